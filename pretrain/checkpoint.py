"""Checkpoints that survive crashes: written under a temporary name, renamed when complete, the
last K kept, old ones removed only after the new one is complete.

RUN_DIR/checkpoints/step-000500/
    accelerate/            Accelerate state: model, optimizer, every rank's RNG states
    data_position.json     every rank's {epoch, batch} in the shard stream
    config.yaml            the resolved config
    backbone.safetensors   the exported backbone + backbone.json, so that eval and export
    backbone.json          need no objective code
    head.safetensors       the classifier head, for objectives that train one (supervised)
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import backbones
from accelerate.utils import gather_object

from . import config as config_mod

STEP_DIR = re.compile(r"step-(\d{6,})")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary `.tmp-*` folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_step(path: Path) -> int:
    m = STEP_DIR.fullmatch(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint folder (expected a name like step-000500)")
    return int(m.group(1))


def save_checkpoint(accelerator, run_dir: Path, step: int, objective, cfg, data_position: dict, meta: dict[str, Any]) -> Path:
    """Collective: every process calls it. Ranks write only their own RNG state (inside
    Accelerate's save_state); the main process writes everything else and does the rename."""
    root = Path(run_dir) / "checkpoints"
    tmp, final = root / f".tmp-{checkpoint_name(step)}", root / checkpoint_name(step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a stale one from a crash
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"))
    positions = gather_object([data_position])  # one entry per rank, in rank order
    if accelerator.is_main_process:
        (tmp / "data_position.json").write_text(json.dumps({"world_size": accelerator.num_processes, "ranks": positions}))
        config_mod.save(cfg, tmp / "config.yaml")
        backbones.save(accelerator.unwrap_model(objective).export_backbone(), tmp, extra={**meta, "step": step})
        heads = accelerator.unwrap_model(objective).export_heads()
        if heads:  # a classifier: the checkpoint predicts, and can teach a distillation run
            backbones.save_head(heads["head"], tmp, heads.get("head_dist"))
        if final.exists():  # the same step saved again after a resume: replace it only now
            old = root / f".old-{checkpoint_name(step)}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        for stale in list_checkpoints(run_dir)[: -cfg.train.keep_last]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, ckpt: Path) -> tuple[int, dict | None]:
    """Restore model, optimizer and RNG states; return (step, this rank's data position or None
    when the checkpoint was written by a different number of processes)."""
    accelerator.load_state(str(Path(ckpt) / "accelerate"))
    positions = json.loads((Path(ckpt) / "data_position.json").read_text())
    if positions["world_size"] != accelerator.num_processes:
        return checkpoint_step(ckpt), None
    return checkpoint_step(ckpt), positions["ranks"][accelerator.process_index]
