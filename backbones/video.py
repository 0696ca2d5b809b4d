"""Clip infrastructure shared by the video families (vit_3d, simple_vit_3d, vivit): the clip
geometry every clip backbone has (`VideoBackbone`), the tubelet embedding (`TubeletEmbed`), and
the vit-pytorch converter helpers that go with them (`TUBELET_RULES`, `square_patch`).
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .base import Backbone, image_size_2d
from .layers import grid_size


class VideoBackbone(Backbone):
    """A backbone over clips (B, C, T, H, W) cut into tubelets of frame_patch_size x patch_size x
    patch_size: input_shape (C, T, H, W), grid_size (T/pf, H/p, W/p), tokens in (t h w) order,
    patchify values in (pf p1 p2 c) order."""

    frames: int
    frame_patch_size: int

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.in_chans, self.frames, *self.image_size)

    @property
    def grid_size(self) -> tuple[int, int, int]:
        h, w = self.image_size
        return self.frames // self.frame_patch_size, h // self.patch_size, w // self.patch_size

    @property
    def patch_pixels(self) -> int:
        return self.frame_patch_size * self.patch_size * self.patch_size * self.in_chans

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, N, pf*p*p*C), tubelets in token order, values (pf p1 p2 c)."""
        p, pf = self.patch_size, self.frame_patch_size
        return rearrange(x, "b c (t pf) (h p1) (w p2) -> b (t h w) (pf p1 p2 c)", pf=pf, p1=p, p2=p)

    def unpatchify(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, pf*p*p*C) -> (B, C, T, H, W), the inverse of patchify."""
        p, pf = self.patch_size, self.frame_patch_size
        gt, gh, gw = self.grid_size
        return rearrange(t, "b (t h w) (pf p1 p2 c) -> b c (t pf) (h p1) (w p2)", t=gt, h=gh, w=gw, pf=pf, p1=p, p2=p)

    def set_geometry(self, image_size: int | tuple[int, int], frames: int, patch_size: int, frame_patch_size: int,
                     in_chans: int) -> None:
        """Validate and store the clip geometry (call first in __init__)."""
        for name, value in (("frames", frames), ("patch_size", patch_size), ("frame_patch_size", frame_patch_size),
                            ("in_chans", in_chans)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if frames % frame_patch_size:
            raise ValueError(f"frames={frames} is not divisible by frame_patch_size={frame_patch_size}: use a clip length "
                             f"that is a multiple of {frame_patch_size} or a frame_patch_size that divides {frames}")
        self.image_size = image_size_2d(image_size)
        grid_size(self.image_size, patch_size)  # raises when the patch size does not divide the frame size
        self.frames, self.frame_patch_size = frames, frame_patch_size
        self.patch_size, self.in_chans = patch_size, in_chans


class TubeletEmbed(nn.Module):
    """Tubelets to tokens: (B, C, T, H, W) -> (B, N, D) in (t h w) order.

    Default: one strided Conv3d (ViViT's tubelet embedding, VideoMAE). `norm=True`: vit-pytorch's
    layout, tubelets flattened as (p1 p2 pf c), LayerNorm, Linear, LayerNorm."""

    def __init__(self, patch_size: int, frame_patch_size: int, in_chans: int, dim: int, norm: bool = False,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.patch_size, self.frame_patch_size, self.norm = patch_size, frame_patch_size, norm
        kernel = (frame_patch_size, patch_size, patch_size)
        if norm:
            tubelet = frame_patch_size * patch_size * patch_size * in_chans
            self.norm_in = nn.LayerNorm(tubelet, eps=norm_eps)
            self.proj = nn.Linear(tubelet, dim)
            self.norm_out = nn.LayerNorm(dim, eps=norm_eps)
        else:
            self.proj = nn.Conv3d(in_chans, dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.norm:
            return rearrange(self.proj(x), "b d t h w -> b (t h w) d")  # (B, N, D)
        p, pf = self.patch_size, self.frame_patch_size
        x = rearrange(x, "b c (t pf) (h p1) (w p2) -> b (t h w) (p1 p2 pf c)", pf=pf, p1=p, p2=p)
        return self.norm_out(self.proj(self.norm_in(x)))  # (B, N, D)


# --------------------------------------------------------------------------- vit-pytorch converter helpers

def square_patch(image_patch_size: int | tuple[int, int]) -> int:
    """vit-pytorch's image_patch_size (an int or a pair) as our square patch_size."""
    ph, pw = (image_patch_size, image_patch_size) if isinstance(image_patch_size, int) else image_patch_size
    if ph != pw:
        raise ValueError(f"image_patch_size={image_patch_size!r}: only square patches convert (ours are square)")
    return int(ph)


#: vit-pytorch's to_patch_embedding (Rearrange, LayerNorm, Linear, LayerNorm) -> TubeletEmbed(norm=True)
TUBELET_RULES = [
    (r"to_patch_embedding\.1\.(weight|bias)", r"patch_embed.norm_in.\1"),
    (r"to_patch_embedding\.2\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"to_patch_embedding\.3\.(weight|bias)", r"patch_embed.norm_out.\1"),
]


__all__ = ["VideoBackbone", "TubeletEmbed", "TUBELET_RULES", "square_patch"]
