"""Score backbones: kNN and linear probe on frozen features; the `python -m eval.run` command.

    python -m eval.run TARGET [--knn] [--linear] [--k 20 ...] [--train-samples N]
                              [--fashion-mnist-dir DIR] [--runs-root DIR] [--device DEV]

TARGET is a checkpoint folder (it holds backbone.json) or a run folder (every complete
checkpoints/step-* in step order). Scores are logged to MLflow at the checkpoint's step: into the
pretraining run named in RUN_DIR/run.json when there is one, else into a new run of experiment
`vit-ssl-eval`. Works from a backbone and its saved config alone: no objective or trainer code.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import backbones

from . import tracking
from .features import cached_features, default_batch_size, extract_features, image_size
from .knn import knn_accuracy
from .linear import linear_probe

EVAL_EXPERIMENT = "vit-ssl-eval"
SUBSET_SEED = 0  # the train subset is the first N of a permutation drawn with this seed
_STEP_DIR = re.compile(r"^step-(\d+)$")

Pair = tuple[torch.Tensor, torch.Tensor]  # (uint8 images (N, C, H, W) or features (N, D), int64 labels (N,))


# --------------------------------------------------------------------------- scoring


def score_features(
    train: Pair,
    test: Pair,
    num_classes: int,
    *,
    knn: bool = True,
    linear: bool = False,
    ks: Sequence[int] = (20,),
) -> dict[str, float]:
    """Scores (fractions) from cached (features, labels) pairs: 'knn/top1@K', 'knn/top5@K', 'linear/top1', 'linear/top5'."""
    scores: dict[str, float] = {}
    if knn:
        res = knn_accuracy(train[0], train[1], test[0], test[1], num_classes, ks=ks)
        scores.update({f"knn/{k}": v for k, v in res.items()})
    if linear:
        res = linear_probe(train[0], train[1], test[0], test[1], num_classes)
        scores.update({"linear/top1": res["top1"], "linear/top5": res["top5"]})
    return scores


def score_backbone(
    backbone: nn.Module,
    preprocess: dict[str, Any],
    train: Pair,
    test: Pair,
    *,
    knn: bool = True,
    linear: bool = False,
    ks: Sequence[int] = (20,),
    num_classes: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Extract features of the (images, labels) splits with `backbone` and score them.

    num_classes defaults to the largest label + 1; device defaults to where the backbone is.
    """
    tr = extract_features(backbone, train[0], train[1], preprocess, device=device)
    te = extract_features(backbone, test[0], test[1], preprocess, device=device)
    if num_classes is None:
        num_classes = int(max(tr[1].max(), te[1].max())) + 1
    return score_features(tr, te, num_classes, knn=knn, linear=linear, ks=ks)


# --------------------------------------------------------------------------- checkpoint data


@dataclass
class EvalData:
    """Where a checkpoint's eval images come from, and the cache names of its splits."""

    train_name: str
    test_name: str
    num_classes: int
    load_train: Callable[[], Pair | Iterable[Pair]]  # (images, labels), or an iterable of such batches
    load_test: Callable[[], Pair | Iterable[Pair]]


def _subset(n: int, total: int) -> torch.Tensor:
    return torch.randperm(total, generator=torch.Generator().manual_seed(SUBSET_SEED))[:n]


def _builtin_data(train_samples: int | None, root: str | os.PathLike | None) -> EvalData:
    """Built-in Fashion-MNIST: train = the first `train_samples` of a seeded permutation (or all), test = all."""
    from data.builtin import FASHION_MNIST_CLASSES, load_fashion_mnist

    def train() -> Pair:
        images, labels = load_fashion_mnist("train", root=root)
        if train_samples is not None and train_samples < len(labels):
            keep = _subset(train_samples, len(labels))
            images, labels = images[keep], labels[keep]
        return images, labels

    suffix = "" if train_samples is None else f"-{train_samples}"
    return EvalData(
        f"fmnist-train{suffix}", "fmnist-test", len(FASHION_MNIST_CLASSES), train, lambda: load_fashion_mnist("test", root=root)
    )


def reservoir_sample(batches: Iterable[Pair], n: int, seed: int) -> Pair:
    """A uniform random sample of `n` (image, label) pairs from a stream of batches, in one pass
    and with memory for `n` images only (shards are often written class by class, so the first
    `n` samples would be a biased memory bank)."""
    gen = torch.Generator().manual_seed(seed)
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    seen = 0
    for imgs, labs in batches:
        for i in range(imgs.shape[0]):
            if seen < n:
                if images is None:
                    images = imgs.new_empty((n, *imgs.shape[1:]))
                    labels = labs.new_empty((n,))
                slot = seen
            else:
                slot = int(torch.randint(0, seen + 1, (), generator=gen))
            if slot < n:
                images[slot], labels[slot] = imgs[i], labs[i]
            seen += 1
    if images is None:
        raise ValueError("the train shards yielded no samples for the kNN memory bank")
    return images[: min(seen, n)], labels[: min(seen, n)]


def _shard_data(spec: dict[str, Any], preprocess: dict[str, Any], train_samples: int | None, batch_size: int) -> EvalData:
    """Shards named in backbone.json's 'data', read without shuffling; train = a seeded uniform
    random sample of `train_samples` of them (reservoir sampling), or all."""
    from data.shards import read_manifest, shard_urls
    from data.stream import ShardLoader

    if not spec.get("test"):
        raise ValueError(
            f"backbone.json data.train is {spec.get('train')!r} but data.test is {spec.get('test')!r}: "
            f"kNN and linear scores need a labelled test split; set data.test in the run's config"
        )

    def batches(which: str, limit: int | None) -> Iterable[Pair]:
        loader = ShardLoader(
            spec[which], batch_size=batch_size, image_size=image_size(preprocess),
            channels=int(preprocess.get("channels", len(preprocess["mean"]))), shuffle=False, drop_last=False,
            num_workers=min(2, len(shard_urls(spec[which]))),
        )

        pairs = ((batch.images, batch.labels) for batch in loader.iter_epoch(0))
        if limit is None:
            return pairs
        return [reservoir_sample(pairs, limit, SUBSET_SEED)]


    try:
        num_classes = len(read_manifest(spec["train"])["classes"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        num_classes = 0  # no manifest (URLs, patterns): from the labels, once they are known
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    suffix = "" if train_samples is None else f"-{train_samples}"
    return EvalData(
        f"shards-{key}-train{suffix}", f"shards-{key}-test", num_classes,
        lambda: batches("train", train_samples), lambda: batches("test", None),
    )


def checkpoint_data(
    meta: dict[str, Any], train_samples: int | None, fashion_mnist_dir: str | None, device: torch.device
) -> EvalData:
    """The eval data of a checkpoint: the shards its run trained on (backbone.json 'data'), else built-in Fashion-MNIST."""
    spec = meta.get("data") or {}
    if spec.get("train"):
        return _shard_data(spec, meta["preprocess"], train_samples, default_batch_size(device))
    return _builtin_data(train_samples, fashion_mnist_dir)


def _features(backbone: nn.Module, preprocess: dict, source: Callable[[], Any], device: torch.device) -> Pair:
    """Features of what `source()` returns: an (images, labels) pair of tensors or an iterable of batches."""
    got = source()
    if isinstance(got, tuple) and isinstance(got[0], torch.Tensor):
        return extract_features(backbone, got[0], got[1], preprocess, device=device)
    return extract_features(backbone, got, None, preprocess, device=device)


def score_checkpoint(
    checkpoint_dir: str | os.PathLike,
    *,
    knn: bool = True,
    linear: bool = False,
    ks: Sequence[int] = (20,),
    train_samples: int | None = None,
    fashion_mnist_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Score a checkpoint folder's backbone; features are cached in CHECKPOINT/features/.

    Data: the built-in Fashion-MNIST (train = the first `train_samples` of a fixed seeded
    permutation, or all 60,000; test = all 10,000), or the shards named in backbone.json's 'data'.
    """
    if train_samples is not None and train_samples < 1:
        raise ValueError(f"train_samples={train_samples} must be >= 1 (or None for the whole train split)")
    meta = backbones.load_meta(checkpoint_dir)
    if "preprocess" not in meta:
        raise ValueError(
            f"{Path(checkpoint_dir) / 'backbone.json'} has no 'preprocess' entry (image_size, channels, mean, std): "
            f"save the backbone with extra={{'preprocess': ...}} as the trainer does"
        )
    preprocess = meta["preprocess"]
    device = torch.device(device)
    data = checkpoint_data(meta, train_samples, None if fashion_mnist_dir is None else str(fashion_mnist_dir), device)
    model: nn.Module | None = None

    def compute(source: Callable[[], Any]) -> Callable[[], Pair]:
        def run() -> Pair:
            nonlocal model
            if model is None:  # load the weights only when some split is not cached yet
                model = backbones.load(checkpoint_dir).to(device)
            return _features(model, preprocess, source, device)

        return run

    train = cached_features(checkpoint_dir, data.train_name, compute(data.load_train))
    test = cached_features(checkpoint_dir, data.test_name, compute(data.load_test))
    num_classes = data.num_classes or int(max(train[1].max(), test[1].max())) + 1
    return score_features(train, test, num_classes, knn=knn, linear=linear, ks=ks)


# --------------------------------------------------------------------------- targets


class TargetError(ValueError):
    """TARGET is neither a checkpoint folder nor a run folder with checkpoints."""


def _step_of(checkpoint: Path, meta: dict[str, Any] | None = None) -> int:
    if meta is not None and isinstance(meta.get("step"), int):
        return meta["step"]
    m = _STEP_DIR.match(checkpoint.name)
    return int(m.group(1)) if m else 0


def find_checkpoints(target: str | os.PathLike) -> tuple[list[Path], Path | None]:
    """(checkpoint folders in step order, the run folder or None) for a checkpoint or run folder."""
    path = Path(target).expanduser()
    if (path / "backbone.json").is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        return [path], run_dir
    ckpt_root = path / "checkpoints"
    if not path.is_dir():
        raise TargetError(f"TARGET {path} does not exist: pass a checkpoint folder (with backbone.json) or a run folder")
    if not ckpt_root.is_dir():
        raise TargetError(
            f"TARGET {path} is neither a checkpoint folder (no backbone.json) nor a run folder (no checkpoints/ folder)"
        )
    found = [d for d in ckpt_root.iterdir() if _STEP_DIR.match(d.name) and (d / "backbone.json").is_file()]
    if not found:
        raise TargetError(f"run folder {path} has no complete checkpoint (checkpoints/step-*/backbone.json): train longer")
    return sorted(found, key=_step_of), path


# --------------------------------------------------------------------------- CLI


def format_table(rows: list[tuple[int, dict[str, float]]]) -> str:
    """A text table: one row per checkpoint step, one column per metric, in percent."""
    names = list(dict.fromkeys(k for _, scores in rows for k in scores))
    header = ["step", *names]
    body = [[str(step), *(f"{100 * s[n]:.2f}" if n in s else "-" for n in names)] for step, s in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *body])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__.split("\n\n")[0])
    p.add_argument("target", metavar="TARGET", help="a checkpoint folder (with backbone.json) or a run folder")
    p.add_argument("--knn", action="store_true", help="kNN scores (default: both kNN and linear)")
    p.add_argument("--linear", action="store_true", help="linear-probe scores (default: both)")
    p.add_argument("--k", type=int, nargs="+", default=[20], help="kNN neighbour counts (default 20)")
    p.add_argument("--train-samples", type=int, default=None, help="score on a fixed subset of N train images")
    p.add_argument("--fashion-mnist-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--runs-root", default="runs", help="MLflow store when TARGET has no run.json (default: runs)")
    p.add_argument("--device", default="cpu", help="device for the feature pass (default: cpu)")
    return p


def _mlflow_run(run_dir: Path | None, target: Path, args: argparse.Namespace) -> tuple[str, str, bool]:
    """(run id, tracking uri, whether we created it): the pretraining run named in run.json, else a new eval run."""
    from mlflow.exceptions import MlflowException

    info = tracking.read_run_json(run_dir)
    if info.get("mlflow_run_id"):
        run_id, uri = info["mlflow_run_id"], info.get("tracking_uri") or tracking.tracking_uri(args.runs_root)
        try:
            tracking.client(uri).get_run(run_id)
        except MlflowException as exn:
            raise ValueError(
                f"{run_dir / tracking.RUN_JSON} names MLflow run {run_id} in {uri}, which cannot be read "
                f"({exn.message}): fix tracking_uri there, or delete run.json to log into a new '{EVAL_EXPERIMENT}' run"
            ) from exn
        return run_id, uri, False
    resolved = str(target.resolve())
    run_id, uri = tracking.start_run(EVAL_EXPERIMENT, args.runs_root, run_name=f"eval-{target.name}", tags={"target": resolved})
    tracking.log_params(run_id, {"target": resolved, "ks": args.k, "train_samples": args.train_samples}, uri)
    return run_id, uri, True


def _score_all(checkpoints: list[Path], run_id: str, uri: str, args: argparse.Namespace) -> list[tuple[int, dict[str, float]]]:
    """Score each checkpoint, logging its scores at its step as soon as they are known."""
    knn, linear = (args.knn, args.linear) if (args.knn or args.linear) else (True, True)
    rows: list[tuple[int, dict[str, float]]] = []
    for ckpt in checkpoints:
        step = _step_of(ckpt, backbones.load_meta(ckpt))
        print(f"scoring {ckpt} (step {step})", file=sys.stderr, flush=True)
        scores = score_checkpoint(
            ckpt, knn=knn, linear=linear, ks=args.k, train_samples=args.train_samples,
            fashion_mnist_dir=args.fashion_mnist_dir, device=args.device,
        )
        tracking.log_metrics(run_id, scores, step, uri)
        rows.append((step, scores))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        checkpoints, run_dir = find_checkpoints(args.target)
        run_id, uri, created = _mlflow_run(run_dir, Path(args.target), args)
    except (ValueError, FileNotFoundError) as exn:
        print(f"eval.run: error: {exn}", file=sys.stderr)
        return 2
    status = "FAILED"
    try:
        rows = _score_all(checkpoints, run_id, uri, args)
        status = "FINISHED"
    except (ValueError, FileNotFoundError) as exn:
        print(f"eval.run: error: {exn}", file=sys.stderr)
        return 1
    finally:
        if created:
            tracking.end_run(run_id, uri, status)
    print(format_table(rows))
    print(f"MLflow run {run_id} ({uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
