"""Score backbones: kNN, linear probe (and fine-tuning) of checkpoints; the `python -m eval.run` command.

    python -m eval.run TARGET [--knn] [--linear] [--finetune] [--k 10 20 100 200]
                              [--train-shards P --test-shards P] [--train-samples N]
                              [--eval-run] [--runs-root DIR] [--device DEV]
    accelerate launch -m eval.run TARGET ...      (every process extracts its share of the features)

TARGET is a checkpoint folder (it holds backbone.json), a run folder (every complete
checkpoints/step-* in step order) or an exported backbone (`python -m pretrain.export`). Scores are
logged to MLflow at the checkpoint's step: into the pretraining run named in RUN_DIR/run.json when
there is one (or, with --eval-run, into a new run of experiment `vit-ssl-eval` tagged with the
pretraining run as its parent), else into a new `vit-ssl-eval` run. Works from a backbone and its
saved config alone: no objective or trainer code.
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
from backbones.base import is_backbone_folder, verify_weights

from . import tracking
from .features import cached_features, default_batch_size, extract_features, image_size, launch_state, process_group, share_cpu_threads
from .knn import knn_accuracy
from .linear import linear_probe

EVAL_EXPERIMENT = tracking.EVAL_EXPERIMENT
DEFAULT_KS = (10, 20, 100, 200)  # DINO reports 20 and 200
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


def subset_indices(n: int, total: int) -> torch.Tensor:
    """The fixed seeded subset of n of `total` samples every evaluator uses for a given N."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(SUBSET_SEED))[:n]


def _builtin_data(train_samples: int | None, root: str | os.PathLike | None, test_samples: int | None = None) -> EvalData:
    """Built-in Fashion-MNIST: each split = the first `*_samples` of a seeded permutation of it (or all of it)."""
    from data.builtin import FASHION_MNIST_CLASSES, load_fashion_mnist

    def load(split: str, n: int | None) -> Callable[[], Pair]:
        def run() -> Pair:
            images, labels = load_fashion_mnist(split, root=root)
            if n is not None and n < len(labels):
                keep = subset_indices(n, len(labels))
                images, labels = images[keep], labels[keep]
            return images, labels

        return run

    def name(split: str, n: int | None) -> str:
        return f"fmnist-{split}" + ("" if n is None else f"-{n}")

    return EvalData(name("train", train_samples), name("test", test_samples), len(FASHION_MNIST_CLASSES),
                    load("train", train_samples), load("test", test_samples))


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


def _shard_data(spec: dict[str, Any], preprocess: dict[str, Any], train_samples: int | None, batch_size: int,
                test_samples: int | None = None) -> EvalData:
    """Labelled shards (spec = {"train": ..., "test": ...}), read without shuffling; each split = a
    seeded uniform random sample of `*_samples` of it (reservoir sampling), or all of it."""
    from data.shards import find_manifest, shard_urls
    from data.stream import ShardLoader

    if not spec.get("test"):
        raise ValueError(
            f"the train shards are {spec.get('train')!r} but there are no test shards: kNN and linear scores "
            f"need a labelled test split; pass --test-shards (or set data.test in the run's config)"
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

    manifest = find_manifest(spec["train"]) or {}
    num_classes = len(manifest.get("classes") or [])  # 0 without a manifest (URLs): from the labels, once known
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]

    def name(split: str, n: int | None) -> str:
        return f"shards-{key}-{split}" + ("" if n is None else f"-{n}")

    return EvalData(
        name("train", train_samples), name("test", test_samples), num_classes,
        lambda: batches("train", train_samples), lambda: batches("test", test_samples),
    )


def checkpoint_data(
    meta: dict[str, Any], train_samples: int | None, fashion_mnist_dir: str | None, device: torch.device,
    shards: dict[str, str | None] | None = None, test_samples: int | None = None,
) -> EvalData:
    """The eval data of a checkpoint: `shards` ({"train", "test"}: the user's labelled shards) when
    given, else the shards its run trained on (backbone.json 'data'), else built-in Fashion-MNIST."""
    spec = {k: v for k, v in (shards or {}).items() if v} or meta.get("data") or {}
    if spec.get("train") or spec.get("test"):
        if not spec.get("train"):
            raise ValueError(f"test shards {spec['test']!r} were given without train shards: pass --train-shards too "
                             "(kNN and the linear probe learn from a labelled train split)")
        return _shard_data(spec, meta["preprocess"], train_samples, default_batch_size(device), test_samples)
    return _builtin_data(train_samples, fashion_mnist_dir, test_samples)


def _features(backbone: nn.Module, preprocess: dict, source: Callable[[], Any], device: torch.device,
              distributed: bool = False) -> Pair:
    """Features of what `source()` returns: an (images, labels) pair of tensors or an iterable of batches."""
    got = source()
    if isinstance(got, tuple) and isinstance(got[0], torch.Tensor):
        return extract_features(backbone, got[0], got[1], preprocess, device=device, distributed=distributed)
    return extract_features(backbone, got, None, preprocess, device=device, distributed=distributed)


def score_checkpoint(
    checkpoint_dir: str | os.PathLike,
    *,
    knn: bool = True,
    linear: bool = False,
    ks: Sequence[int] = (20,),
    train_samples: int | None = None,
    fashion_mnist_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    shards: dict[str, str | None] | None = None,
    distributed: bool = False,
) -> dict[str, float]:
    """Score a checkpoint (or exported backbone) folder's backbone; features are cached in CHECKPOINT/features/.

    Data: `shards` ({"train": ..., "test": ...}, the user's labelled shards), else the shards named in
    backbone.json's 'data', else the built-in Fashion-MNIST (train = the first `train_samples` of a
    fixed seeded permutation, or all 60,000; test = all 10,000).

    distributed=True (a collective, e.g. under `accelerate launch`): every process extracts its
    share of the features, rank 0 writes the cache and scores; other ranks return {}.
    """
    if train_samples is not None and train_samples < 1:
        raise ValueError(f"train_samples={train_samples} must be >= 1 (or None for the whole train split)")
    meta = backbones.load_meta(checkpoint_dir)
    preprocess = _preprocess(meta, checkpoint_dir)
    device = torch.device(device)
    data = checkpoint_data(meta, train_samples, None if fashion_mnist_dir is None else str(fashion_mnist_dir), device, shards)
    model: nn.Module | None = None

    def compute(source: Callable[[], Any]) -> Callable[[], Pair]:
        def run() -> Pair:
            nonlocal model
            if model is None:  # load the weights only when some split is not cached yet
                model = backbones.load(checkpoint_dir).to(device)
            return _features(model, preprocess, source, device, distributed)

        return run

    train = cached_features(checkpoint_dir, data.train_name, compute(data.load_train), distributed)
    test = cached_features(checkpoint_dir, data.test_name, compute(data.load_test), distributed)
    if train is None or test is None or process_group()[0] != 0:
        return {}
    num_classes = data.num_classes or int(max(train[1].max(), test[1].max())) + 1
    return score_features(train, test, num_classes, knn=knn, linear=linear, ks=ks)


def _preprocess(meta: dict[str, Any], where: str | os.PathLike) -> dict[str, Any]:
    if "preprocess" not in meta:
        raise ValueError(
            f"{where} has no 'preprocess' entry (image_size, channels, mean, std) in its backbone.json / config.json: "
            f"save the backbone with extra={{'preprocess': ...}} as the trainer does"
        )
    return meta["preprocess"]


def subset_scorer(
    meta: dict[str, Any], train_samples: int, test_samples: int, *, ks: Sequence[int] = (20,),
    fashion_mnist_dir: str | None = None, device: str | torch.device = "cpu",
) -> Callable[[nn.Module], dict[str, float]]:
    """kNN on a fixed seeded subset (train bank of `train_samples`, `test_samples` test images), for
    watching a run while it trains: the images are read once, here; the returned function scores a
    backbone (a collective under a distributed job: every rank extracts its share; rank 0 gets the
    scores, named 'knn_subset/top1@K', other ranks {}). Nothing is cached: the weights change."""
    device = torch.device(device)
    preprocess = _preprocess(meta, "the run's backbone")
    data = checkpoint_data(meta, train_samples, fashion_mnist_dir, device, test_samples=test_samples)

    def materialise(got: Any) -> Pair:
        if isinstance(got, tuple) and isinstance(got[0], torch.Tensor):
            return got
        images, labels = zip(*got)
        return torch.cat(images), torch.cat(labels)

    train, test = materialise(data.load_train()), materialise(data.load_test())
    num_classes = data.num_classes or int(max(train[1].max(), test[1].max())) + 1

    def score(backbone: nn.Module) -> dict[str, float]:
        tr = extract_features(backbone, *train, preprocess, device=device, distributed=True)
        te = extract_features(backbone, *test, preprocess, device=device, distributed=True)
        if process_group()[0] != 0:
            return {}
        res = knn_accuracy(tr[0], tr[1], te[0], te[1], num_classes, ks=ks)
        return {f"knn_subset/{k}": v for k, v in res.items()}

    return score


# --------------------------------------------------------------------------- targets


class TargetError(ValueError):
    """TARGET is neither a checkpoint folder nor a run folder with checkpoints."""


def step_of(checkpoint: Path, meta: dict[str, Any] | None = None) -> int:
    """A checkpoint's step: backbone.json 'step', else the N of a step-N folder name, else 0."""
    if meta is not None and isinstance(meta.get("step"), int):
        return meta["step"]
    m = _STEP_DIR.match(checkpoint.name)
    return int(m.group(1)) if m else 0


def _run_of(checkpoint: Path) -> Path | None:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def find_checkpoints(target: str | os.PathLike) -> tuple[list[Path], Path | None]:
    """(checkpoint folders in step order, the run folder or None) for a checkpoint folder, a run
    folder, or an exported backbone (its run is the one it was exported from, when that still exists)."""
    path = Path(target).expanduser()
    if (path / "backbone.json").is_file():
        return [path], _run_of(path)
    if is_backbone_folder(path):  # an export: its run is the one named by the checkpoint it came from
        source = backbones.load_meta(path).get("source")
        run_dir = _run_of(Path(source)) if source else None
        return [path], (run_dir if run_dir is not None and run_dir.is_dir() else None)
    ckpt_root = path / "checkpoints"
    if path.is_file():
        raise TargetError(
            f"TARGET {path} is a file, not a folder: pass a checkpoint folder (backbone.json + backbone.safetensors), "
            "a run folder or an exported backbone (python -m pretrain.export); weights files (.pt, .pth, .npz) are never "
            "unpickled: load them into backbones.create(...) with backbones.read_state_dict and save the model with "
            "backbones.save(model, DIR, extra={'preprocess': ...})")
    if not path.is_dir():
        raise TargetError(f"TARGET {path} does not exist: pass a checkpoint folder (with backbone.json), a run folder "
                          "or an exported backbone (python -m pretrain.export)")
    if not ckpt_root.is_dir():
        raise TargetError(
            f"TARGET {path} is neither a checkpoint folder (no backbone.json), a run folder (no checkpoints/ folder) "
            f"nor an exported backbone (no config.json of format vit-ssl)"
        )
    found = [d for d in ckpt_root.iterdir() if _STEP_DIR.match(d.name) and (d / "backbone.json").is_file()]
    if not found:
        raise TargetError(f"run folder {path} has no complete checkpoint (checkpoints/step-*/backbone.json): train longer")
    return sorted(found, key=step_of), path


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
    p.add_argument("target", metavar="TARGET", help="a checkpoint folder, a run folder (every checkpoint) or an exported backbone")
    p.add_argument("--knn", action="store_true", help="kNN scores (with none of --knn/--linear/--finetune: kNN and linear)")
    p.add_argument("--linear", action="store_true", help="linear-probe scores")
    p.add_argument("--finetune", action="store_true", help="fine-tune end to end (python -m eval.finetune) and score")
    p.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS), help="kNN neighbour counts (default 10 20 100 200)")
    p.add_argument("--train-shards", default=None, help="labelled train shards (folder, pattern or URLs); default: the run's, else built-in")
    p.add_argument("--test-shards", default=None, help="labelled test shards; default: the run's, else built-in")
    p.add_argument("--train-samples", type=int, default=None, help="score on a fixed seeded subset of N train images")
    p.add_argument("--finetune-epochs", type=int, default=None, help="epochs of --finetune (default: eval.finetune's)")
    p.add_argument("--fashion-mnist-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--runs-root", default="runs", help="MLflow store when TARGET has no run.json (default: runs)")
    p.add_argument("--eval-run", action="store_true",
                   help="log into a new evaluation run linked to the pretraining run (tag mlflow.parentRunId), not into it")
    p.add_argument("--device", default=None, help="device for the feature pass (default: this process's accelerator, else cpu)")
    return p


def _mlflow_run(run_dir: Path | None, target: Path, args: argparse.Namespace) -> tuple[str, str, bool]:
    """(run id, tracking uri, whether we created it): the pretraining run named in run.json, else (or
    with --eval-run) a new run of experiment vit-ssl-eval, linked to the pretraining run when known."""
    run_id, uri, created = tracking.evaluation_run(run_dir, target, args.runs_root, EVAL_EXPERIMENT,
                                                   f"eval-{target.name}", new_run=args.eval_run)
    if created:
        tracking.log_params(run_id, {"target": str(target.resolve()), "ks": args.k, "train_samples": args.train_samples,
                                     "train_shards": args.train_shards, "test_shards": args.test_shards}, uri)
    return run_id, uri, created


def _score_all(checkpoints: list[Path], run_id: str | None, uri: str | None, args: argparse.Namespace,
               device: torch.device) -> list[tuple[int, dict[str, float]]]:
    """Score each checkpoint (all processes), logging its scores at its step as soon as they are known (rank 0)."""
    chosen = args.knn or args.linear or args.finetune
    knn, linear = (args.knn, args.linear) if chosen else (True, True)
    shards = {"train": args.train_shards, "test": args.test_shards}
    main = process_group()[0] == 0
    rows: list[tuple[int, dict[str, float]]] = []
    for ckpt in checkpoints:
        step = step_of(ckpt, backbones.load_meta(ckpt))
        if main:
            print(f"scoring {ckpt} (step {step})", file=sys.stderr, flush=True)
        scores: dict[str, float] = {}
        if knn or linear:
            scores.update(score_checkpoint(
                ckpt, knn=knn, linear=linear, ks=args.k, train_samples=args.train_samples,
                fashion_mnist_dir=args.fashion_mnist_dir, device=device, shards=shards, distributed=True,
            ))
        if args.finetune:
            scores.update(_finetune(ckpt, args))
        if main:
            tracking.log_metrics(run_id, scores, step, uri)
        rows.append((step, scores))
    return rows


def _finetune(ckpt: Path, args: argparse.Namespace) -> dict[str, float]:
    """finetune/top1 and finetune/top5 of `ckpt` (eval.finetune; its own MLflow logging off: we log here)."""
    from .finetune import finetune

    kw = {} if args.finetune_epochs is None else {"epochs": args.finetune_epochs}
    res = finetune(ckpt, train_shards=args.train_shards, test_shards=args.test_shards, train_samples=args.train_samples,
                   mlflow=False, **kw)
    return {"finetune/top1": res["top1"], "finetune/top5": res["top5"]} if res else {}


def _device(name: str | None) -> torch.device:
    """--device, else this process's accelerator under a launcher (Accelerate's choice), else the CPU;
    on a CPU, each local process gets its share of the cores."""
    state = launch_state()
    device = torch.device(name) if name else state.device
    share_cpu_threads(device)
    return device


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    main_rank = True
    try:
        if args.train_samples is not None and args.train_samples < 1:
            raise ValueError(f"--train-samples {args.train_samples} must be >= 1 (or left out for the whole train split)")
        if args.test_shards and not args.train_shards:
            raise ValueError(f"--test-shards {args.test_shards} was given without --train-shards: pass both "
                             "(kNN and the linear probe learn from a labelled train split)")
        device = _device(args.device)
        main_rank = process_group()[0] == 0
        checkpoints, run_dir = find_checkpoints(args.target)
        for ckpt in checkpoints:  # a truncated or foreign checkpoint is refused before any run is logged
            verify_weights(ckpt)
            _preprocess(backbones.load_meta(ckpt), ckpt)
        run_id, uri, created = _mlflow_run(run_dir, Path(args.target), args) if main_rank else (None, None, False)
    except (ValueError, FileNotFoundError) as exn:
        print(f"eval.run: error: {exn}", file=sys.stderr)
        return 2
    status = "FAILED"
    try:
        rows = _score_all(checkpoints, run_id, uri, args, device)
        status = "FINISHED"
    except (ValueError, FileNotFoundError) as exn:
        print(f"eval.run: error: {exn}", file=sys.stderr)
        return 1
    finally:
        if created:
            tracking.end_run(run_id, uri, status)
    if main_rank:
        print(format_table(rows))
        print(f"MLflow run {run_id} ({tracking.redact(uri)})")
    return 0


if __name__ == "__main__":
    from eval.features import leave

    leave(main())
