"""ViT over video clips (ViT-3D) and its SimpleViT twin (simple_vit_3d).

A clip (B, C, T, H, W) is cut into tubelets of frame_patch_size x patch_size x patch_size values;
each tubelet becomes one token, in (t h w) order over the token grid (T/pf, H/p, W/p). From there it
is a plain ViT: a class token (vit_3d) or none (simple_vit_3d), learned or fixed 3-D sin-cos
positions, pre-norm blocks, a final norm. Every token-level capability holds: MAE runs the encoder
on a random subset of tubelets (VideoMAE's tube masking is one choice of that subset), SimMIM and
MPP replace tubelets by a mask token.

The clip geometry (`VideoBackbone`) and `TubeletEmbed`, shared with vivit, are in video.py.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Classifier, create, register
from .convert import classifier_from, identity_projection, register_reference, register_vit_pytorch, rename
from .layers import SIZES, block_rules, init_patch_embed, init_weights, sincos_padded, transformer, trunc_normal_
from .video import TUBELET_RULES, TubeletEmbed, VideoBackbone, square_patch


# --------------------------------------------------------------------------- ViT-3D

class ViT3D(VideoBackbone):
    supports_token_access = True
    supports_token_drop = True
    supports_mask_token = True
    attention_maps = True

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        frames: int = 16,
        patch_size: int = 16,
        frame_patch_size: int = 2,
        in_chans: int = 3,
        size: str = "base",
        dim: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = True,
        pos_embed: str = "learned",
        pool: str = "cls",
        fc_norm: bool = False,
        drop: float = 0.0,
        head_dim: int | None = None,
        mlp_dim: int | None = None,
        proj_bias: bool = True,
        patch_norm: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.set_geometry(image_size, frames, patch_size, frame_patch_size, in_chans)
        if size not in SIZES:
            raise ValueError(f"size={size!r} is not one of {', '.join(SIZES)}; or set dim, depth and heads")
        if pool not in ("cls", "mean", "mean_all"):
            raise ValueError(f"pool={pool!r}: allowed are 'cls' (class token), 'mean' (mean of the tubelet tokens) and "
                             "'mean_all' (mean of every token, class token included: vit-pytorch's ViT-3D)")
        if pool in ("cls", "mean_all") and not class_token:
            raise ValueError(f"pool={pool!r} needs class_token=True: use pool='mean' without a class token")
        if pos_embed not in ("learned", "sincos", "sincos_inclusive"):
            raise ValueError(f"pos_embed={pos_embed!r}: allowed are 'learned', 'sincos' and 'sincos_inclusive'")
        d, L, h = SIZES[size]
        dim, depth, heads = dim or d, depth or L, heads or h
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1")

        self.embed_dim = dim
        self.num_prefix_tokens = int(class_token)
        self.pool_type, self.fc_norm = pool, fc_norm

        self.patch_embed = TubeletEmbed(patch_size, frame_patch_size, in_chans, dim, norm=patch_norm, norm_eps=norm_eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.num_patches, dim))
        else:
            pos = sincos_padded(self.grid_size, dim, inclusive=pos_embed == "sincos_inclusive")  # (1, N, D)
            pos = torch.cat([torch.zeros(1, self.num_prefix_tokens, dim), pos], dim=1)
            self.register_buffer("pos_embed", pos, persistent=False)
        self.blocks = transformer(dim, depth, heads, mlp_ratio, qkv_bias, drop, head_dim=head_dim, proj_bias=proj_bias,
                                  mlp_dim=mlp_dim, norm_eps=norm_eps)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self._init()

    def _init(self) -> None:
        self.apply(init_weights)
        if not self.patch_embed.norm:
            init_patch_embed(self.patch_embed)
        if isinstance(self.pos_embed, nn.Parameter):
            trunc_normal_(self.pos_embed)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    # -- token-level protocol ------------------------------------------------------------
    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.patch_embed(x)  # (B, N, D)

    def patch_positions(self) -> torch.Tensor:
        return self.pos_embed[:, self.num_prefix_tokens:]  # (1, N, D)

    def add_prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cls_token is None:
            return tokens
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, tokens], dim=1)  # (B, 1+n, D)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, n, D) with positions, any subset of the tubelets -> (B, P+n, D). With
        fc_norm the final norm waits for pool(), so these tokens are not normalised."""
        x = self.add_prefix(tokens)
        for block in self.blocks:
            x = block(x)
        return x if self.fc_norm else self.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "cls":
            out = tokens[:, 0]
        elif self.pool_type == "mean":
            out = tokens[:, self.num_prefix_tokens:].mean(dim=1)
        else:
            out = tokens.mean(dim=1)
        return self.norm(out) if self.fc_norm else out  # (B, D)

    def pool_only_parameters(self) -> list[nn.Parameter]:
        """With fc_norm the final LayerNorm acts on the pooled vector only: no token depends on it."""
        return list(self.norm.parameters()) if self.fc_norm else []

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.no_grad()
    def attention_probs(self, x: torch.Tensor, block: int = -1) -> torch.Tensor:
        """Softmax attention (B, heads, P+N, P+N) of one block (default the last) on clips x."""
        tokens = self.add_prefix(self.embed_patches(x) + self.patch_positions())
        index = range(len(self.blocks))[block]
        for blk in self.blocks[:index]:
            tokens = blk(tokens)
        blk = self.blocks[index]
        return blk.attn.attention_probs(blk.norm1(tokens))


_EXAMPLE = dict(image_size=16, frames=4, patch_size=4, frame_patch_size=2, in_chans=1, dim=48, depth=2, heads=4)


@register("vit_3d", example=_EXAMPLE)
def vit_3d(
    image_size: int | tuple[int, int] = 224,
    frames: int = 16,
    patch_size: int = 16,
    frame_patch_size: int = 2,
    in_chans: int = 3,
    size: str = "base",
    dim: int | None = None,
    depth: int | None = None,
    heads: int | None = None,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    pool: str = "cls",
    class_token: bool = True,
    fc_norm: bool = False,
    drop: float = 0.0,
    head_dim: int | None = None,
    mlp_dim: int | None = None,
    proj_bias: bool = True,
    patch_norm: bool = False,
    norm_eps: float = 1e-6,
) -> ViT3D:
    """ViT over clips (B, C, T, H, W): tubelets of frame_patch_size x patch_size x patch_size, learned
    positions, a class token; pool 'cls', 'mean' (tubelet tokens) or 'mean_all' (every token).
    `fc_norm=True` applies the final LayerNorm to the pooled vector instead of every token (timm's
    name; vit-pytorch's ViT-3D head). head_dim / mlp_dim / proj_bias / patch_norm / norm_eps express
    vit-pytorch's layout (see the converter below); the defaults follow timm / VideoMAE (Conv3d
    tubelets, qkv bias, LayerNorm eps 1e-6)."""
    return ViT3D(image_size, frames, patch_size, frame_patch_size, in_chans, size, dim, depth, heads, mlp_ratio,
                 qkv_bias, class_token=class_token, pos_embed="learned", pool=pool, fc_norm=fc_norm, drop=drop,
                 head_dim=head_dim, mlp_dim=mlp_dim, proj_bias=proj_bias, patch_norm=patch_norm, norm_eps=norm_eps)


@register("simple_vit_3d", example=_EXAMPLE)
def simple_vit_3d(
    image_size: int | tuple[int, int] = 224,
    frames: int = 16,
    patch_size: int = 16,
    frame_patch_size: int = 2,
    in_chans: int = 3,
    size: str = "base",
    dim: int | None = None,
    depth: int | None = None,
    heads: int | None = None,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    drop: float = 0.0,
    head_dim: int | None = None,
    mlp_dim: int | None = None,
    proj_bias: bool = True,
    patch_norm: bool = False,
    norm_eps: float = 1e-6,
) -> ViT3D:
    """SimpleViT over clips: fixed 3-D sin-cos positions (big_vision's frequencies, channels
    [x sin, x cos, y sin, y cos, t sin, t cos], zero-padded when dim is not a multiple of 6), no class
    token, mean pooling. Options as for vit_3d."""
    return ViT3D(image_size, frames, patch_size, frame_patch_size, in_chans, size, dim, depth, heads, mlp_ratio,
                 qkv_bias, class_token=False, pos_embed="sincos_inclusive", pool="mean", drop=drop, head_dim=head_dim,
                 mlp_dim=mlp_dim, proj_bias=proj_bias, patch_norm=patch_norm, norm_eps=norm_eps)


# --------------------------------------------------------------------------- vit-pytorch converters

@register_vit_pytorch("vit_3d")
def _vit_3d(state: dict[str, torch.Tensor], *, image_size, image_patch_size, frames, frame_patch_size, num_classes, dim,
            depth, heads, mlp_dim, pool: str = "cls", channels: int = 3, dim_head: int = 64, dropout: float = 0.0,
            emb_dropout: float = 0.0) -> Classifier:
    """vit_pytorch.vit_3d.ViT (1.16.0). Its head is LayerNorm + Linear on the pooled token and its
    'mean' pool averages every token, class token included: pool='mean_all' with fc_norm here."""
    image_patch_size = square_patch(image_patch_size)
    state = rename(state, block_rules(r"transformer\.layers", "blocks") + TUBELET_RULES + [
        (r"cls_token", "cls_token"),
        (r"pos_embedding", "pos_embed"),
        (r"mlp_head\.0\.(weight|bias)", r"norm.\1"),
        (r"mlp_head\.1\.(weight|bias)", r"head.\1"),
    ])
    if heads == 1 and dim_head == dim:
        identity_projection(state, [f"blocks.{i}.attn.proj" for i in range(depth)], dim)
    mean = pool != "cls"
    backbone = create("vit_3d", image_size=image_size, frames=frames, patch_size=image_patch_size,
                      frame_patch_size=frame_patch_size, in_chans=channels, dim=dim, depth=depth, heads=heads,
                      head_dim=dim_head, mlp_dim=mlp_dim, qkv_bias=False, pool="mean_all" if mean else "cls",
                      fc_norm=mean, patch_norm=True, norm_eps=1e-5)
    return classifier_from(backbone, state)


@register_vit_pytorch("simple_vit_3d")
def _simple_vit_3d(state: dict[str, torch.Tensor], *, image_size, image_patch_size, frames, frame_patch_size,
                   num_classes, dim, depth, heads, mlp_dim, channels: int = 3, dim_head: int = 64) -> Classifier:
    """vit_pytorch.simple_vit_3d.SimpleViT (1.16.0)."""
    image_patch_size = square_patch(image_patch_size)
    state = rename(state, block_rules(r"transformer\.layers", "blocks") + TUBELET_RULES + [
        (r"transformer\.norm\.(weight|bias)", r"norm.\1"),
        (r"linear_head\.(weight|bias)", r"head.\1"),
    ])
    backbone = create("simple_vit_3d", image_size=image_size, frames=frames, patch_size=image_patch_size,
                      frame_patch_size=frame_patch_size, in_chans=channels, dim=dim, depth=depth, heads=heads,
                      head_dim=dim_head, mlp_dim=mlp_dim, qkv_bias=False, proj_bias=False, patch_norm=True, norm_eps=1e-5)
    return classifier_from(backbone, state)


# --------------------------------------------------------------------------- reference configurations

for _size, (_dim, _depth, _heads) in {"small": (384, 12, 6), "base": (768, 12, 12)}.items():
    _vp = dict(image_size=224, image_patch_size=16, frames=16, frame_patch_size=2, num_classes=1000, dim=_dim,
               depth=_depth, heads=_heads, mlp_dim=4 * _dim, dim_head=64)
    _ours = dict(image_size=224, frames=16, patch_size=16, frame_patch_size=2, in_chans=3, dim=_dim, depth=_depth,
                 heads=_heads, head_dim=64, mlp_dim=4 * _dim, qkv_bias=False, patch_norm=True, norm_eps=1e-5)
    register_reference("vit_3d", _size, "vit_pytorch.vit_3d:ViT", _vp, _ours, (3, 16, 224, 224))
    register_reference("simple_vit_3d", _size, "vit_pytorch.simple_vit_3d:SimpleViT", _vp,
                       {**_ours, "proj_bias": False}, (3, 16, 224, 224))
