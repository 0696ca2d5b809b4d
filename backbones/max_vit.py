"""MaxViT (Tu et al., 2022): multi-axis attention in a hierarchical convolutional network.

A convolutional stem (stride 2), then stages that each halve the resolution and double the width.
Every block of a stage is MBConv (1x1 expansion, 3x3 depthwise, squeeze-excitation, 1x1
projection, BatchNorm) followed by two pre-norm transformer blocks: one attends within local
windows of w x w neighbouring positions ("block" attention), the other within a w x w grid of
positions spread evenly over the whole map ("grid" attention, a dilated global mix). Both add a
learned relative-position bias to their attention logits (passed to SDPA as an additive mask).
The pooled embedding is LayerNorm(mean of the last stage's positions), as vit-pytorch's head.

The layout is vit-pytorch's MaxViT (1.16.0), so its weights convert exactly (see
`_from_vit_pytorch`): no activation between the two stem convolutions, no shortcut on the
downsampling MBConv, LayerNorm eps 1e-5, no qkv / output-projection bias.

Which tokens. MaxViT has no per-token final norm: `forward_features` gives the last stage's raw
tokens and `pool` is LayerNorm(mean), so forward(x) == pool(forward_features(x)) as in vit-pytorch
and timm. `forward_masked` (SimMIM) returns the masked run's tokens through that LayerNorm applied
per token: a pixel head then reads normalised features, and the norm is trained by SimMIM too.

Token geometry. `patch_size` is the total stride 2 ** (stages + 1); the output tokens are the last
stage's positions, row-major. The input sides must be multiples of `patch_size * window_size`
(every stage's map must split into whole windows). `forward_masked` (SimMIM) puts the mask token
at the first stage's input, i.e. on the stem's stride-2 map, upsampling the output-grid mask; the
masked pixels are zeroed before the (overlapping) stem, so no visible position sees them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .base import Backbone, Classifier, create, image_size_2d, register
from .convert import classifier_from, register_reference, register_vit_pytorch, rename
from .layers import Block, init_weights, trunc_normal_, upsample_mask, zero_masked_pixels

# name -> (dim, depth, dim_conv_stem): the paper's MaxViT-T / S / B / L
SIZES = {
    "tiny": (64, (2, 2, 5, 2), 64),
    "small": (96, (2, 2, 5, 2), 64),
    "base": (96, (2, 6, 14, 2), 64),
    "large": (128, (2, 6, 14, 2), 128),
}


class SqueezeExcite(nn.Module):
    """Channel gate: x * sigmoid(fc2(silu(fc1(mean over positions))))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(F.silu(self.fc1(x.mean(dim=(2, 3)))))  # (B, C)
        return x * gate.sigmoid()[:, :, None, None]


class MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expand to dim_out * expansion, 3x3 depthwise (stride 2 when
    downsampling), squeeze-excitation, 1x1 project; BatchNorm after each convolution, GELU after
    the first two. A residual connection only when the shape is kept (vit-pytorch's layout)."""

    def __init__(self, dim_in: int, dim_out: int, downsample: bool, expansion: float = 4.0, shrinkage: float = 0.25):
        super().__init__()
        hidden = int(expansion * dim_out)
        self.conv_pw = nn.Conv2d(dim_in, hidden, 1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv_dw = nn.Conv2d(hidden, hidden, 3, stride=2 if downsample else 1, padding=1, groups=hidden)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.se = SqueezeExcite(hidden, int(hidden * shrinkage))
        self.conv_pwl = nn.Conv2d(hidden, dim_out, 1)
        self.bn3 = nn.BatchNorm2d(dim_out)
        self.residual = dim_in == dim_out and not downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.bn1(self.conv_pw(x)))
        y = F.gelu(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(self.se(y)))
        return x + y if self.residual else y


def relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w) index into a ((2w-1)**2) table of the offset (dy, dx) from key j to query i,
    positions row-major inside the window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)  # (2, n)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, n, n), each in [0, 2w-2]
    return rel[0] * (2 * window - 1) + rel[1]  # (n, n)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention's queries will have: autocast's when it is on (an additive SDPA mask is
    then given in that dtype, which every fused kernel accepts), else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class WindowBlock(Block):
    """A pre-norm transformer block (layers.Block) run on w x w groups of a (B, D, H, W) map, with
    a learned relative-position bias per head. `grid=False`: groups are contiguous windows
    (block attention); `grid=True`: groups take every (H/w)-th row and (W/w)-th column (grid
    attention)."""

    def __init__(self, dim: int, dim_head: int, window: int, grid: bool, mlp_ratio: float = 4.0, drop: float = 0.0):
        if dim % dim_head:
            raise ValueError(f"dim_head={dim_head} must divide every stage's width, and {dim} is not a multiple of it: "
                             f"pick dim a multiple of dim_head")
        super().__init__(dim, dim // dim_head, mlp_ratio=mlp_ratio, qkv_bias=False, drop=drop, head_dim=dim_head,
                         proj_bias=False, norm_eps=1e-5)
        self.window, self.grid = window, grid
        self.rel_pos_bias = nn.Parameter(torch.zeros((2 * window - 1) ** 2, dim // dim_head))
        self.register_buffer("rel_pos_index", relative_position_index(window), persistent=False)

    def bias(self) -> torch.Tensor:
        """The additive attention bias (heads, w*w, w*w)."""
        return rearrange(self.rel_pos_bias[self.rel_pos_index], "i j h -> h i j")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D, H, W) -> (B, D, H, W)
        w, (h_, w_) = self.window, x.shape[-2:]
        pattern = "b d (w1 x) (w2 y)" if self.grid else "b d (x w1) (y w2)"
        tokens = rearrange(x, f"{pattern} -> (b x y) (w1 w2) d", w1=w, w2=w)  # (B*groups, w*w, D)
        tokens = super().forward(tokens, attn_mask=self.bias().to(_compute_dtype(tokens)))
        return rearrange(tokens, f"(b x y) (w1 w2) d -> {pattern}", x=h_ // w, y=w_ // w, w1=w, w2=w)


class MaxViTBlock(nn.Module):
    """MBConv, then block attention, then grid attention."""

    def __init__(self, dim_in: int, dim: int, downsample: bool, dim_head: int, window: int, expansion: float,
                 shrinkage: float, mlp_ratio: float, drop: float):
        super().__init__()
        self.mbconv = MBConv(dim_in, dim, downsample, expansion, shrinkage)
        self.block_attn = WindowBlock(dim, dim_head, window, grid=False, mlp_ratio=mlp_ratio, drop=drop)
        self.grid_attn = WindowBlock(dim, dim_head, window, grid=True, mlp_ratio=mlp_ratio, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid_attn(self.block_attn(self.mbconv(x)))


class MaxViT(Backbone):
    supports_token_access = False  # tokens exist only after the convolutional stages
    supports_token_drop = False  # windows need the whole map
    supports_mask_token = True  # at the first stage's input (SimMIM)
    attention_maps = False  # windowed attention, no class token: no per-image attention picture
    supports_any_size = True  # any sides that are multiples of size_multiple (patch_size * window_size)

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        dim: int = 64,
        depth: tuple[int, ...] = (2, 2, 5, 2),
        dim_head: int = 32,
        dim_conv_stem: int | None = None,
        window_size: int = 7,
        mbconv_expansion_rate: float = 4.0,
        mbconv_shrinkage_rate: float = 0.25,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
    ):
        super().__init__()
        depth = tuple(int(d) for d in depth)
        if not depth or min(depth) < 1:
            raise ValueError(f"depth={list(depth)} must list at least one stage, each with >= 1 block, "
                             f"e.g. (2, 2, 5, 2)")
        if in_chans < 1 or dim < 1 or window_size < 1:
            raise ValueError(f"in_chans={in_chans}, dim={dim}, window_size={window_size} must all be >= 1")
        dims = [dim * 2 ** i for i in range(len(depth))]
        bad = [d for d in dims if d % dim_head]
        if dim_head < 1 or bad:
            raise ValueError(f"dim_head={dim_head} must divide every stage's width {dims}: pick dim a multiple of "
                             f"dim_head (MaxViT uses dim_head=32)")
        self.in_chans, self.embed_dim = in_chans, dims[-1]
        self.patch_size = 2 ** (len(depth) + 1)  # stem 2, then 2 per stage
        self.window_size = window_size
        self.size_multiple = self.patch_size * window_size
        self.image_size = image_size_2d(image_size)
        if any(s % self.size_multiple or s < 1 for s in self.image_size):
            raise ValueError(
                f"image_size={list(self.image_size)}: MaxViT with {len(depth)} stages and window_size={window_size} "
                f"needs sides that are multiples of {self.patch_size} * {window_size} = {self.size_multiple} (every "
                f"stage's map must split into whole windows); use such an image size or change window_size / depth"
            )
        stem = dim_conv_stem or dim
        self.stem_dim = stem
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem, 3, stride=2, padding=1),
                                  nn.Conv2d(stem, stem, 3, padding=1))  # (B, stem, H/2, W/2)
        self.stages = nn.ModuleList()
        dim_in = stem
        for d, n in zip(dims, depth):
            self.stages.append(nn.ModuleList(
                MaxViTBlock(dim_in if j == 0 else d, d, j == 0, dim_head, window_size, mbconv_expansion_rate,
                            mbconv_shrinkage_rate, mlp_ratio, drop)
                for j in range(n)))
            dim_in = d
        self.norm = nn.LayerNorm(dims[-1], eps=1e-5)  # on the pooled vector
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.LayerNorm)):
                init_weights(m)
            elif isinstance(m, WindowBlock):
                trunc_normal_(m.rel_pos_bias)

    @property
    def mask_token_dim(self) -> int:
        return self.stem_dim

    def _check(self, x: torch.Tensor) -> None:
        m = self.size_multiple
        if x.ndim != 4 or x.shape[1] != self.in_chans or x.shape[-2] % m or x.shape[-1] % m or min(x.shape[-2:]) < 1:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit this MaxViT: it takes (B, {self.in_chans}, H, W) with H "
                f"and W multiples of patch_size * window_size = {m} (built for {self.image_size[0]}x"
                f"{self.image_size[1]}); resize or crop the input to such a size"
            )

    def _stages(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_stem, H/2, W/2) -> (B, D, H/p, W/p)
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's tokens (B, N, D), row-major. MaxViT has no per-token final norm: its
        LayerNorm acts on the pooled vector (see pool)."""
        self._check(x)
        return rearrange(self._stages(self.stem(x)), "b d h w -> b (h w) d")

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """SimMIM: the masked pixels zeroed, the output-grid mask (B, N) upsampled to the stem's map,
        the mask token (1, 1, stem_dim) in place of the stem's output there, then every stage; the tokens (B, N, D)
        come out through the family's LayerNorm applied per token, so a pixel head reads
        normalised features and the norm (on the pooled vector in forward) is trained too."""
        self._check(x)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        # the stem's 3x3 kernels reach past a token's pixels: zero the masked pixels first, so no
        # visible position sees any of them
        feats = self.stem(zero_masked_pixels(x, mask, grid))  # (B, C, H/2, W/2)
        m = rearrange(upsample_mask(mask, x.shape[0], grid, self.patch_size // 2), "b h w 1 -> b 1 h w")
        token = rearrange(mask_token.to(feats.dtype), "1 1 c -> 1 c 1 1")
        feats = torch.where(m, token, feats)
        return self.norm(rearrange(self._stages(feats), "b d h w -> b (h w) d"))  # (B, N, D)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(tokens.mean(dim=1))  # (B, D)

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("rel_pos_bias")}


@register("max_vit", example=dict(image_size=32, in_chans=1, dim=16, depth=(1, 1), dim_head=8, dim_conv_stem=16,
                                  window_size=2))
def max_vit(
    image_size: int | tuple[int, int] = 224,
    in_chans: int = 3,
    size: str = "tiny",
    dim: int | None = None,
    depth: tuple[int, ...] | None = None,
    dim_head: int = 32,
    dim_conv_stem: int | None = None,
    window_size: int = 7,
    mbconv_expansion_rate: float = 4.0,
    mbconv_shrinkage_rate: float = 0.25,
    mlp_ratio: float = 4.0,
    drop: float = 0.0,
) -> MaxViT:
    """MaxViT; `size` one of tiny / small / base / large (the paper's T / S / B / L widths, depths and
    stem), overridden by dim / depth / dim_conv_stem. Stage widths are dim * 2**i, one stage per
    entry of depth; patch_size (total stride) is 2 ** (len(depth) + 1). dim_conv_stem=None with
    dim set takes dim (vit-pytorch's default)."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not one of {', '.join(SIZES)}; or set dim and depth")
    d, L, stem = SIZES[size]
    if dim is not None and dim_conv_stem is None:
        stem = dim
    return MaxViT(image_size, in_chans, d if dim is None else dim, tuple(L if depth is None else depth), dim_head,
                  stem if dim_conv_stem is None else dim_conv_stem, window_size,
                  mbconv_expansion_rate, mbconv_shrinkage_rate, mlp_ratio, drop)


# --------------------------------------------------------------------------- vit-pytorch

def _bn(src: str, dst: str) -> tuple[str, str]:
    return (rf"{src}\.(weight|bias|running_mean|running_var|num_batches_tracked)", rf"{dst}.\1")


def _mbconv_rules(p: str, q: str) -> list[tuple[str, str]]:
    """vit-pytorch's MBConv Sequential (wrapped in .fn when residual) -> ours."""
    p = rf"{p}\.(?:fn\.)?"
    return [
        (rf"{p}0\.(weight|bias)", rf"{q}.conv_pw.\1"), _bn(f"{p}1", f"{q}.bn1"),
        (rf"{p}3\.(weight|bias)", rf"{q}.conv_dw.\1"), _bn(f"{p}4", f"{q}.bn2"),
        (rf"{p}6\.gate\.1\.weight", rf"{q}.se.fc1.weight"), (rf"{p}6\.gate\.3\.weight", rf"{q}.se.fc2.weight"),
        (rf"{p}7\.(weight|bias)", rf"{q}.conv_pwl.\1"), _bn(f"{p}8", f"{q}.bn3"),
    ]


def _window_rules(attn: str, ff: str, q: str) -> list[tuple[str, str]]:
    return [
        (rf"{attn}\.fn\.norm\.(weight|bias)", rf"{q}.norm1.\1"),
        (rf"{attn}\.fn\.to_qkv\.weight", rf"{q}.attn.qkv.weight"),
        (rf"{attn}\.fn\.to_out\.0\.weight", rf"{q}.attn.proj.weight"),
        (rf"{attn}\.fn\.rel_pos_bias\.weight", rf"{q}.rel_pos_bias"),
        (rf"{ff}\.fn\.net\.0\.(weight|bias)", rf"{q}.norm2.\1"),
        (rf"{ff}\.fn\.net\.1\.(weight|bias)", rf"{q}.mlp.fc1.\1"),
        (rf"{ff}\.fn\.net\.4\.(weight|bias)", rf"{q}.mlp.fc2.\1"),
    ]


@register_vit_pytorch("max_vit")
def _from_vit_pytorch(state: dict[str, torch.Tensor], *, num_classes, dim, depth, dim_head: int = 32,
                      dim_conv_stem: int | None = None, window_size: int = 7, mbconv_expansion_rate: float = 4,
                      mbconv_shrinkage_rate: float = 0.25, dropout: float = 0.1, channels: int = 3,
                      image_size: int | tuple[int, int] = 224) -> Classifier:
    """vit_pytorch.max_vit.MaxViT (1.16.0). vit-pytorch's MaxViT takes any size, so `image_size`
    (ours only) says what our backbone is built for."""
    rules = [(r"conv_stem\.([01])\.(weight|bias)", r"stem.\1.\2"),
             (r"mlp_head\.1\.(weight|bias)", r"norm.\1"), (r"mlp_head\.2\.(weight|bias)", r"head.\1")]
    k = 0
    for i, n in enumerate(depth):  # vit-pytorch's flat layers.k -> our stages.i.j
        for j in range(n):
            q = f"stages.{i}.{j}"
            rules += _mbconv_rules(rf"layers\.{k}\.0", f"{q}.mbconv")
            rules += _window_rules(rf"layers\.{k}\.2", rf"layers\.{k}\.3", f"{q}.block_attn")
            rules += _window_rules(rf"layers\.{k}\.6", rf"layers\.{k}\.7", f"{q}.grid_attn")
            k += 1
    backbone = create("max_vit", image_size=image_size, in_chans=channels, dim=dim, depth=tuple(depth),
                      dim_head=dim_head, dim_conv_stem=dim_conv_stem or dim, window_size=window_size,
                      mbconv_expansion_rate=mbconv_expansion_rate, mbconv_shrinkage_rate=mbconv_shrinkage_rate)
    return classifier_from(backbone, rename(state, rules))


for _size, _name in (("small", "tiny"), ("base", "base")):
    _dim, _depth, _stem = SIZES[_name]
    register_reference(
        "max_vit", _size, "vit_pytorch.max_vit:MaxViT",
        dict(num_classes=1000, dim=_dim, depth=_depth, dim_head=32, dim_conv_stem=_stem, window_size=7,
             mbconv_expansion_rate=4, mbconv_shrinkage_rate=0.25, dropout=0.1),
        dict(image_size=224, in_chans=3, size=_name), (3, 224, 224),
        note=f"the paper's MaxViT-{_name[0].upper()} widths and depths in vit-pytorch's layout (no stem activation, "
             "no shortcut on downsampling MBConv); dropout only in vit-pytorch (ours defaults to 0)",
    )
