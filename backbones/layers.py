"""Shared building blocks: written once here, used by every backbone family and decoder.

State-dict names follow timm's VisionTransformer (`patch_embed.proj`, `blocks.N.attn.qkv`,
`blocks.N.mlp.fc1`, ...) so that our ViT weights move to and from timm without renaming.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


# ViT sizes by name -> (dim, depth, heads), as in the ViT / DeiT papers (`size=` of the plain token families)
SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


def to_2tuple(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


class Attention(nn.Module):
    """Multi-head self-attention: one fused qkv projection, fused SDPA kernel (no N x N matrix
    is materialised by the flash / memory-efficient kernels). `head_dim` sets the width of each
    head independently of `dim` (vit-pytorch's dim_head; inner width heads * head_dim)."""

    # eval.attention records the layers that say so: self-attention whose attention_probs(same
    # inputs as forward) gives the (B, H, N, N) matrix of that call (subclasses inherit it)
    records_attention = True

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 head_dim: int | None = None, proj_bias: bool = True):
        super().__init__()
        if head_dim is None and dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}: pick heads from the divisors of dim, or set head_dim")
        self.heads = heads
        self.head_dim = head_dim or dim // heads
        inner = self.heads * self.head_dim
        self.qkv = nn.Linear(dim, inner * 3, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        drop = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)  # (B, H, N, d)
        return self.proj_drop(self.proj(rearrange(x, "b h n d -> b n (h d)")))

    def attention_probs(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The softmax attention matrix (B, H, N, N): for pictures, not for training."""
        q, k, _ = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        dots = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if attn_mask is not None:
            dots = dots.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else dots + attn_mask
        return dots.softmax(dim=-1)


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
    """Pre-norm transformer block: x + attn(norm(x)), x + mlp(norm(x)). `mlp_dim` overrides
    dim * mlp_ratio; `norm_eps` 1e-6 as timm's ViT (vit-pytorch: 1e-5)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 head_dim: int | None = None, proj_bias: bool = True, mlp_dim: int | None = None, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias, proj_drop=drop, head_dim=head_dim, proj_bias=proj_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim or int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask)
        return x + self.mlp(self.norm2(x))


def transformer(dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                **block_kwargs) -> nn.ModuleList:
    """A stack of `depth` pre-norm blocks (a ModuleList so callers can record per-block outputs);
    `block_kwargs` go to every Block (head_dim, proj_bias, mlp_dim, norm_eps)."""
    return nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias, drop, **block_kwargs) for _ in range(depth))


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens with one strided convolution: (B, C, H, W) -> (B, N, D)."""

    def __init__(self, image_size: int | tuple[int, int], patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.grid_size = grid_size(image_size, patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x), "b d gh gw -> b (gh gw) d")


class NormPatchEmbed(nn.Module):
    """Patches flattened as (p1 p2 c), LayerNorm, linear projection, LayerNorm: vit-pytorch's
    patch embedding (B, C, H, W) -> (B, N, D), for weights brought from that package."""

    def __init__(self, image_size: int | tuple[int, int], patch_size: int, in_chans: int, dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.grid_size = grid_size(image_size, patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_size = patch_size
        patch_dim = patch_size * patch_size * in_chans
        self.norm_in = nn.LayerNorm(patch_dim, eps=norm_eps)
        self.proj = nn.Linear(patch_dim, dim)
        self.norm_out = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        x = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)  # (B, N, p*p*C)
        return self.norm_out(self.proj(self.norm_in(x)))  # (B, N, D)


def grid_size(image_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    h, w = to_2tuple(image_size)
    if h % patch_size or w % patch_size:
        image_size = h if h == w else image_size
        raise ValueError(
            f"image_size={image_size} is not divisible by patch_size={patch_size}: "
            f"use an image size that is a multiple of {patch_size} or a patch size that divides it"
        )
    return h // patch_size, w // patch_size


def sincos_nd(grid: tuple[int, ...], dim: int, temperature: float = 10000.0, inclusive: bool = False) -> torch.Tensor:
    """Fixed sine-cosine positions (1, prod(grid), dim) over a grid of any rank, flattened in
    row-major order: for each axis from the last (x) to the first, dim / (2 * rank) channels of
    sin then cos. Frequencies 1 / temperature ** (i / F), i < F (MAE); `inclusive` divides by
    F - 1 instead, so the last is 1 / temperature (big_vision's SimpleViT, vit-pytorch)."""
    rank = len(grid)
    if dim % (2 * rank):
        raise ValueError(f"dim={dim} must be a multiple of {2 * rank} for {rank}-D sin-cos positions")
    f = dim // (2 * rank)
    omega = 1.0 / temperature ** (torch.arange(f, dtype=torch.float32) / max(1, f - 1 if inclusive else f))
    coords = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in grid], indexing="ij")
    parts = []
    for axis in reversed(range(rank)):
        angle = coords[axis].flatten()[:, None] * omega[None, :]  # (N, F)
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1)[None]  # (1, N, D)


def sincos_padded(grid: tuple[int, ...], dim: int, inclusive: bool = False) -> torch.Tensor:
    """Fixed sin-cos positions (1, N, dim) over a grid of any rank for any dim: the largest multiple
    of 2 * rank channels carry sin-cos (sincos_nd), the rest are zero (vit-pytorch pads the same way)."""
    usable = dim - dim % (2 * len(grid))
    if usable == 0:
        raise ValueError(f"dim={dim} is too small for {len(grid)}-D sin-cos positions: use dim >= {2 * len(grid)}")
    return F.pad(sincos_nd(tuple(grid), usable, inclusive=inclusive), (0, dim - usable))


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0, inclusive: bool = False) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions (1, gh*gw, dim): a quarter of the channels each for
    sin(x), cos(x), sin(y), cos(y) (MAE; `inclusive`: SimpleViT's frequencies)."""
    if dim % 4:
        raise ValueError(f"dim={dim} must be a multiple of 4 for 2-D sin-cos positions")
    return sincos_nd(tuple(grid), dim, temperature, inclusive)


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
    elif isinstance(module, nn.LayerNorm):  # (bias-free or non-affine LayerNorms too)
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
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


class DropPath(nn.Module):
    """Stochastic depth per sample: in training, each sample's residual branch is dropped with
    probability p and the kept ones scaled by 1 / (1 - p); the identity in eval mode."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


# --------------------------------------------------------------------------- masks over a token grid (SimMIM)


def _grid_mask(mask: torch.Tensor, batch: int, grid: tuple[int, int]) -> torch.Tensor:
    """A mask (B, N) over the output grid, checked, as bool (B, gh, gw)."""
    gh, gw = grid
    if tuple(mask.shape) != (batch, gh * gw):
        raise ValueError(f"mask of shape {tuple(mask.shape)}: expected (B, N) = ({batch}, {gh * gw}), one entry per "
                         f"output token of the {gh}x{gw} grid (patchify order)")
    return rearrange(mask.bool(), "b (h w) -> b h w", h=gh)


def upsample_mask(mask: torch.Tensor, batch: int, grid: tuple[int, int], factor: int) -> torch.Tensor:
    """A mask (B, N) over the output grid -> (B, gh*factor, gw*factor, 1) bool over a finer map
    (each output token covers factor x factor positions of it, e.g. a first stage's map)."""
    m = _grid_mask(mask, batch, grid)
    return m.repeat_interleave(factor, 1).repeat_interleave(factor, 2)[..., None]


def zero_masked_pixels(x: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Images x (B, C, H, W) with the pixels under every masked token set to 0: mask (B, N) over
    the output token grid `grid` (gh, gw), each token covering an (H/gh) x (W/gw) block. What a
    backbone with an overlapping (convolutional) stem does before it, so that no visible token
    sees any masked pixel through the kernels that straddle a mask boundary (SimMIM)."""
    (gh, gw), (h, w) = grid, x.shape[-2:]
    if h % gh or w % gw:
        raise ValueError(f"an image of {h}x{w} pixels does not split into the {gh}x{gw} token grid")
    m = _grid_mask(mask, x.shape[0], grid).repeat_interleave(h // gh, 1).repeat_interleave(w // gw, 2)
    return x.masked_fill(m[:, None], 0.0)  # (B, C, H, W)


# --------------------------------------------------------------------------- hierarchical families on channels-last maps
# (Twins-SVT, ScalableViT): maps (B, H, W, C), windows, sub-sampled attention, positional convolutions


def per_stage(name: str, value: Any, n: int) -> list:
    """One value per stage: a list of n values as given, or a single value repeated."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}={list(value)} has {len(value)} entries but the model has {n} stages: give one "
                             f"value per stage or a single value for all of them")
        return list(value)
    return [value] * n


def to_windows(x: torch.Tensor, wh: int, ww: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, H, W, C) -> windows (B*nw, wh*ww, C) in (b, row, col) order, and the key mask
    (B*nw, 1, 1, wh*ww) (True = a real token) when the map had to be padded to tile, else None."""
    b, h, w, _ = x.shape
    ph, pw = (-h) % wh, (-w) % ww
    mask = None
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
        valid = torch.zeros(h + ph, w + pw, dtype=torch.bool, device=x.device)
        valid[:h, :w] = True
        mask = rearrange(valid, "(x w1) (y w2) -> (x y) (w1 w2)", w1=wh, w2=ww).repeat(b, 1)[:, None, None, :]
    return rearrange(x, "b (x w1) (y w2) c -> (b x y) (w1 w2) c", w1=wh, w2=ww), mask


def from_windows(t: torch.Tensor, wh: int, ww: int, h: int, w: int) -> torch.Tensor:
    """The inverse of to_windows: (B*nw, wh*ww, C) -> (B, h, w, C), padding cropped off."""
    nx, ny = -(-h // wh), -(-w // ww)
    x = rearrange(t, "(b x y) (w1 w2) c -> b (x w1) (y w2) c", x=nx, y=ny, w1=wh, w2=ww)
    return x[:, :h, :w]


def window_shape(window: int | None, h: int, w: int) -> tuple[int, int]:
    """A window never larger than the map (one padded window and the whole map are the same
    attention); None: the whole map."""
    return (h, w) if window is None else (min(window, h), min(window, w))


class SubsampledAttention(nn.Module):
    """Every token attends to keys and values taken from an r x r, stride-r convolution of the
    map (Twins' GSA; ScalableViT's SSA, whose key width `dim_key` and value width `dim_value` per
    head are set apart from the model width). A map that r does not tile is zero-padded first."""

    def __init__(self, dim: int, heads: int, dim_key: int, dim_value: int, reduction: int, qkv_bias: bool = False,
                 proj_drop: float = 0.0):
        super().__init__()
        if reduction < 1:
            raise ValueError(f"reduction={reduction}: the key / value stride must be >= 1")
        self.heads, self.reduction = heads, reduction
        self.splits = (heads * dim_key, heads * dim_value)
        self.q = nn.Linear(dim, heads * dim_key, bias=qkv_bias)
        self.kv = nn.Conv2d(dim, heads * (dim_key + dim_value), reduction, stride=reduction, bias=qkv_bias)
        self.proj = nn.Linear(heads * dim_value, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        _, h, w, _ = x.shape
        r = self.reduction
        q = rearrange(self.q(x), "b x y (n d) -> b n (x y) d", n=self.heads)  # (B, heads, H*W, dk)
        fmap = rearrange(x, "b x y c -> b c x y")
        if h % r or w % r:
            fmap = F.pad(fmap, (0, (-w) % r, 0, (-h) % r))
        k, v = self.kv(fmap).split(self.splits, dim=1)  # (B, heads*dk, H/r, W/r), (B, heads*dv, H/r, W/r)
        k, v = (rearrange(t, "b (n d) x y -> b n (x y) d", n=self.heads) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, dv)
        return self.proj_drop(self.proj(rearrange(out, "b n (x y) d -> b x y (n d)", x=h)))  # (B, H, W, C)


class MapBlock(nn.Module):
    """A pre-norm pair on a channels-last map: x + attn(norm1(x)), then x + mlp(norm2(x)).
    `mlp_first` runs the MLP half first (what vit-pytorch's ScalableViT does in its second pair)."""

    def __init__(self, dim: int, attn: nn.Module, mlp_hidden: int, drop: float = 0.0, norm_eps: float = 1e-5,
                 mlp_first: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_hidden, drop=drop)
        self.mlp_first = mlp_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        if self.mlp_first:
            x = x + self.mlp(self.norm2(x))
            return x + self.attn(self.norm1(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PEG(nn.Module):
    """Positional encoding generator (Chu et al., CPVT): x + depthwise conv(x) on the map."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"peg_kernel={kernel_size}: the positional convolution needs an odd kernel size >= 1")
        self.proj = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        return x + rearrange(self.proj(rearrange(x, "b h w c -> b c h w")), "b c h w -> b h w c")


def peg_parameters(model: nn.Module) -> set[str]:
    """The PEG convolutions are the model's positional encoding: no weight decay (CPVT, Twins)."""
    return {name for name, _ in model.named_parameters() if ".peg." in f".{name}"}


def init_hierarchical(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) linears with zero biases, unit LayerNorms (Twins / Swin / timm);
    convolutions keep PyTorch's default."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):  # (bias-free or non-affine LayerNorms too)
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------- state-dict helpers for converters


def fit_shapes(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors reshaped to the target's shapes where only singleton dimensions differ: e.g.
    vit-pytorch's channel LayerNorms (1, C, 1, 1) and 1x1 convolutions (O, I, 1, 1) as our
    LayerNorms (C,) and linears (O, I)."""
    out = {}
    for k, v in state.items():
        t = target.get(k)
        if t is not None and v.shape != t.shape and v.squeeze().shape == t.squeeze().shape:
            v = v.reshape(t.shape)
        out[k] = v
    return out


def concat_keys(state: dict[str, torch.Tensor], parts: list[str], into: str) -> None:
    """Concatenate the tensors `{prefix}{part}` (popped) along dim 0 into `{prefix}{into}` for
    every prefix holding the first part (separate q / k / v weights as one fused qkv)."""
    first = f".{parts[0]}"
    for key in [k for k in state if k.endswith(first)]:
        prefix = key[: -len(parts[0])]
        state[prefix + into] = torch.cat([state.pop(prefix + p) for p in parts], dim=0)


def block_rules(src: str, dst: str) -> list[tuple[str, str]]:
    """Renaming rules from a vit-pytorch Transformer's layers (`src`, a regex prefix such as
    r"transformer\\.layers") to a list of layers.Block (`dst`, e.g. "blocks")."""
    return [
        (rf"{src}\.(\d+)\.0\.norm\.(weight|bias)", rf"{dst}.\1.norm1.\2"),
        (rf"{src}\.(\d+)\.0\.to_qkv\.weight", rf"{dst}.\1.attn.qkv.weight"),
        (rf"{src}\.(\d+)\.0\.to_out\.0\.(weight|bias)", rf"{dst}.\1.attn.proj.\2"),  # Linear + Dropout
        (rf"{src}\.(\d+)\.0\.to_out\.(weight|bias)", rf"{dst}.\1.attn.proj.\2"),  # bare Linear (SimpleViT)
        (rf"{src}\.(\d+)\.1\.net\.0\.(weight|bias)", rf"{dst}.\1.norm2.\2"),
        (rf"{src}\.(\d+)\.1\.net\.1\.(weight|bias)", rf"{dst}.\1.mlp.fc1.\2"),
        (rf"{src}\.(\d+)\.1\.net\.[34]\.(weight|bias)", rf"{dst}.\1.mlp.fc2.\2"),
    ]


__all__ = [
    "SIZES", "Attention", "Mlp", "Block", "transformer", "PatchEmbed", "NormPatchEmbed", "grid_size", "sincos_nd", "sincos_padded", "sincos_2d",
    "resize_pos_embed",
    "init_weights", "init_patch_embed", "trunc_normal_", "gather_tokens", "to_2tuple", "DropPath",
    "upsample_mask", "zero_masked_pixels",
    "per_stage", "to_windows", "from_windows", "window_shape", "SubsampledAttention", "MapBlock", "PEG",
    "peg_parameters", "init_hierarchical", "fit_shapes", "concat_keys", "block_rules",
]
