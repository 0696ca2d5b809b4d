"""ViT for small datasets (Lee, Lee & Song, 2021): shifted patch tokenisation + locality self-attention.

A ViT (class token, learned positions, pre-norm blocks) with two changes that give it the locality
a small dataset cannot teach:

- Shifted patch tokenisation (SPT): the image and four copies shifted by `shift` pixels are
  concatenated on channels (5 C channels), cut into (p1 p2 c) patches, LayerNorm'd and projected.
  Each token therefore also sees a `shift`-wide strip of its neighbours. The paper shifts by half a
  patch in the four diagonal directions; vit-pytorch by one pixel left / right / down / up
  (`shift=1, shift_directions="cardinal"`).
- Locality self-attention (LSA): a learned temperature (the log of the softmax scale, started at
  log(head_dim ** -0.5)) and the diagonal of the attention masked out, so a token attends to the
  others and never to itself. The mask is built for the sequence each call receives, so it stays
  right on the shortened sequences of MAE.

SPT gives one token per patch, so every token-level capability of the ViT holds. One caveat for
masked objectives: a visible token's shifted copies cover a `shift`-wide border of its masked
neighbours. `hide_masked` therefore blanks the masked patches' pixels before tokenising, and MAE,
SimMIM and MPP call it, so nothing of a masked patch leaks into a visible token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .base import Classifier, create, image_size_2d, register
from .convert import classifier_from, register_reference, register_vit_pytorch, rename
from .layers import Attention, Block
from .vit import ViT

DIRECTIONS = ("diagonal", "cardinal")


def shift_offsets(shift: int, directions: str) -> list[tuple[int, int]]:
    """The four (dx, dy) moves of the image content, in the order their copies are stacked.
    'diagonal' (the paper): up-left, up-right, down-left, down-right; 'cardinal' (vit-pytorch):
    right, left, down, up."""
    s = shift
    if directions == "diagonal":
        return [(-s, -s), (s, -s), (-s, s), (s, s)]
    return [(s, 0), (-s, 0), (0, s), (0, -s)]


class ShiftedPatchTokens(nn.Module):
    """SPT: (B, C, H, W) -> (B, N, D). The image and its four shifted copies (zeros shifted in)
    stacked on channels, (p1 p2 c) patches, LayerNorm, linear."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, shift: int, directions: str, norm_eps: float):
        super().__init__()
        self.patch_size = patch_size
        self.offsets = shift_offsets(shift, directions)
        patch_dim = patch_size * patch_size * in_chans * (1 + len(self.offsets))
        self.norm = nn.LayerNorm(patch_dim, eps=norm_eps)
        self.proj = nn.Linear(patch_dim, dim)

    def stack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 5C, H, W): the image, then its copies with content moved by each offset."""
        # F.pad with (dx, -dx, dy, -dy) pads one side and crops the other: content moves by (dx, dy)
        return torch.cat([x, *(F.pad(x, (dx, -dx, dy, -dy)) for dx, dy in self.offsets)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stack(x)  # (B, 5C, H, W)
        p = self.patch_size
        x = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)  # (B, N, p*p*5C)
        return self.proj(self.norm(x))  # (B, N, D)


class LocalitySelfAttention(Attention):
    """Attention with a learned temperature and no attention of a token to itself. The fused SDPA
    kernel takes a boolean mask; the learned scale is applied to q (SDPA's own `scale` is a
    constant and would not learn)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool, proj_drop: float, head_dim: int | None, proj_bias: bool):
        super().__init__(dim, heads, qkv_bias=qkv_bias, proj_drop=proj_drop, head_dim=head_dim, proj_bias=proj_bias)
        self.temperature = nn.Parameter(torch.tensor(math.log(self.head_dim ** -0.5)))

    @staticmethod
    def locality_mask(n: int, device: torch.device, attn_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """(n, n) boolean, True where attention is allowed: everywhere but the diagonal. A lone
        token (n = 1) keeps itself, as vit-pytorch's softmax over one masked entry does."""
        if n == 1:
            return attn_mask
        mask = ~torch.eye(n, dtype=torch.bool, device=device)
        if attn_mask is None:
            return mask
        if attn_mask.dtype == torch.bool:
            return attn_mask & mask
        return attn_mask.masked_fill(~mask, float("-inf"))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return q * self.temperature.exp(), k, v  # (B, H, N, d) each, the scale folded into q

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._qkv(x)
        mask = self.locality_mask(x.shape[1], x.device, attn_mask)
        drop = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=1.0)  # (B, H, N, d)
        return self.proj_drop(self.proj(rearrange(x, "b h n d -> b n (h d)")))

    def attention_probs(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The softmax attention matrix (B, H, N, N), zero on the diagonal: for pictures."""
        q, k, _ = self._qkv(x)
        dots = q @ k.transpose(-2, -1)  # (B, H, N, N)
        mask = self.locality_mask(x.shape[1], x.device, attn_mask)
        if mask is not None:
            dots = dots.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else dots + mask
        return dots.softmax(dim=-1)


class LSABlock(Block):
    """A pre-norm block whose attention is locality self-attention."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, qkv_bias: bool, drop: float, head_dim: int | None,
                 proj_bias: bool, norm_eps: float):
        super().__init__(dim, heads, qkv_bias=qkv_bias, drop=drop, head_dim=head_dim, proj_bias=proj_bias,
                         mlp_dim=mlp_dim, norm_eps=norm_eps)
        self.attn = LocalitySelfAttention(dim, heads, qkv_bias, drop, head_dim, proj_bias)


class SmallDataViT(ViT):
    """A ViT whose patch embedding is SPT and whose attention is LSA; everything else (class token,
    learned positions, token-level protocol, positions resampled for other input sizes) is the ViT's."""

    def __init__(self, image_size, patch_size, in_chans, dim, depth, heads, head_dim, mlp_dim, qkv_bias, proj_bias,
                 pool, drop, shift, shift_directions, norm_eps):
        if shift_directions not in DIRECTIONS:
            raise ValueError(f"shift_directions={shift_directions!r}: allowed are 'diagonal' (the paper) and "
                             "'cardinal' (vit-pytorch)")
        shift = max(1, patch_size // 2) if shift is None else shift
        if not 1 <= shift < min(image_size_2d(image_size)):
            raise ValueError(f"shift={shift} must be at least 1 pixel and less than the image size {image_size} "
                             "(the paper shifts by half a patch, what shift=None picks; vit-pytorch by 1)")
        # the ViT builds a patch embedding and blocks that are replaced below: one block (depth=1) keeps that cheap
        super().__init__(image_size, patch_size, in_chans, dim=dim, depth=1, heads=heads, qkv_bias=qkv_bias,
                         class_token=True, pos_embed="learned", pool=pool, drop=drop, head_dim=head_dim, mlp_dim=mlp_dim,
                         proj_bias=proj_bias, norm_eps=norm_eps)
        self.patch_embed = ShiftedPatchTokens(patch_size, in_chans, dim, shift, shift_directions, norm_eps)
        self.blocks = nn.ModuleList(LSABlock(dim, heads, mlp_dim, qkv_bias, drop, head_dim, proj_bias, norm_eps)
                                    for _ in range(depth))
        self._init()  # the ViT's initialisation over the new modules
        for block in self.blocks:
            nn.init.constant_(block.attn.temperature, math.log(block.attn.head_dim ** -0.5))

    def hide_masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The masked patches' pixels zeroed, so the shifted copies in their neighbours' tokens show
        nothing of them (MAE, SimMIM and MPP call this before embedding)."""
        (gh, gw), p = self.grid_size, self.patch_size
        pixel_mask = repeat(mask.bool(), "b (h w) -> b 1 (h p1) (w p2)", h=gh, w=gw, p1=p, p2=p)  # (B, 1, H, W)
        return x.masked_fill(pixel_mask, 0.0)


@register("small_data_vit", example=dict(image_size=28, patch_size=4, in_chans=1, dim=64, depth=2, heads=4, head_dim=16))
def small_data_vit(
    image_size: int | tuple[int, int] = 32,
    patch_size: int = 4,
    in_chans: int = 3,
    dim: int = 192,
    depth: int = 9,
    heads: int = 12,
    head_dim: int | None = 16,
    mlp_ratio: float = 2.0,
    mlp_dim: int | None = None,
    qkv_bias: bool = False,
    proj_bias: bool = True,
    pool: str = "cls",
    drop: float = 0.0,
    shift: int | None = None,
    shift_directions: str = "diagonal",
    norm_eps: float = 1e-5,
) -> SmallDataViT:
    """ViT for small datasets. The defaults are the paper's CIFAR model (32 px, 4-px patches, dim
    192, depth 9, 12 heads of 16, MLP ratio 2, SPT shifting half a patch diagonally). `shift` in
    pixels (None: half the patch); `shift_directions` 'diagonal' (paper) or 'cardinal' (vit-pytorch,
    with shift=1); pool 'cls' or 'mean' (of the patch tokens)."""
    if dim < 1 or depth < 1 or heads < 1:
        raise ValueError(f"dim={dim}, depth={depth}, heads={heads} must all be >= 1")
    if mlp_dim is None:
        mlp_dim = int(dim * mlp_ratio)
    return SmallDataViT(image_size, patch_size, in_chans, dim, depth, heads, head_dim, mlp_dim, qkv_bias, proj_bias,
                        pool, drop, shift, shift_directions, norm_eps)


# --------------------------------------------------------------------------- vit-pytorch

_RULES = [
    (r"transformer\.layers\.(\d+)\.0\.norm\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"transformer\.layers\.(\d+)\.0\.temperature", r"blocks.\1.attn.temperature"),
    (r"transformer\.layers\.(\d+)\.0\.to_qkv\.weight", r"blocks.\1.attn.qkv.weight"),
    (r"transformer\.layers\.(\d+)\.0\.to_out\.0\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"transformer\.layers\.(\d+)\.1\.net\.0\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"transformer\.layers\.(\d+)\.1\.net\.1\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"transformer\.layers\.(\d+)\.1\.net\.4\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"to_patch_embedding\.to_patch_tokens\.1\.(weight|bias)", r"patch_embed.norm.\1"),
    (r"to_patch_embedding\.to_patch_tokens\.2\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"cls_token", "cls_token"),
    (r"pos_embedding", "pos_embed"),
    (r"mlp_head\.0\.(weight|bias)", r"norm.\1"),  # vit-pytorch's head LayerNorm is our final norm
    (r"mlp_head\.1\.(weight|bias)", r"head.\1"),
]


@register_vit_pytorch("small_data_vit")
def _small_data_vit(state: dict[str, torch.Tensor], *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim,
                    pool: str = "cls", channels: int = 3, dim_head: int = 64, dropout: float = 0.0,
                    emb_dropout: float = 0.0) -> Classifier:
    """vit_pytorch.vit_for_small_dataset.ViT (1.16.0)."""
    if pool != "cls":
        raise ValueError(f"pool={pool!r}: vit-pytorch's small-dataset ViT mean-pools before its final LayerNorm and "
                         "over the class token too, which our tokens-after-the-norm protocol cannot express; only "
                         "pool='cls' models convert")
    backbone_kwargs = dict(image_size=image_size, patch_size=patch_size, in_chans=channels, dim=dim, depth=depth,
                           heads=heads, head_dim=dim_head, mlp_dim=mlp_dim, qkv_bias=False, proj_bias=True, pool="cls",
                           drop=dropout, shift=1, shift_directions="cardinal", norm_eps=1e-5)
    return classifier_from(create("small_data_vit", **backbone_kwargs), rename(state, _RULES))


def _references() -> None:
    # small: the paper's CIFAR model; base: ViT-B/16 at 224 px with SPT + LSA
    configs = {
        "small": (dict(image_size=32, patch_size=4, dim=192, depth=9, heads=12, mlp_dim=384, dim_head=16), (3, 32, 32)),
        "base": (dict(image_size=224, patch_size=16, dim=768, depth=12, heads=12, mlp_dim=3072, dim_head=64),
                 (3, 224, 224)),
    }
    for size, (kw, shape) in configs.items():
        vp = dict(kw, num_classes=1000, channels=3)
        ours = dict(image_size=kw["image_size"], patch_size=kw["patch_size"], in_chans=3, dim=kw["dim"],
                    depth=kw["depth"], heads=kw["heads"], head_dim=kw["dim_head"], mlp_dim=kw["mlp_dim"], qkv_bias=False,
                    shift=1, shift_directions="cardinal", norm_eps=1e-5)
        register_reference("small_data_vit", size, "vit_pytorch.vit_for_small_dataset:ViT", vp, ours, shape)


_references()
