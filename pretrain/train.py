"""The training loop: read it top to bottom in `train()`.

shards -> uint8 batch -> device -> Kornia views -> objective -> loss -> AdamW step
every ckpt_every steps: checkpoint (resumable), at the end: kNN score of the final checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

import backbones
import objectives
from data.augment import DeviceAugment
from data.builtin import builtin_shards
from data.redact import redact
from data.shards import find_manifest, shard_urls
from data.stream import DataError, ShardLoader

from . import checkpoint as ckpt_mod
from . import config as config_mod
from . import guard
from .config import Config, ConfigError
from .tracking import RunLog

# settings that may change when a run is relaunched in the same folder
RESUMABLE_CHANGES = ("train.total_steps", "train.log_every", "train.ckpt_every", "train.keep_last",
                     "train.progress", "train.stop_at", "train.cpu_threads", "train.grace_seconds",
                     "train.max_nonfinite_steps", "eval", "data.num_workers", "data.train", "data.test", "data.fashion_mnist_dir",
                     "data.max_corrupt_fraction")


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up, then cosine to min_lr: a pure function of the step."""
    o, total = cfg.optim, cfg.train.total_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def build_objective(cfg: Config) -> objectives.Objective:
    """Backbone + objective from the config; a bad setting becomes a ConfigError naming the field."""
    kw = {k: v for k, v in cfg.backbone.items() if k != "name"}
    try:
        backbone = backbones.create(cfg.backbone["name"], **kw)
    except (ValueError, TypeError) as e:
        raise config_mod.component_error("backbone", e) from None
    hp = {k: v for k, v in cfg.objective.items() if k != "name"}
    try:
        uses_labels = objectives.objective_class(cfg.objective["name"]).uses_labels
    except ValueError as e:
        raise config_mod.component_error("objective", e) from None
    if uses_labels:
        manifest = train_shards(cfg)[1] or {}
        if not manifest.get("labelled", True):
            raise ConfigError(f"data.train={cfg.data.train} holds unlabelled shards (its manifest says labelled: false) "
                              f"but objective {cfg.objective['name']} trains on labels: write the shards with labels, or "
                              "pick a self-supervised objective (mae, simmim, mpp, dino)")
        if hp.get("num_classes") is None and manifest.get("classes"):  # the shards' manifest names them
            hp["num_classes"] = len(manifest["classes"])
    try:
        return objectives.create(cfg.objective["name"], backbone, **hp)
    except (ValueError, TypeError, OSError) as e:
        raise config_mod.component_error("objective", e) from None


def train_shards(cfg: Config) -> tuple[list[str], dict | None]:
    """The training shards and their manifest (None for remote shards without one)."""
    if cfg.data.train is None:
        spec = builtin_shards(root=cfg.data.fashion_mnist_dir)["train"]
    else:
        spec = cfg.data.train
    try:
        urls = shard_urls(str(spec))
    except ValueError as e:
        raise ConfigError(f"data.train={redact(str(spec))}: {e}") from None
    return urls, find_manifest(spec)


def build_loader(cfg: Config, urls: list[str], manifest: dict | None, objective: objectives.Objective,
                 acc: Accelerator) -> ShardLoader:
    """This rank's stream of uint8 batches; a shard set that cannot serve the launch is a ConfigError."""
    backbone = objective.backbone
    try:
        return ShardLoader(urls, batch_size=cfg.train.batch_size, image_size=cfg.data.load_size or backbone.image_size[0],
                           channels=load_channels(manifest, backbone.in_chans), seed=cfg.train.seed, rank=acc.process_index,
                           world_size=acc.num_processes, num_workers=cfg.data.num_workers,
                           shuffle_buffer=cfg.data.shuffle_buffer, labels=objective.uses_labels,
                           resampled=cfg.data.resampled, shards_per_epoch=cfg.data.shards_per_epoch,
                           max_corrupt_fraction=cfg.data.max_corrupt_fraction)
    except ValueError as e:
        raise ConfigError(f"data.train={redact(str(cfg.data.train or 'built-in'))}: {e}") from None


def load_channels(manifest: dict | None, in_chans: int) -> int:
    """Channels the CPU workers decode to: 1 for grey shards even when the backbone takes RGB (the
    device repeats the channel after augmenting, a third of the work), else the backbone's."""
    return 1 if (manifest or {}).get("channels") == 1 else in_chans


def log_bad_samples(acc: Accelerator, loader: ShardLoader, run_dir: Path) -> int:
    """Collective: every rank's corrupt-sample counts per shard, summed; the main process writes them to
    RUN_DIR/data_errors.json (shard -> count and first reason). Returns the number of shards involved."""
    per_rank = gather_object([(loader.bad_samples, loader.bad_reasons)])
    counts: dict[str, int] = {}
    reasons: dict[str, str] = {}
    for bad, why in per_rank:
        for url, n in bad.items():
            counts[url] = counts.get(url, 0) + n
            reasons.setdefault(url, why.get(url, ""))
    if acc.is_main_process and counts:
        report = {url: {"skipped": n, "first_reason": reasons[url]} for url, n in sorted(counts.items())}
        (run_dir / "data_errors.json").write_text(json.dumps(report, indent=2) + "\n")
    return len(counts)


def normalisation(cfg: Config, manifest: dict | None, channels: int) -> tuple[list[float], list[float]]:
    if cfg.data.mean is not None:
        mean, std = cfg.data.mean, cfg.data.std
    elif manifest and manifest.get("mean"):
        mean, std = manifest["mean"], manifest["std"]
    elif channels == 1:  # ImageNet statistics, averaged over its channels for grey images
        mean, std = [0.449], [0.226]
    else:  # ImageNet statistics, the usual default
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    if len(mean) == 1 and channels == 3:
        mean, std = mean * 3, std * 3
    if len(mean) != channels:
        raise ConfigError(f"data.mean={mean} has {len(mean)} channels but backbone.in_chans={channels}: set data.mean and data.std to {channels} values")
    return list(mean), list(std)


def check_world_size(acc: Accelerator) -> None:
    """Refuse a launch whose processes do not form the job it asked for. On a machine without a GPU
    (STACK.md), `accelerate launch --multi_gpu` without ACCELERATE_USE_CPU=1 starts independent
    copies, and `--num_processes 2` without `--multi_gpu` (or with `--cpu`) starts one process."""
    asked = int(os.environ.get("WORLD_SIZE") or requested_processes() or 1)
    if asked > 1 and acc.num_processes != asked:
        raise ConfigError(
            f"the launch asked for {asked} processes but they do not form one {asked}-process job (Accelerate sees "
            f"{acc.num_processes}): on a machine without a GPU launch with "
            f"ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {asked} ... "
            "(or --config_file launch/cpu_2proc.yaml); on GPUs add --multi_gpu"
        )


def requested_processes() -> int | None:
    """The process count given to `accelerate launch` when it started no distributed job (no
    WORLD_SIZE), read from its command line (its flag, else its config file); None for other parents."""
    try:
        args = [a.decode(errors="replace") for a in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return None
    if "launch" not in args or not any(Path(a).name == "accelerate" for a in args[: args.index("launch")]):
        return None
    flags = dict(re.findall(r"--(num_processes|config_file)[= ](\S+)", " ".join(args[: next(
        (i for i, a in enumerate(args) if a.endswith(".py")), len(args))])))
    try:
        if "num_processes" in flags:
            return int(flags["num_processes"])
        if "config_file" in flags:
            return int((yaml.safe_load(Path(flags["config_file"]).read_text()) or {}).get("num_processes") or 1)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return None


def clip_gradients(acc: Accelerator, model: torch.nn.Module, max_norm: float | None, per_param: bool) -> torch.Tensor:
    """The global gradient norm before clipping; clip it to max_norm (None: no clipping), or (DINO's
    `clip_gradients`) each parameter's norm on its own."""
    if max_norm is not None and not per_param:
        return acc.clip_grad_norm_(model.parameters(), max_norm)
    if per_param and acc.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise ConfigError(f"optim.clip_per_param=true is not supported under {acc.distributed_type.name} (it would "
                          "clip shards, not parameters): set optim.clip_per_param=false")
    acc.unscale_gradients()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if max_norm is not None:
        for p in params:
            torch.nn.utils.clip_grad_norm_(p, max_norm)
    return norm


def next_batches(data, count: int) -> tuple[list, DataError | None]:
    """This step's batches (one per gradient-accumulation micro-step), or the DataError that ended
    the stream here: raised only once every rank knows (raise_data_error), so none is left waiting."""
    try:
        return [next(data) for _ in range(count)], None
    except DataError as e:
        return [], e


def raise_data_error(acc: Accelerator, loader: ShardLoader, run_dir: Path, error: DataError | None) -> None:
    """Collective: the corrupt-sample report written, then the first failing rank's error raised on every rank."""
    messages = [m for m in gather_object([str(error) if error else None]) if m]
    log_bad_samples(acc, loader, run_dir)
    raise DataError(messages[0])


def stop_nonfinite(acc: Accelerator, run_dir: Path, done: int, in_a_row: int, model, cfg: Config,
                   loader: ShardLoader, meta: dict) -> None:
    """Collective: checkpoint the last good state (skipped steps moved nothing), then stop every rank."""
    ckpt = ckpt_mod.save_checkpoint(acc, run_dir, done, model, cfg, loader.state_dict(), meta)
    raise guard.NonFiniteError(
        f"the loss or gradient norm was not finite in {in_a_row} steps in a row (steps {done - in_a_row + 1}-{done}; "
        f"train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}): stopped. {ckpt} holds the last good state "
        f"(the parameters after step {done - in_a_row}); relaunching the same command replays the same steps. Start "
        "again with a lower optim.lr, a longer optim.warmup_steps or optim.clip_grad set (a new run directory), or "
        "with train.mixed_precision=bf16 or no instead of fp16")


def set_cpu_threads(acc: Accelerator, cfg: Config) -> None:
    """train.cpu_threads, else each local process its share of the cores (see share_cpu_threads)."""
    from eval.features import share_cpu_threads

    share_cpu_threads(acc.device, cfg.train.cpu_threads, acc.num_processes)


def resume(acc: Accelerator, cfg: Config, loader: ShardLoader, say) -> tuple[int, Path | None]:
    """Restore the newest complete checkpoint of the run, verified on every rank first: (its step, it),
    or (0, None) for a fresh run. A checkpoint of other settings is refused, naming them."""
    run_dir = cfg.run_dir
    if acc.is_main_process:
        ckpt_mod.remove_stale(run_dir)  # what a kill during a checkpoint write left
    acc.wait_for_everyone()
    latest = ckpt_mod.latest_checkpoint(run_dir)
    if latest is None:
        return 0, None
    saved, written = ckpt_mod.read_checkpoint(acc, latest)
    changed = config_mod.differences(saved, cfg, ignore=RESUMABLE_CHANGES)
    if written.get("mixed_precision", acc.mixed_precision) != acc.mixed_precision:
        changed.append(f"the launch's mixed precision, {written['mixed_precision']} -> {acc.mixed_precision}")
    if changed:
        raise ConfigError(f"{run_dir} holds a run with other settings ({', '.join(changed)}): "
                          f"set train.run_name to start a new run, or restore those settings to resume")
    start_step, position = ckpt_mod.load_checkpoint(acc, latest, written)
    loader.load_state_dict(position)
    if written["world_size"] != acc.num_processes:
        say(f"[vit-ssl] {latest.name} was written by {written['world_size']} process(es): the data stream restarts "
            f"epoch {position['epoch']}")
    elif saved.data.num_workers != cfg.data.num_workers:  # the order is a function of the worker count
        say(f"[vit-ssl] data.num_workers changed ({saved.data.num_workers} -> {cfg.data.num_workers}): the rest "
            f"of epoch {position['epoch']} is read in another order, so some of its samples repeat or wait "
            "for the next epoch; keep the count to resume exactly")
    say(f"[vit-ssl] resumed from {latest} at step {start_step}")
    return start_step, latest


def forward_backward(acc: Accelerator, model, augment: DeviceAugment, batches: list, o) -> tuple[list[dict], torch.Tensor]:
    """One optimizer step's micro-batches: views on the device, forward, backward; returns the
    objective's outputs and the gradient norm before clipping (gradients clipped as configured)."""
    outs = []
    for batch in batches:
        with torch.no_grad():
            views = augment(batch.images.to(acc.device, non_blocking=True))
        with acc.accumulate(model):
            outs.append(model({"views": views, "labels": batch.labels.to(acc.device)}))
            acc.backward(outs[-1]["loss"])
    return outs, clip_gradients(acc, model, o.clip_grad, o.clip_per_param)


def apply_step(acc: Accelerator, model, optimizer, outs: list[dict], grad_norm: torch.Tensor, done: int, total: int) -> bool:
    """The optimizer step and the objective's on_step, unless some rank saw a non-finite loss or
    gradient norm (fp16: the gradient scaler skips overflowing steps itself); then nothing moves."""
    finite = guard.is_finite(*(out["loss"] for out in outs), grad_norm if acc.scaler is None else None)
    (nonfinite,) = guard.any_rank(acc, not finite)
    objective = acc.unwrap_model(model)
    if nonfinite:
        optimizer.zero_grad(set_to_none=True)
        if acc.scaler is not None:  # close the scaler's iteration (the gradients were unscaled)
            acc.scaler.update()
        objective.skip_step(done, total)
        return False
    for p in objective.frozen_parameters():
        p.grad = None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    objective.on_step(done, total)
    return True


class Window:
    """What is logged every train.log_every steps: every scalar the objective returns and the
    gradient norm, summed over the applied steps' micro-batches; images counted over all steps."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.n, self.images, self.t0 = 0, 0, time.time()

    def add(self, outs: list[dict], grad_norm: torch.Tensor, device: torch.device) -> None:
        for out in outs:
            for key, value in {**out, "grad_norm": grad_norm}.items():
                value = torch.as_tensor(value, device=device).detach().float()
                self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.n += 1


def log_window(acc: Accelerator, window: Window, loader: ShardLoader, run_dir: Path, tracker: RunLog | None, bar,
               done: int, extra: dict[str, float]) -> None:
    """Collective: the window's means over all ranks, throughput and data counters, logged by the main process."""
    metrics = {k: acc.reduce(v / window.n, reduction="mean").item() for k, v in sorted(window.sums.items())}
    skipped = acc.reduce(torch.tensor(float(loader.skipped), device=acc.device), reduction="sum").item()
    bad_shards = log_bad_samples(acc, loader, run_dir) if skipped else 0
    img_s = window.images * acc.num_processes / (time.time() - window.t0)
    if tracker is not None:
        tracker.log({**metrics, **extra, "images_per_s": img_s, "data/skipped": skipped, "data/bad_shards": bad_shards,
                     "data/epoch": loader.state_dict()["epoch"]}, done)
        bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", lr=f"{extra['lr']:.2e}", img_s=f"{img_s:.0f}")


def watch_knn(acc: Accelerator, monitor, model, tracker: RunLog | None, bar, done: int, k: int) -> None:
    """Collective: eval.knn_every's kNN on the fixed subset (every rank extracts its share)."""
    watched = monitor(acc.unwrap_model(model).export_backbone())
    if tracker is not None:
        tracker.log(watched, done)
        bar.write(f"[vit-ssl] step {done}: kNN top-1@{k} on the subset = {100 * watched[f'knn_subset/top1@{k}']:.2f} %")


def train(cfg: Config) -> dict[str, Any]:
    t_start = time.time()
    stop = guard.StopSignal(cfg.train.grace_seconds)  # SIGTERM / SIGUSR1: finish the step, checkpoint, exit
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum)
    check_world_size(acc)
    set_cpu_threads(acc, cfg)
    main = acc.is_main_process
    say = (lambda *a: print(*a, flush=True)) if main else (lambda *a: None)
    run_dir = cfg.run_dir

    # 1. model: the same initial weights on every rank
    set_seed(cfg.train.seed)
    objective = build_objective(cfg)
    backbone = objective.backbone
    objective.set_total_steps(cfg.train.total_steps)
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
    say(f"[vit-ssl] {cfg.objective['name']} on {cfg.backbone['name']} "
        f"({sum(p.numel() for p in backbone.parameters()) / 1e6:.2f} M backbone parameters), "
        f"{acc.num_processes} process(es) on {acc.device} ({acc.distributed_type.name}, {acc.mixed_precision} mixed "
        f"precision), global batch {global_batch}, run dir {run_dir}")

    # 2. data: uint8 batches from the shards, augmented on the device
    urls, manifest = train_shards(cfg)
    mean, std = normalisation(cfg, manifest, backbone.in_chans)
    loader = build_loader(cfg, urls, manifest, objective, acc)
    augment = DeviceAugment(objective.views, mean, std, allow_grey=True).to(acc.device)
    objective.set_normalisation(mean, std)

    # 3. optimizer
    o = cfg.optim
    optimizer = torch.optim.AdamW(objective.parameter_groups(o.weight_decay), lr=o.lr, betas=tuple(o.betas))
    model, optimizer = acc.prepare(objective, optimizer)

    # 4. resume from the newest complete checkpoint, or start fresh
    meta = {"objective": cfg.objective["name"], "preprocess": {"image_size": list(backbone.image_size),
            "channels": backbone.in_chans, "mean": mean, "std": std}, "data": {"train": cfg.data.train, "test": cfg.data.test}}
    start_step, latest = resume(acc, cfg, loader, say)
    if latest is None:
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            config_mod.save(cfg, run_dir / "config.yaml")
        set_seed(cfg.train.seed + acc.process_index)  # different masks and crops on each rank
    tracker = RunLog(run_dir, cfg) if main else None
    scores: dict[str, dict] = {}
    scorable = cfg.eval.knn and (cfg.data.train is None or cfg.data.test is not None)
    if latest is None and scorable:
        ckpt0 = ckpt_mod.save_checkpoint(acc, run_dir, 0, model, cfg, loader.state_dict(), meta)
        scores["random_init"] = score(ckpt0, cfg, tracker, acc.device)
    monitor = knn_monitor(cfg, meta, acc.device) if cfg.eval.knn_every and scorable else None

    # 5. the loop; every decision that skips or ends a step is taken by all ranks together (guard.py)
    data, window = iter(loader), Window()
    in_a_row, skipped, done, signalled = 0, 0, start_step, False
    bar = progress_bar(cfg, start_step, main)
    model.train()
    end = min(cfg.train.total_steps, cfg.train.stop_at or cfg.train.total_steps)
    for step in range(start_step, end):
        position = loader.state_dict()  # before this step's batches: where a signal's checkpoint resumes
        batches, data_error = next_batches(data, cfg.train.grad_accum)
        signalled, data_failed = guard.any_rank(acc, stop.received is not None, data_error is not None)
        if data_failed:
            raise_data_error(acc, loader, run_dir, data_error)
        if signalled:
            break
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        outs, grad_norm = forward_backward(acc, model, augment, batches, o)
        window.images += sum(batch.images.shape[0] for batch in batches)
        done = step + 1
        if apply_step(acc, model, optimizer, outs, grad_norm, done, cfg.train.total_steps):
            window.add(outs, grad_norm, acc.device)
            in_a_row = 0
        else:  # a non-finite loss or gradient on some rank: skipped everywhere, nothing moved
            in_a_row, skipped = in_a_row + 1, skipped + 1
            say(f"[vit-ssl] step {done}: the loss or gradient norm is not finite on some process: step skipped "
                f"({in_a_row} in a row, {skipped} in this launch)")
            if in_a_row >= cfg.train.max_nonfinite_steps:
                stop_nonfinite(acc, run_dir, done, in_a_row, model, cfg, loader, meta)
        if done % cfg.train.log_every == 0 or done == cfg.train.total_steps:
            log_window(acc, window, loader, run_dir, tracker, bar, done, {"lr": lr, "nonfinite_steps": skipped})
            window = Window()
        bar.update(1)
        if done % cfg.train.ckpt_every == 0 or done == end:
            ckpt_mod.save_checkpoint(acc, run_dir, done, model, cfg, loader.state_dict(), meta)
        if monitor is not None and done % cfg.eval.knn_every == 0 and done < cfg.train.total_steps:
            watch_knn(acc, monitor, model, tracker, bar, done, cfg.eval.knn_k)
    bar.close()
    (stopping,) = guard.any_rank(acc, stop.received is not None)  # a signal during the last step counts too
    if signalled and ckpt_mod.latest_step(run_dir) != done:  # the stream as it stood before the unstarted step
        ckpt_mod.save_checkpoint(acc, run_dir, done, model, cfg, position, meta)
    if stopping:  # the checkpoint of step `done` is complete: whatever follows, exit 75
        stop.disarm()
        say(f"[vit-ssl] stopped by {stop.received or 'a signal to another process'} after step {done}, checkpointed: "
            "relaunch the same command to resume")
    stop.restore()

    # 6. score the final checkpoint and say where everything is
    final = ckpt_mod.latest_checkpoint(run_dir)
    finished = done == cfg.train.total_steps
    if finished and scorable and not stopping:
        scores["final"] = score(final, cfg, tracker, acc.device)
    acc.wait_for_everyone()
    result = {"run_dir": str(run_dir), "checkpoint": str(final), "scores": scores, "finished": finished,
              "step": done, "stopped_by": (stop.received or "signal") if stopping else None, "objective": acc.unwrap_model(model),
              "minutes": (time.time() - t_start) / 60, "world_size": acc.num_processes}
    if main:
        result["mlflow_run_id"] = tracker.run_id
        tracker.finish(result)
        print(summary(result, cfg, tracker))
    return result


def score(ckpt: Path, cfg: Config, tracker: RunLog | None, device: torch.device) -> dict[str, float]:
    """kNN of one checkpoint on the eval data, logged at the checkpoint's step. A collective: every
    rank extracts its share of the features; the main process (tracker given) scores, logs, prints."""
    from eval.run import score_checkpoint

    t = time.time()
    scores = score_checkpoint(ckpt, knn=True, linear=False, ks=(cfg.eval.knn_k,), train_samples=cfg.eval.knn_train_samples,
                              fashion_mnist_dir=cfg.data.fashion_mnist_dir, device=device, distributed=True)
    if tracker is None:
        return {}
    tracker.log(scores, ckpt_mod.checkpoint_step(ckpt))
    print(f"[vit-ssl] {ckpt.name}: kNN top-1@{cfg.eval.knn_k} = {100 * scores[f'knn/top1@{cfg.eval.knn_k}']:.2f} % "
          f"({time.time() - t:.0f} s)", flush=True)
    return scores


def knn_monitor(cfg: Config, meta: dict, device: torch.device):
    """The scorer of eval.knn_every: kNN on a fixed seeded subset, its images read once here."""
    from eval.run import subset_scorer

    return subset_scorer(meta, cfg.eval.knn_every_train_samples, cfg.eval.knn_every_test_samples, ks=(cfg.eval.knn_k,),
                         fashion_mnist_dir=cfg.data.fashion_mnist_dir, device=device)


def progress_bar(cfg: Config, start: int, main: bool):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.train.total_steps, initial=start, unit="step", dynamic_ncols=True,
                disable=not (main and cfg.train.progress), mininterval=1.0 if sys.stderr.isatty() else 10.0)


def summary(result: dict, cfg: Config, tracker: RunLog) -> str:
    k = f"knn/top1@{cfg.eval.knn_k}"
    lines = [
        "",
        f"run directory : {result['run_dir']}",
        f"checkpoint    : {result['checkpoint']}",
        f"MLflow run    : {tracker.run_id}  (tracking URI {redact(tracker.uri)}; browse: mlflow ui --backend-store-uri "
        f"{redact(tracker.uri)})",
        f"time          : {result['minutes']:.1f} min on {result['world_size']} process(es)",
    ]
    if not result["finished"]:
        lines.append(f"stopped at    : step {result['step']} of {cfg.train.total_steps}; relaunch the same command to go on")
    s = result["scores"]
    if "final" in s:
        bank = f"{cfg.eval.knn_train_samples:,}" if cfg.eval.knn_train_samples else "all"
        line = f"kNN top-1     : {100 * s['final'][k]:.2f} % trained"
        if s.get("random_init"):
            line += f"  vs  {100 * s['random_init'][k]:.2f} % at random init"
        where = "Fashion-MNIST test split" if cfg.data.train is None else f"test shards {cfg.data.test}"
        lines.append(line + f"  (k={cfg.eval.knn_k}, {where}, memory bank of {bank} train images)")
    return "\n".join(lines)
