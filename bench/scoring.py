"""Scoring speed: feature extraction images/s, kNN and linear-probe time, and a cold end-to-end
score of a checkpoint of the built-in MAE recipe, each against a plain baseline in the same process.

    python -m bench.scoring [CHECKPOINT] [--out bench/scoring.md]

CHECKPOINT defaults to a random initialisation of the MAE recipe's backbone (speed does not depend
on the weights). Baselines, written here in the plain way the reference code does it:
- extraction: one forward per 256 images with the default thread settings (ours: eval.features);
- kNN: DINO's `knn_classifier` shape of computation, 100 queries at a time against the whole train
  matrix, one-hot votes (ours: eval.knn, tiled with a running top-k, every k from one search);
- linear probe: nn.Sequential(BatchNorm1d(affine=False), Linear) trained with torch.optim.SGD,
  one run per learning rate of the sweep plus the final run (ours: eval.linear, all heads in one pass).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import backbones
from data.augment import eval_transform
from data.builtin import load_fashion_mnist
from eval.features import extract_features
from eval.knn import knn_accuracy
from eval.linear import DEFAULT_LRS, HOLDOUT, linear_probe
from eval.run import DEFAULT_KS, score_checkpoint, subset_indices

KS = DEFAULT_KS


def recipe_checkpoint(where: Path) -> Path:
    """A checkpoint folder holding a random initialisation of the MAE recipe's backbone."""
    from pretrain.config import build_config

    cfg = build_config("mae")
    kw = {k: v for k, v in cfg.backbone.items() if k != "name"}
    torch.manual_seed(0)
    model = backbones.create(cfg.backbone["name"], **kw)
    images, _ = load_fashion_mnist("train")
    mean, std = (images.float() / 255).mean().item(), (images.float() / 255).std().item()
    pre = {"image_size": list(model.image_size), "channels": model.in_chans, "mean": [mean], "std": [std]}
    return backbones.save(model, where, extra={"step": 0, "preprocess": pre, "data": {"train": None, "test": None}})


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


@torch.inference_mode()
def baseline_extract(model: nn.Module, images: torch.Tensor, pre: dict, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    size = pre["image_size"][0]
    return torch.cat([model(eval_transform(images[i : i + batch_size], size=size, mean=pre["mean"], std=pre["std"]))
                      for i in range(0, images.shape[0], batch_size)])


def baseline_knn(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, k: int, t: float = 0.07) -> float:
    """DINO's knn_classifier computation for one k: 100 queries at a time against the whole train matrix."""
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    correct = 0
    for i in range(0, test.shape[0], 100):
        sims = test[i : i + 100] @ train.T  # (100, N_train)
        top, idx = sims.topk(k, dim=1)
        votes = F.one_hot(train_y[idx], num_classes).float() * (top / t).exp()[..., None]  # (100, k, C)
        correct += (votes.sum(1).argmax(1) == test_y[i : i + 100]).sum().item()
    return correct / test.shape[0]


def baseline_linear(x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, num_classes: int,
                    epochs: int = 30, batch_size: int = 256) -> float:
    """The textbook sweep: one nn.Module + SGD run per learning rate on 90 %, choose on 10 %, retrain on all."""
    def run(xs, ys, lr):
        torch.manual_seed(0)
        probe = nn.Sequential(nn.BatchNorm1d(x.shape[1], affine=False), nn.Linear(x.shape[1], num_classes))
        opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9)
        steps = epochs * (xs.shape[0] // batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(epochs):
            order = torch.randperm(xs.shape[0])
            for j in range(xs.shape[0] // batch_size):
                b = order[j * batch_size : (j + 1) * batch_size]
                loss = F.cross_entropy(probe(xs[b]), ys[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        return probe.eval()

    def top1(probe, xs, ys):
        with torch.no_grad():
            return (probe(xs).argmax(1) == ys).float().mean().item()

    n_val = round(HOLDOUT * x.shape[0])
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    val, fit = perm[:n_val], perm[n_val:]
    held = [top1(run(x[fit], y[fit], lr), x[val], y[val]) for lr in DEFAULT_LRS]
    best = DEFAULT_LRS[max(range(len(held)), key=held.__getitem__)]
    return top1(run(x, y, best), xt, yt)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.scoring", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", default=None)
    p.add_argument("--out", default=None, help="write the markdown table here too")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    ckpt = Path(args.checkpoint) if args.checkpoint else recipe_checkpoint(tmp / "recipe")
    model = backbones.load(ckpt).eval()
    pre = backbones.load_meta(ckpt)["preprocess"]
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    rows: list[tuple[str, str, str, str]] = []

    def row(*cells: str) -> None:
        rows.append(cells)
        print(" | ".join(cells), flush=True)

    # 1. extraction, the 10,000 test images (interleaved, best of 2 each)
    ours_t, base_t = [], []
    for _ in range(2):
        (test_f, _), t = timed(extract_features, model, test_x, test_y, pre)
        ours_t.append(t)
        _, t = timed(baseline_extract, model, test_x, pre)
        base_t.append(t)
    ours_ips, base_ips = 10_000 / min(ours_t), 10_000 / min(base_t)
    row("feature extraction, 10,000 test images", f"{ours_ips:,.0f} img/s", f"{base_ips:,.0f} img/s",
                 f"{ours_ips / base_ips:.2f}x")
    (train_f, _), t_train = timed(extract_features, model, train_x, train_y, pre)
    row("feature extraction, 60,000 train images", f"{t_train:.1f} s", "", "")

    # 2. kNN: 10,000 queries against 60,000 train features
    _, t_knn = timed(knn_accuracy, train_f, train_y, test_f, test_y, 10, ks=KS)
    t_base = 0.0
    for k in KS:
        _, t = timed(baseline_knn, train_f, train_y, test_f, test_y, 10, k)
        t_base += t
    row(f"kNN k={'/'.join(map(str, KS))}, 10,000 vs 60,000", f"{t_knn:.2f} s", f"{t_base:.2f} s",
        f"{t_base / t_knn:.1f}x")

    # 3. linear probe (6-rate sweep + final), on the recipe's 20,000-image bank and on all 60,000
    keep = subset_indices(20_000, len(train_y))
    for name, x, y in (("20,000", train_f[keep], train_y[keep]), ("60,000", train_f, train_y)):
        _, t_ours = timed(linear_probe, x, y, test_f, test_y, 10)
        _, t_b = timed(baseline_linear, x, y, test_f, test_y, 10) if name == "20,000" else (None, float("nan"))
        row(f"linear probe sweep, {name} train features", f"{t_ours:.1f} s",
            "" if t_b != t_b else f"{t_b:.1f} s", "" if t_b != t_b else f"{t_b / t_ours:.1f}x")

    # 4. cold end to end: kNN (4 k) + linear probe of the checkpoint, the recipe's bank and the full train split
    for bank in (20_000, None):
        cold = tmp / f"cold-{bank}"
        shutil.copytree(ckpt, cold, ignore=shutil.ignore_patterns("features"))
        _, t = timed(score_checkpoint, cold, knn=True, linear=True, ks=KS, train_samples=bank)
        row(f"score a checkpoint cold (kNN + linear), bank {'all 60,000' if bank is None else f'{bank:,}'}",
            f"{t:.1f} s", "", "")
    meta = backbones.load_meta(ckpt)
    shutil.rmtree(tmp, ignore_errors=True)

    head = (f"Machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}; backbone {meta['name']} {meta['kwargs']}; "
            f"date {time.strftime('%Y-%m-%d')}.\n\n"
            "| what | ours | baseline | ratio |\n|---|---|---|---|\n")
    table = head + "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text("# Scoring speed\n\nCommand: `python -m bench.scoring --out bench/scoring.md`\n\n"
                                  + __doc__.split("\n\n", 2)[2] + "\n" + table)


if __name__ == "__main__":
    main()
