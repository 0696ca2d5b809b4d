"""The trainer's data settings end to end: unlabelled shards, resampled mode, corrupt shards
reported in the run, and launches the shards cannot serve refused before any work. Real shards
written by `python -m data.shards`, the real CLI, a real MLflow store."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
from mlflow import MlflowClient
from PIL import Image

from helpers import ROOT, clean_env, only_run_dir, run_pretrain, write_fashion_subset

TINY = ["--recipe", "tiny", "eval.knn=false", "train.total_steps=6", "train.ckpt_every=3", "optim.warmup_steps=1"]


def write_unlabelled(folder, tmp_path, n=96, shard_size=24):
    """A CSV of image paths without labels, written to shards by the CLI (no .cls in the tars)."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    lines = ["path"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(images / f"{i:03d}.png")
        lines.append(f"images/{i:03d}.png")
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    from data.shards import main

    assert main(["write", str(tmp_path / "list.csv"), str(folder), "--shard-size", str(shard_size), "--quiet"]) == 0
    return folder


def failing_pretrain(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "pretrain/run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=clean_env())
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_unlabelled_shards_train_mae_and_are_refused_for_supervised(tmp_path):
    shards = write_unlabelled(tmp_path / "shards", tmp_path)
    with tarfile.open(next(shards.glob("*.tar"))) as tar:
        assert not [m for m in tar.getnames() if m.endswith(".cls")]
    run_pretrain(*TINY, f"data.train={shards}", f"train.out_dir={tmp_path / 'runs'}")
    run_dir = only_run_dir(tmp_path / "runs")
    assert (run_dir / "checkpoints" / "step-000006").is_dir()

    proc = failing_pretrain("--objective", "supervised", *TINY[2:], "backbone.image_size=28", f"data.train={shards}",
                            f"train.out_dir={tmp_path / 'runs2'}")
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: data.train=") and "unlabelled" in line and "supervised" in line


def test_resampled_mode_trains_past_its_virtual_epochs_and_saves_the_position(tmp_path):
    shards = write_fashion_subset(tmp_path / "shards", n=96, shard_size=48)  # 2 shards: too few for 1 x 4 in epochs mode
    out = tmp_path / "runs"
    run_pretrain(*TINY, f"data.train={shards}", "data.num_workers=4", "data.resampled=true", f"train.out_dir={out}")
    position = json.loads((only_run_dir(out) / "checkpoints/step-000006/data_position.json").read_text())
    # 4 draws of 48 samples a virtual epoch (192) in batches of 32: 6 batches each; 6 steps = one epoch
    assert position["ranks"] == [{"epoch": 1, "batch": 0}]

    proc = failing_pretrain(*TINY, f"data.train={shards}", "data.num_workers=4", f"train.out_dir={tmp_path / 'r2'}")
    line = proc.stderr.strip().splitlines()[-1]
    assert "2 shards for 1 rank x 4 workers: need >= 4" in line and "data.num_workers=2" in line
    assert "data.resampled=true" in line


def test_corrupt_samples_are_counted_per_shard_in_the_run(tmp_path):
    shards = write_fashion_subset(tmp_path / "shards", n=96, shard_size=48)
    bad = shards / "bad.tar"  # 40 samples: the even ones garbage, so 20 corrupt of 136 read per epoch
    with tarfile.open(bad, "w") as tar:
        for i in range(40):
            payload = b"not a png" if i % 2 == 0 else _png(i)
            for name, data in ((f"b_{i:03d}.png", payload), (f"b_{i:03d}.cls", b"3")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "runs"
    urls = f"{shards}/*.tar"  # a glob: the manifest lists only the good shards
    run_pretrain(*TINY, f"data.train={urls}", "data.num_workers=1", "data.max_corrupt_fraction=0.5",
                 "train.log_every=6", f"train.out_dir={out}")
    run_dir = only_run_dir(out)
    report = json.loads((run_dir / "data_errors.json").read_text())
    assert list(report) == [str(bad)] and report[str(bad)]["skipped"] >= 20
    assert "undecodable" in report[str(bad)]["first_reason"]
    client = MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    assert client.get_metric_history(run_id, "data/skipped")[-1].value >= 20
    assert client.get_metric_history(run_id, "data/bad_shards")[-1].value == 1

    proc = failing_pretrain(*TINY, "train.total_steps=40", f"data.train={urls}", "data.num_workers=1",
                            f"train.out_dir={tmp_path / 'r2'}")
    assert "max_corrupt_fraction" in proc.stderr and "bad.tar" in proc.stderr


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((28, 28), i, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
