"""The spine end to end, with real shards, a real MLflow store and the real CLI."""
from __future__ import annotations

import json

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from helpers import only_run_dir, run_pretrain, write_fashion_subset

TINY = ["--recipe", "tiny"]


def mlflow_runs(out_dir):
    client = MlflowClient(f"sqlite:///{out_dir.resolve()}/mlflow.db")
    exp = client.get_experiment_by_name("vit-ssl")
    return client, client.search_runs([exp.experiment_id])


def test_tiny_recipe_trains_checkpoints_and_logs_a_knn_score(tmp_path):
    watch = ["eval.knn_every=4", "eval.knn_every_train_samples=500", "eval.knn_every_test_samples=200"]
    proc = run_pretrain(*TINY, f"train.out_dir={tmp_path}", *watch)
    run_dir = only_run_dir(tmp_path)
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step-000000", "step-000005", "step-000010"]  # random init, then every 5 steps
    for name in ckpts:
        files = {p.name for p in (run_dir / "checkpoints" / name).iterdir()}
        assert {"accelerate", "data_position.json", "config.yaml", "backbone.safetensors", "backbone.json"} <= files
    meta = json.loads((run_dir / "checkpoints/step-000010/backbone.json").read_text())
    assert meta["step"] == 10 and meta["objective"] == "mae" and meta["preprocess"]["channels"] == 1

    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["backbone.dim"] == "32"
    knn = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "knn/top1_k20")}
    assert set(knn) == {0, 10} and all(0.1 < v <= 1.0 for v in knn.values())
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6, 8, 10]
    # the kNN watched on a subset while training: every 4 steps, not at the end (the full score is there)
    watched = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "knn_subset/top1_k20")}
    assert set(watched) == {4, 8} and all(0.1 < v <= 1.0 for v in watched.values()), watched
    assert "step 4: kNN top-1@20 on the subset" in proc.stdout
    assert json.loads((run_dir / "run.json").read_text())["mlflow_run_id"] == run.info.run_id
    for line in ("run directory :", "MLflow run    :", "kNN top-1     :", "at random init"):
        assert line in proc.stdout

    # the same command again finds the finished run and trains nothing more
    again = run_pretrain(*TINY, f"train.out_dir={tmp_path}", *watch)
    assert f"resumed from {run_dir}/checkpoints/step-000010 at step 10" in again.stdout
    assert len(mlflow_runs(tmp_path)[1]) == 1


def test_resume_ends_with_the_parameters_of_an_uninterrupted_run(tmp_path):
    # 6 shards x 40 images, batch 32: one epoch is 7 batches, so 12 steps cross an epoch boundary
    shards = write_fashion_subset(tmp_path / "shards", n=240, shard_size=40)
    common = [*TINY, f"data.train={shards}", "data.num_workers=2", "train.total_steps=12", "train.ckpt_every=5"]
    run_pretrain(*common, f"train.out_dir={tmp_path / 'straight'}")
    stopped = run_pretrain(*common, f"train.out_dir={tmp_path / 'resumed'}", "train.stop_at=5")
    assert "stopped at    : step 5 of 12" in stopped.stdout
    resumed = run_pretrain(*common, f"train.out_dir={tmp_path / 'resumed'}")
    assert "at step 5" in resumed.stdout

    def final_state(out):
        return load_file(str(only_run_dir(out) / "checkpoints/step-000012/accelerate/model.safetensors"))

    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the uninterrupted one"
    # and it did train: the weights moved away from the step-5 checkpoint
    mid = load_file(str(only_run_dir(tmp_path / "resumed") / "checkpoints/step-000005/accelerate/model.safetensors"))
    assert not all(torch.equal(a[k], mid[k]) for k in a)


def test_relaunch_with_other_training_settings_is_refused(tmp_path):
    shards = write_fashion_subset(tmp_path / "shards", n=128, shard_size=32)
    common = [*TINY, f"data.train={shards}", f"train.out_dir={tmp_path}", "train.run_name=fixed", "train.total_steps=3"]
    run_pretrain(*common)
    with pytest.raises(AssertionError, match="holds a run with other settings \\(optim.lr\\)"):
        run_pretrain(*common, "optim.lr=0.5")
    with pytest.raises(AssertionError, match="holds a run with other settings \\(backbone.depth, backbone.dim\\)"):
        run_pretrain(*common, "backbone.dim=64", "backbone.depth=3")  # another backbone: refused, never loaded loosely


@pytest.mark.slow
def test_mae_learns_on_real_fashion_mnist(tmp_path):
    """About a minute of MAE on real Fashion-MNIST: the loss falls clearly and the kNN score of the
    backbone rises well above the same backbone's score at random initialisation (measured: 56.6 %
    -> 62.6 % with a 5,000-image memory bank)."""
    run_pretrain(*TINY, f"train.out_dir={tmp_path}", "train.total_steps=300", "train.log_every=20",
                 "train.ckpt_every=300", "backbone.patch_size=4", "backbone.dim=64", "backbone.depth=3",
                 "backbone.heads=4", "objective.decoder_dim=64", "optim.warmup_steps=20", "optim.lr=2e-3",
                 "train.batch_size=128", "eval.knn_train_samples=5000")
    client, (run,) = mlflow_runs(tmp_path)
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert loss[-1] < 0.5 * loss[0], f"loss did not fall clearly: {loss}"
    knn = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "knn/top1_k20")}
    assert knn[300] > knn[0] + 0.03, f"kNN top-1 did not improve on random init: {knn}"
