"""Bad input, each answered by one line that names the field or file, the value and the fix, before
any work or without losing any (the README's table "Bad input and what you see"); secrets in shard
URLs never reach MLflow params or an export.

Real CLIs (`pretrain/run.py`, `python -m eval.run`, `python -m pretrain.export`) in subprocesses,
real shards, real checkpoints, a real MLflow store. Settings that fail in build_config /
build_objective are checked in-process (a subprocess adds nothing there); a few of them also go
through the CLI for its exit status 2 and its one `error:` line.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import backbones
from data.redact import redact
from data.shards import ShardsNotFoundError, shard_urls
from eval.run import TargetError, find_checkpoints
from helpers import ROOT, clean_env, write_fashion_subset
from pretrain.config import ConfigError, build_config
from pretrain.train import build_objective, normalisation

TINY = ["--recipe", "tiny", "eval.knn=false", "train.total_steps=4", "optim.warmup_steps=1"]
PREPROCESS = {"image_size": [28, 28], "channels": 1, "mean": [0.5], "std": [0.25]}


# --------------------------------------------------------------------------- helpers


def cli(*argv: str, module: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run pretrain/run.py ARGV (or python -m MODULE ARGV) from the project root, MLflow / Accelerate env cleared."""
    cmd = [sys.executable, *(["-m", module] if module else ["pretrain/run.py"]), *argv]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=clean_env())


def error_line(proc: subprocess.CompletedProcess, prog: str = "") -> str:
    """The one `error:` line of a refused command (exit status 2, no traceback), without its prefix."""
    said = proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.returncode == 2, said
    assert "Traceback" not in proc.stderr, said
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0] == proc.stderr.strip().splitlines()[-1], said
    assert lines[0].startswith(f"{prog}error: "), said
    return lines[0][len(f"{prog}error: "):]


def config_error(recipe: str | None, overrides: list[str], objective: str | None = None) -> str:
    """The ConfigError message of a config that build_config, build_objective or the normalisation refuse."""
    with pytest.raises(ConfigError) as info:
        cfg = build_config(objective, recipe, overrides)
        objective_ = build_objective(cfg)
        normalisation(cfg, None, objective_.backbone.in_chans)
    message = str(info.value)
    assert "\n" not in message
    return message


def run_dir_of(proc: subprocess.CompletedProcess) -> Path:
    """The run directory a pretraining launch announced on its first line."""
    match = re.search(r"run dir (\S+)", proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr[-2000:]
    return Path(match.group(1))


def save_checkpoint(folder: Path) -> Path:
    """A real checkpoint folder as eval.run and export read it: backbone.safetensors + backbone.json."""
    model = backbones.create("vit", image_size=28, patch_size=7, in_chans=1, dim=32, depth=2, heads=2)
    return backbones.save(model, folder, extra={"preprocess": PREPROCESS, "step": 5, "objective": "mae"})


class Payload:
    """Pickles to a call of os.system: unpickling it would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious(path: Path, marker: Path) -> Path:
    """A torch file (what torch.save writes: a zip holding a pickle) whose unpickling runs a command."""
    torch.save({"model": Payload(marker)}, path)
    return path


# --------------------------------------------------------------------------- settings (in-process)

# (recipe, overrides, what the one-line message must say: the field=value and the fix)
SETTINGS = {
    "unknown objective": ("tiny", ["objective.name=byol"], ["objective", "'byol'", "registered objectives are", "mae"]),
    "unknown backbone": ("tiny", ["backbone.name=resnet"], ["backbone", "'resnet'", "registered backbones are", "timm:NAME"]),
    "unknown recipe": ("nope", [], ["recipe='nope' not found", "YAML file path", "tiny"]),
    "image size vs patch": ("tiny", ["backbone.image_size=30"], ["backbone.image_size=30", "patch_size=7", "multiple of 7"]),
    "batch size 0": ("tiny", ["train.batch_size=0"], ["train.batch_size=0", "> 0", "e.g. train.batch_size=64"]),
    "batch size < 0": ("tiny", ["train.batch_size=-4"], ["train.batch_size=-4", "> 0"]),
    "grad accum 0": ("tiny", ["train.grad_accum=0"], ["train.grad_accum=0", "e.g. train.grad_accum=1"]),
    "width 0": ("tiny", ["backbone.dim=0"], ["backbone.dim=0", "integer >= 1", "e.g. backbone.dim=64"]),
    "width < 0": ("tiny", ["backbone.dim=-32"], ["backbone.dim=-32", "integer >= 1"]),
    "depth 0": ("tiny", ["backbone.depth=0"], ["backbone.depth=0", "integer >= 1", "e.g. backbone.depth=2"]),
    "heads 0": ("tiny", ["backbone.heads=0"], ["backbone.heads=0", "integer >= 1"]),
    "image size 0": ("tiny", ["backbone.image_size=0"], ["backbone.image_size=0", "integer >= 1"]),
    "mlp ratio 0": ("tiny", ["backbone.mlp_ratio=0"], ["backbone.mlp_ratio=0", "> 0", "e.g. backbone.mlp_ratio=4.0"]),
    "decoder width 0": ("tiny", ["objective.decoder_dim=0"], ["objective.decoder_dim=0", "integer >= 1"]),
    "decoder heads": ("tiny", ["objective.decoder_heads=3"], ["objective.decoder_heads=3", "decoder_dim=32", "e.g. 16"]),
    "workers < 0": ("tiny", ["data.num_workers=-1"], ["data.num_workers=-1", ">= 0", "e.g. data.num_workers=2"]),
    "load size 0": ("tiny", ["data.load_size=0"], ["data.load_size=0", "leave data.load_size unset"]),
    "total steps 0": ("tiny", ["train.total_steps=0"], ["train.total_steps=0", "> 0", "e.g. train.total_steps=1000"]),
    "total steps < 0": ("tiny", ["train.total_steps=-5"], ["train.total_steps=-5", "> 0"]),
    "ckpt every 0": ("tiny", ["train.ckpt_every=0"], ["train.ckpt_every=0", "e.g. train.ckpt_every=500"]),
    "log every 0": ("tiny", ["train.log_every=0"], ["train.log_every=0", "e.g. train.log_every=20"]),
    "keep last 0": ("tiny", ["train.keep_last=0"], ["train.keep_last=0", "e.g. train.keep_last=3"]),
    "stop at 0": ("tiny", ["train.stop_at=0"], ["train.stop_at=0", "leave train.stop_at unset"]),
    "warmup < 0": ("tiny", ["optim.warmup_steps=-1"], ["optim.warmup_steps=-1", ">= 0"]),
    "mae mask 1": ("tiny", ["objective.mask_ratio=1.0"], ["objective.mask_ratio=1.0", "strictly between 0 and 1", "0.75"]),
    "mae mask 0": ("tiny", ["objective.mask_ratio=0"], ["objective.mask_ratio=0", "strictly between 0 and 1"]),
    "mae mask > 1": ("tiny", ["objective.mask_ratio=1.5"], ["objective.mask_ratio=1.5", "strictly between 0 and 1"]),
    "mae masks nothing": ("tiny", ["objective.mask_ratio=0.01"], ["objective.mask_ratio=0.01", "masks none of the 16",
                                                                  "at least 0.0625"]),
    "simmim mask 1": ("simmim", ["objective.mask_ratio=1.0"], ["objective.mask_ratio=1.0", "strictly between", "0.6"]),
    "simmim mask 0": ("simmim", ["objective.mask_ratio=0"], ["objective.mask_ratio=0", "strictly between"]),
    "mpp corrupt 0": ("mpp", ["objective.corrupt_ratio=0"], ["objective.corrupt_ratio=0", "(0, 1]", "0.5"]),
    "mpp corrupt > 1": ("mpp", ["objective.corrupt_ratio=1.5"], ["objective.corrupt_ratio=1.5", "(0, 1]"]),
    "mpp mask + random > 1": ("mpp", ["objective.random_prob=0.5"], ["objective.mask_prob=0.8", "random_prob=0.5", "sum <= 1"]),
    "unknown key": ("tiny", ["train.nope=1"], ["unknown setting train.nope", "batch_size"]),
    "unknown section": ("tiny", ["nope.x=1"], ["unknown config section 'nope'", "sections are", "train"]),
    "unknown objective option": ("tiny", ["objective.nope=1"], ["objective", "'nope'", "its options are", "mask_ratio"]),
    "unknown backbone option": ("tiny", ["backbone.nope=1"], ["backbone", "'nope'", "its options are", "depth"]),
    "override without a section": ("tiny", ["lr=1"], ["'lr=1'", "section.key=value", "optim.lr=1e-3"]),
    "wrong type int": ("tiny", ["train.batch_size=abc"], ["train.batch_size='abc'", "type int", "e.g. train.batch_size=64"]),
    "wrong type float for int": ("tiny", ["train.total_steps=1.5"], ["train.total_steps=1.5", "type int"]),
    "wrong type list": ("tiny", ["optim.betas=abc"], ["optim.betas='abc'", "must be a list", "[0.9, 0.95]"]),
    "warmup = total": ("tiny", ["optim.warmup_steps=10"], ["optim.warmup_steps=10", "train.total_steps=10",
                                                           "lower optim.warmup_steps (e.g. 1)"]),
    "warmup > total": ("tiny", ["optim.warmup_steps=20"], ["optim.warmup_steps=20", "below train.total_steps=10"]),
    "beta = 1": ("tiny", ["optim.betas=[0.9,1.0]"], ["optim.betas=[0.9, 1.0]", "[0, 1)", "e.g. [0.9, 0.95]"]),
    "one beta": ("tiny", ["optim.betas=[0.9]"], ["optim.betas=[0.9]", "two numbers"]),
    "beta < 0": ("tiny", ["optim.betas=[-0.1,0.9]"], ["optim.betas=[-0.1, 0.9]", "[0, 1)"]),
    "lr 0": ("tiny", ["optim.lr=0"], ["optim.lr=0.0", "> 0", "e.g. optim.lr="]),
    "lr < 0": ("tiny", ["optim.lr=-1e-3"], ["optim.lr=-0.001", "> 0"]),
    "min lr < 0": ("tiny", ["optim.min_lr=-1"], ["optim.min_lr=-1.0", "[0, optim.lr=0.001]", "e.g. optim.min_lr=0"]),
    "min lr > lr": ("tiny", ["optim.min_lr=1"], ["optim.min_lr=1.0", "[0, optim.lr=0.001]"]),
    "weight decay < 0": ("tiny", ["optim.weight_decay=-1"], ["optim.weight_decay=-1.0", ">= 0", "e.g. optim.weight_decay=0.05"]),
    "clip 0": ("tiny", ["optim.clip_grad=0"], ["optim.clip_grad=0.0", "> 0", "e.g. optim.clip_grad=1.0"]),
    "mean/std vs channels": ("tiny", ["data.mean=[0.5,0.5,0.5]", "data.std=[0.2,0.2,0.2]"],
                             ["data.mean=[0.5, 0.5, 0.5]", "3 channels", "backbone.in_chans=1", "set data.mean and data.std to 1"]),
    "mean without std": ("tiny", ["data.mean=[0.5]"], ["data.mean=[0.5]", "data.std=None", "set both or neither"]),
    "mean/std lengths": ("tiny", ["data.mean=[0.5,0.5,0.5]", "data.std=[0.2]"], ["data.mean=[0.5, 0.5, 0.5]",
                                                                               "data.std=[0.2]", "same length"]),
    "std 0": ("tiny", ["data.mean=[0.5]", "data.std=[0.0]"], ["data.std=[0.0]", "> 0", "e.g. data.std=[0.25]"]),
    "mixed precision unknown": ("tiny", ["train.mixed_precision=fp8"], ["train.mixed_precision='fp8'", "allowed are no, fp16, bf16"]),
    "mixed precision boolean": ("tiny", ["train.mixed_precision=true"], ["train.mixed_precision='true'", "allowed are no"]),
    "knn k > bank": ("tiny", ["eval.knn_k=5000"], ["eval.knn_k=5000", "eval.knn_train_samples=2000", "lower eval.knn_k"]),
    "knn k > subset bank": ("tiny", ["eval.knn_every=5", "eval.knn_k=300", "eval.knn_train_samples=null",
                                     "eval.knn_every_train_samples=100"], ["eval.knn_k=300", "eval.knn_every_train_samples=100"]),
    "knn k 0": ("tiny", ["eval.knn_k=0"], ["eval.knn_k=0", "> 0", "e.g. eval.knn_k=20"]),
    "knn bank 0": ("tiny", ["eval.knn_train_samples=0"], ["eval.knn_train_samples=0", "> 0"]),
    "seed < 0": ("tiny", ["train.seed=-1"], ["train.seed=-1", "[0, 2**31)", "e.g. train.seed=0"]),
    "corrupt fraction > 1": ("tiny", ["data.max_corrupt_fraction=1.5"], ["data.max_corrupt_fraction=1.5", "[0, 1)", "0.01"]),
    "draws without resampling": ("tiny", ["data.shards_per_epoch=8"], ["data.shards_per_epoch=8", "data.resampled=true"]),
}


@pytest.mark.parametrize("recipe, overrides, says", SETTINGS.values(), ids=SETTINGS.keys())
def test_a_bad_setting_is_refused_naming_field_value_and_fix(recipe, overrides, says):
    message = config_error(recipe, overrides)
    missing = [s for s in says if s not in message]
    assert not missing, f"{message!r} lacks {missing}"


def test_unknown_objective_on_the_command_line_says_objective_not_recipe():
    message = config_error(None, [], objective="byol")
    assert message.startswith("--objective 'byol' is not a registered objective") and "mae, mpp" in message


def test_an_objective_the_backbone_cannot_serve_names_the_capability_and_what_works(tmp_path):
    """MAE drops tokens and MPP needs token access; hierarchical MobileViT offers neither."""
    recipe = tmp_path / "mobile.yaml"
    recipe.write_text(yaml.safe_dump({"backbone": {"name": "mobile_vit", **backbones.example_config("mobile_vit")},
                                      "objective": {"name": "mpp"}, "train": {"batch_size": 8, "total_steps": 10},
                                      "optim": {"warmup_steps": 1}}))
    message = config_error(str(recipe), [])
    for part in ("objective 'mpp' needs a backbone with supports_token_access", "MobileViT", "dino", "simmim"):
        assert part in message, message


def test_text_settings_take_the_value_as_written():
    """YAML reads `no` as false and "Authorization: Bearer ..." as a mapping; string settings must not."""
    command = 'pipe:env "H=Authorization: Bearer x" cat /data/train-{0..3}.tar # comment'
    cfg = build_config(None, "tiny", ["train.mixed_precision=no", f"data.train={command}", "data.test=null",
                                      "train.run_name='2024-01-01'"])
    assert cfg.train.mixed_precision == "no" and cfg.data.train == command
    assert cfg.data.test is None and cfg.train.run_name == "2024-01-01"


# --------------------------------------------------------------------------- settings through the CLI


def test_cli_unknown_objective_exits_2_before_any_work(tmp_path):
    line = error_line(cli("--objective", "byol", f"train.out_dir={tmp_path / 'runs'}"))
    assert "'byol' is not a registered objective" in line and "mae" in line and "--recipe" in line
    assert not (tmp_path / "runs").exists()


def test_cli_zero_width_backbone_exits_2_before_any_work(tmp_path):
    """It used to build a 0-wide ViT and train it for minutes."""
    line = error_line(cli(*TINY, "backbone.dim=0", f"train.out_dir={tmp_path / 'runs'}"))
    assert line.startswith("backbone.dim=0 must be an integer >= 1")
    assert not (tmp_path / "runs").exists()


def test_cli_mae_on_a_hierarchical_backbone_exits_2(tmp_path):
    recipe = tmp_path / "maxvit.yaml"
    recipe.write_text(yaml.safe_dump({"backbone": {"name": "max_vit", **backbones.example_config("max_vit")},
                                      "objective": {"name": "mae"}}))
    line = error_line(cli("--recipe", str(recipe), f"train.out_dir={tmp_path / 'runs'}"))
    assert "objective 'mae' needs a backbone with supports_token_drop" in line and "MaxViT" in line
    assert "dino, distill, simmim, supervised" in line
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """One real shard of 64 Fashion-MNIST images."""
    return write_fashion_subset(tmp_path_factory.mktemp("one") / "shards", n=64, shard_size=64)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """train.out_dir shared by the runs that get as far as MLflow: its store's tables are made once (4-5 s)."""
    return tmp_path_factory.mktemp("runs")


def test_cli_shard_pattern_matching_nothing_exits_2_before_any_work(tmp_path):
    line = error_line(cli(*TINY, "data.train=/nonexistent/{000..009}.tar", f"train.out_dir={tmp_path / 'runs'}"))
    assert line.startswith("shard pattern '/nonexistent/{000..009}.tar': 10 of 10 files do not exist")
    assert "check the pattern's range and folder" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("what", ["empty folder", "missing folder", "glob"])
def test_a_shard_spec_matching_nothing_says_why(tmp_path, what):
    (tmp_path / "empty").mkdir()
    spec, why = {"empty folder": (tmp_path / "empty", "is a folder with no *.tar and no manifest.json"),
                 "missing folder": (tmp_path / "nowhere", "does not exist"),
                 "glob": (tmp_path / "empty" / "*.tar", "is a pattern that matches no file")}[what]
    with pytest.raises(ShardsNotFoundError) as info:  # a DatasetNotFoundError: pretrain/run.py exits 2 with it
        shard_urls(str(spec))
    assert str(info.value).startswith(f"shard spec {str(spec)!r} {why}") and "python -m data.shards write" in str(info.value)


def test_cli_fewer_shards_than_workers_exits_2_before_any_work(tmp_path, shards):
    line = error_line(cli(*TINY, f"data.train={shards}", "data.num_workers=2", f"train.out_dir={tmp_path / 'runs'}"))
    assert line.startswith(f"data.train={shards}: 1 shards for 1 rank x 2 workers: need >= 2")
    assert "data.num_workers=1" in line and "data.resampled=true" in line
    assert not (tmp_path / "runs").exists()


def test_cli_missing_built_in_dataset_exits_2_before_any_work(tmp_path):
    """Even with the converted shards cached: a folder the user names must hold the files."""
    line = error_line(cli(*TINY, "data.fashion_mnist_dir=/nonexistent", f"train.out_dir={tmp_path / 'runs'}"))
    assert line.startswith("Fashion-MNIST not found in /nonexistent: missing train-images-idx3-ubyte[.gz]")
    assert "apt-get install dataset-fashion-mnist" in line and "data.fashion_mnist_dir=" in line
    assert not (tmp_path / "runs").exists()


def garble(shard: Path) -> None:
    """Overwrite every image's bytes after the PNG signature: the tar stays readable, no image decodes."""
    with tarfile.open(shard) as tar:
        spans = [(m.offset_data, m.size) for m in tar.getmembers() if m.name.endswith(".png")]
    rng = np.random.default_rng(0)
    with open(shard, "r+b") as f:
        for offset, size in spans:
            f.seek(offset + 8)
            f.write(rng.integers(0, 256, size - 8, dtype=np.uint8).tobytes())


def test_cli_corrupt_shard_past_the_threshold_stops_naming_it_and_keeps_the_checkpoints(tmp_path, runs):
    """The check starts after 1,000 samples read (ShardLoader's min_samples_for_check)."""
    folder = write_fashion_subset(tmp_path / "shards", n=1200, shard_size=300)
    bad = shard_urls(str(folder))[1]
    garble(Path(bad))
    proc = cli("--recipe", "tiny", "eval.knn=false", "train.total_steps=100", "train.batch_size=100", "train.ckpt_every=3",
               f"data.train={folder}", "data.num_workers=0", f"train.out_dir={runs}")
    line = error_line(proc)
    assert "were corrupt" in line and "max_corrupt_fraction=0.01" in line and bad in line
    assert "python -m data.shards verify" in line
    run_dir = run_dir_of(proc)
    report = json.loads((run_dir / "data_errors.json").read_text())
    assert list(report) == [bad] and 0 < report[bad]["skipped"] <= 300 and "undecodable" in report[bad]["first_reason"]
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if (p / "backbone.json").is_file())
    assert kept and kept[-1] >= "step-000003", kept  # the work before the stop is there to resume from


# --------------------------------------------------------------------------- checkpoints given to eval.run / export / load


@pytest.fixture
def trunc_ckpt(tmp_path) -> Path:
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints" / "step-000005")
    weights = ckpt / "backbone.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ckpt


def test_eval_run_refuses_a_truncated_checkpoint_before_logging_anything(tmp_path, trunc_ckpt):
    runs = tmp_path / "mlruns-root"
    line = error_line(cli(str(trunc_ckpt.parents[1]), "--knn", "--runs-root", str(runs), module="eval.run"), "eval.run: ")
    assert line.startswith(f"{trunc_ckpt / 'backbone.safetensors'} is truncated or not a safetensors file")
    assert "use another checkpoint of the run" in line
    assert not runs.exists()  # no MLflow store, so no run was created


def test_export_refuses_a_truncated_checkpoint_and_writes_nothing(tmp_path, trunc_ckpt):
    out = tmp_path / "export"
    line = error_line(cli(str(trunc_ckpt), "--out", str(out), module="pretrain.export"), "pretrain.export: ")
    assert f"{trunc_ckpt / 'backbone.safetensors'} is truncated or not a safetensors file" in line
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_eval_run_refuses_a_foreign_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    line = error_line(cli(str(text), "--runs-root", str(tmp_path / "m"), module="eval.run"), "eval.run: ")
    assert line.startswith(f"TARGET {text} is a file, not a folder") and "backbones.save(model, DIR" in line


def test_export_refuses_an_npz_and_a_pt(tmp_path, capsys):
    """In-process through export's main: the same refusal as eval.run's (find_checkpoints)."""
    from pretrain.export import main

    npz, marker = tmp_path / "weights.npz", tmp_path / "PWNED"
    np.savez(npz, w=np.zeros(3))
    for target in (npz, malicious(tmp_path / "weights.pt", marker)):
        assert main([str(target), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"pretrain.export: error: TARGET {target} is a file, not a folder")
        assert "never unpickled" in err
    assert not (tmp_path / "x").exists() and not marker.exists()


def test_a_folder_without_a_backbone_is_named_as_such(tmp_path):
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(TargetError, match="is neither a checkpoint folder .no backbone.json., a run folder"):
        find_checkpoints(tmp_path)


@pytest.fixture
def evil_ckpt(tmp_path) -> tuple[Path, Path]:
    """A checkpoint whose backbone.safetensors is a malicious pickle, and the marker it would create."""
    marker = tmp_path / "PWNED"
    ckpt = save_checkpoint(tmp_path / "evil" / "checkpoints" / "step-000005")
    malicious(ckpt / "backbone.safetensors", marker)
    return ckpt, marker


def test_eval_run_refuses_a_malicious_pickle_unread(tmp_path, evil_ckpt):
    ckpt, marker = evil_ckpt
    line = error_line(cli(str(ckpt), "--knn", "--runs-root", str(tmp_path / "m"), module="eval.run"), "eval.run: ")
    assert "is truncated or not a safetensors file" in line and "never unpickled" in line
    assert not marker.exists() and not (tmp_path / "m").exists()


def test_export_refuses_a_malicious_pickle_unread(tmp_path, evil_ckpt):
    ckpt, marker = evil_ckpt
    line = error_line(cli(str(ckpt), "--out", str(tmp_path / "x"), module="pretrain.export"), "pretrain.export: ")
    assert "is truncated or not a safetensors file" in line and "never unpickled" in line
    assert not marker.exists() and not (tmp_path / "x").exists()


def test_backbones_load_refuses_a_malicious_pickle_unread(tmp_path, evil_ckpt):
    ckpt, marker = evil_ckpt
    with pytest.raises(ValueError, match="is truncated or not a safetensors file"):
        backbones.load(ckpt)
    pt = malicious(tmp_path / "weights.pth", marker)
    with pytest.raises(ValueError, match=r"is a file; backbones.load reads a folder .*read_state_dict"):
        backbones.load(pt)
    with pytest.raises(ValueError, match="was refused unread: it holds objects other than tensors"):
        backbones.read_state_dict(pt)
    assert not marker.exists()


# --------------------------------------------------------------------------- secrets


SECRETS = ("S3CRET_A", "S3CRET_B", "S3CRET_C", "S3CRET_D", "S3CRET_E")


@pytest.mark.parametrize("text, shown", [
    ("https://reader:S3CRET_A@host.example/train-{000..009}.tar", "https://reader:***@host.example/train-{000..009}.tar"),
    ("https://S3CRET_A@github.com/org/data.tar", "https://***@github.com/org/data.tar"),
    ("https://b.s3.amazonaws.com/x.tar?X-Amz-Credential=S3CRET_A&X-Amz-Signature=S3CRET_B&part=2",
     "https://b.s3.amazonaws.com/x.tar?X-Amz-Credential=***&X-Amz-Signature=***&part=2"),
    ("https://host/x.tar?token=S3CRET_A", "https://host/x.tar?token=***"),
    ('pipe:curl -s -H "Authorization: Bearer S3CRET_A" https://host/x-{0..3}.tar',
     'pipe:curl -s -H "Authorization: Bearer ***" https://host/x-{0..3}.tar'),
    ("pipe:curl -u alice:S3CRET_A https://host/x.tar", "pipe:curl -u alice:*** https://host/x.tar"),
    ("pipe:env API_TOKEN=S3CRET_A tool --password S3CRET_B get x.tar", "pipe:env API_TOKEN=*** tool --password *** get x.tar"),
    ("/data/shards/train-{000000..000099}.tar", "/data/shards/train-{000000..000099}.tar"),
    ("pipe:aws s3 cp s3://bucket/keys/train-{000..009}.tar -", "pipe:aws s3 cp s3://bucket/keys/train-{000..009}.tar -"),
    ("https://host:8080/auth-data/x.tar", "https://host:8080/auth-data/x.tar"),
])
def test_redact_masks_credentials_and_leaves_paths_alone(text, shown):
    assert redact(text) == shown


def test_no_secret_in_mlflow_params_or_an_export_after_a_real_run(tmp_path, shards, runs):
    """data.train streams real shards through a command holding a header and a token; data.test is
    a URL with a password and signed-URL parameters (never read: kNN is off)."""
    train = (f'pipe:env "HDR=Authorization: Bearer {SECRETS[0]}" API_TOKEN={SECRETS[1]} cat '
             f"{shards}/shard-{{000000..000000}}.tar")
    test = f"https://reader:{SECRETS[2]}@data.example.com/test-{{0..1}}.tar?X-Amz-Signature={SECRETS[3]}&token={SECRETS[4]}"
    proc = cli(*TINY, "train.batch_size=16", f"data.train={train}", f"data.test={test}", "data.num_workers=0",
               f"train.out_dir={runs}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow import MlflowClient

    run_dir = run_dir_of(proc)
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    params = MlflowClient(f"sqlite:///{runs.resolve()}/mlflow.db").get_run(run_id).data.params
    assert not [k for k, v in params.items() for s in SECRETS if s in v], params
    assert params["data.train"] == redact(train) and "Bearer ***" in params["data.train"]
    assert params["data.test"] == "https://reader:***@data.example.com/test-{0..1}.tar?X-Amz-Signature=***&token=***"
    assert params["train.out_dir"] == str(runs) and params["backbone.name"] == "vit"  # plain values as they were

    export = tmp_path / "export"
    assert cli(str(run_dir), "--out", str(export), module="pretrain.export").returncode == 0
    config = (export / "config.json").read_text()
    assert not [s for s in SECRETS if s in config] and "Bearer ***" in config
