"""Export a trained backbone for reuse: `model.safetensors` + `config.json` in a folder of its own.

    python -m pretrain.export CHECKPOINT --out DIR [--format vit-ssl|timm] [--force]

CHECKPOINT is a checkpoint folder (RUN_DIR/checkpoints/step-NNNNNN, holding backbone.safetensors +
backbone.json), a run folder (its newest complete checkpoint) or an earlier export folder.

--format vit-ssl (default): our state dict and a config.json with the registry name and kwargs,
    the preprocessing, step, objective and source checkpoint (plus a "timm" entry naming the timm
    model the weights also fit, when there is one); a classifier head (supervised / distill runs)
    is exported beside it as head.safetensors. `backbones.load(DIR)` / `backbones.load_classifier(DIR)`
    rebuild it.
--format timm: timm's key layout and a timm config.json ("architecture", "num_classes": 0,
    "model_args", "pretrained_cfg"), for vit, simple_vit and timm:NAME backbones:
        model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=0, **cfg["model_args"])
        model.load_state_dict(safetensors.torch.load_file("DIR/model.safetensors"), strict=True)
    (or `timm.create_model("local-dir:DIR", pretrained=True)`).

The folder is written under a temporary name and renamed when complete, so DIR is either the
whole export or absent. Weights are read from safetensors only; nothing is unpickled.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python pretrain/export.py): find the project
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import backbones  # noqa: E402
from backbones import base as bb_base  # noqa: E402
from backbones import timm_export  # noqa: E402
from data.redact import redact  # noqa: E402

FORMATS = ("vit-ssl", "timm")
# meta keys the export sets itself; every other key of backbone.json (e.g. "data") is carried over
_OWN_KEYS = {"format", "format_version", "name", "kwargs", "preprocess", "step", "objective", "source", "timm"}


class ExportError(ValueError):
    """A user error: printed as one line, exit status 2."""


# --------------------------------------------------------------------------- what to export

def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder to export: CHECKPOINT itself, or a run folder's newest complete one."""
    from eval.run import find_checkpoints  # (imports torch and the eval data code)

    try:
        return find_checkpoints(path)[0][-1]
    except ValueError as e:
        raise ExportError(str(e)) from None


def _load(ckpt: Path) -> tuple[backbones.Backbone, dict[str, Any]]:
    """The backbone (strictly loaded, eval mode) and its metadata; a bad checkpoint is a user error."""
    try:
        return backbones.load(ckpt).eval(), backbones.load_meta(ckpt)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError, ImportError) as e:
        first = " ".join(str(e).strip().splitlines()[:2])[:400]
        raise ExportError(f"cannot load the backbone of {ckpt}: {first}") from None


def _step(meta: dict[str, Any], ckpt: Path) -> int | None:
    if meta.get("step") is not None:
        return int(meta["step"])
    from pretrain.checkpoint import STEP_DIR

    m = STEP_DIR.fullmatch(ckpt.name)
    return int(m.group(1)) if m else None


def provenance(meta: dict[str, Any], ckpt: Path) -> dict[str, Any]:
    """Where the weights come from and how to feed them: preprocess, step, objective, source, plus
    every other key of the checkpoint's metadata (e.g. the training data). An export is made to be
    shared, so credentials in the training data's URLs and commands are masked (data.redact)."""
    extra = {k: v for k, v in meta.items() if k not in _OWN_KEYS}
    return redact({"preprocess": meta.get("preprocess"), "step": _step(meta, ckpt), "objective": meta.get("objective"),
                   "source": str(ckpt.resolve()), **extra})


# --------------------------------------------------------------------------- the two formats

def _save_tensors(state: dict[str, Any], file: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(file))


def _write_json(data: dict[str, Any], file: Path) -> None:
    file.write_text(json.dumps(data, indent=2) + "\n")


def write_vit_ssl(model: backbones.Backbone, meta: dict[str, Any], ckpt: Path, folder: Path) -> None:
    """Our state dict + config.json (+ head.safetensors when the checkpoint has a classifier head)."""
    cfg = backbones.build_config(model)
    config = {"format": bb_base.EXPORT_FORMAT, "format_version": bb_base.EXPORT_FORMAT_VERSION,
              "name": cfg["name"], "kwargs": cfg["kwargs"], **provenance(meta, ckpt)}
    if timm_export.maps_to_timm(model):
        config["timm"] = timm_export.timm_spec(model)
    _save_tensors(model.state_dict(), folder / bb_base.EXPORT_WEIGHTS)
    _write_json(config, folder / bb_base.EXPORT_CONFIG)
    if (ckpt / bb_base.HEAD).is_file():
        clf = backbones.load_classifier(ckpt)
        backbones.save_head(clf.head, folder, clf.head_dist)


def write_timm(model: backbones.Backbone, meta: dict[str, Any], ckpt: Path, folder: Path) -> None:
    """timm's key layout + a timm config.json; our provenance kept under its "vit_ssl" key."""
    state = timm_export.timm_state_dict(model)
    cfg = backbones.build_config(model)
    info = {"name": cfg["name"], "kwargs": cfg["kwargs"], **provenance(meta, ckpt)}
    _save_tensors(state, folder / bb_base.EXPORT_WEIGHTS)
    _write_json(timm_export.timm_config(model, meta.get("preprocess"), info), folder / bb_base.EXPORT_CONFIG)


# --------------------------------------------------------------------------- the output folder

def _check_out(out: Path, ckpt: Path, force: bool) -> None:
    """Refuse an output that is a file, that holds the checkpoint, or that is not empty (without --force)."""
    target, source = out.resolve(), ckpt.resolve()
    if target == source or target in source.parents:
        raise ExportError(f"--out {out} would replace the checkpoint it exports ({ckpt}): choose another folder")
    if out.is_file():
        raise ExportError(f"--out {out} is a file: give a folder path (it is created)")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} is not empty ({len(list(out.iterdir()))} entries): choose a new folder, "
                          "or pass --force to replace it")


def _publish(tmp: Path, out: Path) -> None:
    """Put the complete folder `tmp` in place of `out` (the old `out` removed only afterwards)."""
    if out.exists():
        old = out.parent / f".old-{out.name}-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def export(checkpoint: str | Path, out: str | Path, fmt: str = "vit-ssl", force: bool = False) -> Path:
    """Write the backbone of `checkpoint` (a checkpoint or run folder) to the folder `out` in format
    `fmt` ("vit-ssl" or "timm"); returns `out`. Raises ExportError for anything the user can fix."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    ckpt, out = resolve_checkpoint(checkpoint), Path(out)
    _check_out(out, ckpt, force)
    model, meta = _load(ckpt)
    if fmt == "timm":  # refuse before anything is written
        try:
            timm_export.timm_spec(model)
        except timm_export.TimmUnsupported as e:
            raise ExportError(str(e)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (write_timm if fmt == "timm" else write_vit_ssl)(model, meta, ckpt, tmp)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pretrain.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (created; must be new or empty)")
    p.add_argument("--format", choices=FORMATS, default="vit-ssl", help="vit-ssl (default): backbones.load reads it; "
                   "timm: timm's key layout for timm.create_model")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    return p.parse_args(argv)


def _summary(out: Path, fmt: str) -> str:
    config = json.loads((out / bb_base.EXPORT_CONFIG).read_text())
    if fmt == "timm":
        lines = [f"wrote {out} (format timm): timm.create_model({config['architecture']!r}, pretrained=False, "
                 f"num_classes=0, **config['model_args']) + load_state_dict(strict=True), or "
                 f"timm.create_model('local-dir:{out}', pretrained=True)"]
        if config["architecture"] == timm_export.DEIT_ARCH:
            lines.append("note: timm's distilled ViT pools (class + distillation token) / 2; vit-ssl's embedding is "
                         "the class token, forward_features(x)[:, 0]")
        return "\n".join(lines)
    head = " + head.safetensors" if (out / bb_base.HEAD).is_file() else ""
    return (f"wrote {out} (format vit-ssl, backbone {config['name']}, step {config.get('step')}): "
            f"model.safetensors + config.json{head}; backbones.load({str(out)!r}) rebuilds it")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.format, args.force)
    except ExportError as e:
        print(f"pretrain.export: error: {e}", file=sys.stderr)
        return 2
    print(_summary(out, args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
