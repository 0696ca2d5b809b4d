"""Frozen-backbone features: one pass over a split, cached per checkpoint.

Scoring a checkpoint several ways (kNN at several k, linear probe) and re-scoring it later should
pay for the backbone's forward pass once: a 70,000-image pass of a small ViT takes minutes on a CPU,
while kNN and the probe on cached features take seconds.
"""
from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

FEATURES_DIR = "features"
# Images per forward pass. On a CPU, moderate batches keep the activations in cache: the MAE recipe's
# ViT (width 128, depth 6, 28 px / patch 4) ran at 540-650 images/s with 64-256 per batch, best at 256,
# and 380-560 with 512-1,024 (2 idle cores, 3 rounds of 4,096 test images).
CPU_BATCH, ACCELERATOR_BATCH = 256, 512

Batch = Any  # (images, labels, ...) tuple, or an object with .images and .labels (data.stream.Batch)


def _check_preprocess(preprocess: dict[str, Any]) -> None:
    missing = [k for k in ("image_size", "mean", "std") if k not in preprocess]
    if missing:
        raise ValueError(
            f"preprocess is missing {', '.join(missing)} (got keys {sorted(preprocess)}): pass the checkpoint's "
            f"backbone.json 'preprocess' entry, e.g. {{'image_size': [28, 28], 'channels': 1, 'mean': [0.286], 'std': [0.353]}}"
        )
    if len(preprocess["mean"]) != len(preprocess["std"]):
        raise ValueError(f"preprocess mean {preprocess['mean']} and std {preprocess['std']} differ in length: one per channel")


def image_size(preprocess: dict[str, Any]) -> int:
    """The square input size of a preprocess entry: image_size given as [H, W] (H == W) or as one int."""
    size = preprocess["image_size"]
    if isinstance(size, int):
        return size
    if len(size) != 2 or size[0] != size[1]:
        raise ValueError(f"preprocess image_size={size!r}: expected a square [S, S] (or one int S)")
    return int(size[0])


def _split_batch(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels) of a batch given as a tuple/list or as an object with .images / .labels."""
    if hasattr(batch, "images"):
        return batch.images, getattr(batch, "labels", None)
    if isinstance(batch, (tuple, list)) and len(batch) >= 1:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(
        f"a batch of type {type(batch).__name__} is neither an (images, labels) tuple nor an object with "
        f".images and .labels: iterate a data.stream.ShardLoader epoch or pass tensors"
    )


def _as_batches(images: torch.Tensor | Iterable[Batch], labels: torch.Tensor | None, batch_size: int) -> Iterable[Batch]:
    """Batches from a tensor (sliced, with its labels) or an iterable of batches (as it is)."""
    if not isinstance(images, torch.Tensor):
        if labels is not None:
            raise ValueError("labels must be None when images is an iterable of batches: the batches carry their labels")
        return images
    if labels is not None and labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels: pass one label per image")
    return (
        (images[i : i + batch_size], None if labels is None else labels[i : i + batch_size])
        for i in range(0, images.shape[0], batch_size)
    )


def _check_device(backbone: nn.Module, device: str | torch.device | None) -> torch.device:
    """`device`, or the backbone's device when None; refuses a device the backbone is not on (we never move it)."""
    param = next(backbone.parameters(), None)
    where = param.device if param is not None else torch.device("cpu")
    if device is None:
        return where
    device = torch.device(device)
    same = where.type == device.type and (where.index is None or device.index is None or where.index == device.index)
    if not same:
        raise ValueError(
            f"the backbone is on {where} but device={device}: move it first "
            f"(backbone.to({str(device)!r})) or pass device={str(where)!r}"
        )
    return device


def default_batch_size(device: str | torch.device) -> int:
    """Images per forward pass for tensor input: 256 on a CPU, 512 on an accelerator."""
    return CPU_BATCH if torch.device(device).type == "cpu" else ACCELERATOR_BATCH


def leave(code: int) -> None:
    """End a CLI with `code`. In a process group: flush and os._exit(code), because the group's
    teardown at interpreter exit can abort (SIGABRT, "terminate called without an active
    exception") once a peer has left, turning the documented code into a crash."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def launch_state():
    """Accelerate's PartialState for this process: joins the process group when started by a launcher
    (`accelerate launch`, torchrun). ACCELERATE_USE_CPU=1 is honoured as the Accelerator does (STACK.md:
    without cpu=True, several CPU processes do not form one job)."""
    from accelerate import PartialState

    return PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))


def share_cpu_threads(device: torch.device, threads: int | None = None, processes: int | None = None) -> None:
    """On a CPU, `threads` per process if given, else the cores shared among this machine's processes
    (LOCAL_WORLD_SIZE under a launcher, else `processes`; neither: left alone). `accelerate launch`
    sets OMP_NUM_THREADS=1 on a machine without a GPU, which halves a 2-core CPU's speed."""
    if torch.device(device).type != "cpu":
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes or 0))
    if threads or local:
        torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // local))


def process_group() -> tuple[int, int]:
    """(rank, world size) of the running torch.distributed job (Accelerate sets one up), (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU under NCCL, else the CPU (gloo)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_rows(local: torch.Tensor, width: int) -> list[torch.Tensor]:
    """Every rank's (n_r, width) rows, in rank order, with exactly the rows each rank has: the
    tensors are padded to the longest for the collective and trimmed afterwards (no duplicates)."""
    import torch.distributed as dist

    _, world = process_group()
    dev = _comm_device()
    n = torch.tensor([local.shape[0]], device=dev)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    longest = int(max(c.item() for c in counts))
    padded = local.new_zeros((longest, width)).to(dev)
    padded[: local.shape[0]] = local.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return [p[: int(c.item())].cpu() for p, c in zip(parts, counts)]


def _gather_batches(feats: list[torch.Tensor], labs: list[torch.Tensor], world: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reassemble round-robin batches (batch i was computed by rank i % world) into the input's order."""
    import torch.distributed as dist

    dev = _comm_device()
    header = torch.tensor([feats[0].shape[1] if feats else -1, int(bool(labs))], device=dev)
    headers = [torch.zeros_like(header) for _ in range(world)]
    dist.all_gather(headers, header)
    width = max(int(h[0]) for h in headers)
    if width < 0:
        raise ValueError("no images to extract features from: the tensor or the iterable of batches was empty")
    if len({int(h[1]) for h in headers if int(h[0]) >= 0}) > 1:
        raise ValueError("some batches had labels and some did not: give every batch labels, or none")
    with_labels = any(int(h[1]) for h in headers)
    sizes = torch.tensor([[f.shape[0]] for f in feats], dtype=torch.float32).reshape(-1, 1)
    local = torch.cat(feats) if feats else torch.zeros(0, width)
    all_feats = _all_gather_rows(local, width)
    all_sizes = [s[:, 0].long().tolist() for s in _all_gather_rows(sizes, 1)]
    all_labs = _all_gather_rows(torch.cat(labs)[:, None] if labs else torch.zeros(0, 1, dtype=torch.long), 1) if with_labels else None
    # split each rank's rows back into its batches, then interleave: batch i = rank i % world, its (i // world)-th
    per_rank = [list(f.split(s)) for f, s in zip(all_feats, all_sizes)]
    per_rank_labs = [list(lb[:, 0].split(s)) for lb, s in zip(all_labs, all_sizes)] if with_labels else None
    total = sum(len(s) for s in all_sizes)
    order = [(i % world, i // world) for i in range(total)]
    out = torch.cat([per_rank[r][j] for r, j in order])
    return out, (torch.cat([per_rank_labs[r][j] for r, j in order]) if with_labels else None)


def extract_features(
    backbone: nn.Module,
    images: torch.Tensor | Iterable[Batch],
    labels: torch.Tensor | None,
    preprocess: dict[str, Any],
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    distributed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pooled embeddings (N, D) float32 on the CPU, and the labels (N,) int64 (None if there were none).

    `images` is either a uint8 tensor (N, C, H, W) with `labels` (N,) or None, or an iterable of
    batches (labels must then be None): (images, labels) tuples or objects with .images/.labels, such
    as `ShardLoader(..., shuffle=False, drop_last=False).iter_epoch(0)`. Each uint8 batch is moved to
    `device` (default: where the backbone's parameters are) and preprocessed there with
    `data.augment.eval_transform`. Runs in eval mode under inference_mode; the backbone's training
    flag is restored afterwards, and the backbone is never moved. batch_size (for tensor input)
    defaults to 256 on a CPU and 512 on an accelerator.

    distributed=True (a collective: every process of the running job calls it with the same input):
    batch i is computed by rank i % world_size only, and the features are all-gathered so that
    every rank returns all of them, exactly one row per sample, in the input's order (the ranks'
    shares are padded for the collective and trimmed, so no sample is duplicated). Outside a
    distributed job it is the same as distributed=False.
    """
    from data.augment import eval_transform  # data is a lower layer; imported here to keep `import eval` light

    _check_preprocess(preprocess)
    device = _check_device(backbone, device)
    batches = _as_batches(images, labels, batch_size or default_batch_size(device))
    size = image_size(preprocess)
    rank, world = process_group() if distributed else (0, 1)
    feats, labs = [], []
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.inference_mode():
            for i, batch in enumerate(batches):
                if i % world != rank:  # another rank's batch
                    continue
                imgs, labs_b = _split_batch(batch)
                x = eval_transform(imgs.to(device, non_blocking=True), size=size, mean=preprocess["mean"], std=preprocess["std"])
                feats.append(backbone(x).float().cpu())
                if labs_b is not None:
                    labs.append(torch.as_tensor(labs_b).long().cpu())
    finally:
        backbone.train(was_training)
    if labs and len(labs) != len(feats):
        raise ValueError("some batches had labels and some did not: give every batch labels, or none")
    if world > 1:
        return _gather_batches(feats, labs, world)
    if not feats:
        raise ValueError("no images to extract features from: the tensor or the iterable of batches was empty")
    if labs and len(labs) != len(feats):
        raise ValueError("some batches had labels and some did not: give every batch labels, or none")
    return torch.cat(feats), (torch.cat(labs) if labs else None)


def feature_cache_path(checkpoint_dir: str | os.PathLike, split: str) -> Path:
    """Where the features of `split` are cached: CHECKPOINT/features/{split}.safetensors."""
    if not split or "/" in split or split.startswith("."):
        raise ValueError(f"split={split!r} must be a plain file name (no '/', not starting with '.'), e.g. 'fmnist-test'")
    return Path(checkpoint_dir) / FEATURES_DIR / f"{split}.safetensors"


def cached_features(
    checkpoint_dir: str | os.PathLike,
    split: str,
    compute_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    distributed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(features, labels) of `split`: read from the checkpoint's cache, else computed by compute_fn() and cached.

    The split name must identify the data exactly (e.g. 'fmnist-train-2000' for a 2,000-image subset):
    it is the whole cache key, and a checkpoint's weights never change once written. The file is
    written under a temporary name and renamed, so a crash never leaves a half-written cache.

    distributed=True (a collective): rank 0 decides whether the cache exists; if not, every rank
    runs compute_fn() (a distributed extraction) and rank 0 writes the file. When the features were
    already cached, ranks other than 0 return None: only rank 0 scores.
    """
    from safetensors.torch import load_file, save_file

    path = feature_cache_path(checkpoint_dir, split)
    rank, world = process_group() if distributed else (0, 1)
    cached = path.is_file()
    if world > 1:
        import torch.distributed as dist

        decision = [cached]
        dist.broadcast_object_list(decision, src=0)
        cached = decision[0]
    if cached:
        if rank != 0:
            return None
        tensors = load_file(str(path))
        return tensors["features"], tensors["labels"]
    feats, labels = compute_fn()
    if labels is None:
        raise ValueError(f"compute_fn for split {split!r} returned no labels: features are cached with their labels")
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
        save_file({"features": feats.contiguous(), "labels": labels.contiguous()}, str(tmp), metadata={"split": split})
        os.replace(tmp, path)
    return feats, labels
