"""PNG pictures of what a model learned: attention maps, reconstructions, embeddings, curves.

Each writer takes tensors (no model, no files to find) and returns the path it wrote, so the
`eval.visualize` command, a notebook and the tests share them. Figures are drawn with
matplotlib's Agg canvas through `matplotlib.figure.Figure` (no pyplot, no display, no global
state) at fixed sizes: a grid is CELL_PX pixels per cell, so a picture's size is known from its
rows and columns (`grid_px`).

Images come in the model's input space (normalised with the checkpoint's `preprocess` mean and
std); pass those so the pictures show the original grey levels / colours.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

DPI = 100
CELL_PX = 160  # one image cell of a grid
HEADER_PX = 44  # the band above a grid: the title and the column names
EMBED_PX = (800, 640)  # (width, height) of the embeddings scatter
CURVE_PX = (480, 360)  # (width, height) of one curve panel

Stats = Sequence[float] | None


def grid_px(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) in pixels of a grid picture of rows x cols cells (plus the header band)."""
    return cols * CELL_PX, rows * CELL_PX + HEADER_PX


def _grid_axes(rows: int, cols: int, names: Sequence[str], title: str | None):
    """A figure of rows x cols image cells under a header band: the title, then the column names."""
    width, height = grid_px(rows, cols)
    fig = _figure(width, height)
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01 * CELL_PX * rows / height,
                        top=1 - HEADER_PX / height, wspace=0.04, hspace=0.04)
    for k, name in enumerate(names):
        axes[0, k].set_title(name, fontsize=9, pad=3)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 3 / height, va="top")
    return fig, axes


def _figure(width_px: int, height_px: int):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")  # no bbox_inches="tight": the size stays the one asked for
    return path


def to_display(images: torch.Tensor, mean: Stats = None, std: Stats = None) -> np.ndarray:
    """Images (B, C, H, W) in the normalised input space -> (B, H, W, C) float in [0, 1] for
    imshow: un-normalised with `mean` / `std` (per channel) when given, then clipped."""
    if images.ndim != 4:
        raise ValueError(f"images of shape {tuple(images.shape)}: expected (B, C, H, W)")
    x = images.detach().float().cpu()
    if mean is not None and std is not None:
        c = x.shape[1]
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean {list(mean)} / std {list(std)} do not have one value per channel ({c} channels)")
        x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    return rearrange(x.clamp(0, 1), "b c h w -> b h w c").numpy()


def _show(ax, img: np.ndarray) -> None:
    """One (H, W, C) image in [0, 1] on an axis without ticks (grey for one channel)."""
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(img[..., :3], interpolation="nearest")
    ax.set_axis_off()


def _normalise_maps(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(B, K, gh, gw) -> (B, K, H, W): each map resized to the image (bilinear) and scaled to [0, 1]."""
    m = F.interpolate(maps.detach().float().cpu(), size=size, mode="bilinear", align_corners=False)
    lo = m.amin(dim=(-2, -1), keepdim=True)
    hi = m.amax(dim=(-2, -1), keepdim=True)
    return ((m - lo) / (hi - lo).clamp_min(1e-12)).numpy()


def attention_grid(images: torch.Tensor, maps: torch.Tensor, path: str | os.PathLike, mean: Stats = None,
                   std: Stats = None, title: str | None = None) -> Path:
    """One row per image: the image, then each head's map (B, H, gh, gw) over it, then the mean
    of the heads. Each map is scaled to its own [0, 1]. Size: grid_px(B, heads + 2)."""
    if maps.ndim != 4 or maps.shape[0] != images.shape[0]:
        raise ValueError(f"maps of shape {tuple(maps.shape)} for {images.shape[0]} images: expected (B, heads, gh, gw) "
                         "(eval.attention.class_attention_maps of one layer)")
    shown = to_display(images, mean, std)  # (B, H, W, C)
    size = tuple(images.shape[-2:])
    overlays = _normalise_maps(torch.cat([maps, maps.mean(dim=1, keepdim=True)], dim=1), size)  # (B, heads+1, H, W)
    rows, heads = maps.shape[0], maps.shape[1]
    fig, axes = _grid_axes(rows, heads + 2, ["image", *(f"head {h}" for h in range(heads)), "mean of heads"], title)
    for r in range(rows):
        _show(axes[r, 0], shown[r])
        for k in range(heads + 1):
            ax = axes[r, k + 1]
            ax.imshow(shown[r].mean(axis=-1), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.imshow(overlays[r, k], cmap="inferno", alpha=0.6, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_axis_off()
    return _save(fig, path)


RECONSTRUCTION_COLUMNS = ("original", "masked", "reconstruction")


def reconstruction_grid(recon: Mapping[str, torch.Tensor], path: str | os.PathLike, mean: Stats = None,
                        std: Stats = None, title: str | None = None) -> Path:
    """One row per image: original | masked | reconstructed (the dict of an objective's
    reconstruct_images, in the input space). Size: grid_px(B, 3)."""
    missing = [k for k in RECONSTRUCTION_COLUMNS if k not in recon]
    if missing:
        raise ValueError(f"recon lacks {', '.join(missing)}: pass the dict of MAE / SimMIM reconstruct_images()")
    columns = [to_display(recon[k], mean, std) for k in RECONSTRUCTION_COLUMNS]
    fig, axes = _grid_axes(columns[0].shape[0], len(columns), RECONSTRUCTION_COLUMNS, title)
    for r in range(columns[0].shape[0]):
        for c, shown in enumerate(columns):
            _show(axes[r, c], shown[r])
    return _save(fig, path)


def pca_2d(features: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, 2): the features centred and projected on their two main directions
    (torch.pca_lowrank, seeded so the picture is the same each time)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features of shape {tuple(features.shape)}: expected (N, D) with N >= 2")
    x = features.detach().float().cpu()
    x = x - x.mean(dim=0, keepdim=True)
    q = min(2, x.shape[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        _, _, v = torch.pca_lowrank(x, q=q, center=False)  # v (D, q)
    proj = x @ v  # (N, q)
    return F.pad(proj, (0, 2 - q))  # one feature: the second axis is 0


def embeddings_plot(features: torch.Tensor, labels: torch.Tensor, path: str | os.PathLike,
                    class_names: Sequence[str] | None = None, title: str | None = None) -> Path:
    """A 2-D PCA of features (N, D), one colour per class (labels (N,)), legend of class names.
    Size: EMBED_PX."""
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"{features.shape[0]} features but {labels.shape[0]} labels: one label per feature")
    xy = pca_2d(features).numpy()
    labels = labels.detach().cpu().long().numpy()
    fig = _figure(*EMBED_PX)
    ax = fig.add_axes((0.08, 0.08, 0.62, 0.84))
    cmap = _class_colours(int(labels.max()) + 1)
    for c in np.unique(labels):
        name = class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)
        pts = xy[labels == c]
        ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.7, color=cmap[c], label=name, linewidths=0)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, markerscale=2.5, frameon=False)
    ax.set_title(title or f"PCA of {len(labels)} test features", fontsize=10)
    return _save(fig, path)


def _class_colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    return [cmap(i if n <= 20 else i / max(1, n - 1)) for i in range(n)]


def curves_plot(history: Mapping[str, Sequence[tuple[int, float]]], path: str | os.PathLike,
                title: str | None = None) -> Path:
    """One panel per metric ({name: [(step, value), ...]}, e.g. 'loss' and 'knn/top1_k20'),
    value over step. Size: (CURVE_PX width x panels, CURVE_PX height)."""
    panels = [(name, sorted(points)) for name, points in history.items() if points]
    if not panels:
        raise ValueError("history has no points: nothing to draw (log some metrics, e.g. train for a few steps)")
    fig = _figure(CURVE_PX[0] * len(panels), CURVE_PX[1])
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    fig.subplots_adjust(left=0.1 / len(panels) + 0.03, right=0.98, bottom=0.15, top=0.85, wspace=0.3)
    for ax, (name, points) in zip(axes, panels):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


__all__ = ["CELL_PX", "CURVE_PX", "DPI", "EMBED_PX", "HEADER_PX", "RECONSTRUCTION_COLUMNS", "attention_grid", "curves_plot",
           "embeddings_plot", "grid_px", "pca_2d", "reconstruction_grid", "to_display"]
