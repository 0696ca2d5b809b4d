"""A real `mlflow server` on loopback: the trainer, `eval.run` and `eval.compare` log to it and read
from it over HTTP, and artifacts upload through it. The test starts the server and kills it."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from eval import compare, tracking
from helpers import ROOT, clean_env, only_run_dir, run_pretrain

pytestmark = pytest.mark.slow  # about a minute: a server start, a tiny pretraining, an evaluation

HEALTH_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int, db: Path, artifacts: Path) -> list[str]:
    """The README's command: bound to loopback only; artifacts proxied by the server
    (--artifacts-destination), so clients upload over HTTP; one worker is enough for a test."""
    return [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(artifacts), "--workers", "1"]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Return once GET /health answers OK; fail if the server exits, skip if it is not up in time."""
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode} before answering {url}/health:\n"
                        f"{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    pytest.skip(f"mlflow server did not answer {url}/health within {HEALTH_TIMEOUT_S} s (a busy machine?); "
                f"log tail:\n{log.read_text()[-1500:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (the CLI and its uvicorn worker), SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("mlflow-server")
    url = f"http://127.0.0.1:{free_port()}"
    log = tmp / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            server_command(int(url.rsplit(":", 1)[1]), tmp / "mlflow.db", tmp / "artifacts"), cwd=tmp,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),  # no background job runner: less CPU
        )
    try:
        wait_healthy(url, proc, log)
        yield {"uri": url, "artifacts": tmp / "artifacts", "log": log}
    finally:
        stop(proc)


def test_trainer_eval_and_compare_work_against_a_live_server(server, tmp_path):
    uri = server["uri"]
    run_pretrain("--recipe", "tiny", f"train.out_dir={tmp_path}", "train.total_steps=4", "train.ckpt_every=2",
                 "train.log_every=2", "eval.knn_train_samples=200", env=clean_env(MLFLOW_TRACKING_URI=uri))
    run_dir = only_run_dir(tmp_path)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["tracking_uri"] == uri
    assert not (tmp_path / tracking.DB_NAME).exists() and not (tmp_path / tracking.ARTIFACTS_DIR).exists()

    # eval.run finds the server through run.json alone (no MLFLOW_TRACKING_URI) and logs at each checkpoint's step
    ev = subprocess.run([sys.executable, "-m", "eval.run", str(run_dir), "--knn", "--k", "20", "--train-samples", "200"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, env=clean_env())
    assert ev.returncode == 0, ev.stderr[-3000:]

    client = tracking.client(uri)
    run = client.get_run(info["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["objective"] == "mae" and run.data.params["backbone.dim"] == "32"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]
    history = client.get_metric_history(run.info.run_id, "knn/top1_k20")
    by_step: dict[int, set[float]] = {}
    for m in history:
        by_step.setdefault(m.step, set()).add(m.value)
    assert set(by_step) == {0, 2, 4}  # the trainer scored 0 and 4, eval.run every checkpoint
    assert [len(by_step[s]) for s in (0, 4)] == [1, 1]  # the same checkpoint and bank score the same twice
    assert [m.step for m in client.get_metric_history(run.info.run_id, "minutes")] == [4]

    out_csv = tmp_path / "t.csv"
    cmp = subprocess.run([sys.executable, "-m", "eval.compare", "--tracking-uri", uri, "--csv", str(out_csv), "--log",
                          "--metrics", "knn/top1@20"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=clean_env())
    assert cmp.returncode == 0, cmp.stderr[-3000:]
    with open(out_csv, newline="") as f:
        (row,) = csv.DictReader(f)
    assert row["run_id"] == run.info.run_id and row["steps"] == "4"
    assert float(row["knn/top1@20"]) == pytest.approx(100 * by_step[4].pop(), abs=1e-4) and row["knn/top1@20 step"] == "4"
    assert run_dir.name in cmp.stdout

    # the comparison's artifacts went through the server into its --artifacts-destination
    exp = client.get_experiment_by_name(compare.COMPARE_EXPERIMENT)
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    (logged,) = client.search_runs([exp.experiment_id])
    assert sorted(a.path for a in client.list_artifacts(logged.info.run_id)) == ["compare.csv", "compare.md"]
    (stored,) = server["artifacts"].rglob("compare.csv")
    assert logged.info.run_id in stored.parts and stored.read_text() == out_csv.read_text()


def test_artifact_upload_through_the_server(server, tmp_path):
    uri = server["uri"]
    run_id, _ = tracking.start_run("vit-ssl-pictures", tmp_path / "unused", run_name="upload", uri=uri)
    picture = tmp_path / "attention.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(256))
    tracking.log_artifact(run_id, picture, uri, artifact_path="pictures")
    tracking.end_run(run_id, uri)

    client = tracking.client(uri)
    assert [a.path for a in client.list_artifacts(run_id, "pictures")] == ["pictures/attention.png"]
    (stored,) = server["artifacts"].rglob("attention.png")
    assert run_id in stored.parts and stored.read_bytes() == picture.read_bytes()
    back = Path(client.download_artifacts(run_id, "pictures/attention.png", str(tmp_path / "dl")))
    assert back.read_bytes() == picture.read_bytes()
    assert not (tmp_path / "unused").exists()  # a server store writes nothing on the client's side
