"""Augmentation on the accelerator: batched Kornia views built from an objective's ViewSpecs.

The CPU workers deliver uint8 batches at a fixed load size; every random transform happens here,
per sample, drawing only from the global torch RNG so that a checkpoint's saved RNG state
reproduces the augmentation of a resumed run.

Parts: ``ViewSpec`` (what one kind of view is), ``ResizedCropFlip`` (Kornia's random resized crop
and flip as one grid_sample), ``photometric_steps`` (DINO's colour, blur, solarize: Kornia's
augmentations drawing their own parameters, the pixels done in batched torch ops),
``RandAugment`` (timm's policy with ops and magnitudes drawn per image), ``DeviceAugment`` (the
views of a uint8 batch), ``MixUp`` (MixUp / CutMix with soft targets, composed by the supervised
objectives on their normalised views) and ``eval_transform`` (the deterministic input of scoring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn


MAX_LEVEL = 10.0  # timm's RandAugment magnitude scale: M in [0, 10]


@dataclass(frozen=True)
class ViewSpec:
    """One kind of view: output ``size``, crop area ``scale`` and aspect ``ratio`` ranges of the
    random resized crop, horizontal flip probability ``hflip``, and ``count`` independent views of
    this kind (e.g. DINO's local crops).

    Photometric steps (BYOL / DINO), after crop and flip, each off by default:
    ``color_jitter`` = (brightness, contrast, saturation, hue) strengths applied together with
    probability ``color_jitter_p`` (torchvision's formulas, random order), ``grayscale_p``,
    Gaussian blur with probability ``blur_p`` and a per-image sigma drawn from ``blur_sigma``
    (in output pixels), solarize with probability ``solarize_p`` (pixels >= ``solarize_threshold``,
    in [0, 1], are inverted). On 1-channel images the steps that need colour (saturation, hue,
    greyscale) are skipped; brightness, contrast, blur and solarize still apply.

    RandAugment (timm's "rand-m{M}-mstd{S}-inc1", DeiT's policy), after the photometric steps and
    off by default: each image draws ``randaugment_ops`` ops (N) of ``RANDAUGMENT_OPS`` with
    replacement, applies each with probability ``randaugment_p``, at a magnitude drawn per image and
    op from N(``randaugment_magnitude``, ``randaugment_mstd``) clipped to [0, 10] (timm's 0-10 scale,
    not the paper's 0-30). On 1-channel images the colour op (``color``) is left out of the draw."""

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    count: int = 1
    color_jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    color_jitter_p: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    randaugment_ops: int = 0
    randaugment_magnitude: float = 9.0
    randaugment_mstd: float = 0.5
    randaugment_p: float = 0.5

    def __post_init__(self) -> None:
        checks = [
            ("size", self.size, isinstance(self.size, int) and self.size >= 1, "an integer >= 1"),
            ("scale", self.scale, len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1, "(lo, hi) with 0 < lo <= hi <= 1"),
            ("ratio", self.ratio, len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1], "(lo, hi) with 0 < lo <= hi"),
            ("hflip", self.hflip, 0 <= self.hflip <= 1, "a probability in [0, 1]"),
            ("count", self.count, isinstance(self.count, int) and self.count >= 1, "an integer >= 1"),
            ("color_jitter", self.color_jitter, len(self.color_jitter) == 4 and min(self.color_jitter) >= 0
             and self.color_jitter[3] <= 0.5, "(brightness, contrast, saturation, hue), all >= 0, hue <= 0.5"),
            ("color_jitter_p", self.color_jitter_p, 0 <= self.color_jitter_p <= 1, "a probability in [0, 1]"),
            ("grayscale_p", self.grayscale_p, 0 <= self.grayscale_p <= 1, "a probability in [0, 1]"),
            ("blur_p", self.blur_p, 0 <= self.blur_p <= 1, "a probability in [0, 1]"),
            ("blur_sigma", self.blur_sigma, len(self.blur_sigma) == 2 and 0 < self.blur_sigma[0] <= self.blur_sigma[1], "(lo, hi) with 0 < lo <= hi"),
            ("solarize_p", self.solarize_p, 0 <= self.solarize_p <= 1, "a probability in [0, 1]"),
            ("solarize_threshold", self.solarize_threshold, 0 <= self.solarize_threshold <= 1, "a pixel value in [0, 1]"),
            ("randaugment_ops", self.randaugment_ops, isinstance(self.randaugment_ops, int) and self.randaugment_ops >= 0,
             "an integer >= 0 (ops per image; 0 turns RandAugment off, DeiT uses 2)"),
            ("randaugment_magnitude", self.randaugment_magnitude, 0 <= self.randaugment_magnitude <= MAX_LEVEL,
             f"in [0, {MAX_LEVEL:g}] (timm's scale; DeiT uses 9)"),
            ("randaugment_mstd", self.randaugment_mstd, 0 <= self.randaugment_mstd < math.inf, "a finite std >= 0"),
            ("randaugment_p", self.randaugment_p, 0 <= self.randaugment_p <= 1, "a probability in [0, 1]"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"ViewSpec {name}={value!r} is invalid; it must be {allowed}")


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> None:
    if len(mean) != len(std) or len(mean) not in (1, 3):
        raise ValueError(f"mean={list(mean)} and std={list(std)} must both have 1 or 3 values (one per channel)")
    if min(std) <= 0:
        raise ValueError(f"std={list(std)} must be positive")


def _check_images(images: torch.Tensor, channels: int, mean: Sequence[float], allow_grey: bool = False) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    ok = images.shape[1] == channels or (allow_grey and images.shape[1] == 1)
    if not ok:
        raise ValueError(
            f"images have C={images.shape[1]} channel(s) but mean={list(mean)} has {channels} value(s); "
            "give one mean/std value per channel (or load the data with that many channels; a grey batch "
            "with 3-value stats is repeated to 3 channels with allow_grey=True)"
        )


def blur_kernel_size(sigma_max: float, size: int) -> int:
    """An odd kernel covering +-3 sigma, no wider than the (odd-rounded-down) image."""
    k = 2 * math.ceil(3 * sigma_max) + 1
    return max(3, min(k, size if size % 2 else size - 1))


# --------------------------------------------------------------------------- photometric steps, batched
#
# Each step subclasses the Kornia augmentation it stands for and keeps its parameter drawing: the
# factors, the random order, the sigmas and which images ``p`` selects come from that module's own
# ``forward_parameters``, so a seed draws what Kornia draws. Only the pixel work is ours: vectorised
# over the batch, in place where it can be (on a CPU a fresh image-sized buffer costs more than a
# pass over it), costly ops on the selected images alone. Outputs match Kornia's to float rounding
# (tests/test_photometric.py). Measured (CPU, 2 threads, batch 64): DINO's first global view at
# 224 px RGB about 2x faster than with the Kornia modules, the colour jitter 4-6x, the blur 1.7-1.9x.

GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as Kornia's rgb_to_grayscale


def _per_image(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image values (b,) -> (b, 1, 1, 1) on x's device and dtype."""
    return v.to(device=x.device, dtype=x.dtype, non_blocking=True).view(-1, 1, 1, 1)


def grey(x: torch.Tensor) -> torch.Tensor:
    """(b, 3, H, W) RGB -> (b, 1, H, W) luma, accumulated in Kornia's order: three passes."""
    r, g, b = x.unbind(1)  # (b, H, W) each
    return (r * GREY_WEIGHTS[0]).add_(g, alpha=GREY_WEIGHTS[1]).add_(b, alpha=GREY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place: x * factor (b,), clipped to [0, 1] (torchvision's brightness)."""
    return x.mul_(_per_image(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place: blend with the image's mean grey level, x * f + mean * (1 - f), clipped
    (torchvision's contrast; a 1-channel image's mean is its own)."""
    f = _per_image(factor, x)
    if x.shape[1] == 3:  # the mean of the luma is the luma of the channel means
        mean = torch.einsum("bc,c->b", x.mean(dim=(2, 3)), x.new_tensor(GREY_WEIGHTS)).view(-1, 1, 1, 1)
    else:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (b, 1, 1, 1)
    return x.mul_(f).add_(mean * (1 - f)).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place: blend with the pixel's grey, x * f + grey * (1 - f), clipped (torchvision's
    saturation). A 1-channel image has no colour to change and stays as it is, as in Kornia."""
    if x.shape[1] != 3:
        return x
    f = _per_image(factor, x)
    g = grey(x).mul_(1 - f)  # (b, 1, H, W), taken before x changes
    return x.mul_(f).add_(g).clamp_(0.0, 1.0)


def shift_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """In place: rotate the HSV hue of (b, 3, H, W) RGB images by ``turns`` (b,) of the colour
    circle, keeping saturation and value; Kornia's ``adjust_hue`` (RGB -> HSV -> RGB) to float
    rounding, in one pass.

    With M, m the largest and smallest channel and C = M - m, the hue h (in sixths of a turn) follows
    from which channel is largest; the rotation keeps M and m, and each output channel is m + C * v,
    v = clamp(2 - d, 0, 1) with d the distance on the circle from the new hue to the channel's own
    (red 0, green 2, blue 4). No HSV image and no sextant table are built; the constants are folded
    into (b, 3) shifts: about 12 one-plane and 8 three-plane element-wise passes, 5 one-plane buffers
    (fresh buffers cost more than passes on a CPU)."""
    if x.shape[1] != 3:
        raise ValueError(f"hue needs RGB images (b, 3, H, W), got {tuple(x.shape)}; use hue=0 for grey images")
    r, g, b = x.unbind(1)  # (b, H, W) views
    top, low = x.amax(dim=1), x.amin(dim=1)
    red_top, green_top = r == top, g == top
    chroma = top.sub_(low)  # (b, H, W), in top's buffer
    # h * C in [-C, 5 C]: the largest channel picks the formula (ties give the same hue either way)
    h = torch.sub(r, g).add_(chroma, alpha=4.0)  # blue largest
    torch.where(green_top, torch.sub(b, r).add_(chroma, alpha=2.0), h, out=h)
    torch.where(red_top, torch.sub(g, b), h, out=h)
    h = h.div_(chroma).nan_to_num_(0.0).unsqueeze(1)  # (b, 1, H, W); grey pixels (0 / 0): 0
    # per image and channel: rotation - channel hue (mod 6), taken in [-5, 1) so that h + shift is in [-6, 6)
    centre = torch.tensor([0.0, 2.0, 4.0], device=x.device, dtype=x.dtype)
    shift = torch.remainder(6.0 * turns.to(x.device, x.dtype).view(-1, 1) - centre - 1.0, 6.0) - 5.0  # (b, 3)
    a = torch.add(h, shift.view(-1, 3, 1, 1), out=x)  # (b, 3, H, W): new hue - channel hue (mod 6) - 6
    v = a.abs_().sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0)  # d = 3 - ||a| - 3|, so v = clamp(2 - d, 0, 1)
    return v.mul_(chroma.unsqueeze(1)).add_(low.unsqueeze(1))  # m + C v


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised 1-d Gaussians (b, size), one per sigma (b,), centred on the middle tap (Kornia's
    formula, same operations, same rounding)."""
    x = torch.arange(size, device=sigma.device, dtype=sigma.dtype) - size // 2
    g = torch.exp(-x.pow(2.0) / (2 * sigma.pow(2.0)).unsqueeze(1))  # (b, size)
    return g / g.sum(-1, keepdim=True)


def reflect_blur_matrices(kernels: torch.Tensor, n: int) -> torch.Tensor:
    """Per image, the blur of a length-``n`` line by its odd kernel (b, k), reflect padding folded
    in, as a matrix (b, n, n): row i holds the taps at the positions they read (a reflected
    position collects two taps)."""
    b, k = kernels.shape
    pos = torch.arange(n, device=kernels.device)
    src = (pos[:, None] + torch.arange(k, device=kernels.device) - k // 2).abs()  # (n, k), reflected at 0
    src = torch.where(src > n - 1, 2 * (n - 1) - src, src)  # and at n - 1
    return kernels.new_zeros(b, n, n).scatter_add_(2, src.expand(b, n, k), kernels[:, None, :].expand(b, n, k))


def gaussian_blur(x: torch.Tensor, kernels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Separable blur of (b, C, H, W) with one odd 1-d kernel per image (b, k) along both axes,
    reflect padding (Kornia's ``gaussian_blur2d``): batched matrix products, rows for all channels
    at once, then columns one channel at a time (no (b, C, H, H) copy of the matrices); ``out``
    (may be x itself) takes the result. Grouped convolutions with per-image kernels measured
    slower here than these dense banded matrices (n multiply-adds per pixel instead of k, but in
    the fastest kernel there is)."""
    b, c, h, w = x.shape
    kernels = kernels.to(x.device, x.dtype)
    across = reflect_blur_matrices(kernels, w)  # (b, W, W)
    down = across if h == w else reflect_blur_matrices(kernels, h)  # (b, H, H)
    rows = torch.bmm(rearrange(x, "b c h w -> b (c h) w"), across.transpose(1, 2)).view(b, c, h, w)  # along W
    out = torch.empty_like(rows) if out is None else out
    for i in range(c):  # along H; bmm straight into a strided out= view measured erratic (up to 6x slower)
        out[:, i].copy_(torch.bmm(down, rows[:, i]))
    return out


class _Batched:
    """Mixin for a Kornia intensity augmentation: ``forward`` draws with the Kornia module's own
    ``forward_parameters`` and applies ``transform`` (the subclass's vectorised op) to the images
    ``p`` selected; the others come back as they were, bit for bit.

    Where the op is costly per pixel (``subset_pays``) and the parameters are on the CPU (read there
    for free), it runs on the selected images alone. Otherwise it runs on the whole batch and
    ``torch.where`` picks, as Kornia does, so an accelerator never waits for the host. With
    ``inplace`` the module may overwrite its input and return it: fresh buffers cost more than
    passes over the pixels on a CPU (DeviceAugment's photometric steps take the crop's fresh output)."""

    per_image_keys: tuple[str, ...] = ()
    subset_pays: bool = True
    inplace: bool = False

    def transform(self, x: torch.Tensor, params: dict[str, torch.Tensor], owned: bool) -> torch.Tensor:
        """The op on every image of x with its parameters: (b, C, H, W), or a view that broadcasts
        to it. ``owned``: x may be overwritten (and returned)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, C, H, W) float -> the same shape; ``params`` replays a draw (``self._params``)."""
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"{type(self).__name__} takes float (B, C, H, W) images, got {x.dtype} {tuple(x.shape)}")
        params = self.forward_parameters(x.shape) if params is None else params
        self._params = params
        if self.p == 1.0 and self.p_batch == 1.0:
            return self.transform(x, params, owned=self.inplace).contiguous()
        chosen = params["batch_prob"] > 0.5  # (B,)
        if chosen.device.type == "cpu":
            if not bool(chosen.any()):
                return x if self.inplace else x.clone()
            if bool(chosen.all()):
                return self.transform(x, params, owned=self.inplace).contiguous()
            if self.subset_pays:
                return self._on_chosen(x, params, chosen.nonzero().squeeze(1))
        pick = chosen.to(x.device).view(-1, 1, 1, 1)
        done = self.transform(x, params, owned=False)
        return torch.where(pick, done, x, out=x) if self.inplace else torch.where(pick, done, x)

    def _on_chosen(self, x: torch.Tensor, params: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        """The op on images ``idx`` (n,) (CPU) alone, with their share of the per-image parameters."""
        some = {k: v[idx] if k in self.per_image_keys else v for k, v in params.items()}
        at = idx.to(x.device, non_blocking=True)
        done = self.transform(x[at], some, owned=True)  # x[at]: a fresh copy (faster than index_select here)
        return x.index_copy_(0, at, done) if self.inplace else x.index_copy(0, at, done)


class BatchedColorJitter(_Batched, K.ColorJitter):
    """``K.ColorJitter`` (torchvision's formulas: brightness, contrast, saturation, hue in a random
    order drawn per batch, each image its own factors, applied with probability ``p``), batched:
    in-place blends for the first three, ``shift_hue`` for the hue. A step whose strength is 0 is
    skipped, as Kornia skips a step whose drawn factors are all neutral."""

    per_image_keys = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
    _steps = ((adjust_brightness, "brightness_factor"), (adjust_contrast, "contrast_factor"),
              (adjust_saturation, "saturation_factor"), (shift_hue, "hue_factor"))

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0,
                 p: float = 1.0, inplace: bool = False):
        super().__init__(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, p=p)
        self._on = tuple(float(v) != 0.0 for v in (brightness, contrast, saturation, hue))
        self.inplace = inplace

    @property
    def subset_pays(self) -> bool:
        return self._on[3]  # the hue costs ~20 passes over the pixels; the blends alone cost less than the copies

    def transform(self, x: torch.Tensor, params: dict[str, torch.Tensor], owned: bool) -> torch.Tensor:
        x = x.clamp_(0.0, 1.0) if owned else x.clamp(0.0, 1.0)  # the steps work in place
        last = None
        for i in params["order"].tolist():
            if self._on[i]:
                step, key = self._steps[i]
                x, last = step(x, params[key]), i
        return x.clamp_(0.0, 1.0) if last == 3 else x  # the blends end clipped already


class BatchedGrayscale(_Batched, K.RandomGrayscale):
    """``K.RandomGrayscale`` on RGB images: the luma in all three channels, with probability ``p``."""

    subset_pays = False  # a few passes: cheaper on the whole batch than the copies a subset needs

    def __init__(self, p: float = 0.1, inplace: bool = False):
        super().__init__(p=p)
        self.inplace = inplace

    def transform(self, x: torch.Tensor, params: dict[str, torch.Tensor], owned: bool) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError(f"BatchedGrayscale needs RGB images (b, 3, H, W), got {tuple(x.shape)}")
        luma = grey(x).expand(-1, 3, -1, -1)  # a view; forward makes a tensor of its own where it returns one
        return x.copy_(luma) if owned else luma


class BatchedGaussianBlur(_Batched, K.RandomGaussianBlur):
    """``K.RandomGaussianBlur`` with a square odd ``kernel_size``, reflect borders and a sigma drawn
    per image from ``sigma``, with probability ``p``: per-image kernels as banded matrices, matmuls."""

    per_image_keys = ("sigma",)

    def __init__(self, kernel_size: int, sigma: tuple[float, float], p: float = 0.5, inplace: bool = False):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"BatchedGaussianBlur kernel_size={kernel_size} must be an odd integer >= 1")
        super().__init__((kernel_size, kernel_size), sigma, border_type="reflect", p=p)
        self.kernel_size = kernel_size
        self.inplace = inplace

    def transform(self, x: torch.Tensor, params: dict[str, torch.Tensor], owned: bool) -> torch.Tensor:
        if self.kernel_size // 2 >= min(x.shape[-2:]):
            raise ValueError(f"BatchedGaussianBlur kernel_size={self.kernel_size} needs images larger than its radius "
                             f"{self.kernel_size // 2} for reflect padding, got {tuple(x.shape)}; use a smaller kernel")
        sigma = params["sigma"].to(x.device, x.dtype, non_blocking=True)
        out = x if owned else None
        return gaussian_blur(x, gaussian_kernels(sigma, self.kernel_size), out=out)


class BatchedSolarize(_Batched, K.RandomSolarize):
    """``K.RandomSolarize`` at one fixed ``threshold`` (no additions): with probability ``p``, pixels at
    or above the threshold are inverted (x -> 1 - x), after clipping to [0, 1]."""

    per_image_keys = ("thresholds", "additions")
    subset_pays = False

    def __init__(self, threshold: float, p: float = 0.5, inplace: bool = False):
        super().__init__(thresholds=(threshold, threshold), additions=(0.0, 0.0), p=p)
        self.inplace = inplace

    def transform(self, x: torch.Tensor, params: dict[str, torch.Tensor], owned: bool) -> torch.Tensor:
        x = x.clamp_(0.0, 1.0) if owned else x.clamp(0.0, 1.0)
        return torch.where(x < _per_image(params["thresholds"], x), x, 1.0 - x, out=x)


def photometric_steps(view: ViewSpec, channels: int, inplace: bool = False) -> list[nn.Module]:
    """The colour / blur / solarize steps of ``view`` for images with ``channels`` channels, in
    DINO's order; steps with probability 0 are left out (so they draw nothing from the RNG). Each
    is the batched stand-in of a Kornia augmentation (an instance of it, drawing as it does);
    ``inplace``: they may overwrite their input (give them a tensor no one else reads)."""
    steps: list[nn.Module] = []
    b, c, s, h = view.color_jitter
    if channels != 3:
        s = h = 0.0  # saturation and hue need colour
    if view.color_jitter_p > 0 and (b, c, s, h) != (0.0, 0.0, 0.0, 0.0):
        steps.append(BatchedColorJitter(brightness=b, contrast=c, saturation=s, hue=h, p=view.color_jitter_p,
                                        inplace=inplace))
    if view.grayscale_p > 0 and channels == 3:
        steps.append(BatchedGrayscale(p=view.grayscale_p, inplace=inplace))
    if view.blur_p > 0:
        steps.append(BatchedGaussianBlur(blur_kernel_size(view.blur_sigma[1], view.size), view.blur_sigma,
                                         p=view.blur_p, inplace=inplace))
    if view.solarize_p > 0:
        steps.append(BatchedSolarize(view.solarize_threshold, p=view.solarize_p, inplace=inplace))
    return steps


# --------------------------------------------------------------------------- RandAugment, per image

#: timm's increasing RandAugment ops ("inc1", DeiT's): every op grows stronger with the magnitude.
#: The geometric ones come last: the images that drew any of them share one warp.
RANDAUGMENT_OPS: tuple[str, ...] = (
    "auto_contrast", "equalize", "invert", "posterize", "solarize", "solarize_add",
    "color", "contrast", "brightness", "sharpness",
    "rotate", "shear_x", "shear_y", "translate_x", "translate_y",
)
GEOMETRIC_OPS: tuple[str, ...] = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
#: ops that need 3 channels: a grey image never draws them
COLOUR_ONLY_OPS = frozenset({"color"})
# PIL's ImageFilter.SMOOTH, the degenerate image of ImageEnhance.Sharpness
_SMOOTH = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)  # (b,) -> (b, 1, 1, 1)


def _levels(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255.0).round_()  # [0, 1] -> the 256 uint8 levels, as floats


def luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's "L" (ITU-R 601-2 luma) of (b, 3, H, W) images -> (b, 1, H, W); a grey image is its own."""
    if x.shape[1] == 1:
        return x
    return torch.einsum("bchw,c->bhw", x, x.new_tensor([0.299, 0.587, 0.114])).unsqueeze(1)


def _enhance(x: torch.Tensor, degenerate: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance with timm's increasing factor 1 +- 0.9 level/10 (in [0.1, 1.9]): from
    ``degenerate`` (factor 0) through the image (factor 1) and beyond, clipped to [0, 1]."""
    factor = _col(1.0 + sign * 0.9 * level / MAX_LEVEL)
    return (degenerate + factor * (x - degenerate)).clamp_(0.0, 1.0)


def auto_contrast(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Stretch each image's channels from their (min, max) to (0, 1); a flat channel stays."""
    lo = x.amin(dim=(2, 3), keepdim=True)  # (b, C, 1, 1)
    span = x.amax(dim=(2, 3), keepdim=True) - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), x)


def equalize(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per image and channel on the 256 levels, batched: one histogram
    (scatter_add) and one table lookup (gather). A channel PIL leaves alone stays as it is."""
    h = x.shape[2]
    v = rearrange(_levels(x).long(), "b c h w -> b c (h w)")
    hist = torch.zeros(*v.shape[:2], 256, dtype=torch.long, device=x.device).scatter_add_(2, v, torch.ones_like(v))
    top = torch.where(hist > 0, torch.arange(256, device=x.device), 0).amax(-1, keepdim=True)  # (b, C, 1) brightest level
    step = (hist.sum(-1, keepdim=True) - hist.gather(2, top)) // 255  # (b, C, 1)
    lut = ((hist.cumsum(-1) - hist + step // 2) // step.clamp_min(1)).clamp_max_(255)  # (b, C, 256)
    out = rearrange(lut.gather(2, v).to(x.dtype) / 255.0, "b c (h w) -> b c h w", h=h)
    return torch.where(rearrange(step > 0, "b c 1 -> b c 1 1"), out, x)


def invert(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return 1.0 - x


def posterize(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Keep the top 4 - floor(4 level/10) bits of each level, at least 1 (timm asks for 0 bits at
    level 10, a black image, which Pillow now refuses)."""
    step = _col(torch.pow(2.0, (4.0 + torch.floor(4.0 * level / MAX_LEVEL)).clamp_max(7.0)))  # 2 ** (8 - bits)
    return torch.floor(_levels(x) / step) * step / 255.0


def solarize(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Invert the levels at or above 256 - floor(256 level/10) (none at level 0, all at 10)."""
    threshold = _col(256.0 - torch.floor(256.0 * level / MAX_LEVEL))
    return torch.where(_levels(x) >= threshold, 1.0 - x, x)


def solarize_add(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Add floor(110 level/10) levels to the levels below 128, clipped at 255."""
    add = _col(torch.floor(110.0 * level / MAX_LEVEL)) / 255.0
    return torch.where(_levels(x) < 128, (x + add).clamp_max_(1.0), x)


def color(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return _enhance(x, luma(x), level, sign)  # saturation: toward / away from the grey image


def contrast(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    mean = _levels(luma(x).mean(dim=(1, 2, 3), keepdim=True)) / 255.0  # (b, 1, 1, 1) PIL rounds it to a level
    return _enhance(x, mean, level, sign)


def brightness(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return _enhance(x, torch.zeros_like(x[:, :1, :1, :1]), level, sign)


def sharpness(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Away from (or toward) PIL's 3x3 SMOOTH of the image; its border pixels stay, as in PIL."""
    c = x.shape[1]
    if min(x.shape[-2:]) < 3:
        return x
    kernel = repeat(x.new_tensor(_SMOOTH) / 13.0, "h w -> c 1 h w", c=c)
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)  # (b, C, H-2, W-2)
    return _enhance(x, smooth, level, sign)


PIXEL_OPS = {f.__name__: f for f in (auto_contrast, equalize, invert, posterize, solarize, solarize_add, color,
                                     contrast, brightness, sharpness)}


def geometric_theta(kind: torch.Tensor, level: torch.Tensor, sign: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per image (g,) the index into GEOMETRIC_OPS, its level and sign -> (g, 2, 3) affine_grid
    matrices (output -> input, align_corners=False), as timm's PIL ops: rotate by +-30 level/10
    degrees about the centre (counter-clockwise for +), shear by +-0.3 level/10 about the top-left
    corner, translate by +-0.45 level/10 of the side."""
    strength = sign * level / MAX_LEVEL  # (g,)

    def of(name: str, scale: float) -> torch.Tensor:
        return torch.where(kind == GEOMETRIC_OPS.index(name), strength * scale, torch.zeros_like(strength))

    angle, shear_x, shear_y = of("rotate", math.pi / 6), of("shear_x", 0.3), of("shear_y", 0.3)
    cos, sin = torch.cos(angle), torch.sin(angle)
    aspect = height / width  # pixel -> normalised units differ per axis
    # in pixels about the centre: input = L @ output + t, with the corner shear's t = s * (side / 2)
    row0 = torch.stack([cos, (shear_x - sin) * aspect, 2 * of("translate_x", 0.45) + shear_x * aspect], -1)
    row1 = torch.stack([(sin + shear_y) / aspect, cos, 2 * of("translate_y", 0.45) + shear_y / aspect], -1)
    return torch.stack([row0, row1], 1)  # (g, 2, 3)


def warp(x: torch.Tensor, theta: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Bilinear affine warp of (g, C, H, W) by theta (g, 2, 3); uncovered pixels take ``fill``."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.add_(fill).clamp_(0.0, 1.0)


class RandAugment(nn.Module):
    """RandAugment with per-image randomness on float [0, 1] (B, C, H, W) batches.

    For each of ``num_ops`` layers every image draws one op of ``ops`` (uniformly, with
    replacement across layers, as timm), a coin with probability ``p`` that it applies, a sign and a
    magnitude from N(``magnitude``, ``magnitude_std``) clipped to [0, 10]. Each op then runs once per
    layer on the subset of images that drew it (index_select / index_copy_; the geometric ones
    share one warp), so the cost is one pass per op, not per image, and one host sync per layer.
    Kornia's ``kornia.augmentation.auto.RandAugment`` draws its ops once per batch (a
    ``randperm`` of the policy) and its magnitude is fixed: the whole batch gets the same ops.

    Ops and magnitudes follow timm's "inc1" set on PIL images, in floats: level arithmetic on the
    256 uint8 levels where PIL works on levels (posterize, solarize, equalize), bilinear warps
    (rotation about the centre, shears about the top-left corner, as PIL), ``fill`` (per channel,
    in [0, 1]; the normalisation mean, as timm's ``img_mean``) where a warp uncovers the image;
    posterize keeps at least 1 bit. Only the global torch RNG of the input's device is used. The
    output stays in [0, 1]. With ``channels != 3`` the colour-only ops are left out of the draw (a
    grey image draws among the other 14)."""

    def __init__(self, num_ops: int, magnitude: float = 9.0, magnitude_std: float = 0.5, p: float = 0.5,
                 channels: int = 3, fill: Sequence[float] = (0.5,), ops: Sequence[str] | None = None):
        super().__init__()
        ops = tuple(RANDAUGMENT_OPS if ops is None else ops)
        unknown = [o for o in ops if o not in RANDAUGMENT_OPS]
        if unknown or not ops:
            raise ValueError(f"RandAugment ops={list(ops)}: {unknown or 'none given'}; "
                             f"choose among {', '.join(RANDAUGMENT_OPS)}")
        if channels != 3:
            ops = tuple(o for o in ops if o not in COLOUR_ONLY_OPS)
        if len(fill) not in (1, channels):
            raise ValueError(f"RandAugment fill={list(fill)} must have 1 or {channels} value(s) (one per channel)")
        self.ops = tuple(o for o in ops if o not in GEOMETRIC_OPS) + tuple(o for o in ops if o in GEOMETRIC_OPS)
        self.num_pixel_ops = sum(o not in GEOMETRIC_OPS for o in self.ops)
        self.num_ops, self.magnitude, self.magnitude_std, self.p = num_ops, float(magnitude), float(magnitude_std), p
        self.register_buffer("fill", torch.tensor([float(f) for f in fill]).view(1, -1, 1, 1), persistent=False)
        kinds = [GEOMETRIC_OPS.index(o) for o in self.ops[self.num_pixel_ops:]]
        self.register_buffer("geometric_kind", torch.tensor(kinds, dtype=torch.long), persistent=False)

    def sample(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Per layer and image (num_ops, B): ``op`` (index into self.ops, or len(self.ops) where the
        coin said no), ``level`` in [0, 10] and ``sign`` (+-1)."""
        shape = (self.num_ops, batch)
        op = torch.randint(0, len(self.ops), shape, device=device)
        skip = torch.rand(shape, device=device) >= self.p
        level = (self.magnitude + self.magnitude_std * torch.randn(shape, device=device)).clamp_(0.0, MAX_LEVEL)
        sign = torch.where(torch.rand(shape, device=device) < 0.5, -1.0, 1.0)
        return {"op": op.masked_fill_(skip, len(self.ops)), "level": level, "sign": sign}

    def forward(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, C, H, W) float in [0, 1] -> the same shape, each image with its own ops."""
        if not x.is_floating_point() or x.ndim != 4:
            raise ValueError(f"RandAugment takes float (B, C, H, W) images in [0, 1], got {x.dtype} {tuple(x.shape)}")
        params = self.sample(x.shape[0], x.device) if params is None else params
        x = x.clone()
        for op, level, sign in zip(params["op"], params["level"], params["sign"]):
            self._layer(x, op, level, sign)
        return x

    def _layer(self, x: torch.Tensor, op: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> None:
        """One layer in place: each op on the images that drew it."""
        order = torch.argsort(op, stable=True)  # images grouped by op
        counts = torch.bincount(op, minlength=len(self.ops) + 1).tolist()  # the layer's one host sync
        groups = torch.split(order, counts)
        for name, idx in zip(self.ops[:self.num_pixel_ops], groups):
            if len(idx):
                x.index_copy_(0, idx, PIXEL_OPS[name](x.index_select(0, idx), level[idx], sign[idx]))
        idx = torch.cat(groups[self.num_pixel_ops:len(self.ops)]) if self.num_pixel_ops < len(self.ops) else order[:0]
        if len(idx):
            kind = self.geometric_kind[op[idx] - self.num_pixel_ops]
            theta = geometric_theta(kind, level[idx], sign[idx], x.shape[2], x.shape[3])
            x.index_copy_(0, idx, warp(x.index_select(0, idx), theta, self.fill.to(x.dtype)))

    def extra_repr(self) -> str:
        return (f"num_ops={self.num_ops}, magnitude={self.magnitude}, magnitude_std={self.magnitude_std}, "
                f"p={self.p}, ops={self.ops}")


# --------------------------------------------------------------------------- MixUp / CutMix


@dataclass(frozen=True)
class MixParams:
    """One batch's mix: ``lam`` is each image's own share (for CutMix, the share of its area left
    after the box); ``box`` = (y0, y1, x0, x1) pasted from the flipped batch, None for MixUp."""

    lam: float
    box: tuple[int, int, int, int] | None = None


def one_hot_smoothed(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) -> (B, K): 1 - smoothing + smoothing/K on the label, smoothing/K elsewhere."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)  # (B, K)
    return targets.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def cutmix_box(lam: float, height: int, width: int, cy: int, cx: int) -> MixParams:
    """CutMix's box for a drawn ``lam``, centred on pixel (cy, cx): sides int(side * sqrt(1 - lam)),
    clipped at the border, and the lambda corrected to the share of the area the box leaves."""
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return MixParams(1.0 - (y1 - y0) * (x1 - x0) / (height * width), (y0, y1, x0, x1))


class MixUp(nn.Module):
    """MixUp / CutMix in timm's batch mode, composed by a supervised objective on its normalised views:
    with probability ``prob`` the batch is mixed with its own reverse (image i with image B-1-i), by
    CutMix with probability ``switch_prob`` (when both alphas are > 0) else by MixUp, with one
    lambda ~ Beta(alpha, alpha) for the batch. A CutMix box has sides sqrt(1 - lambda) of the image,
    centred uniformly and clipped at the border; lambda is then corrected to the area left.
    ``forward(images (B, C, H, W), labels (B,)) -> (images, soft targets (B, K))``, the targets
    label-smoothed. Draws from the global torch (CPU) RNG only."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1):
        super().__init__()
        checks = [
            ("num_classes", num_classes, isinstance(num_classes, int) and num_classes >= 2, "an integer >= 2"),
            ("mixup_alpha", mixup_alpha, mixup_alpha >= 0, ">= 0 (0: no MixUp)"),
            ("cutmix_alpha", cutmix_alpha, cutmix_alpha >= 0, ">= 0 (0: no CutMix)"),
            ("mix_prob", prob, 0 <= prob <= 1, "a probability in [0, 1]"),
            ("mix_switch_prob", switch_prob, 0 <= switch_prob <= 1, "a probability in [0, 1]"),
            ("label_smoothing", label_smoothing, 0 <= label_smoothing < 1, "in [0, 1)"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={value!r} is invalid; it must be {allowed}")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise ValueError("mixup_alpha=0 and cutmix_alpha=0: nothing to mix; set one > 0 (DeiT: 0.8 and 1.0)")
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing

    def sample(self, height: int, width: int) -> MixParams:
        if float(torch.rand(())) >= self.prob:
            return MixParams(1.0)
        cutmix = self.mixup_alpha == 0 or (self.cutmix_alpha > 0 and float(torch.rand(())) < self.switch_prob)
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        if not cutmix:
            return MixParams(lam)
        return cutmix_box(lam, height, width, int(torch.randint(0, height, ())), int(torch.randint(0, width, ())))

    def apply(self, images: torch.Tensor, labels: torch.Tensor, params: MixParams) -> tuple[torch.Tensor, torch.Tensor]:
        partner = images.flip(0)  # (B, C, H, W) image B-1-i beside image i
        if params.box is not None:
            y0, y1, x0, x1 = params.box
            images = images.clone()
            images[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        elif params.lam < 1.0:
            images = images * params.lam + partner * (1.0 - params.lam)
        own = one_hot_smoothed(labels, self.num_classes, self.label_smoothing)  # (B, K)
        return images, own * params.lam + own.flip(0) * (1.0 - params.lam)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(images, labels, self.sample(*images.shape[-2:]))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, "
                f"prob={self.prob}, switch_prob={self.switch_prob}, label_smoothing={self.label_smoothing}")


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k target_k log softmax(logits)_k; logits and targets (B, K)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class ResizedCropFlip(nn.Module):
    """Kornia's RandomResizedCrop (bilinear, align_corners=True) and RandomHorizontalFlip as one
    batched bilinear ``grid_sample``: the boxes and flips are drawn by those Kornia modules' own
    parameter generators (the same distribution and the same random numbers, so a seed gives the
    same views as the two Kornia steps, up to float rounding), then every image is cropped,
    resized and flipped in one call. Kornia crops by index, one ``interpolate`` per image after
    reading the boxes back to the host; this is one kernel for the batch.
    (B, C, H, W) float -> (B, C, size, size)."""

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float], hflip: float):
        super().__init__()
        self.size = size
        self.crop = K.RandomResizedCrop((size, size), scale=scale, ratio=ratio, p=1.0)  # its sampler only
        self.flip = K.RandomHorizontalFlip(p=hflip) if hflip > 0 else None

    def grid(self, box: torch.Tensor, flip: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Boxes (B, 4, 2) of inclusive pixel corners (x, y), flips (B,) -> sampling grid (B, S, S, 2)."""
        steps = torch.linspace(0.0, 1.0, self.size, device=box.device, dtype=box.dtype) if self.size > 1 \
            else torch.zeros(1, device=box.device, dtype=box.dtype)
        (x0, y0), (x1, y1) = box[:, 0].unbind(-1), box[:, 2].unbind(-1)  # (B,) each
        xs = x0[:, None] + steps * (x1 - x0)[:, None]  # (B, S) pixel columns, corner-aligned
        ys = y0[:, None] + steps * (y1 - y0)[:, None]  # (B, S)
        xs = torch.where(flip[:, None], xs.flip(1), xs)
        u = xs * (2.0 / max(width - 1, 1)) - 1.0  # align_corners=True units
        v = ys * (2.0 / max(height - 1, 1)) - 1.0
        b, s = u.shape
        return torch.stack([u[:, None, :].expand(b, s, s), v[:, :, None].expand(b, s, s)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drawn = self.crop.forward_parameters(x.shape)["src"]  # (B, 4, 2), drawn where Kornia draws (the CPU)
        box = drawn.to(x.device, x.dtype)
        if self.flip is not None:
            flip = self.flip.forward_parameters(x.shape)["batch_prob"].to(x.device).bool()  # (B,)
        else:
            flip = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        out = F.grid_sample(x, self.grid(box, flip, x.shape[2], x.shape[3]), mode="bilinear", padding_mode="border",
                            align_corners=True)
        if x.shape[-2:] == (self.size, self.size):
            self._copy_whole_crops(x, out, drawn, flip)
        return out

    def _copy_whole_crops(self, x: torch.Tensor, out: torch.Tensor, drawn: torch.Tensor, flip: torch.Tensor) -> None:
        """A crop of the whole image at its own size is the image (flipped or not), bit for bit, as
        with Kornia; the test runs on the boxes where they were drawn, so a GPU batch waits for nothing."""
        whole = ((drawn[:, 2] - drawn[:, 0]) == self.size - 1).all(-1).nonzero().squeeze(1)
        if len(whole):
            idx = whole.to(x.device)
            exact = x.index_select(0, idx)  # (n, C, H, W)
            out.index_copy_(0, idx, torch.where(rearrange(flip[idx], "n -> n 1 1 1"), exact.flip(-1), exact))

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.crop._param_generator.scale}, ratio={self.crop._param_generator.ratio}, " \
               f"hflip={self.flip.p if self.flip is not None else 0.0}"


class RepeatChannels(nn.Module):
    """(B, 1, H, W) -> (B, channels, H, W): a grey view for a backbone that takes colour."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return repeat(x, "b 1 h w -> b c h w", c=self.channels)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class DeviceAugment(nn.Module):
    """Random views of a uint8 batch: per view instance one batched random resized crop + flip
    (``ResizedCropFlip``: Kornia's parameters, one grid_sample) (+ the photometric steps the ViewSpec
    asks for) (+ RandAugment) + Normalize, with each image drawing its own crop, flip, photometric
    and RandAugment parameters.

    ``forward(images)`` returns float32 (B, len(mean), size, size) tensors, one per view instance,
    in the order of ``views`` with each spec repeated ``count`` times, on the images' device.

    Grey input: with ``allow_grey=True`` and 3-value mean/std, a (B, 1, H, W) batch is augmented
    as grey (``grey_pipelines``: no colour-only steps, which would do nothing on a grey image) and
    its channel repeated to 3 just before Normalize, for a 3-channel backbone fed grey data. Without
    it a channel-count mismatch is an error (it usually means the data or the stats are wrong).
    """

    def __init__(self, views: Sequence[ViewSpec], mean: Sequence[float], std: Sequence[float],
                 allow_grey: bool = False):
        super().__init__()
        if not views:
            raise ValueError("views is empty; give at least one ViewSpec")
        _check_stats(mean, std)
        self.views = list(views)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.allow_grey = allow_grey
        self.pipelines = nn.ModuleList(self._pipeline(view, len(self.mean)) for view in self.views)
        grey = allow_grey and len(self.mean) == 3
        self.grey_pipelines = nn.ModuleList(self._pipeline(view, 1) for view in self.views) if grey else None

    def _pipeline(self, view: ViewSpec, channels: int) -> nn.Sequential:
        """The steps of one view for input with ``channels`` channels."""
        steps: list[nn.Module] = [ResizedCropFlip(view.size, view.scale, view.ratio, view.hflip)]
        steps.extend(photometric_steps(view, channels, inplace=True))  # on the crop's fresh output
        if view.randaugment_ops:
            fill = self.mean if channels == len(self.mean) else [sum(self.mean) / len(self.mean)]
            steps.append(RandAugment(view.randaugment_ops, view.randaugment_magnitude, view.randaugment_mstd,
                                     view.randaugment_p, channels=channels, fill=fill))
        if channels != len(self.mean):
            steps.append(RepeatChannels(len(self.mean)))
        steps.append(K.Normalize(mean=torch.tensor(self.mean), std=torch.tensor(self.std)))
        return nn.Sequential(*steps)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        _check_images(images, len(self.mean), self.mean, allow_grey=self.grey_pipelines is not None)
        pipelines = self.pipelines if images.shape[1] == len(self.mean) else self.grey_pipelines
        pixels = images.float().div_(255.0)
        out = []
        for view, pipeline in zip(self.views, pipelines):
            out.extend(pipeline(pixels) for _ in range(view.count))
        return out

    def extra_repr(self) -> str:
        return f"views={self.views}, mean={self.mean}, std={self.std}, allow_grey={self.allow_grey}"


def eval_transform(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Deterministic evaluation input: uint8 (B, C, H, W) -> float32 (B, len(mean), size, size),
    pixel/255 resized (bilinear, antialiased) when needed, a grey channel repeated for 3-value
    stats, then normalised."""
    _check_stats(mean, std)
    _check_images(images, len(mean), mean, allow_grey=True)
    x = images.float().div_(255.0)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if x.shape[1] == 1 and len(mean) == 3:
        x = repeat(x, "b 1 h w -> b c h w", c=3)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t
