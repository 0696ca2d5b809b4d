"""Augmentation on the accelerator: batched Kornia views built from an objective's ViewSpecs.

The CPU workers deliver uint8 batches at a fixed load size; every random transform happens here,
per sample, drawing only from the global torch RNG so that a checkpoint's saved RNG state
reproduces the augmentation of a resumed run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn


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
    greyscale) are skipped; brightness, contrast, blur and solarize still apply."""

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
            "give one mean/std value per channel (or load the data with that many channels)"
        )


def blur_kernel_size(sigma_max: float, size: int) -> int:
    """An odd kernel covering +-3 sigma, no wider than the (odd-rounded-down) image."""
    k = 2 * math.ceil(3 * sigma_max) + 1
    return max(3, min(k, size if size % 2 else size - 1))


def photometric_steps(view: ViewSpec, channels: int) -> list[nn.Module]:
    """The colour / blur / solarize steps of ``view`` for images with ``channels`` channels, in
    DINO's order; steps with probability 0 are left out (so they draw nothing from the RNG)."""
    steps: list[nn.Module] = []
    b, c, s, h = view.color_jitter
    if channels != 3:
        s = h = 0.0  # saturation and hue need colour
    if view.color_jitter_p > 0 and (b, c, s, h) != (0.0, 0.0, 0.0, 0.0):
        steps.append(K.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h, p=view.color_jitter_p))
    if view.grayscale_p > 0 and channels == 3:
        steps.append(K.RandomGrayscale(p=view.grayscale_p))
    if view.blur_p > 0:
        k = blur_kernel_size(view.blur_sigma[1], view.size)
        steps.append(K.RandomGaussianBlur((k, k), view.blur_sigma, border_type="reflect", p=view.blur_p))
    if view.solarize_p > 0:
        t = view.solarize_threshold
        steps.append(K.RandomSolarize(thresholds=(t, t), additions=(0.0, 0.0), p=view.solarize_p))
    return steps


class DeviceAugment(nn.Module):
    """Random views of a uint8 batch: per view instance one batched RandomResizedCrop (+ flip)
    (+ the photometric steps the ViewSpec asks for) + Normalize, with each image drawing its own
    crop, flip and photometric parameters.

    ``forward(images)`` returns float32 (B, C, size, size) tensors, one per view instance, in the
    order of ``views`` with each spec repeated ``count`` times.
    """

    def __init__(self, views: Sequence[ViewSpec], mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if not views:
            raise ValueError("views is empty; give at least one ViewSpec")
        _check_stats(mean, std)
        self.views = list(views)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.pipelines = nn.ModuleList(self._pipeline(view) for view in self.views)

    def _pipeline(self, view: ViewSpec) -> nn.Module:
        steps: list[nn.Module] = [
            K.RandomResizedCrop((view.size, view.size), scale=view.scale, ratio=view.ratio, p=1.0),
        ]
        if view.hflip > 0:
            steps.append(K.RandomHorizontalFlip(p=view.hflip))
        steps.extend(photometric_steps(view, len(self.mean)))
        steps.append(K.Normalize(mean=torch.tensor(self.mean), std=torch.tensor(self.std)))
        return nn.Sequential(*steps)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        _check_images(images, len(self.mean), self.mean)
        pixels = images.float().div_(255.0)
        out = []
        for view, pipeline in zip(self.views, self.pipelines):
            out.extend(pipeline(pixels) for _ in range(view.count))
        return out

    def extra_repr(self) -> str:
        return f"views={self.views}, mean={self.mean}, std={self.std}"


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
