"""ViT (Dosovitskiy et al., 2020) and SimpleViT (Beyer et al., 2022).

One class: SimpleViT is a ViT with fixed 2-D sin-cos positions, no class token and mean pooling.
With `distill_token=True` a ViT carries DeiT's distillation token after its class token (prefix
tokens [cls, dist], positions for both, as timm's VisionTransformerDistilled).
Parameter names match timm's VisionTransformer, so weights move between the two unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Backbone, image_size_2d, register
from .layers import (SIZES, NormPatchEmbed, PatchEmbed, init_patch_embed, init_weights, resize_pos_embed, sincos_2d,
                     transformer, trunc_normal_)


class ViT(Backbone):
    supports_token_access = True
    supports_token_drop = True
    supports_mask_token = True
    attention_maps = True
    supports_any_size = True  # forward at other sizes interpolates the positions (DINO's local crops)

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
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
        drop: float = 0.0,
        distill_token: bool = False,
        head_dim: int | None = None,
        mlp_dim: int | None = None,
        proj_bias: bool = True,
        patch_norm: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if distill_token and not class_token:
            raise ValueError("distill_token=True needs a class token (DeiT): use the vit backbone, not simple_vit")
        if size not in SIZES:
            raise ValueError(f"size={size!r} is not one of {', '.join(SIZES)}; or set dim, depth and heads")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool={pool!r}: allowed are 'cls' and 'mean'")
        if pool == "cls" and not class_token:
            raise ValueError("pool='cls' needs class_token=True: use pool='mean' without a class token")
        if pos_embed not in ("learned", "sincos", "sincos_inclusive"):
            raise ValueError(f"pos_embed={pos_embed!r}: allowed are 'learned', 'sincos' and 'sincos_inclusive'")
        d, L, h = SIZES[size]
        dim, depth, heads = dim or d, depth or L, heads or h
        if in_chans < 1 or patch_size < 1 or depth < 1:
            raise ValueError(f"in_chans={in_chans}, patch_size={patch_size}, depth={depth} must all be >= 1")

        self.image_size = image_size_2d(image_size)
        self.patch_size, self.in_chans, self.embed_dim = patch_size, in_chans, dim
        self.num_prefix_tokens = int(class_token) + int(distill_token)
        self.has_distill_token = distill_token
        self.pool_type = pool

        if patch_norm:  # vit-pytorch's layout: LayerNorm, Linear, LayerNorm over (p1 p2 c) patches
            self.patch_embed = NormPatchEmbed(self.image_size, patch_size, in_chans, dim, norm_eps)
        else:
            self.patch_embed = PatchEmbed(self.image_size, patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if distill_token else None
        n_pos = self.num_patches + self.num_prefix_tokens
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, dim))
        else:
            pos = sincos_2d(self.grid_size, dim, inclusive=pos_embed == "sincos_inclusive")
            pos = torch.cat([torch.zeros(1, self.num_prefix_tokens, dim), pos], dim=1)
            self.register_buffer("pos_embed", pos, persistent=False)
        self.blocks = transformer(dim, depth, heads, mlp_ratio, qkv_bias, drop, head_dim=head_dim, proj_bias=proj_bias,
                                  mlp_dim=mlp_dim, norm_eps=norm_eps)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self._init()

    def _init(self) -> None:
        self.apply(init_weights)
        if isinstance(self.patch_embed, PatchEmbed):
            init_patch_embed(self.patch_embed)
        if isinstance(self.pos_embed, nn.Parameter):
            trunc_normal_(self.pos_embed)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        if self.dist_token is not None:
            trunc_normal_(self.dist_token)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm at the built size or any other multiple of the patch size
        (the patch positions are then resampled to the input's grid)."""
        self.check_input(x, any_size=True)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        pos = resize_pos_embed(self.patch_positions(), self.grid_size, grid)  # (1, gh*gw, D)
        return self.forward_tokens(self.patch_embed(x) + pos)  # (B, P+gh*gw, D)

    # -- token-level protocol ------------------------------------------------------------
    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.patch_embed(x)  # (B, N, D)

    def patch_positions(self) -> torch.Tensor:
        return self.pos_embed[:, self.num_prefix_tokens :]  # (1, N, D)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        prefix = [t for t in (self.cls_token, self.dist_token) if t is not None]
        if prefix:
            prefix = torch.cat(prefix, dim=1) + self.pos_embed[:, : self.num_prefix_tokens]  # (1, P, D)
            tokens = torch.cat([prefix.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # (B, P+n, D)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "cls":
            return tokens[:, 0]
        return tokens[:, self.num_prefix_tokens :].mean(dim=1)

    def distill_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.has_distill_token:
            raise ValueError("this ViT has no distillation token: build it with distill_token=True")
        return tokens[:, 1]  # (B, D)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}


@register("vit", example=dict(image_size=28, patch_size=4, in_chans=1, dim=64, depth=2, heads=4))
def vit(
    image_size: int | tuple[int, int] = 224,
    patch_size: int = 16,
    in_chans: int = 3,
    size: str = "base",
    dim: int | None = None,
    depth: int | None = None,
    heads: int | None = None,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    pool: str = "cls",
    drop: float = 0.0,
    distill_token: bool = False,
    class_token: bool = True,
    head_dim: int | None = None,
    mlp_dim: int | None = None,
    proj_bias: bool = True,
    patch_norm: bool = False,
    norm_eps: float = 1e-6,
) -> ViT:
    """ViT: learned positions, a class token, pooling by class token ('cls') or mean of patches;
    `distill_token=True` adds DeiT's distillation token (for the distill objective). The defaults
    are timm's VisionTransformer; head_dim / mlp_dim / proj_bias / patch_norm / norm_eps also
    express vit-pytorch's ViT (see backbones.convert)."""
    return ViT(image_size, patch_size, in_chans, size, dim, depth, heads, mlp_ratio, qkv_bias,
               class_token=class_token, pos_embed="learned", pool=pool, drop=drop, distill_token=distill_token,
               head_dim=head_dim, mlp_dim=mlp_dim, proj_bias=proj_bias, patch_norm=patch_norm, norm_eps=norm_eps)


@register("simple_vit", example=dict(image_size=28, patch_size=4, in_chans=1, dim=64, depth=2, heads=4))
def simple_vit(
    image_size: int | tuple[int, int] = 224,
    patch_size: int = 16,
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
) -> ViT:
    """SimpleViT: fixed 2-D sin-cos positions (big_vision's frequencies), no class token, mean
    pooling. head_dim / mlp_dim / proj_bias / patch_norm / norm_eps as for vit."""
    return ViT(image_size, patch_size, in_chans, size, dim, depth, heads, mlp_ratio, qkv_bias,
               class_token=False, pos_embed="sincos_inclusive", pool="mean", drop=drop, head_dim=head_dim,
               mlp_dim=mlp_dim, proj_bias=proj_bias, patch_norm=patch_norm, norm_eps=norm_eps)
