"""ScalableViT (Yang et al., 2022): scalable self-attention and interactive window attention.

A 7 x 7, stride-4 convolution stem, then stages whose widths double, joined by 3 x 3 stride-2
convolutions. Every layer of a stage holds two pre-norm pairs:
  - scalable self-attention (SSA): keys and values from an r x r, stride-r convolution of the
    map (spatial scaling) with query / key and value widths set apart from the model width
    (channel scaling), then an MLP;
  - interactive window self-attention (IWSA): attention inside non-overlapping windows, plus the
    local interactive module (LIM, a 3 x 3 convolution of the values over the whole map, so
    neighbouring windows exchange information), then an MLP.
A depthwise convolution (PEG) sits between the two pairs of each stage's first layer; there are no
other positions. Every stage but the last ends with a LayerNorm; the last one's LayerNorm is the
final norm, on the output tokens (`final_norm="tokens"`) or, as vit-pytorch has it, on their mean
(`final_norm="pooled"`).

vit-pytorch 1.16.0 unpacks each layer's modules in another order than it builds them, so its
layers run SSA, MLP, PEG, MLP, IWSA. `layer_order="ssa_ff_ff_iwsa"` reproduces that (the converter
sets it); the default "ssa_ff_iwsa_ff" is the order its code names. Both have the same parameters.

Output tokens are the last stage's map flattened in row-major order; `patch_size` is the total
stride 4 * 2 ** (stages - 1). Any input whose sides are multiples of it works (padded windows,
padded SSA kernel; the map helpers shared with twins_svt are in layers.py).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .base import Backbone, Classifier, create, image_size_2d, register
from .convert import classifier_from, register_reference, register_vit_pytorch, rename
from .layers import (PEG, MapBlock, SubsampledAttention, concat_keys, fit_shapes, from_windows, init_hierarchical,
                     peg_parameters, per_stage, to_windows, upsample_mask, window_shape, zero_masked_pixels)

LAYER_ORDERS = ("ssa_ff_iwsa_ff", "ssa_ff_ff_iwsa")


class InteractiveWindowAttention(nn.Module):
    """IWSA: window attention with query / key width `dim_key` and value width `dim_value` per
    head, plus LIM, a 3 x 3 convolution of the whole value map added to the attention output.
    `window` None: one window, the whole map."""

    def __init__(self, dim: int, heads: int, dim_key: int, dim_value: int, window: int | None, proj_drop: float = 0.0):
        super().__init__()
        self.heads, self.window = heads, window
        self.splits = (heads * dim_key, heads * dim_key, heads * dim_value)
        self.qkv = nn.Linear(dim, sum(self.splits), bias=False)
        self.lim = nn.Conv2d(heads * dim_value, heads * dim_value, 3, padding=1)
        self.proj = nn.Linear(heads * dim_value, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        _, h, w, _ = x.shape
        q, k, v = self.qkv(x).split(self.splits, dim=-1)  # (B, H, W, heads*d)
        local = rearrange(self.lim(rearrange(v, "b x y c -> b c x y")), "b c x y -> b x y c")  # (B, H, W, heads*dv)
        wh, ww = window_shape(self.window, h, w)
        (q, _), (k, mask), (v, _) = (to_windows(t, wh, ww) for t in (q, k, v))  # (B*nw, wh*ww, heads*d)
        q, k, v = (rearrange(t, "n t (h d) -> n h t d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B*nw, heads, wh*ww, dv)
        out = from_windows(rearrange(out, "n h t d -> n t (h d)"), wh, ww, h, w)  # (B, H, W, heads*dv)
        return self.proj_drop(self.proj(out + local))


class ScalableLayer(nn.Module):
    """SSA pair, PEG (first layer of a stage only), IWSA pair."""

    def __init__(self, dim: int, heads: int, ssa_dim_key: int, ssa_dim_value: int, reduction: int, iwsa_dim_key: int,
                 iwsa_dim_value: int, window: int | None, ff_mult: int, peg: bool, layer_order: str, drop: float,
                 norm_eps: float):
        super().__init__()
        hidden = dim * ff_mult
        self.ssa = MapBlock(dim, SubsampledAttention(dim, heads, ssa_dim_key, ssa_dim_value, reduction, proj_drop=drop),
                            hidden, drop, norm_eps)
        self.peg = PEG(dim) if peg else None
        iwsa = InteractiveWindowAttention(dim, heads, iwsa_dim_key, iwsa_dim_value, window, proj_drop=drop)
        self.iwsa = MapBlock(dim, iwsa, hidden, drop, norm_eps, mlp_first=layer_order == "ssa_ff_ff_iwsa")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        x = self.ssa(x)
        if self.peg is not None:
            x = self.peg(x)
        return self.iwsa(x)


class ScalableStage(nn.Module):
    """Layers, then (all but the last stage) a LayerNorm and the stride-2 convolution to the next width."""

    def __init__(self, dim: int, depth: int, last: bool, norm_eps: float, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(ScalableLayer(dim, peg=i == 0, norm_eps=norm_eps, **layer_kwargs)
                                    for i in range(depth))
        self.norm = None if last else nn.LayerNorm(dim, eps=norm_eps)
        self.downsample = None if last else nn.Conv2d(dim, dim * 2, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H/2, W/2, 2C) (last: (B, H, W, C))
        for layer in self.layers:
            x = layer(x)
        if self.downsample is None:
            return x
        x = rearrange(self.norm(x), "b h w c -> b c h w")
        return rearrange(self.downsample(x), "b c h w -> b h w c")


class ScalableViT(Backbone):
    supports_mask_token = True  # SimMIM: the mask token replaces the stem's tokens
    supports_any_size = True  # any multiple of the total stride (padded windows, padded SSA kernel)

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        dim: int = 64,
        depths: tuple[int, ...] = (2, 2, 20, 2),
        heads: int | tuple[int, ...] = (2, 4, 8, 16),
        reduction_factor: int | tuple[int, ...] = (8, 4, 2, 1),
        window_size: int | None | tuple[int | None, ...] = 7,
        ssa_dim_key: int | tuple[int, ...] = (40, 40, 40, 32),
        ssa_dim_value: int | tuple[int, ...] = 32,
        iwsa_dim_key: int | tuple[int, ...] = 32,
        iwsa_dim_value: int | tuple[int, ...] = 32,
        ff_mult: int = 4,
        layer_order: str = "ssa_ff_iwsa_ff",
        final_norm: str = "tokens",
        norm_eps: float = 1e-5,
        drop: float = 0.0,
    ):
        super().__init__()
        n = len(depths)
        if n < 1:
            raise ValueError("depths=[]: give the number of layers of every stage, e.g. depths=[2, 2, 20, 2]")
        if layer_order not in LAYER_ORDERS:
            raise ValueError(f"layer_order={layer_order!r}: allowed are {', '.join(map(repr, LAYER_ORDERS))} "
                             "(the second is what vit-pytorch runs)")
        if final_norm not in ("tokens", "pooled"):
            raise ValueError(f"final_norm={final_norm!r}: allowed are 'tokens' (LayerNorm on the output tokens) and "
                             "'pooled' (LayerNorm on their mean, as vit-pytorch)")
        per = {name: per_stage(name, value, n) for name, value in (
            ("heads", heads), ("reduction_factor", reduction_factor), ("window_size", window_size),
            ("ssa_dim_key", ssa_dim_key), ("ssa_dim_value", ssa_dim_value), ("iwsa_dim_key", iwsa_dim_key),
            ("iwsa_dim_value", iwsa_dim_value))}
        for name, values in (("depths", depths), *per.items()):
            if any(not (v is None and name == "window_size") and (v is None or int(v) != v or v < 1) for v in values):
                raise ValueError(f"{name}={list(values)}: every entry must be an integer >= 1"
                                 + (" (or None: the whole map)" if name == "window_size" else ""))
        if in_chans < 1 or dim < 1 or ff_mult < 1:
            raise ValueError(f"in_chans={in_chans}, dim={dim}, ff_mult={ff_mult} must all be >= 1")

        self.image_size = image_size_2d(image_size)
        self.in_chans, self.embed_dim = in_chans, dim * 2 ** (n - 1)
        self.patch_size = 4 * 2 ** (n - 1)
        h, w = self.image_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image_size={list(self.image_size)} is not divisible by the total stride "
                             f"{self.patch_size} (4 * 2 ** (stages - 1) for {n} stages): use an image size that is a "
                             f"multiple of {self.patch_size}, or fewer stages")
        self.stem_dim, self.final_norm = dim, final_norm

        self.stem = nn.Conv2d(in_chans, dim, 7, stride=4, padding=3)
        self.stages = nn.ModuleList(
            ScalableStage(dim * 2 ** i, depths[i], last=i == n - 1, norm_eps=norm_eps, heads=per["heads"][i],
                          ssa_dim_key=per["ssa_dim_key"][i], ssa_dim_value=per["ssa_dim_value"][i],
                          reduction=per["reduction_factor"][i], iwsa_dim_key=per["iwsa_dim_key"][i],
                          iwsa_dim_value=per["iwsa_dim_value"][i], window=per["window_size"][i], ff_mult=ff_mult,
                          layer_order=layer_order, drop=drop)
            for i in range(n))
        self.norm = nn.LayerNorm(self.embed_dim, eps=norm_eps)
        self.apply(init_hierarchical)

    @property
    def mask_token_dim(self) -> int:
        return self.stem_dim

    def _run(self, x: torch.Tensor, mask: torch.Tensor | None = None, token: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, C, H, W) -> the last stage's tokens (B, N, D), normed when final_norm='tokens';
        with a stem-grid mask (B, H/4, W/4, 1), `token` (1, 1, dim) replaces those stem tokens."""
        x = rearrange(self.stem(x), "b c h w -> b h w c")  # (B, H/4, W/4, dim)
        if mask is not None:
            x = torch.where(mask, token.to(x.dtype).view(1, 1, 1, -1), x)
        for stage in self.stages:
            x = stage(x)
        x = rearrange(x, "b h w c -> b (h w) c")  # (B, N, D)
        return self.norm(x) if self.final_norm == "tokens" else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's tokens (B, N, D), after the final norm when final_norm='tokens' (with
        'pooled' the norm comes after the mean: see pool)."""
        self.check_input(x, any_size=True)
        return self._run(x)

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """SimMIM: the output-grid mask (B, N) upsampled to the stem's map, `mask_token` (1, 1, dim)
        in place of the stem's output there, then every stage: (B, N, D) in patchify order. The
        stem's 7 x 7 kernels reach 3 px into neighbouring patches, so the masked pixels are zeroed
        before the stem too: no visible token sees any of them."""
        self.check_input(x)
        x = zero_masked_pixels(x, mask, self.grid_size)  # (B, C, H, W)
        m = upsample_mask(mask, x.shape[0], self.grid_size, self.patch_size // 4)  # (B, H/4, W/4, 1)
        return self._run(x, m, mask_token)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = tokens.mean(dim=1)  # (B, D)
        return self.norm(pooled) if self.final_norm == "pooled" else pooled

    def pool_only_parameters(self) -> list[nn.Parameter]:
        """With final_norm='pooled' the final LayerNorm acts on the mean only: no token depends on it."""
        return list(self.norm.parameters()) if self.final_norm == "pooled" else []

    def no_weight_decay(self) -> set[str]:
        return peg_parameters(self)


@register("scalable_vit", example=dict(image_size=32, in_chans=1, dim=16, depths=(1, 1), heads=(1, 2),
                                       reduction_factor=(2, 1), window_size=(4, None), ssa_dim_key=8, ssa_dim_value=8,
                                       iwsa_dim_key=8, iwsa_dim_value=8, ff_mult=2))
def scalable_vit(
    image_size: int | tuple[int, int] = 224,
    in_chans: int = 3,
    dim: int = 64,
    depths: tuple[int, ...] = (2, 2, 20, 2),
    heads: int | tuple[int, ...] = (2, 4, 8, 16),
    reduction_factor: int | tuple[int, ...] = (8, 4, 2, 1),
    window_size: int | None | tuple[int | None, ...] = 7,
    ssa_dim_key: int | tuple[int, ...] = (40, 40, 40, 32),
    ssa_dim_value: int | tuple[int, ...] = 32,
    iwsa_dim_key: int | tuple[int, ...] = 32,
    iwsa_dim_value: int | tuple[int, ...] = 32,
    ff_mult: int = 4,
    layer_order: str = "ssa_ff_iwsa_ff",
    final_norm: str = "tokens",
    norm_eps: float = 1e-5,
    drop: float = 0.0,
) -> ScalableViT:
    """ScalableViT with vit-pytorch's arguments (its `depth` is `depths`, `ff_expansion_factor`
    is `ff_mult`, `dropout` is `drop`); per stage a list or one value for all. `dim` is the first
    stage's width (doubled at every stage); `depths` layers of one SSA + one IWSA pair each;
    `reduction_factor` the SSA key / value stride; `window_size` the IWSA window side (None: the
    whole map); `ssa_dim_key` / `..._value`, `iwsa_dim_key` / `..._value` per-head widths.
    Defaults: vit-pytorch's README ScalableViT-S with 7 x 7 windows at every stage."""
    return ScalableViT(image_size, in_chans, dim, tuple(depths), heads, reduction_factor, window_size, ssa_dim_key,
                       ssa_dim_value, iwsa_dim_key, iwsa_dim_value, ff_mult, layer_order, final_norm, norm_eps, drop)


# --------------------------------------------------------------------------- vit-pytorch


def _vp_scalable_kwargs(num_classes: int, dim: int, depth, heads, reduction_factor, window_size=None,
                        iwsa_dim_key=32, iwsa_dim_value=32, ssa_dim_key=32, ssa_dim_value=32, ff_expansion_factor=4,
                        channels=3, dropout=0.0) -> dict[str, Any]:
    """Our create() kwargs for vit_pytorch.scalable_vit.ScalableViT(**vp) (num_classes aside)."""
    as_list = lambda v: list(v) if isinstance(v, (tuple, list)) else v  # noqa: E731
    return dict(in_chans=channels, dim=dim, depths=list(depth), heads=as_list(heads),
                reduction_factor=as_list(reduction_factor), window_size=as_list(window_size),
                ssa_dim_key=as_list(ssa_dim_key), ssa_dim_value=as_list(ssa_dim_value),
                iwsa_dim_key=as_list(iwsa_dim_key), iwsa_dim_value=as_list(iwsa_dim_value), ff_mult=ff_expansion_factor,
                layer_order="ssa_ff_ff_iwsa", final_norm="pooled", norm_eps=1e-5, drop=dropout)


@register_vit_pytorch("scalable_vit")
def _scalable_from_vit_pytorch(state: dict[str, torch.Tensor], *, image_size: int = 224, **vp_kwargs: Any) -> Classifier:
    """vit_pytorch.scalable_vit.ScalableViT (1.16.0): its keyword arguments, plus the
    `image_size` our backbone is built for (any multiple of the total stride works)."""
    try:
        kw = _vp_scalable_kwargs(**vp_kwargs)
    except TypeError as e:
        raise ValueError(f"not vit_pytorch ScalableViT's arguments: {e}") from None
    backbone = create("scalable_vit", image_size=image_size, **kw)
    ln = lambda src, dst: [(src + r"\.g", dst + ".weight"), (src + r"\.b", dst + ".bias")]  # noqa: E731
    layer, to = r"layers\.(\d+)\.0\.layers\.(\d+)\.", r"stages.\1.layers.\2."
    ff = lambda i, dst: [*ln(layer + rf"{i}\.net\.0", to + f"{dst}.norm2"),  # noqa: E731
                         (layer + rf"{i}\.net\.1\.(weight|bias)", to + dst + r".mlp.fc1.\3"),
                         (layer + rf"{i}\.net\.4\.(weight|bias)", to + dst + r".mlp.fc2.\3")]
    rules = [
        (r"to_patches\.(weight|bias)", r"stem.\1"),
        *ln(layer + r"0\.norm", to + "ssa.norm1"),
        (layer + r"0\.to_q\.weight", to + "ssa.attn.q.weight"),
        (layer + r"0\.to_(k|v)\.weight", to + r"ssa.attn.\3"),
        (layer + r"0\.to_out\.0\.(weight|bias)", to + r"ssa.attn.proj.\3"),
        *ff(1, "ssa"),
        (layer + r"2\.proj\.(weight|bias)", to + r"peg.proj.\3"),
        *ff(3, "iwsa"),  # vit-pytorch runs this MLP before the IWSA (layer_order="ssa_ff_ff_iwsa")
        *ln(layer + r"4\.norm", to + "iwsa.norm1"),
        (layer + r"4\.to_(q|k|v)\.weight", to + r"iwsa.attn.\3"),
        (layer + r"4\.local_interactive_module\.(weight|bias)", to + r"iwsa.attn.lim.\3"),
        (layer + r"4\.to_out\.0\.(weight|bias)", to + r"iwsa.attn.proj.\3"),
        *ln(r"layers\.(\d+)\.0\.norm", r"stages.\1.norm"),
        (r"layers\.(\d+)\.1\.conv\.(weight|bias)", r"stages.\1.downsample.\2"),
        (r"mlp_head\.1\.(weight|bias)", r"norm.\1"),
        (r"mlp_head\.2\.(weight|bias)", r"head.\1"),
    ]
    state = rename(state, rules)
    # IWSA: q, k, v (1x1 convolutions) as one, first (it takes its .k and .v); SSA: k and v (stride-r convolutions)
    concat_keys(state, ["q", "k", "v"], "qkv.weight")
    concat_keys(state, ["k", "v"], "kv.weight")
    return classifier_from(backbone, fit_shapes(state, backbone.state_dict()))


# --------------------------------------------------------------------------- reference configurations

_SCALABLE_REFS = {
    # vit-pytorch README's "ScalableViT-S" (dropout off); windows 64 / 32 at 256 px make stages 1-2 global
    "small": dict(dim=64, heads=(2, 4, 8, 16), depth=(2, 2, 20, 2), ssa_dim_key=(40, 40, 40, 32),
                  reduction_factor=(8, 4, 2, 1), window_size=(64, 32, None, None)),
    # the official ScalableViT-B's widths, heads and block counts written the README's way
    "base": dict(dim=96, heads=(3, 6, 12, 24), depth=(2, 2, 14, 6), ssa_dim_key=(64, 40, 40, 32),
                 reduction_factor=(8, 4, 2, 1), window_size=(64, 32, None, None)),
}
for _size, _vp in _SCALABLE_REFS.items():
    _vp = dict(num_classes=1000, **_vp)
    register_reference(
        "scalable_vit", _size, "vit_pytorch.scalable_vit:ScalableViT", _vp,
        dict(image_size=256, **_vp_scalable_kwargs(**_vp)), (3, 256, 256),
        note="" if _size == "small" else
        "vit-pytorch has no ScalableViT-B: the paper's widths (96..768), heads (3..24), ssa key width 32 x its "
        "channel ratios (2, 1.25, 1.25, 1) and block counts (2, 2, 14, 6), each a full SSA + IWSA layer as the "
        "README's -S does (so about twice the official network)")
