"""MobileViT (Mehta & Rastegari, 2021): MobileNetV2 blocks with transformers as convolutions.

A stride-2 3x3 convolution and four MobileNetV2 (MV2) inverted-residual blocks form the stem
(stride 4). Each following stage is a stride-2 MV2 block and a MobileViT block: a 3x3 and a 1x1
convolution encode local structure and widen to the transformer width `dim`; the map is unfolded
into u x u patches and a transformer attends, for each of the u*u positions inside a patch, across
all patches (so every position sees the whole image at 1/u resolution); the map is folded back,
projected to the stage's channels, concatenated with the block's input and fused by a 3x3
convolution. A final 1x1 convolution widens to channels[-1]: those are the output tokens, and the
pooled embedding is their mean.

Arguments and layout follow vit-pytorch's MobileViT (1.16.0), so its weights convert exactly (see
`_from_vit_pytorch`): `channels` lists the stem conv, the four stem MV2 outputs, two entries per
stage (the MV2 output and the MobileViT block's channels, equal) and the final width; `dims`
and `depths` give each stage's transformer width and depth; 4 heads of width 8, SiLU MLP, no
final LayerNorm in the transformer. vit-pytorch fixes three stages; here any number >= 1 works.

Token geometry. `patch_size` is the total stride 4 * 2 ** stages; the output tokens are the last
map's positions, row-major. The input sides must be multiples of `patch_size * unfold_size`
(the last map must split into whole u x u patches). `forward_masked` (SimMIM) puts the mask
token at the first stage's input, on the stem's stride-4 map (width channels[3]); the masked
pixels are zeroed before the (overlapping) stem, so no visible position sees them.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .base import Backbone, Classifier, create, image_size_2d, register
from .convert import classifier_from, register_reference, register_vit_pytorch, rename
from .layers import init_weights, transformer, upsample_mask, zero_masked_pixels

# name -> (dims, channels, expansion, depths): the paper's MobileViT-XXS / XS / S
SIZES = {
    "xxs": ((64, 80, 96), (16, 16, 24, 24, 48, 48, 64, 64, 80, 80, 320), 2.0),
    "xs": ((96, 120, 144), (16, 32, 48, 48, 64, 64, 80, 80, 96, 96, 384), 4.0),
    "s": ((144, 192, 240), (16, 32, 64, 64, 96, 96, 128, 128, 160, 160, 640), 4.0),
}


class ConvNormAct(nn.Module):
    """Convolution without bias, BatchNorm, SiLU."""

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(dim_out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class MV2Block(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand to dim_in * expansion (skipped when expansion is
    1), 3x3 depthwise (stride 1 or 2), 1x1 linear projection; BatchNorm after each, SiLU after the
    first two; a residual connection when the shape is kept."""

    def __init__(self, dim_in: int, dim_out: int, stride: int = 1, expansion: float = 4.0):
        super().__init__()
        hidden = int(dim_in * expansion)
        self.expand = ConvNormAct(dim_in, hidden, 1) if expansion != 1 else None
        self.dw = ConvNormAct(hidden, hidden, 3, stride, groups=hidden)
        self.project = nn.Conv2d(hidden, dim_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(dim_out)
        self.residual = stride == 1 and dim_in == dim_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.expand(x) if self.expand is not None else x)
        y = self.bn(self.project(y))
        return x + y if self.residual else y


class MobileViTBlock(nn.Module):
    """Local convolutions, a transformer across unfolded u x u patches, fusion with the input."""

    def __init__(self, channels: int, dim: int, depth: int, mlp_dim: int, unfold: tuple[int, int], heads: int,
                 dim_head: int, kernel_size: int = 3, drop: float = 0.0):
        super().__init__()
        self.unfold = unfold
        self.local_conv = ConvNormAct(channels, channels, kernel_size)
        self.local_proj = ConvNormAct(channels, dim, 1)
        self.blocks = transformer(dim, depth, heads, qkv_bias=False, drop=drop, head_dim=dim_head, mlp_dim=mlp_dim,
                                  norm_eps=1e-5)
        for block in self.blocks:
            block.mlp.act = nn.SiLU()
        self.fuse_proj = ConvNormAct(dim, channels, 1)
        self.fuse_conv = ConvNormAct(2 * channels, channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        (uh, uw), h = self.unfold, x.shape[-2]
        y = self.local_proj(self.local_conv(x))  # (B, dim, H, W)
        # each position inside a u x u patch attends across all patches
        t = rearrange(y, "b d (h uh) (w uw) -> (b uh uw) (h w) d", uh=uh, uw=uw)  # (B*u*u, H*W/u^2, dim)
        for block in self.blocks:
            t = block(t)
        y = rearrange(t, "(b uh uw) (h w) d -> b d (h uh) (w uw)", uh=uh, uw=uw, h=h // uh)
        return self.fuse_conv(torch.cat([self.fuse_proj(y), x], dim=1))


class MobileViTStage(nn.Module):
    def __init__(self, dim_in: int, channels: int, dim: int, depth: int, mlp_dim: int, expansion: float,
                 unfold: tuple[int, int], heads: int, dim_head: int, kernel_size: int, drop: float):
        super().__init__()
        self.down = MV2Block(dim_in, channels, 2, expansion)
        self.vit = MobileViTBlock(channels, dim, depth, mlp_dim, unfold, heads, dim_head, kernel_size, drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(self.down(x))


class MobileViT(Backbone):
    supports_token_access = False  # tokens exist only after the convolutional stages
    supports_token_drop = False  # convolutions and fold / unfold need the whole map
    supports_mask_token = True  # at the first stage's input (SimMIM)
    attention_maps = False  # attention runs per in-patch position across patches, no class token
    supports_any_size = True  # any sides that are multiples of size_multiple (patch_size * unfold_size)

    def __init__(
        self,
        image_size: int | tuple[int, int] = 256,
        in_chans: int = 3,
        dims: tuple[int, ...] = (144, 192, 240),
        channels: tuple[int, ...] = (16, 32, 64, 64, 96, 96, 128, 128, 160, 160, 640),
        depths: tuple[int, ...] = (2, 4, 3),
        expansion: float = 4.0,
        kernel_size: int = 3,
        unfold_size: int | tuple[int, int] = 2,
        mlp_ratios: tuple[float, ...] | None = None,
        heads: int = 4,
        dim_head: int = 8,
        drop: float = 0.0,
    ):
        super().__init__()
        dims, channels, depths = tuple(dims), tuple(channels), tuple(depths)
        n = len(dims)
        if n < 1 or len(depths) != n or min(depths) < 1:
            raise ValueError(f"dims={list(dims)} and depths={list(depths)} must be equally long (one entry per stage, "
                             f"at least one stage, depths >= 1), e.g. dims=(64, 80, 96), depths=(2, 4, 3)")
        if len(channels) != 5 + 2 * n:
            raise ValueError(
                f"channels={list(channels)} has {len(channels)} entries; {n} stage(s) need 5 + 2 * {n} = {5 + 2 * n}: "
                f"the stem conv, four stem MV2 blocks, two per stage, the final width (vit-pytorch's layout)")
        pairs = [(4 + 2 * i, 5 + 2 * i) for i in range(n)]  # a stage's MV2 output and its MobileViT block
        bad = [(a, b) for a, b in pairs if channels[a] != channels[b]]
        if bad:
            a, b = bad[0]
            raise ValueError(f"channels[{a}]={channels[a]} and channels[{b}]={channels[b]} must be equal (a stage's "
                             f"MV2 output and its MobileViT block's channels, one width in vit-pytorch's layout); set "
                             f"both to one value")
        mlp_ratios = tuple(mlp_ratios) if mlp_ratios is not None else (2.0,) + (4.0,) * (n - 1)
        if len(mlp_ratios) != n:
            raise ValueError(f"mlp_ratios={list(mlp_ratios)} must have one entry per stage ({n})")
        if in_chans < 1 or heads < 1 or dim_head < 1 or expansion <= 0:
            raise ValueError(f"in_chans={in_chans}, heads={heads}, dim_head={dim_head} must be >= 1 and "
                             f"expansion={expansion} > 0")
        self.unfold_size = (unfold_size, unfold_size) if isinstance(unfold_size, int) else tuple(unfold_size)
        self.in_chans, self.embed_dim = in_chans, channels[-1]
        self.patch_size = 4 * 2 ** n
        self.size_multiple = (self.patch_size * self.unfold_size[0], self.patch_size * self.unfold_size[1])
        self.image_size = image_size_2d(image_size)
        if any(s % m or s < 1 for s, m in zip(self.image_size, self.size_multiple)):
            raise ValueError(
                f"image_size={list(self.image_size)}: MobileViT with {n} stage(s) and unfold_size="
                f"{list(self.unfold_size)} needs sides that are multiples of {self.patch_size} * unfold_size = "
                f"{list(self.size_multiple)} (the last map must split into whole patches); use such an image size")
        c = channels
        self.stem_dim = c[3]
        self.stem = nn.Sequential(
            ConvNormAct(in_chans, c[0], 3, stride=2),
            MV2Block(c[0], c[1], 1, expansion),
            MV2Block(c[1], c[2], 2, expansion),
            MV2Block(c[2], c[3], 1, expansion),
            MV2Block(c[3], c[3], 1, expansion),
        )
        self.stages = nn.ModuleList(
            MobileViTStage(c[3 + 2 * i], c[4 + 2 * i], dims[i], depths[i], int(dims[i] * mlp_ratios[i]), expansion,
                           self.unfold_size, heads, dim_head, kernel_size, drop)
            for i in range(n))
        self.final = ConvNormAct(c[-2], c[-1], 1)
        self.apply(lambda m: init_weights(m) if isinstance(m, (nn.Linear, nn.LayerNorm)) else None)

    @property
    def mask_token_dim(self) -> int:
        return self.stem_dim

    def _check(self, x: torch.Tensor) -> None:
        mh, mw = self.size_multiple
        if x.ndim != 4 or x.shape[1] != self.in_chans or x.shape[-2] % mh or x.shape[-1] % mw or min(x.shape[-2:]) < 1:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit this MobileViT: it takes (B, {self.in_chans}, H, W) "
                f"with H a multiple of {mh} and W of {mw} (patch_size * unfold_size; built for "
                f"{self.image_size[0]}x{self.image_size[1]}); resize or crop the input to such a size")

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:  # (B, c3, H/4, W/4) -> (B, D, H/p, W/p)
        for stage in self.stages:
            x = stage(x)
        return self.final(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens of the final 1x1 convolution (B, N, D), row-major."""
        self._check(x)
        return rearrange(self._trunk(self.stem(x)), "b d h w -> b (h w) d")

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """SimMIM: the masked pixels zeroed, the output-grid mask (B, N) upsampled to the stem's
        stride-4 map, the mask token (1, 1, channels[3]) in place of the stem's output there, then
        every stage: (B, N, D)."""
        self._check(x)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        # the stem's kernels reach past a token's pixels: zero the masked pixels first, so no
        # visible position sees any of them
        feats = self.stem(zero_masked_pixels(x, mask, grid))  # (B, c3, H/4, W/4)
        m = rearrange(upsample_mask(mask, x.shape[0], grid, self.patch_size // 4), "b h w 1 -> b 1 h w")
        token = rearrange(mask_token.to(feats.dtype), "1 1 c -> 1 c 1 1")
        feats = torch.where(m, token, feats)
        return rearrange(self._trunk(feats), "b d h w -> b (h w) d")  # (B, N, D)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(dim=1)  # (B, D)


@register("mobile_vit", example=dict(image_size=64, in_chans=1, dims=(16, 24),
                                     channels=(8, 8, 16, 16, 16, 16, 24, 24, 48), depths=(1, 1), expansion=2.0))
def mobile_vit(
    image_size: int | tuple[int, int] = 256,
    in_chans: int = 3,
    size: str = "s",
    dims: tuple[int, ...] | None = None,
    channels: tuple[int, ...] | None = None,
    depths: tuple[int, ...] = (2, 4, 3),
    expansion: float | None = None,
    kernel_size: int = 3,
    unfold_size: int | tuple[int, int] = 2,
    mlp_ratios: tuple[float, ...] | None = None,
    heads: int = 4,
    dim_head: int = 8,
    drop: float = 0.0,
) -> MobileViT:
    """MobileViT; `size` one of xxs / xs / s (the paper's widths, MV2 expansion 2 for xxs, 4
    otherwise), overridden by dims / channels / expansion. One stage per entry of dims / depths;
    patch_size (total stride) is 4 * 2 ** len(dims). mlp_ratios=None: vit-pytorch's 2 for the
    first stage, 4 for the others (the paper uses 2 throughout); heads 4 x dim_head 8 as
    vit-pytorch."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not one of {', '.join(SIZES)}; or set dims and channels")
    d, c, e = SIZES[size]
    return MobileViT(image_size, in_chans, tuple(dims or d), tuple(channels or c), tuple(depths),
                     e if expansion is None else expansion, kernel_size, unfold_size, mlp_ratios, heads, dim_head, drop)


# --------------------------------------------------------------------------- vit-pytorch

def _bn(src: str, dst: str) -> tuple[str, str]:
    return (rf"{src}\.(weight|bias|running_mean|running_var|num_batches_tracked)", rf"{dst}.\1")


def _cna(src: str, dst: str) -> list[tuple[str, str]]:
    """vit-pytorch's conv_nxn_bn / conv_1x1_bn Sequential(conv, bn, silu) -> ConvNormAct."""
    return [(rf"{src}\.0\.weight", rf"{dst}.conv.weight"), _bn(rf"{src}\.1", f"{dst}.bn")]


def _mv2(src: str, dst: str, expansion: float) -> list[tuple[str, str]]:
    if expansion == 1:
        return [(rf"{src}\.conv\.0\.weight", rf"{dst}.dw.conv.weight"), _bn(rf"{src}\.conv\.1", f"{dst}.dw.bn"),
                (rf"{src}\.conv\.3\.weight", rf"{dst}.project.weight"), _bn(rf"{src}\.conv\.4", f"{dst}.bn")]
    return [(rf"{src}\.conv\.0\.weight", rf"{dst}.expand.conv.weight"), _bn(rf"{src}\.conv\.1", f"{dst}.expand.bn"),
            (rf"{src}\.conv\.3\.weight", rf"{dst}.dw.conv.weight"), _bn(rf"{src}\.conv\.4", f"{dst}.dw.bn"),
            (rf"{src}\.conv\.6\.weight", rf"{dst}.project.weight"), _bn(rf"{src}\.conv\.7", f"{dst}.bn")]


@register_vit_pytorch("mobile_vit")
def _from_vit_pytorch(state: dict[str, torch.Tensor], *, image_size, dims, channels, num_classes, expansion: float = 4,
                      kernel_size: int = 3, patch_size: tuple[int, int] = (2, 2), depths=(2, 4, 3)) -> Classifier:
    """vit_pytorch.mobile_vit.MobileViT (1.16.0; three stages, 3 input channels)."""
    rules = _cna(r"conv1", "stem.0")
    for i in range(4):
        rules += _mv2(rf"stem\.{i}", f"stem.{i + 1}", expansion)
    for i in range(len(dims)):
        p, q = rf"trunk\.{i}", f"stages.{i}"
        rules += _mv2(rf"{p}\.0", f"{q}.down", expansion)
        rules += _cna(rf"{p}\.1\.conv1", f"{q}.vit.local_conv") + _cna(rf"{p}\.1\.conv2", f"{q}.vit.local_proj")
        rules += _cna(rf"{p}\.1\.conv3", f"{q}.vit.fuse_proj") + _cna(rf"{p}\.1\.conv4", f"{q}.vit.fuse_conv")
        t = rf"{p}\.1\.transformer\.layers\.(\d+)"
        rules += [
            (rf"{t}\.0\.norm\.(weight|bias)", rf"{q}.vit.blocks.\1.norm1.\2"),
            (rf"{t}\.0\.to_qkv\.weight", rf"{q}.vit.blocks.\1.attn.qkv.weight"),
            (rf"{t}\.0\.to_out\.0\.(weight|bias)", rf"{q}.vit.blocks.\1.attn.proj.\2"),
            (rf"{t}\.1\.net\.0\.(weight|bias)", rf"{q}.vit.blocks.\1.norm2.\2"),
            (rf"{t}\.1\.net\.1\.(weight|bias)", rf"{q}.vit.blocks.\1.mlp.fc1.\2"),
            (rf"{t}\.1\.net\.4\.(weight|bias)", rf"{q}.vit.blocks.\1.mlp.fc2.\2"),
        ]
    rules += _cna(r"to_logits\.0", "final") + [(r"to_logits\.2\.weight", "head.weight")]
    backbone = create("mobile_vit", image_size=tuple(image_size), in_chans=3, dims=tuple(dims),
                      channels=tuple(channels), depths=tuple(depths), expansion=expansion, kernel_size=kernel_size,
                      unfold_size=tuple(patch_size), mlp_ratios=(2.0, 4.0, 4.0))
    return classifier_from(backbone, rename(state, rules))


for _size, _name in (("small", "xxs"), ("base", "s")):
    _dims, _channels, _exp = SIZES[_name]
    register_reference(
        "mobile_vit", _size, "vit_pytorch.mobile_vit:MobileViT",
        dict(image_size=(256, 256), dims=_dims, channels=_channels, num_classes=1000, expansion=_exp),
        dict(image_size=256, in_chans=3, size=_name), (3, 256, 256),
        note=f"the paper's MobileViT-{_name.upper()} widths in vit-pytorch's layout (4 heads x 8, MLP ratios 2/4/4, "
             "no LayerNorm after each transformer; the paper: heads of 32, MLP ratio 2, a final LayerNorm)",
    )
