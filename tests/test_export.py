"""Export (python -m pretrain.export): every backbone round-trips through an export folder, ViT-family
exports load strictly into the matching timm model with the same features, the CLI works from a
checkpoint and from a run folder in both formats, and bad input is refused without a traceback
and without unpickling anything."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import backbones
from backbones.timm_export import timm_spec, timm_state_dict
from backbones.vit import ViT
from helpers import ROOT, clean_env
from pretrain.export import ExportError, export, main

PREPROCESS = {"image_size": [28, 28], "channels": 1, "mean": [0.286], "std": [0.353]}
VIT = dict(image_size=28, patch_size=4, in_chans=1, dim=32, depth=2, heads=2, mlp_ratio=2.0)


def _checkpoint(model: backbones.Backbone, folder: Path, step: int = 7) -> Path:
    """A checkpoint folder as the trainer writes it (backbone.safetensors + backbone.json)."""
    return backbones.save(model, folder, extra={"objective": "mae", "preprocess": PREPROCESS, "step": step,
                                                "data": {"train": None}})


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (zero biases and tokens would hide a mapping error)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _timm_model(folder: Path) -> torch.nn.Module:
    """What a timm user does with a --format timm folder."""
    import timm

    cfg = json.loads((folder / "config.json").read_text())
    model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=0, **cfg["model_args"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.eval()


def _features(timm_model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = timm_model.forward_features(x)  # (B, P+N, D)
    return tokens, timm_model.forward_head(tokens, pre_logits=True)  # (B, D)


# --------------------------------------------------------------------------- round trip, every family

@pytest.mark.parametrize("name", backbones.list_backbones())
def test_every_backbone_round_trips_through_an_export_folder(name, tmp_path):
    torch.manual_seed(0)
    model = backbones.create(name, **backbones.example_config(name)).eval()
    ckpt = _checkpoint(model, tmp_path / "ckpt")
    out = export(ckpt, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    again = backbones.load(out).eval()
    x = torch.randn(2, *model.input_shape)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    meta = backbones.load_meta(out)
    assert (meta["format"], meta["format_version"], meta["name"]) == ("vit-ssl", 1, name)
    assert (meta["step"], meta["objective"], meta["preprocess"]) == (7, "mae", PREPROCESS)
    assert meta["source"] == str(ckpt.resolve()) and meta["data"] == {"train": None}
    assert ("timm" in meta) == (name in ("vit", "simple_vit"))


# --------------------------------------------------------------------------- timm: strict load, same features

@pytest.mark.parametrize("kwargs", [
    dict(name="vit", pool="cls"),
    dict(name="vit", pool="mean"),
    dict(name="vit", pool="mean", class_token=False, qkv_bias=False),
    dict(name="simple_vit"),  # fixed sin-cos positions, no class token
])
def test_vit_family_timm_export_loads_strictly_with_the_same_features(kwargs, tmp_path):
    kwargs = dict(kwargs)
    model = _randomise(backbones.create(kwargs.pop("name"), **VIT, **kwargs))
    out = export(_checkpoint(model, tmp_path / "ckpt"), tmp_path / "timm", fmt="timm")
    ref = _timm_model(out)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        tokens, pooled = _features(ref, x)
        torch.testing.assert_close(tokens, model.forward_features(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(pooled, model(x), atol=1e-5, rtol=0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_classes"] == 0 and cfg["pretrained_cfg"]["input_size"] == [1, 28, 28]
    assert cfg["pretrained_cfg"]["mean"] == [0.286] and cfg["vit_ssl"]["step"] == 7


def test_sincos_positions_with_a_class_token_become_a_timm_parameter():
    """MAE-style fixed positions are a non-persistent buffer of ours: timm gets them as pos_embed
    over the patches only, and the class token stays without a position (no_embed_class)."""
    import timm

    model = _randomise(ViT(image_size=(28, 20), patch_size=4, in_chans=2, dim=32, depth=2, heads=2, pos_embed="sincos"))
    spec = timm_spec(model)
    assert spec["model_args"]["no_embed_class"] and spec["model_args"]["img_size"] == [28, 20]
    ref = timm.create_model(spec["architecture"], pretrained=False, num_classes=0, **spec["model_args"]).eval()
    ref.load_state_dict(timm_state_dict(model), strict=True)
    x = torch.randn(2, 2, 28, 20)
    with torch.no_grad():
        tokens, pooled = _features(ref, x)
        torch.testing.assert_close(tokens, model.forward_features(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(pooled, model(x), atol=1e-5, rtol=0)


def test_a_distilled_vit_maps_to_timms_deit_with_the_same_tokens(tmp_path):
    model = _randomise(backbones.create("vit", **VIT, distill_token=True))
    out = export(_checkpoint(model, tmp_path / "ckpt"), tmp_path / "timm", fmt="timm")
    ref = _timm_model(out)
    assert type(ref).__name__ == "VisionTransformerDistilled"
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        tokens, pooled = _features(ref, x)
        ours = model.forward_features(x)
        torch.testing.assert_close(tokens, ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(pooled, (ours[:, 0] + ours[:, 1]) / 2, atol=1e-5, rtol=0)  # DeiT's pooling


def test_a_timm_backbone_exports_its_inner_model_and_loads_back(tmp_path):
    import timm

    torch.manual_seed(0)
    model = backbones.create("timm:vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=1, embed_dim=32,
                             depth=1, num_heads=2).eval()
    ckpt = _checkpoint(model, tmp_path / "ckpt")
    out = export(ckpt, tmp_path / "timm", fmt="timm")
    # timm's own loader reads the folder (config.json + model.safetensors), strictly
    ref = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), model(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(_timm_model(out)(x), model(x), atol=1e-5, rtol=0)
        # a timm folder loads back as a timm: backbone
        again = backbones.load(out).eval()
        assert backbones.load_meta(out)["name"] == "timm:vit_tiny_patch16_224"
        assert torch.equal(again(x), model(x))
        assert torch.equal(backbones.load(export(ckpt, tmp_path / "ours")).eval()(x), model(x))


# --------------------------------------------------------------------------- the CLI, a real subprocess

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.export", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=clean_env())


def test_cli_exports_a_classifier_checkpoint_with_its_head(tmp_path):
    torch.manual_seed(0)
    model = backbones.create("vit", **VIT).eval()
    ckpt = _checkpoint(model, tmp_path / "run/checkpoints/step-000007")
    head = torch.nn.Linear(32, 5)
    backbones.save_head(head, ckpt)
    proc = _cli(str(ckpt), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "format vit-ssl" in proc.stdout and "step 7" in proc.stdout
    clf = backbones.load_classifier(tmp_path / "out").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(clf(x), head(model(x)))


def test_cli_exports_a_run_folders_newest_complete_checkpoint_for_timm(tmp_path):
    run = tmp_path / "run"
    for step, seed in ((2, 0), (4, 1)):
        torch.manual_seed(seed)
        _checkpoint(backbones.create("vit", **VIT, pool="mean"), run / f"checkpoints/step-{step:06d}", step)
    (run / "checkpoints/.tmp-step-000006").mkdir()  # a save in progress is not a checkpoint
    proc = _cli(str(run), "--out", str(tmp_path / "timm"), "--format", "timm")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((tmp_path / "timm/config.json").read_text())
    assert cfg["vit_ssl"]["step"] == 4 and cfg["vit_ssl"]["source"].endswith("step-000004")
    newest = backbones.load(run / "checkpoints/step-000004").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(_features(_timm_model(tmp_path / "timm"), x)[1], newest(x), atol=1e-5, rtol=0)


def test_cli_user_errors_are_one_line_without_a_traceback(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("mine")
    _checkpoint(backbones.create("vit", **VIT), tmp_path / "ckpt")
    proc = _cli(str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("pretrain.export: error: --out")
    assert "--force" in proc.stderr and (tmp_path / "out/keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------- refusals

def _run_main(capsys, *args: str) -> tuple[int, str]:
    rc = main(list(args))
    return rc, capsys.readouterr().err.strip()


def test_refuses_missing_checkpoints_and_runs_without_one(tmp_path, capsys):
    rc, err = _run_main(capsys, str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert rc == 2 and "does not exist" in err and "nope" in err
    (tmp_path / "run/checkpoints/.tmp-step-000002").mkdir(parents=True)
    rc, err = _run_main(capsys, str(tmp_path / "run"), "--out", str(tmp_path / "out"))
    assert rc == 2 and "no complete checkpoint" in err
    (tmp_path / "empty").mkdir()
    rc, err = _run_main(capsys, str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert rc == 2 and "neither a checkpoint folder" in err
    assert not (tmp_path / "out").exists()


def test_a_non_empty_out_needs_force_and_is_then_replaced_whole(tmp_path, capsys):
    ckpt = _checkpoint(backbones.create("vit", **VIT), tmp_path / "ckpt")
    (tmp_path / "out").mkdir()
    (tmp_path / "out/old.txt").write_text("old")
    rc, err = _run_main(capsys, str(ckpt), "--out", str(tmp_path / "out"))
    assert rc == 2 and "--force" in err
    assert main([str(ckpt), "--out", str(tmp_path / "out"), "--force"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    # never over the checkpoint itself, even with --force
    rc, err = _run_main(capsys, str(ckpt), "--out", str(ckpt), "--force")
    assert rc == 2 and "would replace the checkpoint" in err and (ckpt / "backbone.safetensors").is_file()


@pytest.mark.parametrize("name, kwargs, why", [
    ("cait", backbones.example_config("cait"), "'cait' has no timm equivalent"),
    ("vit", dict(VIT, patch_norm=True), "patch_norm=True"),
    ("vit", dict(VIT, norm_eps=1e-5), "norm_eps=1e-05"),
])
def test_timm_format_refuses_what_timm_cannot_rebuild(name, kwargs, why, tmp_path, capsys):
    ckpt = _checkpoint(backbones.create(name, **kwargs), tmp_path / "ckpt")
    rc, err = _run_main(capsys, str(ckpt), "--out", str(tmp_path / "out"), "--format", "timm")
    assert rc == 2 and why in err and "--format vit-ssl" in err and "\n" not in err
    if name == "cait":
        assert "vit, simple_vit and timm:NAME" in err
    assert not (tmp_path / "out").exists()


class _Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_named_safetensors_is_refused_unread(tmp_path, capsys):
    marker = tmp_path / "executed"
    out = export(_checkpoint(backbones.create("vit", **VIT), tmp_path / "ckpt"), tmp_path / "out")
    (out / "model.safetensors").write_bytes(pickle.dumps({"state": _Payload(marker)}))
    with pytest.raises(ValueError, match="not a safetensors file"):
        backbones.load(out)
    # the same file in a checkpoint: export refuses it in one line
    (tmp_path / "ckpt/backbone.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    rc, err = _run_main(capsys, str(tmp_path / "ckpt"), "--out", str(tmp_path / "again"))
    assert rc == 2 and "not a safetensors file" in err
    assert not marker.exists()


def test_export_folders_load_strictly_and_refuse_unknown_formats(tmp_path):
    out = export(_checkpoint(backbones.create("vit", **VIT), tmp_path / "ckpt"), tmp_path / "out")
    state = load_file(str(out / "model.safetensors"))
    save_file({k: v for k, v in state.items() if k != "norm.bias"}, str(out / "model.safetensors"))
    with pytest.raises(RuntimeError, match="norm.bias"):
        backbones.load(out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "format_version": 2}))
    with pytest.raises(ValueError, match="format_version=2, newer"):
        backbones.load_meta(out)
    with pytest.raises(FileNotFoundError, match="config.json"):
        backbones.load(tmp_path)
    with pytest.raises(ExportError, match="--format 'onnx'"):
        export(tmp_path / "ckpt", tmp_path / "x", fmt="onnx")
