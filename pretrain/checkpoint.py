"""Checkpoints that survive crashes: written under a temporary name, renamed when complete, the
last K kept, old ones removed only after the new one is complete.

RUN_DIR/checkpoints/step-000500/
    accelerate/            Accelerate state: model, optimizer, every rank's RNG states
    data_position.json     every rank's {epoch, batch} in the shard stream, the world size, the mixed precision
    config.yaml            the resolved config
    backbone.safetensors   the exported backbone + backbone.json, so that eval and export
    backbone.json          need no objective code
    head.safetensors       the classifier head, for objectives that train one (supervised)
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate.utils import gather_object
from accelerate.utils.other import load as accelerate_load
from safetensors import safe_open

import backbones

from . import config as config_mod

STEP_DIR = re.compile(r"step-(\d{6,})")


class CheckpointError(ValueError):
    """A checkpoint cannot be written or resumed from; the message names the file and the fix."""


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


def latest_step(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint, None when there is none."""
    latest = latest_checkpoint(run_dir)
    return None if latest is None else checkpoint_step(latest)


def checkpoint_step(path: Path) -> int:
    m = STEP_DIR.fullmatch(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint folder (expected a name like step-000500)")
    return int(m.group(1))


def save_checkpoint(accelerator, run_dir: Path, step: int, objective, cfg, data_position: dict, meta: dict[str, Any]) -> Path:
    """Collective: every process calls it. Ranks write only their own RNG state (inside
    Accelerate's save_state); the main process writes everything else, flushes it to disk and
    publishes it by a rename. A failure on any rank at any stage (a full disk, say) raises
    CheckpointError on every rank, with the previous checkpoint intact and still the newest."""
    root = Path(run_dir) / "checkpoints"
    tmp, final = root / f".tmp-{checkpoint_name(step)}", root / checkpoint_name(step)
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # a stale one from a crash
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(tmp / "accelerate"))
    except Exception as e:  # noqa: BLE001 - torch.save and safetensors report a full disk with their own types
        error = f"rank {accelerator.process_index}: {write_error(e, root)}"
    positions = gather_object([data_position])  # one entry per rank, in rank order
    exported = exported_weights(accelerator, objective)  # collective under FSDP
    if main and error is None:
        error = _attempt(lambda: _write_main_files(accelerator, tmp, positions, cfg, objective, exported, meta, step), root)
    _raise_if_any(accelerator, error, final, run_dir, tmp)
    if main:
        error = _attempt(lambda: _publish(tmp, final, cfg.train.keep_last), root)
    _raise_if_any(accelerator, error, final, run_dir, tmp)
    return final


def _write_main_files(accelerator, tmp: Path, positions: list, cfg, objective, exported: dict, meta: dict, step: int) -> None:
    (tmp / "data_position.json").write_text(json.dumps({
        "world_size": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision, "ranks": positions}))
    config_mod.save(cfg, tmp / "config.yaml")
    backbone = accelerator.unwrap_model(objective).export_backbone()
    backbones.save(backbone, tmp, extra={**meta, "step": step}, state=exported["backbone"])
    if "head" in exported:  # a classifier: the checkpoint predicts, and can teach a distillation run
        backbones.save_head(exported["head"], tmp, exported.get("head_dist"))


def _publish(tmp: Path, final: Path, keep_last: int) -> None:
    """Flush, rename into place, then rotate. A folder being replaced or deleted is renamed away
    first, so a kill at any point leaves only complete step-* folders (see remove_stale)."""
    root = final.parent
    _flush_to_disk(tmp)
    if final.exists():  # the same step saved again after a resume: replace it only now
        old = root / f".old-{final.name}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync(root)
    for stale in list_checkpoints(root.parent)[:-keep_last]:
        doomed = root / f".del-{stale.name}"
        stale.rename(doomed)
        shutil.rmtree(doomed)


def _attempt(write, folder: Path) -> str | None:
    try:
        write()
    except Exception as e:  # noqa: BLE001 - any failure becomes every rank's CheckpointError
        return write_error(e, folder)
    return None


def _raise_if_any(accelerator, error: str | None, final: Path, run_dir: Path, tmp: Path) -> None:
    """Collective: every rank learns of any rank's failure and raises the same CheckpointError."""
    errors = [e for e in gather_object([error]) if e]
    if not errors:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = latest_checkpoint(run_dir)
    raise CheckpointError(
        f"could not write checkpoint {final} ({errors[0]}): "
        + (f"{previous.name} is intact and is where a relaunch resumes" if previous else "no earlier checkpoint exists")
        + "; free space on that disk (or set train.out_dir elsewhere) and relaunch the same command")


def exported_weights(accelerator, objective) -> dict[str, dict]:
    """The weights of what a checkpoint exports (the backbone, and the classifier heads of objectives
    that train them), cut out of the objective's full state dict: under FSDP the modules hold shards
    and Accelerate gathers the full state (a collective); elsewhere it is the modules' own state."""
    full = accelerator.get_state_dict(objective)
    inner = accelerator.unwrap_model(objective)
    names = {id(m): n for n, m in inner.named_modules()}

    def weights_of(module) -> dict:
        if id(module) not in names:  # built for export (distill's merged head): its own weights
            return module.state_dict()
        prefix = names[id(module)] + "."
        return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}

    out = {"backbone": weights_of(inner.export_backbone())}
    out.update({name: weights_of(head) for name, head in inner.export_heads().items() if head is not None})
    return out


def write_error(e: Exception, folder: Path) -> str:
    """The error of a failed write, with the free space of the disk it was writing to."""
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free on that disk"
    except OSError:
        free = "free space unknown"
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}; {free}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush_to_disk(folder: Path) -> None:
    """fsync every file and folder below `folder`, so the rename publishes data that is on disk
    (a power cut after it must not leave a complete-looking checkpoint of empty files)."""
    for path in sorted(folder.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(folder)


def remove_stale(run_dir: Path) -> None:
    """What a crash or kill during a checkpoint write leaves: a `.tmp-*` folder (incomplete: removed),
    a `.old-step-N` without its `step-N` (killed between the two renames of a replacement: restored),
    a `.del-*` folder (rotated out: removed). Main process only."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(".old-") and not (root / p.name[len(".old-"):]).exists():
            p.rename(root / p.name[len(".old-"):])
        elif p.is_dir() and p.name.startswith((".tmp-", ".old-", ".del-")):
            shutil.rmtree(p, ignore_errors=True)


def read_checkpoint(accelerator, ckpt: Path) -> tuple[Any, dict]:
    """Collective: every rank verifies what it will read (verify_checkpoint); any rank's failure is
    every rank's CheckpointError. Returns the checkpoint's config and its data_position.json."""
    try:
        found, error = verify_checkpoint(ckpt, accelerator.process_index, accelerator.num_processes), None
    except CheckpointError as e:
        found, error = None, str(e)
    errors = [e for e in gather_object([error]) if e]
    if errors:
        raise CheckpointError(errors[0])
    return found


def verify_checkpoint(ckpt: Path, process_index: int, num_processes: int) -> tuple[Any, dict]:
    """Everything a resume reads, checked before it is read for real: each file present, the config
    and data position parseable, each safetensors file complete, each pickle loadable with
    weights_only=True (tensors and plain values only: a pickle that would run code is refused
    unread). CheckpointError names the file and the way out."""
    ckpt = Path(ckpt)
    state = ckpt / "accelerate"
    advice = f"move {ckpt} aside to resume from the checkpoint before it, or set train.run_name to start a new run"
    needed = {"config.yaml": ckpt, "data_position.json": ckpt, "model.safetensors or pytorch_model*.bin": state,
              "optimizer*.bin": state}
    for name, folder in needed.items():
        if not (folder.is_dir() and any(any(folder.glob(pattern)) for pattern in name.split(" or "))):
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {name} is missing from {folder}: {advice}")
    try:
        saved = config_mod.load(ckpt / "config.yaml")
        written = json.loads((ckpt / "data_position.json").read_text())
        same_world = written["world_size"] == num_processes
    except Exception as e:  # noqa: BLE001 - a garbled YAML or JSON file
        raise CheckpointError(f"checkpoint {ckpt} has an unreadable config.yaml or data_position.json "
                              f"({_first_line(e)}): {advice}") from None
    rng = state / f"random_states_{process_index}.pkl"
    if same_world and not rng.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {rng.name} is missing from {state}: {advice}")
    for path in sorted(state.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad file
            raise CheckpointError(f"checkpoint file {path} is unreadable ({_first_line(e)}): {advice}") from None
    for path in sorted([*state.glob("*.bin"), *state.glob("*.pkl"), *state.glob("*.pt")]):
        if path.name.startswith("random_states_") and path != rng:
            continue
        try:
            accelerate_load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"checkpoint file {path} holds objects other than tensors and plain values and was refused unread "
                f"({_first_line(e)}); it is not a file this project wrote and may run code if unpickled: {advice}") from None
        except Exception as e:  # noqa: BLE001 - truncated zip, foreign format
            raise CheckpointError(f"checkpoint file {path} is unreadable ({_first_line(e)}): {advice}") from None
    return saved, written


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def load_checkpoint(accelerator, ckpt: Path, written: dict) -> tuple[int, dict]:
    """Restore model, optimizer and RNG states (after read_checkpoint); return (step, this rank's
    data position). A checkpoint of another process count restarts the data epoch it was in."""
    accelerator.load_state(str(Path(ckpt) / "accelerate"))
    if written["world_size"] != accelerator.num_processes:
        return checkpoint_step(ckpt), {"epoch": written["ranks"][0]["epoch"], "batch": 0}
    return checkpoint_step(ckpt), written["ranks"][accelerator.process_index]
