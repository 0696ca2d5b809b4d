"""Two real processes (Accelerate, gloo, on the CPU): world size, disjoint data, identical
parameters, and one writer of checkpoints and of the MLflow run."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from mlflow import MlflowClient

from helpers import ROOT, clean_env, write_fashion_subset, write_id_shards


def test_two_processes_train_in_step(tmp_path):
    id_shards = write_id_shards(tmp_path / "ids", n=200, shard_size=25)  # 8 shards = 2 ranks x 2 workers x 2
    shards = write_fashion_subset(tmp_path / "fm", n=512, shard_size=64)
    out = tmp_path / "runs"
    accelerate = shutil.which("accelerate", path=str(Path(__import__("sys").executable).parent))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "tests/dist_check.py", str(tmp_path), str(id_shards),
           f"data.train={shards}", f"train.out_dir={out}", "train.total_steps=6", "train.ckpt_every=3",
           "data.num_workers=2", "train.batch_size=16"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=clean_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())

    assert report["world_size"] == 2 and report["result_world_size"] == 2
    a, b = (set(ids) for ids in report["ids_per_rank"])
    assert not a & b, "ranks read the same samples"
    assert a | b == set(range(200)) and len(report["ids_per_rank"][0]) + len(report["ids_per_rank"][1]) == 200
    assert report["params_identical"]
    assert "2 process(es)" in proc.stdout and "global batch 32" in proc.stdout

    # one writer: one MLflow run, each checkpoint once and complete, nothing half-written
    client = MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("vit-ssl").experiment_id])
    assert len(runs) == 1
    run_dir = Path(report["run_dir"])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    ckpt = run_dir / "checkpoints/step-000006"
    positions = json.loads((ckpt / "data_position.json").read_text())
    assert positions["world_size"] == 2 and len(positions["ranks"]) == 2
    # Accelerate keeps each rank's RNG state (needed for exact resume); the rest exists once
    assert sorted(p.name for p in (ckpt / "accelerate").glob("random_states_*.pkl")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert proc.stdout.count("run directory :") == 1


def test_a_launch_whose_processes_do_not_form_one_job_is_refused(tmp_path):
    """STACK.md: `--multi_gpu` without ACCELERATE_USE_CPU=1 on a machine with no GPU starts two
    independent single-process runs; the trainer must stop instead of training twice."""
    accelerate = shutil.which("accelerate", path=str(Path(__import__("sys").executable).parent))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29518",
           "pretrain/run.py", "--recipe", "tiny", f"train.out_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=clean_env(OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    assert "do not form one 2-process job" in proc.stderr and "ACCELERATE_USE_CPU=1" in proc.stderr
    assert not any(tmp_path.glob("*/checkpoints"))
