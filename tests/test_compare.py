"""`python -m eval.compare` against real sqlite stores: runs written the way the trainer's RunLog
writes them (eval.tracking, same tags and metric names), and one real tiny pretraining run."""
from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from eval import compare, tracking
from helpers import ROOT, clean_env, only_run_dir, run_pretrain

CONFIG = {"backbone": {"name": "vit", "dim": 32}, "objective": {"name": "mae"}, "train": {"total_steps": 10}}


@pytest.fixture(autouse=True)
def no_env_store(monkeypatch):
    monkeypatch.delenv(tracking.ENV_URI, raising=False)


def pretraining_run(root: Path, name: str, objective: str, logs: list[tuple[int, dict[str, float]]],
                    minutes: float | None = None, finished: bool = True) -> str:
    """A run of experiment vit-ssl as pretrain.tracking.RunLog writes it; `logs` in write order."""
    tags = {"objective": objective, "backbone": "vit", "run_dir": str(root / name), "recipe": "None"}
    run_id, uri = tracking.start_run(compare.PRETRAIN_EXPERIMENT, root, run_name=name, tags=tags, uri=store_uri(root))
    tracking.log_params(run_id, {**CONFIG, "objective": {"name": objective}}, uri)
    for step, metrics in logs:
        tracking.log_metrics(run_id, metrics, step, uri)
    if minutes is not None:
        tracking.log_metrics(run_id, {"minutes": minutes}, logs[-1][0], uri)
    if finished:
        tracking.end_run(run_id, uri)
    return run_id


def linked_run(root: Path, experiment: str, parent: str, logs: list[tuple[int, dict[str, float]]]) -> str:
    """An evaluation run tagged with its pretraining run as parent (what `eval.run --eval-run` writes)."""
    run_id, uri = tracking.start_run(experiment, root, run_name="eval-x", tags={compare.PARENT_TAG: parent},
                                     uri=store_uri(root))
    for step, metrics in logs:
        tracking.log_metrics(run_id, metrics, step, uri)
    tracking.end_run(run_id, uri)
    return run_id


def store_uri(root: Path) -> str:
    return f"sqlite:///{root.resolve()}/{tracking.DB_NAME}"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, str]:
    """Three pretraining runs, two linked evaluation runs and a run of another experiment (built
    once: creating a sqlite store's tables takes seconds; tests only add runs of other experiments)."""
    root = tmp_path_factory.mktemp("store") / "runs"
    root.mkdir()
    mae = pretraining_run(root, "mae-a", "mae", [
        (0, {"knn/top1@20": 0.30}), (2, {"loss": 1.0}), (10, {"loss": 0.5}),
        (10, {"knn/top1@20": 0.60, "knn/top5@20": 0.9, "linear/top1": 0.70}),
        (5, {"knn/top1@20": 0.99}),  # a middle checkpoint scored afterwards: not the run's last step
    ], minutes=1.5)
    dino = pretraining_run(root, "dino-b", "dino", [
        (0, {"knn/top1@20": 0.20}), (20, {"loss": 2.0, "knn/top1@20": 0.80})], minutes=3.3)
    empty = pretraining_run(root, "simmim-c", "simmim", [], finished=False)
    # dino-b's evaluation run: a linear and a fine-tune score at step 20, an older kNN at step 10
    linked_run(root, "vit-ssl-eval", dino, [(10, {"knn/top1@20": 0.5}), (20, {"linear/top1": 0.75, "finetune/top1": 0.9})])
    # a child run inside the pretraining experiment counts for its parent and is no row of its own
    linked_run(root, compare.PRETRAIN_EXPERIMENT, mae, [(10, {"finetune/top1": 0.65})])
    tracking.start_run("other", root, run_name="not-a-pretraining-run", uri=store_uri(root))
    return {"root": str(root), "mae": mae, "dino": dino, "empty": empty}


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {row["run"]: row for row in csv.DictReader(f)}


def table_names(markdown: str) -> list[str]:
    """Run names of a printed table, top to bottom."""
    return [line.split("|")[1].strip() for line in markdown.splitlines()[2:]]


def test_table_has_each_runs_last_step_scores_and_its_linked_runs_scores(store, tmp_path, capsys):
    assert compare.main(["--runs-root", store["root"], "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    rows = read_csv(tmp_path / "t.csv")
    assert set(rows) == {"mae-a", "dino-b", "simmim-c"}  # no child run, no other experiment
    mae, dino, empty = rows["mae-a"], rows["dino-b"], rows["simmim-c"]
    assert (mae["run_id"], mae["objective"], mae["backbone"], mae["status"]) == (store["mae"], "mae", "vit", "FINISHED")
    # kNN at step 10 (its latest step), not the step-5 value written after it
    assert (mae["knn/top1@20"], mae["knn/top1@20 step"], mae["steps"], mae["minutes"]) == ("60.0000", "10", "10", "1.500")
    assert (mae["linear/top1"], mae["finetune/top1"]) == ("70.0000", "65.0000")  # fine-tune from the child run
    # dino: its own kNN at step 20 beats the linked run's step-10 kNN; linear and fine-tune come from the linked run
    assert (dino["knn/top1@20"], dino["knn/top1@20 step"]) == ("80.0000", "20")
    assert (dino["linear/top1"], dino["finetune/top1"], dino["steps"], dino["minutes"]) == ("75.0000", "90.0000", "20", "3.300")
    assert (empty["status"], empty["steps"], empty["minutes"], empty["knn/top1@20"]) == ("RUNNING", "", "", "")

    lines = {name: line for name, line in zip(table_names(out), out.splitlines()[2:])}
    assert [c.strip() for c in out.splitlines()[0].split("|")[1:-1]] == [
        "run", "id", "objective", "backbone", "status", "steps", "minutes", "knn/top1@20", "linear/top1", "finetune/top1"]
    assert [c.strip() for c in lines["dino-b"].split("|")[1:-1]] == [
        "dino-b", store["dino"][:8], "dino", "vit", "FINISHED", "20", "3.3", "80.00", "75.00", "90.00"]
    assert [c.strip() for c in lines["simmim-c"].split("|")[6:-1]] == ["-"] * 5


def test_sort_by_a_score_or_by_minutes_puts_runs_without_it_last(store, capsys):
    assert compare.main(["--runs-root", store["root"], "--sort", "knn/top1@20"]) == 0
    assert table_names(capsys.readouterr().out) == ["dino-b", "mae-a", "simmim-c"]
    assert compare.main(["--runs-root", store["root"], "--sort", "minutes", "--metrics", "knn/top1_k20"]) == 0
    out = capsys.readouterr().out
    assert table_names(out) == ["mae-a", "dino-b", "simmim-c"]
    assert "knn/top1_k20" in out.splitlines()[0] and "linear/top1" not in out  # only the asked columns
    assert compare.main(["--runs-root", store["root"], "--sort", "knn/top1_k20", "--metrics", "knn/top1@20"]) == 0
    assert table_names(capsys.readouterr().out)[0] == "dino-b"  # a score named as MLflow writes it


def test_log_records_the_table_as_artifacts_of_a_compare_run(store, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory's ./mlruns
    assert compare.main(["--runs-root", store["root"], "--log", "--csv", "t.csv"]) == 0
    printed = capsys.readouterr().out
    uri = f"sqlite:///{Path(store['root']).resolve()}/mlflow.db"
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(compare.COMPARE_EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["runs"] == "3" and run.data.params["experiment"] == "vit-ssl"
    assert run.data.metrics == {}  # the table only: the scores stay in the runs they belong to
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["compare.csv", "compare.md"]
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl")))
    assert (local / "compare.md").read_text() == printed
    assert (local / "compare.csv").read_text() == (tmp_path / "t.csv").read_text()
    assert exp.artifact_location == (Path(store["root"]).resolve() / tracking.ARTIFACTS_DIR).as_uri()
    assert not (tmp_path / "mlruns").exists()
    # the comparison run is no pretraining run: the next table still has three rows
    assert compare.main(["--runs-root", store["root"]]) == 0
    assert len(table_names(capsys.readouterr().out)) == 3


def test_bad_options_are_one_line_errors_with_exit_2(store, tmp_path, capsys):
    assert compare.main(["--runs-root", store["root"], "--experiment", "vit-sl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'vit-sl'" in err and "vit-ssl" in err and "--experiment" in err
    assert compare.main(["--runs-root", store["root"], "--sort", "knn/top1@200"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sort 'knn/top1@200'" in err and "minutes" in err
    with socket.socket() as s:  # a loopback port nothing listens on: fail at once, not after MLflow's retries
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert compare.main(["--tracking-uri", dead]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no MLflow server answers at {dead}" in err


def test_missing_store_is_an_error_and_not_created(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "eval.compare", "--runs-root", str(tmp_path / "nowhere")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=clean_env())
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and f"no MLflow store at {tmp_path / 'nowhere' / 'mlflow.db'}" in proc.stderr
    assert "--runs-root" in proc.stderr
    assert not (tmp_path / "nowhere").exists()


def test_real_pretraining_run_and_its_evaluation_run(tmp_path):
    """What the trainer and `eval.run --eval-run` actually write, read back by the CLI: kNN@20 from
    the trainer's final checkpoint score, kNN@10 only from the linked evaluation run."""
    run_pretrain("--recipe", "tiny", f"train.out_dir={tmp_path}", "train.total_steps=4", "train.ckpt_every=2",
                 "train.log_every=2", "eval.knn_train_samples=200")
    run_dir = only_run_dir(tmp_path)
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    ev = subprocess.run([sys.executable, "-m", "eval.run", str(run_dir), "--knn", "--k", "10", "--eval-run",
                         "--train-samples", "200"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=clean_env())
    assert ev.returncode == 0, ev.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "eval.compare", "--runs-root", str(tmp_path), "--csv", str(tmp_path / "t.csv"),
                           "--metrics", "knn/top1@20", "knn/top1@10", "--sort", "knn/top1@10"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]

    client = tracking.client(store_uri(tmp_path))
    run = client.get_run(run_id)
    knn = {m.step: m.value for m in client.get_metric_history(run_id, "knn/top1_k20")}
    assert set(knn) == {0, 4}  # random init and the final checkpoint
    assert client.get_metric_history(run_id, "knn/top1_k10") == []
    (child,) = client.search_runs([client.get_experiment_by_name(compare.EVAL_EXPERIMENT).experiment_id])
    assert child.data.tags[compare.PARENT_TAG] == run_id
    knn10 = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "knn/top1_k10")}
    assert set(knn10) == {0, 2, 4}  # every checkpoint of the run folder

    (row,) = read_csv(tmp_path / "t.csv").values()
    assert (row["run_id"], row["run"], row["objective"], row["backbone"]) == (run_id, run_dir.name, "mae", "vit")
    assert row["status"] == "FINISHED" and row["steps"] == "4"
    assert float(row["minutes"]) == pytest.approx(run.data.metrics["minutes"], abs=1e-3)
    assert (float(row["knn/top1@20"]), row["knn/top1@20 step"]) == (pytest.approx(100 * knn[4], abs=1e-4), "4")
    assert (float(row["knn/top1@10"]), row["knn/top1@10 step"]) == (pytest.approx(100 * knn10[4], abs=1e-4), "4")
    assert f"{100 * knn[4]:.2f}" in proc.stdout.splitlines()[2] and run_dir.name in proc.stdout
