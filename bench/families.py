"""Every backbone family beside vit-pytorch 1.16.0's same network: parameters, forward and
training-step images/s, peak memory, with the ratio ours / theirs, in one run.

    python -m bench.families --params                 # parameter counts at small and base (fast)
    python -m bench.families [--size small] [--batch 8] [--family NAME ...]

The configurations are the references registered by each family file (backbones.convert
.Reference): the same network built by both libraries from the same arguments. Timing is
interleaved (ours, theirs, ours, ...) in one process, 2 threads; a training step is forward, a
mean-of-outputs loss, backward and AdamW; each figure is the median of the rounds. Peak memory is
the resident-set high-water mark of one forward + backward above the built model, each side in a
fresh process (Linux VmHWM, reset through /proc/self/clear_refs): activations and gradients (the
gradients weigh the same on both sides). Needs vit-pytorch: pip install --no-deps vit-pytorch==1.16.0.
"""
from __future__ import annotations

import argparse
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import backbones
from backbones.convert import REFERENCES, Reference, build_vit_pytorch


def count(model: nn.Module, head_classes: int = 1000) -> int:
    """Parameters without a classifier head (tensors whose first axis is the head's 1000 classes)."""
    return sum(p.numel() for p in model.parameters() if not (p.ndim >= 1 and p.shape[0] == head_classes))


def _rss_mb() -> tuple[float, float]:
    status = open("/proc/self/status").read()
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    return rss / 1024, hwm / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Runner:
    """One model's forward and training step on a fixed batch."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.model, self.x = model, x
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward(self) -> None:
        with torch.no_grad():
            self.model.eval()(self.x)

    def train_step(self) -> None:
        self.model.train()
        self.model(self.x).float().mean().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _batch(ref: Reference, batch: int) -> int:
    return max(1, batch // 4) if len(ref.input_shape) == 4 else batch  # clips: 16 frames x 196 tubelets


def _model(ref: Reference, side: str) -> nn.Module:
    return backbones.create(ref.family, **ref.ours) if side == "ours" else build_vit_pytorch(ref)


def peak_mb(ref: Reference, side: str, batch: int) -> float:
    """Peak resident memory of one forward + backward above the built model, in a fresh process
    (so no allocator cache from earlier steps hides it): activations and gradients."""
    code = ("import sys, torch; torch.set_num_threads(2); from bench.families import _peak_here; "
            f"print(_peak_here({ref.family!r}, {ref.size!r}, {side!r}, {batch}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _peak_here(family: str, size: str, side: str, batch: int) -> float:
    ref = next(r for r in REFERENCES if r.family == family and r.size == size)
    torch.manual_seed(0)
    model = _model(ref, side).train()
    x = torch.randn(batch, *ref.input_shape)
    rss, _ = _rss_mb()
    _reset_peak()
    model(x).float().mean().backward()
    return _rss_mb()[1] - rss


def bench(ref: Reference, batch: int, iters: int) -> dict:
    """Medians over `iters` interleaved rounds (ours, theirs) of a forward and a training step."""
    torch.manual_seed(0)
    batch = _batch(ref, batch)
    x = torch.randn(batch, *ref.input_shape)
    runners = {side: Runner(_model(ref, side), x) for side in ("ours", "theirs")}
    for r in runners.values():  # warm-up: kernels, allocator, optimizer state
        r.forward()
        r.train_step()
    fwd = {side: [] for side in runners}
    step = {side: [] for side in runners}
    for _ in range(iters):  # interleaved, so both see the same machine state
        for side, r in runners.items():
            fwd[side].append(timed(r.forward))
            step[side].append(timed(r.train_step))
    res = {"family": ref.family, "batch": batch, "note": ref.note}
    for side in runners:
        res[f"fwd_{side}"] = batch / statistics.median(fwd[side])
        res[f"step_{side}"] = batch / statistics.median(step[side])
        res[f"mem_{side}"] = peak_mb(ref, side, batch)
    return res


def params_table(refs: list[Reference]) -> str:
    lines = ["| family | size | input | ours | vit-pytorch 1.16.0 | note |", "|---|---|---|---|---|---|"]
    for ref in refs:
        ours = count(backbones.create(ref.family, **ref.ours))
        theirs = count(build_vit_pytorch(ref))
        shape = "×".join(map(str, ref.input_shape))
        lines.append(f"| `{ref.family}` | {ref.size} | {shape} | {ours / 1e6:.2f} M | {theirs / 1e6:.2f} M | {ref.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", action="store_true", help="only the parameter-count table (small and base)")
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch", type=int, default=8, help="images per step (clips: a quarter)")
    ap.add_argument("--iters", type=int, default=3, help="interleaved timing rounds (the median is reported)")
    ap.add_argument("--family", action="append")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    refs = [r for r in REFERENCES if not args.family or r.family in args.family]
    if args.params:
        print(params_table(refs))
        return 0
    refs = [r for r in refs if r.size == args.size]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"batch {args.batch}, {args.iters} interleaved iterations, fp32")
    print("| family | input | batch | fwd img/s ours | vit-pytorch | ratio | train img/s ours | vit-pytorch | ratio "
          "| peak MB ours | vit-pytorch | ratio |")
    print("|---" * 12 + "|")
    for ref in refs:
        r = bench(ref, args.batch, args.iters)
        shape = "×".join(map(str, ref.input_shape))
        print(f"| `{r['family']}` | {shape} | {r['batch']} | {r['fwd_ours']:.1f} | {r['fwd_theirs']:.1f} | {r['fwd_ours'] / r['fwd_theirs']:.2f} "
              f"| {r['step_ours']:.1f} | {r['step_theirs']:.1f} | {r['step_ours'] / r['step_theirs']:.2f} "
              f"| {r['mem_ours']:.0f} | {r['mem_theirs']:.0f} | {r['mem_ours'] / max(r['mem_theirs'], 1e-9):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
