"""End-to-end fine-tuning of a pretrained backbone with a new linear head; `python -m eval.finetune`.

MAE's fine-tuning protocol scaled to a CPU: AdamW with linear warm-up then cosine decay,
layer-wise learning-rate decay (LLRD), label smoothing, optional RandAugment and MixUp
(data.augment), the new head initialised small (trunc-normal, std 2e-5, zero bias: MAE's choice,
so the first steps do not push large random gradients into the pretrained blocks), and test
top-1 / top-5 after every epoch. MAE / SimMIM features score low when frozen (kNN, linear probe);
this is the score that says what such a checkpoint is worth downstream.

    python -m eval.finetune TARGET [--train-shards P --test-shards P] [--epochs N] [--batch-size N]
                            [--lr X] [--layer-decay X] [--weight-decay X] [--train-samples N]
                            [--out DIR] [--randaugment N[,M]] [--mixup X] [--seed N] [--no-mlflow]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m eval.finetune TARGET ...

TARGET is a checkpoint folder (RUN_DIR/checkpoints/step-NNNNNN) or any folder `backbones.load`
reads (an export, a previous fine-tune). It is also the downstream fine-tuning script: point
--train-shards / --test-shards at your own labelled shards (`python -m data.shards write`).
Data: those shards, else the shards named in the checkpoint's backbone.json "data", else the
built-in Fashion-MNIST. The result OUT (default TARGET/finetune/) is a classifier folder:
`backbones.load_classifier(OUT)` predicts; OUT/metrics.json holds the scores and the history.

Layer ids for LLRD, for any backbone (see `layer_ids`): the blocks are found generically as the
units of the backbone's trunk, its first nn.ModuleList (or an nn.Sequential named blocks /
stages / layers, as in timm models) together with its sibling lists; every other parameter is
placed by where it comes in `named_parameters()` order.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import backbones
from backbones.base import Classifier

from . import tracking
from .features import image_size, share_cpu_threads
from .run import step_of, subset_indices

EVAL_EXPERIMENT = tracking.EVAL_EXPERIMENT  # runs not inside a pretraining run folder go here
OUT_NAME = "finetune"
METRICS = "metrics.json"
HEAD_INIT_STD = 2e-5  # MAE's head init for fine-tuning
EVAL_BATCH = 256
_TRUNK_NAMES = ("blocks", "stages", "layers", "levels")

Pair = tuple[torch.Tensor, torch.Tensor]  # uint8 images (B, C, H, W), int64 labels (B,)


# --------------------------------------------------------------------------- layer ids and groups


def _is_trunk(name: str, module: nn.Module) -> bool:
    """An nn.ModuleList, or an nn.Sequential named like a block stack (timm keeps blocks in Sequentials)."""
    if isinstance(module, nn.ModuleList):
        return len(module) > 0
    return isinstance(module, nn.Sequential) and len(module) > 0 and name.rsplit(".", 1)[-1] in _TRUNK_NAMES


def trunk_units(model: nn.Module) -> list[str]:
    """Name prefixes of the model's blocks in forward order, e.g. ['blocks.0', 'blocks.1', ...].

    The trunk is the first block stack met in `named_modules()` order (an nn.ModuleList, or an
    nn.Sequential named blocks / stages / layers / levels) and the block stacks beside it under the
    same parent (CaiT's class-attention blocks, ViViT's temporal blocks). Each element of a stack
    is a unit, except that an element which is itself an nn.ModuleList contributes its own
    elements (MaxViT's stages of blocks). A hierarchical backbone's stage is one unit when it is
    not such a list (its patch merging included).
    """
    found = next(((n, m) for n, m in model.named_modules() if n and _is_trunk(n, m)), None)
    if found is None:
        return []
    parent_name = found[0].rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    units: list[str] = []
    for child_name, child in parent.named_children():
        full = f"{parent_name}.{child_name}" if parent_name else child_name
        if not _is_trunk(full, child):
            continue
        for i, element in enumerate(child):
            if isinstance(element, nn.ModuleList):
                units.extend(f"{full}.{i}.{j}" for j in range(len(element)))
            else:
                units.append(f"{full}.{i}")
    return units


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """({parameter name: layer id}, L) for layer-wise LR decay, L = the number of blocks.

    Block i (0-based, see trunk_units) is layer i + 1. A parameter outside the blocks takes its
    place in `named_parameters()` order: before the first block it is the embedding, layer 0
    (patch embedding, positions, class tokens; a module's own parameters come first, so tokens
    registered on the backbone itself are layer 0 too); after the last block it is layer L + 1
    (final norm, pooling, head); between blocks it joins the block that follows it. Ids are
    therefore monotone in parameter order. A model without a block stack has L = 0: every
    parameter is layer 0 or 1 and LLRD scales nothing but the embedding.
    """
    units = trunk_units(model)
    index = {u: i for i, u in enumerate(units)}
    ids: dict[str, int] = {}
    begun = 0  # blocks whose parameters have started
    for name, _ in model.named_parameters():
        parts = name.split(".")
        unit = next((index[p] for p in (".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)) if p in index), None)
        if unit is not None:
            ids[name] = unit + 1
            begun = max(begun, unit + 1)
        else:
            ids[name] = 0 if begun == 0 else begun + 1
    return ids, len(units)


def param_groups(
    model: Classifier, lr: float, weight_decay: float, layer_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups of a backbone + head: one per (layer id, decay or not).

    A parameter at layer l gets lr * layer_decay ** (L + 1 - l) (key "lr_scale" holds the factor,
    "layer" the id, "names" the parameter names); the head is layer L + 1 (factor 1). Weight decay
    is off for norms, biases (every parameter with ndim <= 1) and the backbone's
    `no_weight_decay()` names (positions, tokens). Frozen parameters are left out.
    """
    ids, depth = layer_ids(model.backbone)
    skip = {f"backbone.{n}" for n in model.backbone.no_weight_decay()}
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = ids[name[len("backbone."):]] if name.startswith("backbone.") else depth + 1
        decay = p.ndim > 1 and name not in skip
        scale = layer_decay ** (depth + 1 - layer)
        group = groups.setdefault((layer, decay), {
            "params": [], "names": [], "layer": layer, "lr_scale": scale, "lr": lr * scale,
            "weight_decay": weight_decay if decay else 0.0,
        })
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then half-cosine to 0 at `total`: a function of the step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def new_head(dim: int, num_classes: int, std: float = HEAD_INIT_STD) -> nn.Linear:
    """A linear head initialised small (trunc-normal std 2e-5, zero bias) as in MAE's fine-tuning."""
    head = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(head.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(head.bias)
    return head


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    """Where the fine-tuning images come from: tensors in memory (built-in) or shard specs."""

    num_classes: int
    classes: list[str] | None
    load_channels: int
    train: Pair | None = None  # (N, C, H, W) uint8, (N,) int64
    test: Pair | None = None
    train_shards: Any = None
    test_shards: Any = None
    train_count: int | None = None  # samples in the train shards, when known
    size: int = 0  # square input size the shards are decoded at (preprocess image_size)
    describe: dict[str, Any] = field(default_factory=dict)


def _count_shards(spec: Any, size: int, channels: int) -> tuple[int, int]:
    """(samples, largest label + 1) of shards without a manifest: one reading pass."""
    from data.stream import ShardLoader

    loader = ShardLoader(spec, batch_size=256, image_size=size, channels=channels, shuffle=False,
                         drop_last=False, num_workers=1)
    n, top = 0, -1
    for batch in loader.iter_epoch(0):
        n += batch.labels.shape[0]
        top = max(top, int(batch.labels.max()))
    return n, top + 1


def _builtin(train_samples: int | None, root: str | os.PathLike | None) -> Data:
    """Built-in Fashion-MNIST as uint8 tensors: train = the first `train_samples` of a seeded
    permutation (the subset eval.run scores with the same --train-samples), test = all 10,000."""
    from data.builtin import FASHION_MNIST_CLASSES, load_fashion_mnist

    images, labels = load_fashion_mnist("train", root=root)
    if train_samples is not None and train_samples < len(labels):
        keep = subset_indices(train_samples, len(labels))
        images, labels = images[keep], labels[keep]
    return Data(len(FASHION_MNIST_CLASSES), list(FASHION_MNIST_CLASSES), 1, train=(images, labels),
                test=load_fashion_mnist("test", root=root), describe={"train": None, "test": None})


def _shards(train: Any, test: Any, preprocess: dict[str, Any], where: str) -> Data:
    """Labelled shard sets; the class count from the train manifest, else from one pass over the labels."""
    from data.shards import find_manifest, shard_urls

    if not train or not test:
        raise ValueError(
            f"{where}: train shards {train!r} and test shards {test!r}: fine-tuning needs both a labelled train "
            f"and a labelled test split; give --train-shards and --test-shards"
        )
    shard_urls(train), shard_urls(test)  # fail now when a spec matches nothing
    manifest = find_manifest(train)
    for name, spec, m in (("train", train, manifest), ("test", test, find_manifest(test))):
        if m is not None and not m.get("labelled", True):
            raise ValueError(f"{name} shards {spec} are unlabelled (manifest: labelled false): fine-tuning needs labels; "
                             "write them with classes (`python -m data.shards write SRC OUT`)")
    channels = int(preprocess.get("channels", len(preprocess["mean"])))
    load_channels = 1 if (manifest or {}).get("channels") == 1 else channels
    if manifest is not None and manifest.get("classes"):
        classes, count = list(manifest["classes"]), manifest.get("num_samples")
        num_classes = len(classes)
    else:
        classes = None
        count, num_classes = _count_shards(train, image_size(preprocess), load_channels)
    if num_classes < 2:
        raise ValueError(f"train shards {train}: {num_classes} class(es) found; a classifier needs at least 2")
    return Data(num_classes, classes, load_channels, train_shards=train, test_shards=test, train_count=count,
                describe={"train": str(train), "test": str(test)})


def resolve_data(meta: dict[str, Any], train_shards: Any, test_shards: Any, train_samples: int | None,
                 fashion_mnist_dir: str | os.PathLike | None) -> Data:
    """The given shards, else the shards named in backbone.json 'data', else built-in Fashion-MNIST."""
    if train_shards is not None or test_shards is not None:
        return _shards(train_shards, test_shards, meta["preprocess"], "--train-shards/--test-shards")
    spec = meta.get("data") or {}
    if spec.get("train"):
        return _shards(spec["train"], spec.get("test"), meta["preprocess"], "backbone.json data")
    return _builtin(train_samples, fashion_mnist_dir)


def _tensor_batches(pair: Pair, order: torch.Tensor, batch_size: int, drop_last: bool) -> Iterator[Pair]:
    images, labels = pair
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        yield images[idx], labels[idx]


def train_batches(data: Data, epoch: int, batch_size: int, seed: int, rank: int, world: int) -> Iterator[Pair]:
    """This rank's batches of one epoch, shuffled by (seed, epoch): its share of a permutation of
    the tensors, or its shards (data.stream.ShardLoader, split by rank and worker)."""
    if data.train is not None:
        n = len(data.train[1])
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        share = perm[rank::world][: n // world]  # equal shares, so the ranks stay in step
        yield from _tensor_batches(data.train, share, batch_size, drop_last=True)
        return
    from data.shards import shard_urls
    from data.stream import ShardLoader

    urls = shard_urls(data.train_shards)
    if len(urls) < world:
        raise ValueError(f"train shards {data.train_shards}: {len(urls)} shard(s) for {world} processes; write at least "
                         f"one shard per process (`python -m data.shards write SRC OUT --shard-size N`)")
    loader = ShardLoader(urls, batch_size=batch_size, image_size=data.size,
                         channels=data.load_channels, seed=seed, rank=rank, world_size=world,
                         num_workers=max(1, min(2, len(urls) // world)), shuffle=True, drop_last=True)
    for batch in loader.iter_epoch(epoch):
        yield batch.images, batch.labels


def eval_batches(data: Data, rank: int, world: int) -> Iterator[Pair]:
    """This rank's share of the test split, each sample on exactly one rank (no padding duplicates):
    every world-th tensor row, or the rank's shards (rank 0 reads them all when there are fewer
    shards than processes)."""
    if data.test is not None:
        order = torch.arange(rank, len(data.test[1]), world)
        yield from _tensor_batches(data.test, order, EVAL_BATCH, drop_last=False)
        return
    from data.shards import shard_urls
    from data.stream import ShardLoader

    urls = shard_urls(data.test_shards)
    split = len(urls) >= world
    if not split and rank != 0:
        return
    loader = ShardLoader(urls, batch_size=EVAL_BATCH, image_size=data.size, channels=data.load_channels,
                         rank=rank if split else 0, world_size=world if split else 1,
                         num_workers=max(1, min(2, len(urls) // (world if split else 1))), shuffle=False, drop_last=False)
    for batch in loader.iter_epoch(0):
        yield batch.images, batch.labels


def steps_per_epoch(data: Data, batch_size: int, world: int, train_samples: int | None) -> int:
    """Optimizer steps of one epoch (an estimate for shards whose ranks hold unequal shares)."""
    n = len(data.train[1]) if data.train is not None else int(data.train_count or 0)
    steps = (n // world) // batch_size
    if train_samples is not None and data.train is None:
        steps = min(steps, math.ceil(train_samples / (batch_size * world)))
    if steps < 1:
        raise ValueError(
            f"{n} train samples give no full batch of batch_size={batch_size} on each of {world} process(es): "
            f"lower --batch-size or use more train samples"
        )
    return steps


# --------------------------------------------------------------------------- settings and checks


@dataclass
class Settings:
    """What a fine-tune ran with (saved in backbone.json 'finetune' and metrics.json)."""

    epochs: int = 2
    batch_size: int = 128
    lr: float = 3e-3
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.8, 1.0)
    randaugment: tuple[int, float] = (0, 9.0)  # (ops per image, magnitude); 0 ops = off
    mixup: float = 0.0  # MixUp alpha; 0 = off
    train_samples: int | None = None
    seed: int = 0

    def check(self) -> None:
        rules = [
            ("epochs", self.epochs, isinstance(self.epochs, int) and self.epochs >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size, isinstance(self.batch_size, int) and self.batch_size >= 1, "an integer >= 1"),
            ("lr", self.lr, self.lr > 0, "> 0 (MAE: 5e-4 x batch / 256 for ViT-B; 3e-3 for a few epochs of a small ViT)"),
            ("layer_decay", self.layer_decay, 0 < self.layer_decay <= 1, "in (0, 1] (1 = no decay; MAE: 0.65-0.75)"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
            ("warmup_epochs", self.warmup_epochs, self.warmup_epochs >= 0, ">= 0"),
            ("label_smoothing", self.label_smoothing, 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("randaugment", self.randaugment, self.randaugment[0] >= 0 and 0 <= self.randaugment[1] <= 10,
             "N[,M] with N >= 0 ops per image and magnitude M in [0, 10] (DeiT: 2,9)"),
            ("mixup", self.mixup, self.mixup >= 0, ">= 0 (MixUp alpha; 0 = off, DeiT: 0.8)"),
            ("train_samples", self.train_samples, self.train_samples is None or self.train_samples >= 1,
             "an integer >= 1 (or unset for the whole train split)"),
        ]
        for name, value, ok, allowed in rules:
            if not ok:
                raise ValueError(f"{name}={value!r} is invalid: it must be {allowed}")


def check_out(out: Path, target: Path) -> None:
    """Refuse an OUT that would overwrite anything but an earlier fine-tune (never the checkpoint)."""
    out, target = out.resolve(), target.resolve()
    if out == target or out in target.parents:
        raise ValueError(f"--out {out} is the checkpoint folder or holds it: pass a new folder (default TARGET/{OUT_NAME})")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / METRICS).is_file())):
        raise ValueError(f"--out {out} exists and is not a fine-tune output (no {METRICS}): pass a new folder or remove it")


# --------------------------------------------------------------------------- training


def _lockstep(batches: Iterable[Pair], acc: Any, limit: int | None) -> Iterator[Pair]:
    """Batches while every rank still has one (ranks reading shards may hold unequal shares; a rank
    stepping alone would hang the gradient all-reduce), and at most `limit` of them."""
    it = iter(batches)
    done = 0
    while limit is None or done < limit:
        batch = next(it, None)
        if acc.num_processes > 1:
            have = torch.tensor([0.0 if batch is None else 1.0], device=acc.device)
            if acc.reduce(have, reduction="sum").item() < acc.num_processes:
                return
        if batch is None:
            return
        done += 1
        yield batch


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[Pair], preprocess: dict[str, Any], acc: Any) -> dict[str, float]:
    """Test top-1 / top-5 (fractions) over every rank's share, and the sample count."""
    from data.augment import eval_transform

    was = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=acc.device)  # correct@1, correct@5, seen
    for images, labels in batches:
        x = eval_transform(images.to(acc.device), size=image_size(preprocess), mean=preprocess["mean"], std=preprocess["std"])
        logits = model(x)  # (B, K)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, 5)
        hit = top == labels.to(acc.device)[:, None]
        totals += torch.tensor([hit[:, 0].sum().item(), hit.any(-1).sum().item(), len(labels)],
                               dtype=torch.float64, device=acc.device)
    model.train(was)
    totals = acc.reduce(totals, reduction="sum") if acc.num_processes > 1 else totals
    n = max(1.0, totals[2].item())
    return {"top1": totals[0].item() / n, "top5": totals[1].item() / n, "samples": int(totals[2].item())}


def _augmenter(s: Settings, preprocess: dict[str, Any], device: torch.device):
    from data.augment import DeviceAugment, ViewSpec

    view = ViewSpec(size=image_size(preprocess), scale=tuple(s.crop_scale), hflip=0.5,
                    randaugment_ops=int(s.randaugment[0]), randaugment_magnitude=float(s.randaugment[1]))
    return DeviceAugment([view], preprocess["mean"], preprocess["std"], allow_grey=True).to(device)


def _loss_fn(s: Settings, num_classes: int):
    """(images, labels) -> (images, targets) mixer, and the loss on (logits, targets)."""
    from data.augment import MixUp, soft_target_cross_entropy

    if s.mixup > 0:
        mix = MixUp(num_classes, mixup_alpha=s.mixup, cutmix_alpha=0.0, label_smoothing=s.label_smoothing)
        return mix, soft_target_cross_entropy
    return None, lambda logits, y: F.cross_entropy(logits.float(), y, label_smoothing=s.label_smoothing)


def _train_epoch(model, optimizer, acc, batches, augment, mix, loss_fn, schedule) -> tuple[float, int]:
    """One epoch; `schedule(i)` sets the LRs before step i of the epoch. Returns (mean loss, steps)."""
    model.train()
    total, count = torch.zeros((), device=acc.device), 0
    for i, (images, labels) in enumerate(batches):
        schedule(i)
        with torch.no_grad():
            x = augment(images.to(acc.device, non_blocking=True))[0]  # (B, C, S, S)
        y = labels.to(acc.device)
        if mix is not None:
            x, y = mix(x, y)  # y: soft targets (B, K)
        loss = loss_fn(model(x), y)
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total += loss.detach()
        count += 1
    mean = total / max(1, count)
    return (acc.reduce(mean, reduction="mean") if acc.num_processes > 1 else mean).item(), count


def make_accelerator() -> Any:
    """The Accelerator of a fine-tune. Unused parameters are allowed (a backbone may hold some the
    pooled embedding never reaches, e.g. a distillation token), at the price of one graph walk."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    return Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def finetune(
    target: str | os.PathLike,
    *,
    train_shards: Any = None,
    test_shards: Any = None,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 3e-3,
    layer_decay: float = 0.75,
    weight_decay: float = 0.05,
    warmup_epochs: float = 0.5,
    label_smoothing: float = 0.1,
    crop_scale: Sequence[float] = (0.8, 1.0),
    randaugment: Sequence[float] = (0, 9.0),
    mixup: float = 0.0,
    train_samples: int | None = None,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    run_id: str | None = None,
    uri: str | None = None,
    runs_root: str | os.PathLike = "runs",
    fashion_mnist_dir: str | os.PathLike | None = None,
    eval_before: bool = False,
    accelerator: Any = None,
    mlflow: bool = True,
) -> dict[str, Any]:
    """Fine-tune the backbone of `target` end to end with a new linear head; returns the scores.

    Returns {"top1", "top5" (fractions, test split, after the last epoch), "epochs", "minutes",
    "history" (per epoch: top1, top5, loss), "out", "num_classes", "step" (the checkpoint's),
    "world_size"} and "before" ({"top1", "top5"} with the untrained head) when eval_before.
    Data: train_shards / test_shards (both, labelled), else the shards in backbone.json 'data',
    else built-in Fashion-MNIST (train_samples: a fixed seeded subset of it; for shards, each
    epoch stops after about train_samples samples). Runs under Accelerate on however many
    processes were launched; only the main process writes OUT (default TARGET/finetune, replaced
    atomically) and logs to MLflow: when run_id is given, `finetune/top1` and `finetune/top5` at
    the checkpoint's step and the per-epoch curve as `finetune/step-NNNNNN/{top1,top5,loss}` at
    step = epoch (0 = before training), in run `run_id` of `uri` (default tracking_uri(runs_root)).
    Without run_id, or with mlflow=False (a caller that logs the returned scores itself), nothing
    is logged.
    """
    from accelerate.utils import set_seed

    t0 = time.time()
    s = Settings(epochs, batch_size, float(lr), float(layer_decay), float(weight_decay), float(warmup_epochs),
                 float(label_smoothing), tuple(float(c) for c in crop_scale), (int(randaugment[0]), float(randaugment[1])),
                 float(mixup), train_samples, seed)
    s.check()
    target = Path(target).expanduser()
    meta = backbones.load_meta(target)
    if "preprocess" not in meta:
        raise ValueError(f"{target / backbones.base.META} has no 'preprocess' entry (image_size, channels, mean, std): "
                         "save the backbone with extra={'preprocess': ...} as the trainer does")
    preprocess = meta["preprocess"]
    out = Path(out).expanduser() if out is not None else target / OUT_NAME
    check_out(out, target)
    data = resolve_data(meta, train_shards, test_shards, train_samples, fashion_mnist_dir)
    data.size = image_size(preprocess)

    acc = accelerator or make_accelerator()
    share_cpu_threads(acc.device)
    rank, world = acc.process_index, acc.num_processes
    per_epoch = steps_per_epoch(data, s.batch_size, world, s.train_samples)
    total, warmup = per_epoch * s.epochs, round(s.warmup_epochs * per_epoch)

    set_seed(s.seed)  # the same head on every rank
    backbone = backbones.load(target)
    model = Classifier(backbone, new_head(backbone.embed_dim, data.num_classes)).to(acc.device)
    optimizer = torch.optim.AdamW(param_groups(model, s.lr, s.weight_decay, s.layer_decay), lr=s.lr)
    ddp_model, optimizer = acc.prepare(model, optimizer)
    set_seed(s.seed + rank)  # different crops and mixes on each rank
    augment, (mix, loss_fn) = _augmenter(s, preprocess, acc.device), _loss_fn(s, data.num_classes)

    step = step_of(target, meta)
    log = _Logger(mlflow and acc.is_main_process and run_id is not None, run_id, uri or (run_id and tracking.tracking_uri(runs_root)), step)
    history: list[dict[str, float]] = []
    before, done = None, 0
    if eval_before:
        before = evaluate(model, eval_batches(data, rank, world), preprocess, acc)
        log.epoch(0, before)
    for epoch in range(s.epochs):
        def schedule(i: int, epoch: int = epoch) -> None:
            factor = lr_factor(epoch * per_epoch + i, total, warmup)
            for group in optimizer.param_groups:
                group["lr"] = s.lr * group["lr_scale"] * factor

        batches = _lockstep(train_batches(data, epoch, s.batch_size, s.seed, rank, world), acc, per_epoch)
        loss, steps = _train_epoch(ddp_model, optimizer, acc, batches, augment, mix, loss_fn, schedule)
        done += steps
        scores = {**evaluate(model, eval_batches(data, rank, world), preprocess, acc), "loss": loss, "epoch": epoch + 1}
        history.append(scores)
        log.epoch(epoch + 1, scores)
        if acc.is_main_process:
            print(f"[finetune] epoch {epoch + 1}/{s.epochs}: loss {loss:.4f}  test top-1 {100 * scores['top1']:.2f} %  "
                  f"top-5 {100 * scores['top5']:.2f} %  ({(time.time() - t0) / 60:.1f} min)", flush=True)

    final = history[-1]
    result = {"top1": final["top1"], "top5": final["top5"], "epochs": s.epochs, "minutes": (time.time() - t0) / 60,
              "history": history, "out": str(out), "num_classes": data.num_classes, "step": step, "world_size": world,
              "train_steps": done, "test_samples": final["samples"]}
    if before is not None:
        result["before"] = {"top1": before["top1"], "top5": before["top5"]}
    if acc.is_main_process:
        _write_out(out, model, target, meta, data, s, result)
        log.final(result)
    acc.wait_for_everyone()
    return result


class _Logger:
    """MLflow logging of the main process (a no-op elsewhere or without a run)."""

    def __init__(self, active: bool, run_id: str | None, uri: str | None, step: int):
        self.active, self.run_id, self.uri, self.step = active, run_id, uri, step

    def epoch(self, epoch: int, scores: dict[str, float]) -> None:
        if self.active:
            prefix = f"finetune/step-{self.step:06d}"
            tracking.log_metrics(self.run_id, {f"{prefix}/{k}": scores[k] for k in ("top1", "top5", "loss") if k in scores},
                                 epoch, self.uri)

    def final(self, result: dict[str, Any]) -> None:
        if self.active:
            tracking.log_metrics(self.run_id, {"finetune/top1": result["top1"], "finetune/top5": result["top5"]},
                                 self.step, self.uri)


def _write_out(out: Path, model: Classifier, target: Path, meta: dict[str, Any], data: Data, s: Settings,
               result: dict[str, Any]) -> None:
    """OUT = backbone + head + metrics.json, written to a temporary folder and renamed into place."""
    settings = {**asdict(s), "source": str(target.resolve()), "source_step": result["step"],
                "num_classes": data.num_classes, "head_init_std": HEAD_INIT_STD, "world_size": result["world_size"]}
    extra = {"preprocess": meta["preprocess"], "data": data.describe, "step": result["step"], "finetune": settings,
             "scores": {"finetune/top1": result["top1"], "finetune/top5": result["top5"]}}
    if data.classes:
        extra["classes"] = data.classes
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{uuid.uuid4().hex[:8]}")
    try:
        backbones.save(model.backbone, tmp, extra=extra)
        backbones.save_head(model.head, tmp)
        metrics = {k: v for k, v in result.items() if k != "out"}
        (tmp / METRICS).write_text(json.dumps({**metrics, "settings": settings}, indent=2) + "\n")
        old = None
        if out.exists():
            old = out.with_name(f".old-{out.name}-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- MLflow run of the CLI


def mlflow_run(target: Path, runs_root: str | os.PathLike, eval_run: bool = False) -> tuple[str, str, bool]:
    """(run id, tracking uri, created): the pretraining run named in RUN_DIR/run.json when TARGET
    is RUN_DIR/checkpoints/step-N; else, or with `eval_run`, a new run of experiment
    'vit-ssl-eval', tagged mlflow.parentRunId with the pretraining run when there is one."""
    run_dir = target.parent.parent if target.parent.name == "checkpoints" else None
    return tracking.evaluation_run(run_dir, target, runs_root, EVAL_EXPERIMENT, f"finetune-{target.name}",
                                   new_run=eval_run, tags={"eval": "finetune"})


# --------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        _fail(message)


def _fail(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"eval.finetune: error: {message}", file=sys.stderr)
    sys.exit(2)


def _randaugment(text: str) -> tuple[int, float]:
    parts = text.split(",")
    try:
        if len(parts) > 2:
            raise ValueError
        return int(parts[0]), float(parts[1]) if len(parts) == 2 else 9.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or N,M (ops per image, magnitude 0-10), e.g. 2,9") from None


def _parser() -> _Parser:
    d = Settings()
    p = _Parser(prog="python -m eval.finetune", description=__doc__.split("\n\n")[0],
                epilog="Runs on your own labelled shards too: --train-shards DIR --test-shards DIR.")
    p.add_argument("target", metavar="TARGET", help="checkpoint folder (with backbone.json) or a saved backbone folder")
    p.add_argument("--train-shards", default=None, help="labelled train shards (folder, pattern or URL)")
    p.add_argument("--test-shards", default=None, help="labelled test shards, scored after each epoch")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"per process; default {d.batch_size}")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak LR of the head; default {d.lr:g}")
    p.add_argument("--layer-decay", type=float, default=d.layer_decay, help=f"LR x decay^(L+1-layer); default {d.layer_decay}")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    p.add_argument("--train-samples", type=int, default=None, help="train on N samples (built-in: a fixed seeded subset)")
    p.add_argument("--out", default=None, help=f"output folder (default TARGET/{OUT_NAME})")
    p.add_argument("--randaugment", type=_randaugment, default=d.randaugment, metavar="N[,M]",
                   help="RandAugment: N ops per image at magnitude M (default off; DeiT: 2,9)")
    p.add_argument("--mixup", type=float, default=d.mixup, help="MixUp alpha (default 0 = off; DeiT: 0.8)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--runs-root", default="runs", help="MLflow store when TARGET is not in a run folder (default: runs)")
    p.add_argument("--eval-run", action="store_true",
                   help="log into a new run linked to the pretraining run (tag mlflow.parentRunId), not into it")
    p.add_argument("--no-mlflow", action="store_true", help="log nothing to MLflow")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    target = Path(args.target).expanduser()
    try:  # cheap checks first, before the imports of accelerate and mlflow and before any MLflow run
        backbones.load_meta(target)
        Settings(args.epochs, args.batch_size, args.lr, args.layer_decay, args.weight_decay, randaugment=args.randaugment,
                 mixup=args.mixup, train_samples=args.train_samples, seed=args.seed).check()
    except (ValueError, FileNotFoundError) as exn:
        _fail(str(exn).replace("\n", " "))
    from mlflow.exceptions import MlflowException

    from data.stream import DataError

    acc = make_accelerator()  # before anything asks which process this is (it reads ACCELERATE_USE_CPU)
    run_id = uri = None
    created = False
    status = "FAILED"
    try:
        if acc.is_main_process and not args.no_mlflow:
            run_id, uri, created = mlflow_run(target, args.runs_root, args.eval_run)
        result = finetune(
            target, train_shards=args.train_shards, test_shards=args.test_shards, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, layer_decay=args.layer_decay, weight_decay=args.weight_decay,
            train_samples=args.train_samples, out=args.out, seed=args.seed, randaugment=args.randaugment,
            mixup=args.mixup, run_id=run_id, uri=uri, runs_root=args.runs_root, accelerator=acc,
        )
        status = "FINISHED"
    except (ValueError, FileNotFoundError, DataError, MlflowException) as exn:
        _fail(str(exn).replace("\n", " "))
    finally:
        if created:
            tracking.end_run(run_id, uri, status)
    if acc.is_main_process:
        print(f"fine-tuned {target} for {result['epochs']} epoch(s) in {result['minutes']:.1f} min: "
              f"test top-1 {100 * result['top1']:.2f} %, top-5 {100 * result['top5']:.2f} %")
        print(f"classifier    : {result['out']}  (backbones.load_classifier)")
        if run_id:
            print(f"MLflow run    : {run_id} ({uri})")
    return 0


if __name__ == "__main__":
    from eval.features import leave

    leave(main())
