"""eval.finetune: layer-wise LR decay groups, learning on real Fashion-MNIST shards, the written
classifier folder, MLflow metrics, the CLI in one and in two real processes (Accelerate, gloo)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import backbones
from backbones.base import Classifier
from eval import tracking
from eval.finetune import finetune, layer_ids, lr_factor, new_head, param_groups, trunk_units

from helpers import ROOT, clean_env, write_fashion_subset

PREPROCESS = {"image_size": [28, 28], "channels": 1, "mean": [0.286], "std": [0.353]}


def tiny_vit(depth: int = 2, seed: int = 0) -> backbones.Backbone:
    torch.manual_seed(seed)
    return backbones.create("vit", image_size=28, patch_size=7, in_chans=1, dim=32, depth=depth, heads=2, mlp_ratio=2.0)


def expected_vit_layer(name: str, depth: int) -> int:
    """MAE's rule for a ViT: tokens, positions, patch embedding -> 0; blocks.i -> i + 1; the rest -> L + 1."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "dist_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


# --------------------------------------------------------------------------- LLRD groups


def test_vit_lr_of_every_parameter_is_lr_times_decay_to_its_depth():
    depth, lr, decay = 3, 1e-3, 0.5
    model = Classifier(tiny_vit(depth), new_head(32, 10))
    groups = param_groups(model, lr, weight_decay=0.05, layer_decay=decay)
    seen: dict[int, str] = {}
    for g in groups:
        assert len(g["params"]) == len(g["names"])
        for name, p in zip(g["names"], g["params"]):
            assert id(p) not in seen, f"{name} is in two groups"
            seen[id(p)] = name
            layer = expected_vit_layer(name.removeprefix("backbone."), depth) if name.startswith("backbone.") else depth + 1
            assert g["layer"] == layer, name
            assert g["lr"] == pytest.approx(lr * decay ** (depth + 1 - layer)), name
            no_decay = p.ndim <= 1 or name.removeprefix("backbone.") in model.backbone.no_weight_decay()
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(seen) == trainable  # every trainable parameter in exactly one group
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["backbone.pos_embed"]["lr"] == pytest.approx(lr * decay ** 4)
    assert by_name["head.weight"]["lr"] == pytest.approx(lr) and by_name["head.weight"]["weight_decay"] == 0.05
    assert by_name["backbone.blocks.2.attn.qkv.weight"]["lr"] == pytest.approx(lr * decay)


def test_frozen_parameters_are_left_out():
    model = Classifier(tiny_vit(), new_head(32, 10))
    model.backbone.patch_embed.requires_grad_(False)
    names = [n for g in param_groups(model, 1e-3, 0.05, 0.75) for n in g["names"]]
    assert names and not any(n.startswith("backbone.patch_embed") for n in names)


@pytest.mark.parametrize("family", ["max_vit", "twins_svt"])
def test_hierarchical_backbone_gets_monotone_layer_ids(family):
    model = backbones.create(family, **backbones.example_config(family))
    ids, depth = layer_ids(model)
    names = [n for n, _ in model.named_parameters()]
    assert set(ids) == set(names)
    order = [ids[n] for n in names]
    assert order == sorted(order), "layer ids must not decrease in parameter order"
    assert depth >= 2 and min(order) >= 0 and max(order) == depth + 1
    assert len(set(order)) >= depth  # every block its own id
    units = trunk_units(model)
    assert all(u.startswith("stages.") for u in units)
    for i, unit in enumerate(units):  # a stage's / block's parameters share its id
        assert {ids[n] for n in names if n.startswith(unit + ".")} <= {i + 1}
    assert ids[names[-1]] == depth + 1  # final norm


def test_cait_class_attention_blocks_are_deeper_layers():
    model = backbones.create("cait", **backbones.example_config("cait"))
    ids, depth = layer_ids(model)
    assert trunk_units(model) == ["blocks.0", "blocks.1", "blocks_token_only.0"] and depth == 3
    assert ids["blocks_token_only.0." + next(n for n, _ in model.blocks_token_only[0].named_parameters())] == 3
    assert ids["norm.weight"] == 4 and ids["cls_token"] == 0


def test_lr_schedule_warms_up_then_decays_to_zero():
    values = [lr_factor(s, total=20, warmup=4) for s in range(20)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[4] == pytest.approx(1.0) and values[-1] < 0.01
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


# --------------------------------------------------------------------------- data and a saved target


def write_test_subset(out: Path, n: int, shard_size: int) -> Path:
    """Real Fashion-MNIST test images (the first n of the test split) as real tar shards."""
    from data.builtin import FASHION_MNIST_CLASSES, load_fashion_mnist
    from data.shards import write_shards

    images, labels = load_fashion_mnist("test")
    samples = ((f"ft_{i:06d}", images[i, 0].numpy(), int(labels[i])) for i in range(n))
    write_shards(samples, out, shard_size=shard_size, classes=FASHION_MNIST_CLASSES)
    return out


def save_target(folder: Path, step: int = 7) -> Path:
    """A random-init tiny ViT saved as a checkpoint would be (backbone.json with preprocess and step)."""
    backbones.save(tiny_vit(), folder, extra={"preprocess": PREPROCESS, "step": step, "data": {"train": None}})
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("ft-shards")
    return write_fashion_subset(base / "train", n=1536, shard_size=384), write_test_subset(base / "test", n=600, shard_size=300)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> tuple[Path, Path]:
    """For the CLI runs, which test plumbing, not learning: 4 train shards (2 ranks x 2 workers), 2 test shards."""
    base = tmp_path_factory.mktemp("ft-small")
    return write_fashion_subset(base / "train", n=256, shard_size=64), write_test_subset(base / "test", n=200, shard_size=100)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, shards):
    """One fine-tune of a random-init tiny ViT, logged into a real sqlite MLflow store."""
    base = tmp_path_factory.mktemp("ft-run")
    target = save_target(base / "ckpt")
    run_id, uri = tracking.start_run("ft-test", base / "mlruns")
    # from random init (no pretraining): more steps, a higher LR and whole-image crops learn fastest
    result = finetune(target, train_shards=shards[0], test_shards=shards[1], epochs=2, batch_size=32, lr=5e-3,
                      layer_decay=0.75, crop_scale=(1.0, 1.0), eval_before=True, run_id=run_id, uri=uri)
    return target, result, run_id, uri


# --------------------------------------------------------------------------- learning, output, MLflow


def test_finetuning_learns_well_above_chance(tuned):
    _, result, _, _ = tuned
    assert result["epochs"] == 2 and len(result["history"]) == 2 and result["test_samples"] == 600
    assert result["before"]["top1"] < 0.3  # an untrained head: about chance (10 %)
    assert result["top1"] > 0.45 and result["top1"] > result["before"]["top1"] + 0.25
    assert result["top5"] >= result["top1"] and result["top5"] > 0.8
    assert result["train_steps"] == 2 * (1536 // 32)


def test_written_classifier_predicts_the_reported_accuracy(tuned, shards):
    from data.augment import eval_transform
    from data.stream import ShardLoader

    target, result, _, _ = tuned
    out = Path(result["out"])
    assert out == target / "finetune" and not list(target.glob(".tmp-*")) and not list(target.glob(".old-*"))
    model = backbones.load_classifier(out).eval()
    assert model.num_classes == 10
    loader = ShardLoader(shards[1], batch_size=100, image_size=28, channels=1, shuffle=False, drop_last=False, num_workers=1)
    correct = n = 0
    with torch.inference_mode():
        for batch in loader.iter_epoch(0):
            x = eval_transform(batch.images, 28, PREPROCESS["mean"], PREPROCESS["std"])
            correct += int((model(x).argmax(-1) == batch.labels).sum())
            n += len(batch.labels)
    assert n == 600 and correct / n == pytest.approx(result["top1"], abs=1e-9)
    meta = backbones.load_meta(out)
    assert meta["preprocess"] == PREPROCESS and meta["finetune"]["source"] == str(target.resolve())
    assert meta["finetune"]["layer_decay"] == 0.75 and meta["classes"][0] == "T-shirt/top"
    assert meta["scores"]["finetune/top1"] == result["top1"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["top1"] == result["top1"] and [h["epoch"] for h in metrics["history"]] == [1, 2]
    # and the source checkpoint is untouched
    assert backbones.load_meta(target)["step"] == 7 and not (target / "head.safetensors").exists()


def test_mlflow_metrics_at_the_checkpoint_step_and_per_epoch(tuned):
    _, result, run_id, uri = tuned
    client = tracking.client(uri)
    final = client.get_metric_history(run_id, "finetune/top1")
    assert [(m.step, m.value) for m in final] == [(7, pytest.approx(result["top1"]))]
    assert [m.step for m in client.get_metric_history(run_id, "finetune/top5")] == [7]
    curve = client.get_metric_history(run_id, "finetune/step-000007/top1")
    assert sorted(m.step for m in curve) == [0, 1, 2]  # 0 = before training
    assert {m.step: m.value for m in curve}[2] == pytest.approx(result["top1"])
    assert [m.step for m in client.get_metric_history(run_id, "finetune/step-000007/loss")] == [1, 2]


def test_bad_settings_and_targets_are_refused_before_work(tmp_path, small_shards):
    shards = small_shards
    target = save_target(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="layer_decay=1.5"):
        finetune(target, train_shards=shards[0], test_shards=shards[1], layer_decay=1.5)
    with pytest.raises(ValueError, match="--out .* checkpoint folder"):
        finetune(target, train_shards=shards[0], test_shards=shards[1], out=target)
    with pytest.raises(ValueError, match="test shards None"):
        finetune(target, train_shards=shards[0])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "precious.txt").write_text("x")
    with pytest.raises(ValueError, match="not a fine-tune output"):
        finetune(target, train_shards=shards[0], test_shards=shards[1], out=tmp_path / "taken")
    assert (tmp_path / "taken" / "precious.txt").exists()


# --------------------------------------------------------------------------- the CLI, one and two processes


def run_cli(args: list[str], launcher: list[str] | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["-m", "eval.finetune", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env or clean_env())


def test_cli_logs_into_the_pretraining_run_of_the_checkpoint(tmp_path, small_shards):
    shards = small_shards
    run_dir = tmp_path / "run"
    target = save_target(run_dir / "checkpoints" / "step-000007")
    run_id, uri = tracking.start_run("vit-ssl", tmp_path / "store")
    tracking.write_run_json(run_dir, run_id, uri, "vit-ssl")
    proc = run_cli([str(target), "--train-shards", str(shards[0]), "--test-shards", str(shards[1]), "--epochs", "1",
                    "--batch-size", "32", "--randaugment", "2,9", "--mixup", "0.8"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "test top-1" in proc.stdout and run_id in proc.stdout
    result = json.loads((target / "finetune" / "metrics.json").read_text())
    assert result["settings"]["randaugment"] == [2, 9.0] and result["settings"]["mixup"] == 0.8
    history = tracking.client(uri).get_metric_history(run_id, "finetune/top1")
    assert [(m.step, m.value) for m in history] == [(7, pytest.approx(result["top1"]))]
    assert backbones.load_classifier(target / "finetune").num_classes == 10


def test_eval_run_is_a_new_run_linked_to_the_pretraining_run(tmp_path):
    from eval.finetune import mlflow_run

    run_dir = tmp_path / "run"
    target = save_target(run_dir / "checkpoints" / "step-000007")
    parent, uri = tracking.start_run("vit-ssl", tmp_path / "store")
    tracking.write_run_json(run_dir, parent, uri, "vit-ssl")
    assert mlflow_run(target, tmp_path / "elsewhere") == (parent, uri, False)
    run_id, uri2, created = mlflow_run(target, tmp_path / "elsewhere", eval_run=True)
    run = tracking.client(uri2).get_run(run_id)
    assert created and uri2 == uri and run_id != parent
    assert run.data.tags[tracking.PARENT_TAG] == parent and run.data.tags["eval"] == "finetune"
    assert not (tmp_path / "elsewhere").exists()


def test_cli_errors_are_one_line_with_exit_2(tmp_path):
    target = save_target(tmp_path / "ckpt")
    proc = run_cli([str(target), "--layer-decay", "0", "--no-mlflow"])
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("eval.finetune: error: layer_decay=0.0 is invalid")
    proc = run_cli([str(tmp_path / "missing"), "--no-mlflow"])
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("eval.finetune: error: ") and str(tmp_path / "missing") in proc.stderr
    proc = run_cli([str(target), "--randaugment", "two", "--no-mlflow"])
    assert proc.returncode == 2 and "eval.finetune: error:" in proc.stderr and "N,M" in proc.stderr


def test_two_processes_write_one_classifier_and_log_once(tmp_path, small_shards):
    """STACK.md: on a CPU only ACCELERATE_USE_CPU=1 with --multi_gpu really starts 2 ranks (gloo);
    the written world size proves both ranks trained together."""
    target = save_target(tmp_path / "ckpt")
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    launcher = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                "no", "--dynamo_backend", "no", "--main_process_port", "29531"]
    shards = small_shards
    proc = run_cli([str(target), "--train-shards", str(shards[0]), "--test-shards", str(shards[1]), "--epochs", "1",
                    "--batch-size", "32", "--runs-root", str(tmp_path / "store"), "--out", str(tmp_path / "out")],
                   launcher=launcher, env=clean_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["test_samples"] == 200  # each test sample scored once
    assert metrics["train_steps"] == (256 // 2) // 32
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert proc.stdout.count("classifier    :") == 1
    client = tracking.client(f"sqlite:///{(tmp_path / 'store').resolve()}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("vit-ssl-eval").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["eval"] == "finetune" and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "finetune/top1")] == [7]
    assert backbones.load_classifier(tmp_path / "out").num_classes == 10
