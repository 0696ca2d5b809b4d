"""Images/s of the whole input path (read shards -> decode -> transfer -> augment) beside the
classic per-sample path, and its ratio to each built-in recipe's training step.

    python -m bench.input_path                          # 28 and 224 px, 0/1/2 workers, mae + dino, all recipes
    python -m bench.input_path --sizes 28 --recipes mae,dino --batches 5 --rounds 1 --out input.md

Ours: ShardLoader (uint8 at the load size, the trainer's arguments) -> .to(device) ->
DeviceAugment(the objective's views), batched Kornia on the device. Classic: webdataset's own
pipeline (WebDataset -> shuffle -> decode("pil")) with per-sample torchvision transforms
(RandomResizedCrop bicubic, flip, colour jitter, greyscale, PIL Gaussian blur, solarize, ToTensor,
Normalize, built from the same ViewSpecs, as in the MAE and DINO references) in DataLoader workers,
collated to the same batch size, then moved to the device. Same shards, same views, same workers.

Sizes: 28 = the built-in Fashion-MNIST PNG shards (grey, 1 channel) with the views of the mae
and dino recipes; any other size S = RGB JPEG shards (quality 90) made once into the cache folder
from built-in images upscaled to S and coloured, with the papers' views (MAE: one S view, crop
scale 0.2-1; DINO: 2 x S + 6 local views at 96/224 x S), as the objectives build them by default.

Timing: every measurement is a job; the jobs run in interleaved rounds (each job once per round,
so all see the same machine state) and each figure is the median over rounds. An input job starts
its loader afresh (workers included), pulls `--warmup` batches, then times `--batches` batches;
a training job times `--steps` steps of forward + backward + AdamW on random views of the
recipe's shapes (distill without its teacher, kind=none, as bench.step_speed does: the student's
step alone, so its ratio is a lower bound). The main process uses all the cores the process may
run on, as the trainer does; DataLoader workers take one thread each and compete for those cores.
The default run takes about 20-25 minutes on an idle 2-core CPU, most of it DINO's multi-crop at
224 px; making the JPEG shards (4000 images, about 14 KB each) takes under a minute, once.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader

from data.augment import DeviceAugment, ViewSpec
from data.builtin import FASHION_MNIST_CLASSES, builtin_shards, cache_root, load_fashion_mnist
from data.shards import read_manifest, shard_urls, write_shards
from data.stream import ShardLoader

BUILTIN_SIZE = 28  # the built-in images' own size: no JPEG shards, the recipes' views
RECIPES = ("mae", "simmim", "mpp", "dino", "supervised", "distill")
VIEW_KINDS = ("mae", "dino")
RATIO_GOAL = 3.0
JPEG_QUALITY = 90
SHUFFLE_BUFFER = 2000  # the trainer's data.shuffle_buffer default


# --------------------------------------------------------------------------------------------
# What is measured
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputCase:
    """One input path to time: which shards, decoded to which size and channels, into which views,
    normalised how, in batches of what size."""

    urls: tuple[str, ...]
    load_size: int
    channels: int
    views: tuple[ViewSpec, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int

    def describe_views(self) -> str:
        """'2 × 28 + 2 × 12' style summary of the view sizes."""
        return " + ".join(f"{v.count} × {v.size}" for v in _merged(self.views))


def _merged(views: Sequence[ViewSpec]) -> list[ViewSpec]:
    """Consecutive views of one size folded into one entry with the summed count (for display)."""
    out: list[ViewSpec] = []
    for v in views:
        if out and out[-1].size == v.size:
            out[-1] = ViewSpec(v.size, count=out[-1].count + v.count)
        else:
            out.append(ViewSpec(v.size, count=v.count))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rate(batches: Iterator[int], warmup: int, count: int, device: torch.device) -> float:
    """Images/s over ``count`` items of ``batches`` (each the batch's image count) after ``warmup``."""
    for _ in range(warmup):
        next(batches)
    _sync(device)
    start, images = time.perf_counter(), 0
    for _ in range(count):
        images += next(batches)
    _sync(device)
    return images / (time.perf_counter() - start)


def ours_batches(case: InputCase, workers: int, device: torch.device, seed: int = 0) -> Iterator[int]:
    """The trainer's input path: ShardLoader -> device -> DeviceAugment; yields images per batch."""
    loader = ShardLoader(list(case.urls), batch_size=case.batch_size, image_size=case.load_size,
                         channels=case.channels, seed=seed, num_workers=workers, shuffle_buffer=SHUFFLE_BUFFER)
    augment = DeviceAugment(case.views, case.mean, case.std).to(device)
    with torch.no_grad():
        for batch in loader:
            views = augment(batch.images.to(device, non_blocking=True))  # [(B, C, S, S), ...]
            yield views[0].shape[0]


# --------------------------------------------------------------------------------------------
# The classic path: PIL + torchvision per sample in DataLoader workers
# --------------------------------------------------------------------------------------------


class PilGaussianBlur:
    """DINO's blur: PIL's Gaussian filter with a radius drawn uniformly from ``sigma``, with
    probability ``p`` (the reference's `GaussianBlur` in utils.py)."""

    def __init__(self, p: float, sigma: tuple[float, float]):
        self.p, self.sigma = p, sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand(()) >= self.p:
            return image
        radius = float(torch.empty(()).uniform_(*self.sigma))
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


def classic_transform(view: ViewSpec, channels: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """torchvision per-sample transform doing what ``view`` asks (the MAE / DINO references' order:
    crop, flip, colour jitter, greyscale, blur, solarize, ToTensor, Normalize)."""
    steps: list = [T.RandomResizedCrop(view.size, scale=view.scale, ratio=view.ratio,
                                       interpolation=T.InterpolationMode.BICUBIC)]
    if view.hflip > 0:
        steps.append(T.RandomHorizontalFlip(view.hflip))
    b, c, s, h = view.color_jitter
    if channels != 3:
        s = h = 0.0  # as DeviceAugment: saturation and hue need colour
    if view.color_jitter_p > 0 and (b, c, s, h) != (0.0, 0.0, 0.0, 0.0):
        steps.append(T.RandomApply([T.ColorJitter(b, c, s, h)], p=view.color_jitter_p))
    if view.grayscale_p > 0 and channels == 3:
        steps.append(T.RandomGrayscale(view.grayscale_p))
    if view.blur_p > 0:
        steps.append(PilGaussianBlur(view.blur_p, view.blur_sigma))
    if view.solarize_p > 0:
        steps.append(T.RandomSolarize(threshold=round(255 * view.solarize_threshold), p=view.solarize_p))
    steps += [T.ToTensor(), T.Normalize(list(mean), list(std))]
    return T.Compose(steps)


class MultiView:
    """One sample's views: each ViewSpec's transform applied ``count`` times, in the spec order."""

    def __init__(self, case: InputCase):
        self.transforms = [classic_transform(v, case.channels, case.mean, case.std)
                           for v in case.views for _ in range(v.count)]

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [t(image) for t in self.transforms]  # [(C, S, S), ...]


def _class_index(value: bytes | int) -> int:
    return int(value)


def classic_batches(case: InputCase, workers: int, device: torch.device, seed: int = 0) -> Iterator[int]:
    """webdataset's pipeline with PIL decode and per-sample transforms in the DataLoader workers,
    collated per view and moved to the device; yields images per batch."""
    import webdataset as wds

    dataset = (
        wds.WebDataset(list(case.urls), shardshuffle=len(case.urls), seed=seed, empty_check=False)
        .shuffle(SHUFFLE_BUFFER)
        .decode("pil" if case.channels == 3 else "pill")
        .to_tuple("jpg;jpeg;png", "cls")
        .map_tuple(MultiView(case), _class_index)
        .repeat()
    )
    loader = DataLoader(dataset, batch_size=case.batch_size, num_workers=workers, drop_last=True)
    for views, _labels in loader:
        views = [v.to(device, non_blocking=True) for v in views]  # [(B, C, S, S), ...]
        yield views[0].shape[0]


# --------------------------------------------------------------------------------------------
# Shards: the built-in ones, and JPEG shards at other sizes (made once)
# --------------------------------------------------------------------------------------------


def colour_image(grey: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (28, 28) grey garment as uint8 (size, size, 3) RGB: upscaled (bicubic), the garment in
    one random colour over a random two-colour gradient background, plus mild sensor-like noise so
    that the JPEG holds photo-like detail rather than flat areas."""
    alpha = np.asarray(Image.fromarray(grey).resize((size, size), Image.Resampling.BICUBIC), np.float32)
    alpha = alpha[..., None] / 255.0  # (S, S, 1)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = np.clip(0.5 + ramp[None, :] * math.cos(angle) + ramp[:, None] * math.sin(angle), 0, 1)[..., None]
    c0, c1, fg = rng.uniform(0, 255, (3, 3)).astype(np.float32)
    background = c0 + t * (c1 - c0)  # (S, S, 3)
    garment = fg * (0.35 + 0.65 * alpha)  # keeps the garment's shading
    rgb = background + alpha * (garment - background)
    rgb += 6.0 * rng.standard_normal(rgb.shape, dtype=np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _jpeg_samples(size: int, count: int, seed: int = 0) -> Iterator[tuple[str, bytes, int]]:
    import io

    images, labels = load_fashion_mnist("train")
    rng = np.random.default_rng(seed)
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(colour_image(images[i, 0].numpy(), size, rng)).save(buf, "JPEG", quality=JPEG_QUALITY)
        yield f"rgb{size}_{i:08d}", buf.getvalue(), int(labels[i])


def jpeg_shards(size: int, count: int, shard_size: int, folder: str | os.PathLike | None = None) -> Path:
    """A folder of RGB JPEG shards (quality 90) of ``count`` built-in images upscaled to ``size``,
    written once under ``folder`` (default ``<cache>/bench``; a temporary folder renamed when
    complete) and reused."""
    name = f"fashion-mnist-rgb{size}-q{JPEG_QUALITY}-n{count}-s{shard_size}"
    final = (Path(folder).expanduser() if folder else cache_root() / "bench") / name
    if (final / "manifest.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{name}-{uuid.uuid4().hex[:8]}")
    try:
        write_shards(_jpeg_samples(size, count), tmp, shard_size=shard_size, classes=FASHION_MNIST_CLASSES, prefix="rgb")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: use theirs
            if not (final / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def shard_note(folder: Path) -> str:
    """'60000 images in 24 shards, 1 channel PNG, 0.7 KB each' for a table's heading."""
    manifest = read_manifest(folder)
    tars = [folder / s["file"] for s in manifest["shards"]]
    kb = sum(t.stat().st_size for t in tars) / max(manifest["num_samples"], 1) / 1024
    kind = "RGB JPEG q90" if manifest["channels"] == 3 else "grey PNG"
    return f"{manifest['num_samples']} images in {len(tars)} shards, {kind}, {kb:.1f} KB per sample, `{folder}`"


# --------------------------------------------------------------------------------------------
# Views and recipes
# --------------------------------------------------------------------------------------------


def _recipe_objective(name: str):
    """(config, objective) of a built-in recipe, built as the trainer builds it (distill with
    kind=none: no teacher run is needed to time the student)."""
    from pretrain.config import build_config
    from pretrain.train import build_objective

    overrides = ["objective.kind=none"] if name == "distill" else []
    cfg = build_config(objective=name, overrides=overrides)
    return cfg, build_objective(cfg)


def paper_views(kind: str, size: int) -> list[ViewSpec]:
    """The views the objective builds by default (the papers' settings) for ``size``-px images:
    MAE one view; DINO 2 global views at ``size`` and 6 local ones at 96/224 of it."""
    import backbones
    import objectives

    local = max(8, round(size * 96 / 224 / 8) * 8)  # 96 at 224; a multiple of 8 so a tiny ViT takes it
    patch = math.gcd(size, local)
    backbone = backbones.create("vit", image_size=size, patch_size=patch, in_chans=3, dim=8, depth=1, heads=1)
    if kind == "mae":
        return objectives.create("mae", backbone, decoder_dim=8, decoder_depth=1, decoder_heads=1).views
    return objectives.create("dino", backbone, out_dim=8, head_hidden_dim=8, head_bottleneck_dim=8,
                             global_size=size, local_size=local).views


def size_case(size: int, kind: str, batch_size: int | None, args: argparse.Namespace) -> tuple[InputCase, Path]:
    """The input case of view ``kind`` at ``size`` px, and its shard folder."""
    if size == BUILTIN_SIZE:
        folder = builtin_shards()["train"]
        cfg, objective = _recipe_objective(kind)
        views, batch = objective.views, cfg.train.batch_size
        channels = objective.backbone.in_chans
    else:
        folder = jpeg_shards(size, args.jpeg_images, args.jpeg_shard_size, args.jpeg_dir)
        views, batch, channels = paper_views(kind, size), args.jpeg_batch, 3
    manifest = read_manifest(folder)
    mean, std = manifest["mean"], manifest["std"]
    case = InputCase(tuple(shard_urls(folder)), size, channels, tuple(views), tuple(mean), tuple(std),
                     batch_size or batch)
    return case, folder


# --------------------------------------------------------------------------------------------
# Training step
# --------------------------------------------------------------------------------------------


class TrainStep:
    """One recipe's training step (forward, backward, AdamW) on fixed random views of its shapes."""

    def __init__(self, name: str, batch_size: int | None, device: torch.device):
        from pretrain.train import normalisation, train_shards

        cfg, objective = _recipe_objective(name)
        self.objective = objective.to(device)
        self.batch_size = batch_size or cfg.train.batch_size
        channels = objective.backbone.in_chans
        mean, std = normalisation(cfg, train_shards(cfg)[1], channels)
        objective.set_total_steps(cfg.train.total_steps)
        objective.set_normalisation(mean, std)
        self.optimizer = torch.optim.AdamW(objective.parameter_groups(cfg.optim.weight_decay), lr=cfg.optim.lr)
        self.batch = {
            "views": [torch.randn(self.batch_size, channels, v.size, v.size, device=device)
                      for v in objective.views for _ in range(v.count)],
            "labels": torch.randint(0, len(FASHION_MNIST_CLASSES), (self.batch_size,), device=device),
        }
        self.step_count = 0
        load = cfg.data.load_size or objective.backbone.image_size[0]
        self.case = InputCase(tuple(shard_urls(builtin_shards()["train"])), load, channels,
                              tuple(objective.views), tuple(mean), tuple(std), self.batch_size)

    def step(self) -> int:
        self.objective.train()
        self.objective(self.batch)["loss"].backward()
        for p in self.objective.frozen_parameters():
            p.grad = None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        self.objective.on_step(self.step_count, 10**6)
        return self.batch_size

    def steps(self) -> Iterator[int]:
        while True:
            yield self.step()


# --------------------------------------------------------------------------------------------
# Running the jobs
# --------------------------------------------------------------------------------------------


Job = Callable[[], float]  # one round of a measurement -> images/s


def input_job(path: str, case: InputCase, workers: int, args: argparse.Namespace, device: torch.device) -> Job:
    make = ours_batches if path == "ours" else classic_batches

    def run() -> float:
        batches = make(case, workers, device)
        try:
            return timed_rate(batches, args.warmup, args.batches, device)
        finally:
            batches.close()  # ends the DataLoader iterator: its workers stop before the next job

    return run


def train_job(step: TrainStep, args: argparse.Namespace, device: torch.device) -> Job:
    def run() -> float:
        return timed_rate(step.steps(), 1, args.steps, device)

    return run


def job_label(key: tuple) -> str:
    """'ours 28 px 2 × 28 + 2 × 12 batch 64, 2 workers' or 'train dino' for progress lines."""
    if key[0] == "train":
        return f"train {key[1]}"
    path, case, workers = key
    return f"{path} {case.load_size} px {case.describe_views()} batch {case.batch_size}, {workers} workers"


def run_rounds(jobs: dict[tuple, Job], rounds: int, log: Callable[[str], None]) -> dict[tuple, float]:
    """Every job once per round, in the same order each round; the median images/s per job."""
    rates: dict[tuple, list[float]] = {key: [] for key in jobs}
    for r in range(rounds):
        for key, job in jobs.items():
            start = time.perf_counter()
            rates[key].append(job())
            log(f"round {r + 1}/{rounds} {job_label(key)}: {rates[key][-1]:.1f} img/s "
                f"({time.perf_counter() - start:.1f} s)")
    return {key: statistics.median(values) for key, values in rates.items()}


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def num(x: float) -> str:
    """Three significant figures for rates and ratios alike (1.83, 18.3, 183, 1834)."""
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3g}"


def size_table(size: int, note: str, rows: list[tuple[str, InputCase, int]], rates: dict[tuple, float]) -> str:
    lines = [f"### {size} px: {note}", "",
             "| views | sizes | batch | workers | ours img/s | classic img/s | ours / classic |",
             "|---|---|---|---|---|---|---|"]
    for kind, case, w in rows:
        ours, classic = rates[("ours", case, w)], rates[("classic", case, w)]
        lines.append(f"| {kind} | {case.describe_views()} | {case.batch_size} | {w} | {num(ours)} | {num(classic)} "
                     f"| {num(ours / classic)} |")
    return "\n".join(lines)


def recipe_table(steps: dict[str, TrainStep], workers: list[int], rates: dict[tuple, float]) -> str:
    lines = ["### Recipes: training step vs input path (ours, best of workers "
             f"{', '.join(map(str, workers))}); goal input / train >= {RATIO_GOAL:g}", "",
             "| recipe | views | batch | train img/s | input img/s | workers | input / train | goal |",
             "|---|---|---|---|---|---|---|---|"]
    for name, step in steps.items():
        train = rates[("train", name)]
        best = max(workers, key=lambda w: rates[("ours", step.case, w)])
        inp = rates[("ours", step.case, best)]
        ratio = inp / train
        mark = "ok" if ratio >= RATIO_GOAL else "LIMITS"
        label = f"{name} (student only)" if name == "distill" else name
        lines.append(f"| {label} | {step.case.describe_views()} | {step.batch_size} | {num(train)} | {num(inp)} | {best} "
                     f"| {num(ratio)} | {mark} |")
    return "\n".join(lines)


def header(argv: Sequence[str], device: torch.device, args: argparse.Namespace) -> str:
    cores = len(os.sched_getaffinity(0))
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return "\n".join([
        "## Input path benchmark", "",
        f"`{shlex.join(['python', '-m', 'bench.input_path', *argv])}`", "",
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {platform.machine()}, {cores} cores, "
        f"torch {torch.__version__}, device {device}{gpu}; main process {torch.get_num_threads()} threads, "
        f"each DataLoader worker 1 thread on the same cores; {args.warmup} warm-up + {args.batches} timed batches "
        f"per round (training: {args.steps} step(s)), median of {args.rounds} interleaved rounds; fp32.",
    ])


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _recipes(text: str) -> list[str]:
    if text == "all":
        return list(RECIPES)
    if text == "none":
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in RECIPES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown recipe(s) {', '.join(bad)}; use all, none or a comma list of "
                                         f"{', '.join(RECIPES)}")
    return names


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.input_path", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[28, 224],
                    help="28 = built-in PNG shards; other sizes (>= 32) = RGB JPEG shards made from them (default 28 224)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts (default 0 1 2)")
    ap.add_argument("--views", nargs="+", choices=VIEW_KINDS, default=list(VIEW_KINDS), help="view sets (default mae dino)")
    ap.add_argument("--recipes", type=_recipes, default=list(RECIPES),
                    help=f"all, none, or a comma list of {','.join(RECIPES)} (default all)")
    ap.add_argument("--batches", type=int, default=10, help="timed batches per round (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed batches before timing, per round (default 3)")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per round (default 3)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported (default 3)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="one batch size for everything (default: the recipe's at 28 px and for recipes, --jpeg-batch else)")
    ap.add_argument("--jpeg-batch", type=int, default=64, help="batch at JPEG sizes (default 64, the MAE/DINO per-GPU batch)")
    ap.add_argument("--jpeg-images", type=int, default=4000, help="images in the JPEG shards (default 4000)")
    ap.add_argument("--jpeg-shard-size", type=int, default=500, help="images per JPEG shard (default 500: 8 shards)")
    ap.add_argument("--jpeg-dir", default=None,
                    help="where the JPEG shards are made once (default $VIT_SSL_CACHE/bench or ~/.cache/vit-ssl/bench)")
    ap.add_argument("--device", default=None, help="cuda if available, else cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the main process (default: all its cores)")
    ap.add_argument("--out", default=None, help="also write the markdown to this file")
    ap.add_argument("--quiet", action="store_true", help="no per-job progress lines on stderr")
    return ap


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One clear line per bad option, before any work."""
    for size in args.sizes:
        if size != BUILTIN_SIZE and size < 32:
            ap.error(f"--sizes {size}: sizes other than {BUILTIN_SIZE} (the built-in images) are JPEG shards upscaled "
                     f"from {BUILTIN_SIZE} px, so they must be >= 32")
    for name in ("batches", "warmup", "steps", "rounds", "jpeg_batch", "jpeg_images", "jpeg_shard_size"):
        value = getattr(args, name)
        if value < (0 if name == "warmup" else 1):
            ap.error(f"--{name.replace('_', '-')} {value}: must be {'>= 0' if name == 'warmup' else '>= 1'}")
    if min(args.workers) < 0:
        ap.error(f"--workers {min(args.workers)}: worker counts must be >= 0")
    if args.batch_size is not None and args.batch_size < 1:
        ap.error(f"--batch-size {args.batch_size}: must be >= 1")
    if args.recipes and not [w for w in args.workers if w <= 2]:
        ap.error(f"--workers {' '.join(map(str, args.workers))}: the recipe table takes the best of the counts <= 2; "
                 "add one (e.g. 0 1 2) or pass --recipes none")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    args.workers = list(dict.fromkeys(args.workers))  # a repeated count would only repeat its rows
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))

    jobs: dict[tuple, Job] = {}
    tables: list[tuple[int, str, list[tuple[str, InputCase, int]]]] = []
    for size in args.sizes:
        rows = []
        for kind in args.views:
            case, folder = size_case(size, kind, args.batch_size, args)
            for w in args.workers:
                rows.append((kind, case, w))
                for path in ("ours", "classic"):
                    jobs[(path, case, w)] = input_job(path, case, w, args, device)
        tables.append((size, shard_note(folder), rows))
    steps = {name: TrainStep(name, args.batch_size, device) for name in args.recipes}
    recipe_workers = sorted({w for w in args.workers if w <= 2})
    for name, step in steps.items():
        jobs[("train", name)] = train_job(step, args, device)
        for w in recipe_workers:
            jobs.setdefault(("ours", step.case, w), input_job("ours", step.case, w, args, device))

    rates = run_rounds(jobs, args.rounds, log)
    parts = [header(argv, device, args)]
    parts += [size_table(size, note, rows, rates) for size, note, rows in tables]
    if steps:
        parts.append(recipe_table(steps, recipe_workers, rates))
    text = "\n\n".join(parts) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
