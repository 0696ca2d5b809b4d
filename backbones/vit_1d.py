"""ViT and SimpleViT over 1-D signals (vit-pytorch's vit_1d / simple_vit_1d).

Input (B, C, L): the signal is cut into L / p patches of p steps, each flattened as (p c) (the 1-D
form of the 2-D (p1 p2 c)), embedded, and run through the same pre-norm blocks as the image ViT.
`vit_1d` has a class token and learned positions and pools by its class token; `simple_vit_1d`
has fixed 1-D sin-cos positions, no class token and mean pooling.

Geometry: `image_size` is the 1-tuple (L,), `input_shape` (C, L), `grid_size` (L // p,),
`patch_pixels` p * C. The masked objectives work on this rank-1 token grid unchanged (MAE over
time patches, SimMIM masking single patches, MPP's mean value per patch).
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .base import Backbone, Classifier, create, register
from .convert import classifier_from, identity_projection, register_reference, register_vit_pytorch, rename
from .layers import SIZES, init_weights, sincos_nd, transformer, trunc_normal_


class PatchEmbed1d(nn.Module):
    """(B, C, L) -> (B, N, D): patches of p steps flattened (p c), then a linear projection;
    `patch_norm`: LayerNorm before and after it (vit-pytorch's layout)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, patch_norm: bool, norm_eps: float):
        super().__init__()
        self.patch_size = patch_size
        patch_dim = patch_size * in_chans
        self.norm_in = nn.LayerNorm(patch_dim, eps=norm_eps) if patch_norm else nn.Identity()
        self.proj = nn.Linear(patch_dim, dim)
        self.norm_out = nn.LayerNorm(dim, eps=norm_eps) if patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rearrange(x, "b c (n p) -> b n (p c)", p=self.patch_size)  # (B, N, p*C)
        return self.norm_out(self.proj(self.norm_in(x)))  # (B, N, D)


class ViT1d(Backbone):
    supports_token_access = True
    supports_token_drop = True
    supports_mask_token = True
    attention_maps = True
    supports_any_size = False  # positions are learned for one length (and DINO gives signals views of that length)

    def __init__(
        self,
        seq_len: int,
        patch_size: int,
        in_chans: int,
        size: str,
        dim: int | None,
        depth: int | None,
        heads: int | None,
        mlp_ratio: float,
        mlp_dim: int | None,
        head_dim: int | None,
        qkv_bias: bool,
        proj_bias: bool,
        class_token: bool,
        pos_embed: str,
        pool: str,
        drop: float,
        patch_norm: bool,
        norm_eps: float,
    ):
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"size={size!r} is not one of {', '.join(SIZES)}; or set dim, depth and heads")
        d, L, h = SIZES[size]
        dim, depth, heads = dim or d, depth or L, heads or h
        if in_chans < 1 or patch_size < 1 or depth < 1 or seq_len < 1:
            raise ValueError(f"in_chans={in_chans}, patch_size={patch_size}, depth={depth}, seq_len={seq_len} "
                             "must all be >= 1")
        if seq_len % patch_size:
            raise ValueError(f"seq_len={seq_len} is not divisible by patch_size={patch_size}: crop or pad the signal "
                             f"to a multiple of {patch_size}, or pick a patch size that divides {seq_len}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool={pool!r}: allowed are 'cls' and 'mean'")
        if pool == "cls" and not class_token:
            raise ValueError("pool='cls' needs class_token=True: use pool='mean' without a class token")

        self.image_size = (seq_len,)
        self.patch_size, self.in_chans, self.embed_dim = patch_size, in_chans, dim
        self.num_prefix_tokens = int(class_token)
        self.pool_type = pool

        self.patch_embed = PatchEmbed1d(patch_size, in_chans, dim, patch_norm, norm_eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.num_patches, dim))
        elif pos_embed == "sincos_inclusive":
            pos = sincos_nd(self.grid_size, dim, inclusive=True)  # (1, N, D), vit-pytorch's frequencies
            pos = torch.cat([torch.zeros(1, self.num_prefix_tokens, dim), pos], dim=1)
            self.register_buffer("pos_embed", pos, persistent=False)
        else:
            raise ValueError(f"pos_embed={pos_embed!r}: allowed are 'learned' and 'sincos_inclusive'")
        self.blocks = transformer(dim, depth, heads, mlp_ratio, qkv_bias, drop, head_dim=head_dim, proj_bias=proj_bias,
                                  mlp_dim=mlp_dim, norm_eps=norm_eps)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

        self.apply(init_weights)
        if isinstance(self.pos_embed, nn.Parameter):
            trunc_normal_(self.pos_embed)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    # -- 1-D geometry -------------------------------------------------------------------------
    @property
    def grid_size(self) -> tuple[int]:
        return (self.image_size[0] // self.patch_size,)

    @property
    def patch_pixels(self) -> int:
        return self.patch_size * self.in_chans

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, L) -> (B, N, p*C), values (p c)."""
        return rearrange(x, "b c (n p) -> b n (p c)", p=self.patch_size)

    def unpatchify(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, p*C) -> (B, C, L), the inverse of patchify."""
        return rearrange(t, "b n (p c) -> b c (n p)", p=self.patch_size, c=self.in_chans)

    # -- token-level protocol ------------------------------------------------------------
    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.patch_embed(x)  # (B, N, D)

    def patch_positions(self) -> torch.Tensor:
        return self.pos_embed[:, self.num_prefix_tokens :]  # (1, N, D)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cls_token is not None:
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)  # (B, 1, D)
            tokens = torch.cat([cls, tokens], dim=1)  # (B, 1+n, D)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "cls":
            return tokens[:, 0]
        return tokens[:, self.num_prefix_tokens :].mean(dim=1)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}


_EXAMPLE = dict(seq_len=128, patch_size=8, in_chans=1, dim=64, depth=2, heads=4)


@register("vit_1d", example=_EXAMPLE)
def vit_1d(
    seq_len: int = 256,
    patch_size: int = 16,
    in_chans: int = 3,
    size: str = "base",
    dim: int | None = None,
    depth: int | None = None,
    heads: int | None = None,
    mlp_ratio: float = 4.0,
    mlp_dim: int | None = None,
    head_dim: int | None = None,
    qkv_bias: bool = False,
    proj_bias: bool = True,
    pool: str = "cls",
    drop: float = 0.0,
    patch_norm: bool = True,
    norm_eps: float = 1e-5,
) -> ViT1d:
    """ViT over signals (B, C, seq_len): class token, learned positions. The defaults are
    vit-pytorch's layout (LayerNorm'd patch embedding, no qkv bias, LayerNorm eps 1e-5); `size`
    as for vit, overridden by dim / depth / heads; pool 'cls' or 'mean' (of the patch tokens)."""
    return ViT1d(seq_len, patch_size, in_chans, size, dim, depth, heads, mlp_ratio, mlp_dim, head_dim, qkv_bias,
                 proj_bias, class_token=True, pos_embed="learned", pool=pool, drop=drop, patch_norm=patch_norm,
                 norm_eps=norm_eps)


@register("simple_vit_1d", example=_EXAMPLE)
def simple_vit_1d(
    seq_len: int = 256,
    patch_size: int = 16,
    in_chans: int = 3,
    size: str = "base",
    dim: int | None = None,
    depth: int | None = None,
    heads: int | None = None,
    mlp_ratio: float = 4.0,
    mlp_dim: int | None = None,
    head_dim: int | None = None,
    qkv_bias: bool = False,
    proj_bias: bool = False,
    drop: float = 0.0,
    patch_norm: bool = True,
    norm_eps: float = 1e-5,
) -> ViT1d:
    """SimpleViT over signals: fixed 1-D sin-cos positions, no class token, mean pooling (the
    defaults are vit-pytorch's simple_vit_1d layout, no attention-output bias included)."""
    return ViT1d(seq_len, patch_size, in_chans, size, dim, depth, heads, mlp_ratio, mlp_dim, head_dim, qkv_bias,
                 proj_bias, class_token=False, pos_embed="sincos_inclusive", pool="mean", drop=drop,
                 patch_norm=patch_norm, norm_eps=norm_eps)


# --------------------------------------------------------------------------- vit-pytorch

_BLOCK_RULES = [
    (r"transformer\.layers\.(\d+)\.0\.norm\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"transformer\.layers\.(\d+)\.0\.to_qkv\.weight", r"blocks.\1.attn.qkv.weight"),
    (r"transformer\.layers\.(\d+)\.0\.to_out(\.0)?\.(weight|bias)", r"blocks.\1.attn.proj.\3"),
    (r"transformer\.layers\.(\d+)\.1\.net\.0\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"transformer\.layers\.(\d+)\.1\.net\.1\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"transformer\.layers\.(\d+)\.1\.net\.[34]\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"to_patch_embedding\.1\.(weight|bias)", r"patch_embed.norm_in.\1"),
    (r"to_patch_embedding\.2\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"to_patch_embedding\.3\.(weight|bias)", r"patch_embed.norm_out.\1"),
]


@register_vit_pytorch("vit_1d")
def _vit_1d(state: dict[str, torch.Tensor], *, seq_len, patch_size, num_classes, dim, depth, heads, mlp_dim,
            channels: int = 3, dim_head: int = 64, dropout: float = 0.0, emb_dropout: float = 0.0) -> Classifier:
    """vit_pytorch.vit_1d.ViT (1.16.0): its head LayerNorm is our final norm, its class token a (D,) vector."""
    state = rename(state, _BLOCK_RULES + [
        (r"cls_token", "cls_token"),
        (r"pos_embedding", "pos_embed"),
        (r"mlp_head\.0\.(weight|bias)", r"norm.\1"),
        (r"mlp_head\.1\.(weight|bias)", r"head.\1"),
    ])
    state["cls_token"] = state["cls_token"].reshape(1, 1, dim)
    if heads == 1 and dim_head == dim:  # vit-pytorch then has no output projection
        identity_projection(state, [f"blocks.{i}.attn.proj" for i in range(depth)], dim)
    backbone = create("vit_1d", seq_len=seq_len, patch_size=patch_size, in_chans=channels, dim=dim, depth=depth,
                      heads=heads, head_dim=dim_head, mlp_dim=mlp_dim, qkv_bias=False, proj_bias=True, drop=dropout,
                      patch_norm=True, norm_eps=1e-5)
    return classifier_from(backbone, state)


@register_vit_pytorch("simple_vit_1d")
def _simple_vit_1d(state: dict[str, torch.Tensor], *, seq_len, patch_size, num_classes, dim, depth, heads, mlp_dim,
                   channels: int = 3, dim_head: int = 64) -> Classifier:
    """vit_pytorch.simple_vit_1d.SimpleViT (1.16.0)."""
    state = rename(state, _BLOCK_RULES + [
        (r"transformer\.norm\.(weight|bias)", r"norm.\1"),
        (r"linear_head\.(weight|bias)", r"head.\1"),
    ])
    backbone = create("simple_vit_1d", seq_len=seq_len, patch_size=patch_size, in_chans=channels, dim=dim, depth=depth,
                      heads=heads, head_dim=dim_head, mlp_dim=mlp_dim, qkv_bias=False, proj_bias=False,
                      patch_norm=True, norm_eps=1e-5)
    return classifier_from(backbone, state)


def _references() -> None:
    # ViT-S / ViT-B widths over a 3-channel signal of 1024 steps in patches of 16 (64 tokens)
    for size, (dim, depth, heads) in {"small": SIZES["small"], "base": SIZES["base"]}.items():
        vp = dict(seq_len=1024, patch_size=16, num_classes=1000, dim=dim, depth=depth, heads=heads, mlp_dim=4 * dim,
                  channels=3, dim_head=64)
        ours = dict(seq_len=1024, patch_size=16, in_chans=3, dim=dim, depth=depth, heads=heads, head_dim=64,
                    mlp_dim=4 * dim)
        register_reference("vit_1d", size, "vit_pytorch.vit_1d:ViT", vp, ours, (3, 1024))
        register_reference("simple_vit_1d", size, "vit_pytorch.simple_vit_1d:SimpleViT", vp, ours, (3, 1024))


_references()
