"""Twins-SVT (Chu et al., 2021): spatially separable self-attention.

A hierarchy of stages. Each stage merges p x p patches of the previous map into one token
(LayerNorm, linear, LayerNorm: vit-pytorch's patch embedding), then runs layers of two pre-norm
blocks: locally-grouped self-attention (LSA, attention inside non-overlapping windows) and
global sub-sampled attention (GSA, every token attends to keys / values summarised by a k x k
strided convolution). A depthwise convolution (PEG, the positional encoding generator) follows
the first layer of every stage; there are no other positions. The last stage has GSA blocks only
(as in vit-pytorch: at 224 px its 7 x 7 map is one window anyway).

The network runs on channels-last maps (B, H, W, C). Output tokens are the last stage's map
flattened in row-major order: `patch_size` is the total stride, `grid_size` the last map.

Any input whose sides are multiples of the total stride works (DINO's local crops): windows that
do not tile the map are padded and the padded keys masked out, and a map that the GSA kernel does
not tile is zero-padded before the strided convolution. At sizes that tile exactly both are
no-ops and the network is vit-pytorch's TwinsSVT (see the converter below).

The map helpers it shares with scalable_vit (`MapBlock`, `SubsampledAttention`, `PEG`, windows,
`per_stage`, `upsample_mask`, `init_hierarchical`, the converters' `fit_shapes` / `concat_keys`)
live in layers.py. SimMIM needs no pixel zeroing here: the first patch embedding does not overlap
(p x p patches, stride p), so a visible first-stage token sees no masked pixel.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from einops import rearrange
from torch import nn

from .base import Backbone, Classifier, create, image_size_2d, register
from .convert import classifier_from, register_reference, register_vit_pytorch, rename
from .layers import (PEG, Attention, MapBlock, NormPatchEmbed, SubsampledAttention, concat_keys, fit_shapes, from_windows,
                     init_hierarchical, peg_parameters, per_stage, to_windows, upsample_mask, window_shape)


# --------------------------------------------------------------------------- Twins-SVT


class WindowAttention(Attention):
    """Multi-head self-attention inside non-overlapping windows of a map (Twins' LSA): the fused
    qkv Attention of layers.py run on each window; ragged edges padded, padded keys masked."""

    def __init__(self, dim: int, heads: int, head_dim: int | None, window: int, qkv_bias: bool = False,
                 proj_drop: float = 0.0):
        super().__init__(dim, heads, qkv_bias=qkv_bias, proj_drop=proj_drop, head_dim=head_dim)
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        _, h, w, _ = x.shape
        wh, ww = window_shape(self.window, h, w)
        windows, mask = to_windows(x, wh, ww)  # (B*nw, wh*ww, C)
        return from_windows(super().forward(windows, attn_mask=mask), wh, ww, h, w)  # (B, H, W, C)


class TwinsLayer(nn.Module):
    """LSA block (absent in the last stage), then GSA block."""

    def __init__(self, dim: int, heads: int, head_dim: int, window: int, global_k: int, mlp_ratio: float, local: bool,
                 drop: float, norm_eps: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.lsa = MapBlock(dim, WindowAttention(dim, heads, head_dim, window, proj_drop=drop), hidden, drop,
                            norm_eps) if local else None
        self.gsa = MapBlock(dim, SubsampledAttention(dim, heads, head_dim, head_dim, global_k, proj_drop=drop), hidden,
                            drop, norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        if self.lsa is not None:
            x = self.lsa(x)
        return self.gsa(x)


class TwinsStage(nn.Module):
    def __init__(self, size_in: tuple[int, int], in_dim: int, dim: int, patch: int, depth: int, peg_kernel: int,
                 norm_eps: float, **layer_kwargs):
        super().__init__()
        self.patch = patch
        self.patch_embed = NormPatchEmbed(size_in, patch, in_dim, dim, norm_eps)
        self.layers = nn.ModuleList(TwinsLayer(dim, norm_eps=norm_eps, **layer_kwargs) for _ in range(depth))
        self.peg = PEG(dim, peg_kernel)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/p, W/p, D)."""
        return rearrange(self.patch_embed(x), "b (h w) d -> b h w d", h=x.shape[-2] // self.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, D)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 0:
                x = self.peg(x)
        return x


class TwinsSVT(Backbone):
    supports_mask_token = True  # SimMIM: the mask token replaces first-stage tokens
    supports_any_size = True  # any multiple of the total stride (padded windows, padded GSA kernel)

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        dims: tuple[int, ...] = (64, 128, 256, 512),
        patch_sizes: tuple[int, ...] = (4, 2, 2, 2),
        depths: tuple[int, ...] = (2, 2, 6, 5),
        heads: int | tuple[int, ...] = 8,
        head_dim: int | tuple[int, ...] = 64,
        windows: int | tuple[int, ...] = 7,
        global_k: int | tuple[int, ...] = 7,
        mlp_ratio: float = 4.0,
        peg_kernel: int = 3,
        final_norm: bool = True,
        norm_eps: float = 1e-5,
        drop: float = 0.0,
    ):
        super().__init__()
        n = len(dims)
        if n < 1:
            raise ValueError("dims=[]: give the width of every stage, e.g. dims=[64, 128, 256, 512]")
        patch_sizes, depths = per_stage("patch_sizes", patch_sizes, n), per_stage("depths", depths, n)
        heads, head_dim = per_stage("heads", heads, n), per_stage("head_dim", head_dim, n)
        windows, global_k = per_stage("windows", windows, n), per_stage("global_k", global_k, n)
        for name, values in (("dims", dims), ("patch_sizes", patch_sizes), ("depths", depths), ("heads", heads),
                             ("head_dim", head_dim), ("windows", windows), ("global_k", global_k)):
            if any(int(v) != v or v < 1 for v in values):
                raise ValueError(f"{name}={list(values)}: every entry must be an integer >= 1")
        if in_chans < 1:
            raise ValueError(f"in_chans={in_chans} must be >= 1")

        self.image_size = image_size_2d(image_size)
        self.in_chans, self.embed_dim = in_chans, dims[-1]
        self.patch_size = 1
        for p in patch_sizes:
            self.patch_size *= p
        h, w = self.image_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image_size={list(self.image_size)} is not divisible by the total stride "
                             f"{self.patch_size} (the product of patch_sizes={patch_sizes}): use an image size that "
                             f"is a multiple of {self.patch_size}, or other patch_sizes")
        self.first_stride = patch_sizes[0]

        stages, in_dim, stride = [], in_chans, 1
        for i in range(n):
            stages.append(TwinsStage((h // stride, w // stride), in_dim, dims[i], patch_sizes[i], depths[i], peg_kernel,
                                     norm_eps, heads=heads[i], head_dim=head_dim[i], window=windows[i],
                                     global_k=global_k[i], mlp_ratio=mlp_ratio, local=i < n - 1, drop=drop))
            in_dim, stride = dims[i], stride * patch_sizes[i]
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(dims[-1], eps=norm_eps) if final_norm else nn.Identity()
        self.apply(init_hierarchical)

    @property
    def mask_token_dim(self) -> int:
        return self.stages[0].patch_embed.proj.out_features

    def _run(self, x: torch.Tensor, mask: torch.Tensor | None = None, token: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, C, H, W) -> the last stage's tokens after the final norm (B, N, D); with a
        first-stage mask (B, H1, W1, 1), `token` (1, 1, D1) replaces those first-stage tokens."""
        for i, stage in enumerate(self.stages):
            if i:
                x = rearrange(x, "b h w c -> b c h w")
            x = stage.embed(x)  # (B, H_i, W_i, D_i)
            if mask is not None and i == 0:
                x = torch.where(mask, token.to(x.dtype).view(1, 1, 1, -1), x)
            x = stage(x)
        return self.norm(rearrange(x, "b h w c -> b (h w) c"))  # (B, N, D)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, any_size=True)
        return self._run(x)

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """SimMIM: the output-grid mask (B, N) upsampled to the first stage's map, `mask_token`
        (1, 1, dims[0]) in place of the first patch embedding's output there, then every stage.
        Returns the last stage's tokens (B, N, D) in patchify order."""
        self.check_input(x)
        m = upsample_mask(mask, x.shape[0], self.grid_size, self.patch_size // self.first_stride)
        return self._run(x, m, mask_token)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(dim=1)  # (B, D)

    def no_weight_decay(self) -> set[str]:
        return peg_parameters(self)


@register("twins_svt", example=dict(image_size=32, in_chans=1, dims=(16, 32, 64), patch_sizes=(2, 2, 2),
                                    depths=(1, 1, 1), heads=2, head_dim=8, windows=4, global_k=(4, 2, 1),
                                    mlp_ratio=2.0))
def twins_svt(
    image_size: int | tuple[int, int] = 224,
    in_chans: int = 3,
    dims: tuple[int, ...] = (64, 128, 256, 512),
    patch_sizes: tuple[int, ...] = (4, 2, 2, 2),
    depths: tuple[int, ...] = (2, 2, 6, 5),
    heads: int | tuple[int, ...] = 8,
    head_dim: int | tuple[int, ...] = 64,
    windows: int | tuple[int, ...] = 7,
    global_k: int | tuple[int, ...] = 7,
    mlp_ratio: float = 4.0,
    peg_kernel: int = 3,
    final_norm: bool = True,
    norm_eps: float = 1e-5,
    drop: float = 0.0,
) -> TwinsSVT:
    """Twins-SVT. Per stage (a list, or one value for all): `dims` widths, `patch_sizes` merge
    factors (their product is the total stride, `patch_size`), `depths` layers (one LSA + one GSA
    block each; GSA only in the last stage; vit-pytorch's s{i}_depth is depths[i] - 1), `heads`
    and `head_dim` (vit-pytorch: 8 of 64 everywhere), `windows` LSA window sides, `global_k` GSA
    key / value stride. `final_norm`: a LayerNorm on the output tokens (vit-pytorch has none).
    The defaults are vit-pytorch's TwinsSVT defaults plus that final norm."""
    return TwinsSVT(image_size, in_chans, tuple(dims), tuple(patch_sizes), tuple(depths), heads, head_dim, windows,
                    global_k, mlp_ratio, peg_kernel, final_norm, norm_eps, drop)


# --------------------------------------------------------------------------- vit-pytorch


_VP_TWINS_DEFAULTS: dict[str, Any] = {
    **{f"s{i}_{k}": v for i, dims in enumerate((64, 128, 256, 512), 1)
       for k, v in dict(emb_dim=dims, patch_size=4 if i == 1 else 2, local_patch_size=7, global_k=7,
                        depth=(1, 1, 5, 4)[i - 1]).items()},
    "peg_kernel_size": 3,
    "dropout": 0.0,
}


def _vp_twins_kwargs(vp: dict[str, Any]) -> dict[str, Any]:
    """Our create() kwargs for vit_pytorch.twins_svt.TwinsSVT(**vp) (num_classes aside)."""
    unknown = sorted(set(vp) - set(_VP_TWINS_DEFAULTS) - {"num_classes"})
    if unknown:
        raise ValueError(f"vit_pytorch TwinsSVT has no argument {unknown[0]!r}; its arguments are: num_classes, "
                         f"{', '.join(_VP_TWINS_DEFAULTS)}")
    cfg = {**_VP_TWINS_DEFAULTS, **vp}
    stage = lambda key: [cfg[f"s{i}_{key}"] for i in range(1, 5)]  # noqa: E731
    return dict(in_chans=3, dims=stage("emb_dim"), patch_sizes=stage("patch_size"),
                depths=[d + 1 for d in stage("depth")], heads=8, head_dim=64, windows=stage("local_patch_size"),
                global_k=stage("global_k"), mlp_ratio=4.0, peg_kernel=cfg["peg_kernel_size"], final_norm=False,
                norm_eps=1e-5, drop=cfg["dropout"])


@register_vit_pytorch("twins_svt")
def _twins_from_vit_pytorch(state: dict[str, torch.Tensor], *, num_classes: int, image_size: int = 224,
                            **vp_kwargs: Any) -> Classifier:
    """vit_pytorch.twins_svt.TwinsSVT (1.16.0): its keyword arguments (s1_emb_dim, ...,
    peg_kernel_size, dropout; it always takes 3 channels), plus the `image_size` our backbone
    is built for (any multiple of the total stride works)."""
    kw = _vp_twins_kwargs(vp_kwargs)
    backbone = create("twins_svt", image_size=image_size, **kw)
    n = len(kw["dims"])
    # layer 0 is vit-pytorch's first Transformer (layers.S.1), layers 1.. its second (layers.S.3)
    state = {re.sub(r"^layers\.(\d)\.1\.layers\.0\.", r"layers.\1.L0.", k): v for k, v in state.items()}
    state = {re.sub(r"^layers\.(\d)\.3\.layers\.(\d+)\.", lambda m: f"layers.{m[1]}.L{int(m[2]) + 1}.", k): v
             for k, v in state.items()}
    ln = lambda src, dst: [(src + r"\.g", dst + ".weight"), (src + r"\.b", dst + ".bias")]  # noqa: E731
    layer = r"layers\.(\d)\.L(\d+)\."
    to = r"stages.\1.layers.\2."
    rules = [
        *ln(r"layers\.(\d)\.0\.proj\.0", r"stages.\1.patch_embed.norm_in"),
        (r"layers\.(\d)\.0\.proj\.1\.(weight|bias)", r"stages.\1.patch_embed.proj.\2"),
        *ln(r"layers\.(\d)\.0\.proj\.2", r"stages.\1.patch_embed.norm_out"),
        (r"layers\.(\d)\.2\.proj\.fn\.(weight|bias)", r"stages.\1.peg.proj.\2"),
        *ln(layer + r"0\.fn\.norm", to + "lsa.norm1"),
        (layer + r"0\.fn\.to_(q|kv)\.weight", to + r"lsa.attn.\3"),
        (layer + r"0\.fn\.to_out\.0\.(weight|bias)", to + r"lsa.attn.proj.\3"),
        *ln(layer + r"2\.fn\.norm", to + "gsa.norm1"),
        (layer + r"2\.fn\.to_q\.weight", to + "gsa.attn.q.weight"),
        (layer + r"2\.fn\.to_kv\.weight", to + "gsa.attn.kv.weight"),
        (layer + r"2\.fn\.to_out\.0\.(weight|bias)", to + r"gsa.attn.proj.\3"),
        *ln(layer + r"1\.fn\.net\.0", to + "lsa.norm2"),
        (layer + r"1\.fn\.net\.1\.(weight|bias)", to + r"lsa.mlp.fc1.\3"),
        (layer + r"1\.fn\.net\.4\.(weight|bias)", to + r"lsa.mlp.fc2.\3"),
        *ln(layer + r"3\.fn\.net\.0", to + "gsa.norm2"),
        (layer + r"3\.fn\.net\.1\.(weight|bias)", to + r"gsa.mlp.fc1.\3"),
        (layer + r"3\.fn\.net\.4\.(weight|bias)", to + r"gsa.mlp.fc2.\3"),
        (rf"layers\.{n + 2}\.(weight|bias)", r"head.\1"),
    ]
    state = rename(state, rules)
    concat_keys(state, ["q", "kv"], "qkv.weight")  # LSA: q then (k, v), as our fused qkv
    state = fit_shapes(state, backbone.state_dict())
    # vit-pytorch flattens a patch as (c p1 p2), ours as (p1 p2 c): permute the patch dimension
    for i, p in enumerate(kw["patch_sizes"]):
        c = kw["dims"][i - 1] if i else 3
        perm = rearrange(torch.arange(c * p * p), "(c p1 p2) -> (p1 p2 c)", c=c, p1=p, p2=p)
        for name in ("norm_in.weight", "norm_in.bias"):
            key = f"stages.{i}.patch_embed.{name}"
            state[key] = state[key].flatten()[perm]
        key = f"stages.{i}.patch_embed.proj.weight"
        state[key] = state[key].flatten(1)[:, perm]
    return classifier_from(backbone, state)


# --------------------------------------------------------------------------- reference configurations

_TWINS_REFS = {
    # vit-pytorch's defaults (its README's Twins-SVT-S-like network)
    "small": {},
    # Twins-SVT-B's widths; the depths follow vit-pytorch's convention (s{i}_depth = the paper's blocks / 2, the
    # global-only last stage its blocks as given)
    "base": dict(s1_emb_dim=96, s2_emb_dim=192, s3_emb_dim=384, s4_emb_dim=768, s3_depth=9, s4_depth=2),
}
for _size, _vp in _TWINS_REFS.items():
    _vp = dict(num_classes=1000, **_vp)
    register_reference(
        "twins_svt", _size, "vit_pytorch.twins_svt:TwinsSVT", _vp, dict(image_size=224, **_vp_twins_kwargs(_vp)),
        (3, 224, 224),
        note="" if _size == "small" else "vit-pytorch has no Twins-SVT-B: its widths (96..768) and the paper's "
             "stage-3 depth in vit-pytorch's layers, with vit-pytorch's fixed 8 heads of 64")
