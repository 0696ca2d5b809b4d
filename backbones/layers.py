"""Shared building blocks: written once here, used by every backbone family and decoder.

State-dict names follow timm's VisionTransformer (`patch_embed.proj`, `blocks.N.attn.qkv`,
`blocks.N.mlp.fc1`, ...) so that our ViT weights move to and from timm without renaming.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def to_2tuple(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


class Attention(nn.Module):
    """Multi-head self-attention: one fused qkv projection, fused SDPA kernel (no N x N matrix
    is materialised by the flash / memory-efficient kernels)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}: pick heads from the divisors of dim")
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        drop = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)  # (B, H, N, d)
        return self.proj_drop(self.proj(rearrange(x, "b h n d -> b n (h d)")))

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax attention matrix (B, H, N, N): for pictures, not for training."""
        q, k, _ = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask)
        return x + self.mlp(self.norm2(x))


def transformer(dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0) -> nn.ModuleList:
    """A stack of `depth` pre-norm blocks (a ModuleList so callers can record per-block outputs)."""
    return nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias, drop) for _ in range(depth))


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens with one strided convolution: (B, C, H, W) -> (B, N, D)."""

    def __init__(self, image_size: int | tuple[int, int], patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.grid_size = grid_size(image_size, patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x), "b d gh gw -> b (gh gw) d")


def grid_size(image_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    h, w = to_2tuple(image_size)
    if h % patch_size or w % patch_size:
        image_size = h if h == w else image_size
        raise ValueError(
            f"image_size={image_size} is not divisible by patch_size={patch_size}: "
            f"use an image size that is a multiple of {patch_size} or a patch size that divides it"
        )
    return h // patch_size, w // patch_size


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions (B=1, N=gh*gw, dim): a quarter of the channels each for
    sin(y), cos(y), sin(x), cos(x) (MAE / SimpleViT)."""
    if dim % 4:
        raise ValueError(f"dim={dim} must be a multiple of 4 for 2-D sin-cos positions")
    gh, gw = grid
    y, x = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)[None]  # (1, N, D)


def resize_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Patch positions (1, gh*gw, D) of one grid resampled to another by bicubic interpolation
    (antialiased when shrinking, as timm does): how a ViT takes DINO's small local crops."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    grid = rearrange(pos, "1 (h w) d -> 1 d h w", h=old_grid[0], w=old_grid[1])
    shrink = new_grid[0] < old_grid[0] or new_grid[1] < old_grid[1]
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=shrink)
    return rearrange(grid, "1 d h w -> 1 (h w) d").to(pos.dtype)  # (1, h'*w', D)


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform linears, zero biases, unit norms (MAE / timm ViT initialisation)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_patch_embed(embed: PatchEmbed) -> None:
    """Initialise the patch projection like a linear layer (MAE), not like a convolution."""
    w = embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(embed.proj.bias)


def trunc_normal_(t: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    return nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), ids (B, n) -> (B, n, D): a gather, cheaper than boolean indexing."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


__all__ = [
    "Attention", "Mlp", "Block", "transformer", "PatchEmbed", "grid_size", "sincos_2d", "resize_pos_embed",
    "init_weights", "init_patch_embed", "trunc_normal_", "gather_tokens", "to_2tuple",
]
