"""Feature extraction and `eval.run` on two real processes (Accelerate, gloo, on the CPU): every
sample's feature exactly once, in order, equal to one process's; one writer of caches and MLflow."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch
from mlflow import MlflowClient

import backbones
from eval import tracking
from eval.features import extract_features
from eval.run import score_checkpoint
from helpers import ROOT, clean_env, write_id_shards

PREPROCESS = {"image_size": [28, 28], "channels": 1, "mean": [0.286], "std": [0.353]}


def launch(*args: str, port: int) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(port), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=clean_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def test_two_processes_gather_every_feature_exactly_once(tmp_path):
    shards = write_id_shards(tmp_path / "ids", n=70, shard_size=25)  # 70 samples: 5 batches of 16, the last short
    launch("tests/eval_dist_check.py", str(tmp_path), str(shards), port=29531)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == 2

    torch.manual_seed(0)
    model = backbones.create("vit", image_size=28, patch_size=7, in_chans=1, dim=32, depth=1, heads=2)
    images = torch.randint(0, 256, (37, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    want, _ = extract_features(model, images, None, PREPROCESS, batch_size=8)
    for r in (r0, r1):  # every rank holds all 37, once each, in the input's order
        assert torch.equal(r["labels"], torch.arange(37))
        torch.testing.assert_close(r["feats"], want, rtol=1e-5, atol=1e-5)
        assert sorted(r["s_labels"].tolist()) == list(range(70))  # the shard stream: complete and unique
        assert r["s_feats"].shape == (70, 32)
    # cache: written once by rank 0; when it exists, only rank 0 reads it
    assert (tmp_path / "ckpt" / "features" / "ids.safetensors").is_file()
    assert not r0["cached_none"] and not r1["cached_none"]
    assert not r0["again_none"] and r1["again_none"]


def test_eval_run_on_two_processes_logs_once_and_matches_one_process(tmp_path):
    from data.builtin import DatasetNotFoundError, load_fashion_mnist

    try:
        load_fashion_mnist("test")
    except DatasetNotFoundError:
        import pytest

        pytest.skip("built-in dataset missing: run ./setup.sh")
    run_dir = tmp_path / "run"
    torch.manual_seed(0)
    model = backbones.create("vit", image_size=28, patch_size=7, in_chans=1, dim=32, depth=1, heads=2)
    ckpt = run_dir / "checkpoints" / "step-000300"
    backbones.save(model, ckpt, extra={"step": 300, "preprocess": PREPROCESS, "data": {"train": None, "test": None}})
    (tmp_path / "store").mkdir()
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    run_id, _ = tracking.start_run("vit-ssl", tmp_path / "store", uri=uri)
    tracking.write_run_json(run_dir, run_id, uri, "vit-ssl")

    proc = launch("-m", "eval.run", str(run_dir), "--knn", "--k", "20", "--train-samples", "3000", port=29532)
    assert proc.stdout.count("MLflow run") == 1  # one table, from rank 0
    history = MlflowClient(uri).get_metric_history(run_id, tracking.mlflow_metric_name("knn/top1@20"))
    assert [m.step for m in history] == [300]  # logged once, at the checkpoint's step
    # the same score in one process, from fresh features (the 2-process cache moved aside)
    shutil.move(str(ckpt / "features"), str(tmp_path / "features-2proc"))
    one = score_checkpoint(ckpt, ks=(20,), train_samples=3000)
    assert abs(one["knn/top1@20"] - history[0].value) < 1e-6
