"""Helpers shared by the training tests: run the real CLI, write small real shard sets."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ACCELERATE_"))}
    env.update(extra)
    return env


def run_pretrain(*args: str, timeout: int = 600, launcher: list[str] | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["pretrain/run.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env or clean_env())
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def without_gradient(module) -> list[str]:
    """Names of the trainable parameters whose gradient is missing or all zero after a backward."""
    return [n for n, p in module.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]


def only_run_dir(out_dir: Path) -> Path:
    dirs = [p for p in Path(out_dir).iterdir() if p.is_dir() and p.name != "mlartifacts"]
    assert len(dirs) == 1, dirs
    return dirs[0]


def write_fashion_subset(out: Path, n: int, shard_size: int) -> Path:
    """Real Fashion-MNIST images (the first n of the train split) as real tar shards."""
    from data.builtin import FASHION_MNIST_CLASSES, load_fashion_mnist
    from data.shards import write_shards

    images, labels = load_fashion_mnist("train")
    samples = ((f"fm_{i:06d}", images[i, 0].numpy(), int(labels[i])) for i in range(n))
    write_shards(samples, out, shard_size=shard_size, classes=FASHION_MNIST_CLASSES)
    return out


def write_id_shards(out: Path, n: int, shard_size: int) -> Path:
    """Noise images whose label is their own index, so a reader's samples can be told apart."""
    from data.shards import write_shards

    rng = np.random.default_rng(0)
    samples = ((f"id_{i:06d}", rng.integers(0, 256, (28, 28), dtype=np.uint8), i) for i in range(n))
    write_shards(samples, out, shard_size=shard_size, classes=[str(i) for i in range(n)])
    return out
