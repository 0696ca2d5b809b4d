"""Pictures of a checkpoint: the `python -m eval.visualize` command.

    python -m eval.visualize CHECKPOINT [IMAGES...] [--out DIR] [--layer L] [--num-images N]
                             [--embed-images M] [--no-mlflow]

CHECKPOINT is a checkpoint folder (it holds backbone.json) or a run folder (its newest complete
checkpoint). IMAGES are PNG / JPEG files, resized to the backbone's input and converted to its
channels; without them, the first N test images of the run's shards (backbone.json "data") or of
the built-in Fashion-MNIST. Written to --out (default CHECKPOINT/pictures):

    attention.png        the class token's attention to the patches per head of one block (the
                         last by default, --layer), over each image; without a class token the
                         mean attention each patch receives (backbones with attention_maps)
    reconstructions.png  original | masked | reconstructed (checkpoints of MAE and SimMIM)
    embeddings.png       a 2-D PCA of the features of up to 2,000 (--embed-images) test images,
                         coloured by class
    curves.png           loss and kNN top-1 over the steps (runs with MLflow history)

Unless --no-mlflow, the PNGs are logged as artifacts under pictures/step-NNNNNN/ of the MLflow run
named in the run folder's run.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import backbones

from . import pictures, tracking
from .attention import class_attention_maps, record_attention
from .run import find_checkpoints, step_of

EMBED_IMAGES = 2000
RECONSTRUCTION_SEED = 0  # the masks of reconstructions.png: the same picture on every call
_MASKED_OBJECTIVES = ("mae", "simmim")


# --------------------------------------------------------------------------- where things are


def resolve_checkpoint(target: str | Path) -> tuple[Path, Path | None]:
    """(checkpoint folder, run folder or None): TARGET itself when it is a checkpoint (or an export),
    else the newest complete checkpoints/step-* of the run folder TARGET."""
    found, run_dir = find_checkpoints(target)
    return found[-1], run_dir


# --------------------------------------------------------------------------- images


def load_image_files(paths: Sequence[str | Path], size: tuple[int, int], channels: int) -> torch.Tensor:
    """PNG / JPEG files -> uint8 (N, channels, H, W), each converted to grey or RGB and resized
    (bilinear) to `size` = (H, W)."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        try:
            with Image.open(p) as img:
                img = img.convert("L" if channels == 1 else "RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
        except (FileNotFoundError, UnidentifiedImageError, OSError) as exn:
            raise ValueError(f"image {p} cannot be read as PNG / JPEG ({exn.__class__.__name__}): pass image files") from exn
        t = torch.from_numpy(np.asarray(img).copy())
        out.append(t[None] if t.ndim == 2 else t.permute(2, 0, 1))
    return torch.stack(out)  # (N, C, H, W)


def _shard_spec(meta: dict[str, Any]) -> str | None:
    data = meta.get("data") or {}
    return data.get("test") or data.get("train")


def dataset_images(meta: dict[str, Any], n: int, labelled: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """(uint8 images (n', C, H, W), labels (n',), class names or None): from the run's test shards
    (else its train shards) or the built-in Fashion-MNIST test split. With `labelled` (embeddings)
    a uniform random sample of the shards (they are often written class by class), else the first n."""
    spec = _shard_spec(meta)
    if spec is None:
        from data.builtin import FASHION_MNIST_CLASSES, load_fashion_mnist

        images, labels = load_fashion_mnist("test")
        return images[:n], labels[:n], list(FASHION_MNIST_CLASSES)
    from data.shards import read_manifest
    from data.stream import ShardLoader

    from .features import image_size

    pre = meta["preprocess"]
    loader = ShardLoader(spec, batch_size=min(n, 256), image_size=image_size(pre), channels=int(pre.get("channels", 1)),
                         shuffle=False, drop_last=False, num_workers=0, labels=False)
    pairs = ((b.images, b.labels) for b in loader.iter_epoch(0))
    if labelled:
        from .run import reservoir_sample

        images, labels = reservoir_sample(pairs, n, seed=0)
    else:
        got = []
        for imgs, labs in pairs:
            got.append((imgs, labs))
            if sum(g[0].shape[0] for g in got) >= n:
                break
        images, labels = (torch.cat([g[i] for g in got])[:n] for i in (0, 1))
    try:
        classes = read_manifest(spec)["classes"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        classes = None
    return images, labels, classes


def model_input(images: torch.Tensor, preprocess: dict[str, Any]) -> torch.Tensor:
    """uint8 images -> the backbone's normalised float input (data.augment.eval_transform)."""
    from data.augment import eval_transform

    from .features import image_size

    return eval_transform(images, size=image_size(preprocess), mean=preprocess["mean"], std=preprocess["std"])


# --------------------------------------------------------------------------- the pictures


def draw_attention(backbone: nn.Module, x: torch.Tensor, out: Path, layer: int, preprocess: dict[str, Any]) -> Path:
    """attention.png: one block's class-token (or mean received) attention per head over x."""
    every = record_attention(backbone, x)  # (B, L, H, N, N)
    count = every.shape[1]
    if not -count <= layer < count:
        raise ValueError(f"--layer={layer}: this backbone records {count} self-attention layers, pick one of "
                         f"0..{count - 1} (or -{count}..-1 from the last)")
    attn = every[:, layer]  # (B, H, N, N)
    prefix = attn.shape[-1] - backbone.num_patches
    maps = class_attention_maps(attn, prefix, backbone.grid_size)  # (B, H, gh, gw)
    what = "class token's attention to the patches" if prefix else "mean attention each patch receives"
    return pictures.attention_grid(x, maps, out / "attention.png", preprocess["mean"], preprocess["std"],
                                   title=f"{what}, layer {layer % count} of 0..{count - 1}")


def load_objective(ckpt: Path) -> nn.Module:
    """The checkpoint's whole objective (MAE / SimMIM with their decoders), rebuilt from
    config.yaml and loaded strictly from accelerate/model.safetensors."""
    # eval never imports objectives at module level (DESIGN: scoring works from a backbone and its
    # config alone); reconstructions are the one picture that needs the objective's decoder / head,
    # so the import happens here, only when a reconstruction is drawn.
    import objectives
    import yaml
    from safetensors.torch import load_file

    weights, config = ckpt / "accelerate" / "model.safetensors", ckpt / "config.yaml"
    for f in (weights, config):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: reconstructions need the full training checkpoint")
    section = dict(yaml.safe_load(config.read_text()).get("objective") or {})
    name = section.pop("name")
    objective = objectives.create(name, backbones.load(ckpt), **section)
    objective.load_state_dict(load_file(str(weights)), strict=True)
    return objective.eval()


def draw_reconstructions(ckpt: Path, x: torch.Tensor, out: Path, preprocess: dict[str, Any]) -> Path:
    objective = load_objective(ckpt)
    recon = objective.reconstruct_images(x, generator=torch.Generator().manual_seed(RECONSTRUCTION_SEED))
    return pictures.reconstruction_grid(recon, out / "reconstructions.png", preprocess["mean"], preprocess["std"],
                                        title=f"{objective.name}: original | masked | reconstructed")


def draw_embeddings(backbone: nn.Module, meta: dict[str, Any], out: Path, n: int = EMBED_IMAGES) -> Path | None:
    from .features import extract_features

    images, labels, classes = dataset_images(meta, n, labelled=True)
    if (labels < 0).all():
        return None  # unlabelled shards: nothing to colour by
    feats, labels = extract_features(backbone, images, labels, meta["preprocess"])
    return pictures.embeddings_plot(feats, labels, out / "embeddings.png", classes)


def metric_history(run_id: str, uri: str) -> dict[str, list[tuple[int, float]]]:
    """{'loss': [(step, value)...], 'knn/top1_k20': ...} of an MLflow run: the loss and every
    top-1 score (kNN, linear, fine-tune) it has."""
    c = tracking.client(uri)
    names = sorted(c.get_run(run_id).data.metrics)
    wanted = [n for n in names if n == "loss"] + [n for n in names if "/top1" in n]
    return {n: [(m.step, m.value) for m in c.get_metric_history(run_id, n)] for n in wanted}


def draw_curves(run: dict[str, Any], out: Path) -> Path | None:
    history = metric_history(run["mlflow_run_id"], run["tracking_uri"])
    if not any(history.values()):
        return None
    return pictures.curves_plot(history, out / "curves.png", title=f"MLflow run {run['mlflow_run_id'][:8]}")


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.visualize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint folder (with backbone.json) or a run folder")
    p.add_argument("images", metavar="IMAGES", nargs="*", help="PNG / JPEG files (default: the first N test images)")
    p.add_argument("--out", default=None, help="output folder (default: CHECKPOINT/pictures)")
    p.add_argument("--layer", type=int, default=-1, help="the block whose attention is drawn (default -1, the last)")
    p.add_argument("--num-images", type=int, default=8, help="test images drawn when no IMAGES are given (default 8)")
    p.add_argument("--embed-images", type=int, default=EMBED_IMAGES,
                   help=f"test images in the embeddings picture (default {EMBED_IMAGES})")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the PNGs to the run's MLflow run")
    return p


def _run_info(run_dir: Path | None) -> dict[str, Any]:
    """The run folder's pretraining run as {"mlflow_run_id", "tracking_uri"} when it names a readable run, else {}."""
    found = tracking.pretraining_run(run_dir)
    return {} if found is None else {"mlflow_run_id": found[0], "tracking_uri": found[1]}


def _mlflow_run(run_dir: Path | None, no_mlflow: bool) -> dict[str, Any]:
    """The run to read curves from and log to; with --no-mlflow an unreadable one is only noted."""
    try:
        return _run_info(run_dir)
    except ValueError as exn:
        if not no_mlflow:
            raise
        print(f"curves.png skipped: {exn}", file=sys.stderr)
        return {}


def _load(ckpt: Path) -> tuple[dict[str, Any], nn.Module]:
    """(backbone.json, the backbone in eval mode) of an image checkpoint written by the trainer."""
    meta = backbones.load_meta(ckpt)
    if "preprocess" not in meta:
        raise ValueError(f"{ckpt / 'backbone.json'} has no 'preprocess' entry (image_size, channels, mean, std): "
                         "pass a checkpoint written by the trainer")
    backbone = backbones.load(ckpt).eval()
    if len(backbone.input_shape) != 3:
        raise ValueError(f"backbone {meta['name']!r} takes input of shape {tuple(backbone.input_shape)}, not images: "
                         "eval.visualize draws image backbones only")
    return meta, backbone


def visualize(args: argparse.Namespace) -> list[Path]:
    """Write the pictures; returns their paths. Raises ValueError / FileNotFoundError on bad input."""
    for option, value, low in (("--num-images", args.num_images, 1), ("--embed-images", args.embed_images, 2)):
        if value < low:
            raise ValueError(f"{option}={value}: use at least {low}")
    ckpt, run_dir = resolve_checkpoint(args.checkpoint)
    meta, backbone = _load(ckpt)
    run = _mlflow_run(run_dir, args.no_mlflow)
    pre = meta["preprocess"]
    if args.images:
        raw = load_image_files(args.images, backbone.image_size, int(pre.get("channels", backbone.in_chans)))
    else:
        raw = dataset_images(meta, args.num_images)[0]
    x = model_input(raw, pre)  # (B, C, H, W)
    out = Path(args.out) if args.out else ckpt / "pictures"

    drawn: list[Path | None] = []
    if backbone.attention_maps:
        drawn.append(draw_attention(backbone, x, out, args.layer, pre))
    else:
        print(f"attention.png skipped: backbone {meta['name']!r} has no attention maps", file=sys.stderr)
    if meta.get("objective") in _MASKED_OBJECTIVES:
        drawn.append(draw_reconstructions(ckpt, x, out, pre))
    drawn.append(draw_embeddings(backbone, meta, out, args.embed_images))
    if run:
        drawn.append(draw_curves(run, out))
    written = [p for p in drawn if p is not None]
    if run and not args.no_mlflow:
        folder = f"pictures/step-{step_of(ckpt, meta):06d}"
        for p in written:
            tracking.log_artifact(run["mlflow_run_id"], p, run["tracking_uri"], folder)
        print(f"logged to MLflow run {run['mlflow_run_id']} under {folder}/", file=sys.stderr)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        written = visualize(args)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as exn:
        print(f"eval.visualize: error: {' '.join(str(exn).split())}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
