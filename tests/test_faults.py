"""No lost work: a run killed with SIGKILL, stopped by SIGTERM / SIGUSR1, fed a NaN, short of disk,
handed a malicious or truncated checkpoint or an unreachable MLflow server. Real runs of the CLI,
real Accelerate (1 process, and 2 processes with gloo), real shards, a real filesystem."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, clean_env, only_run_dir, write_fashion_subset

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
PORTS = iter(range(29540, 29580))
TINY_DINO = ["--objective", "dino", "backbone.dim=32", "backbone.depth=2", "backbone.heads=2", "objective.out_dim=128",
             "objective.head_hidden_dim=64", "objective.head_bottleneck_dim=32", "optim.warmup_steps=2",
             "train.batch_size=16", "train.progress=false"]
COMMON = ["train.log_every=1", "train.ckpt_every=4", "train.total_steps=24", "train.keep_last=2", "eval.knn=false",
          "data.num_workers=1"]


def command(objective: str, procs: int, shards: Path, out: Path, *extra: str) -> list[str]:
    args = ["pretrain/run.py", *(["--recipe", "tiny"] if objective == "mae" else TINY_DINO), *COMMON,
            f"data.train={shards}", f"train.out_dir={out}", *extra]
    if procs == 1:
        return [sys.executable, *args]
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(procs), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(next(PORTS)), *args]


def start(cmd: list[str], **env: str) -> subprocess.Popen:
    """A real launch in its own process group (so SIGKILL reaches the launcher and every worker)."""
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=clean_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", **env))


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def run(cmd: list[str], expect: int = 0, **env: str) -> tuple[str, str]:
    code, out, err = finish(start(cmd, **env))
    assert code == expect, f"exit {code}, expected {expect}:\n{out[-3000:]}\n{err[-5000:]}"
    return out, err


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t = time.time()
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared:\n{finish(proc)[2][-3000:]}"
        assert time.time() - t < timeout, f"{path} did not appear"
        time.sleep(0.02)


def per_step(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl as step -> the last record of that step (a relaunch rewrites the steps after its
    checkpoint), without the wall-clock fields."""
    steps: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            steps[record.pop("step")] = {k: v for k, v in record.items() if k not in ("images_per_s", "nonfinite_steps")}
    return steps


def model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "accelerate" / "model.safetensors"))


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_fashion_subset(tmp_path_factory.mktemp("shards") / "fm", n=320, shard_size=40)  # 8 shards


@pytest.mark.parametrize("procs", [1, 2])
@pytest.mark.parametrize("objective", ["mae", "dino"])
def test_a_run_killed_after_a_checkpoint_resumes_bit_identically(objective, procs, shards, tmp_path):
    """SIGKILL to the launch and every worker once a checkpoint exists, then the same command again:
    per-step losses and final parameters (DINO's teacher and centre included) equal an uninterrupted run's."""
    straight = start(command(objective, procs, shards, tmp_path / "straight"))  # side by side: 2 cores
    killed = start(command(objective, procs, shards, tmp_path / "killed"))
    wait_for(tmp_path / "killed", killed)
    run_dir = only_run_dir(tmp_path / "killed")
    wait_for(run_dir / "checkpoints" / "step-000004", killed)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (run_dir / "checkpoints" / "step-000024").exists(), "the kill came too late to test a resume"
    (run_dir / "checkpoints" / ".tmp-step-000028").mkdir()  # what a kill during a checkpoint write leaves
    code, out, err = finish(straight)
    assert code == 0, err[-3000:]
    resumed, _ = run(command(objective, procs, shards, tmp_path / "killed"))

    assert f"resumed from {run_dir}/checkpoints/step-0000" in resumed
    a, b = per_step(only_run_dir(tmp_path / "straight")), per_step(run_dir)
    assert sorted(a) == sorted(b) == list(range(1, 25))
    assert a == b, "per-step losses of the resumed run differ from the uninterrupted run's"
    assert_same_state(model_state(only_run_dir(tmp_path / "straight") / "checkpoints/step-000024"),
                      model_state(run_dir / "checkpoints/step-000024"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000020", "step-000024"]  # keep_last=2


@pytest.mark.parametrize("procs,sig", [(1, signal.SIGTERM), (2, signal.SIGUSR1)])
def test_a_signal_ends_the_run_with_a_checkpoint_and_code_75(procs, sig, shards, tmp_path):
    """The signal reaches the training processes: the step finishes, a
    checkpoint of it is written, the processes exit with 75; the same command resumes from it and
    ends where an uninterrupted run ends."""
    cmd = command("mae", procs, shards, tmp_path / "runs", "train.total_steps=400", "train.ckpt_every=1000")
    proc = start(cmd)
    wait_for(tmp_path / "runs", proc)
    run_dir = only_run_dir(tmp_path / "runs")
    wait_for(run_dir / "metrics.jsonl", proc)
    while len((run_dir / "metrics.jsonl").read_text().splitlines()) < 3:
        time.sleep(0.02)
    if procs == 1:  # to the whole process group, its data-loading worker included (what `timeout` or a shell sends)
        os.killpg(proc.pid, sig)
    else:  # to each training process, as launch/slurm_node.sh forwards it
        workers = training_processes(proc.pid)
        assert len(workers) == procs
        for pid in workers:
            os.kill(pid, sig)
    code, out, err = finish(proc, timeout=120)
    assert f"[vit-ssl] {sig.name}: finishing this step" in err
    stopped = [p for p in (run_dir / "checkpoints").iterdir()]
    assert len(stopped) == 1 and 3 <= int(stopped[0].name[5:]) < 400, stopped
    step = int(stopped[0].name[5:])
    assert f"stopped by {sig.name} after step {step}, checkpointed" in out
    if procs == 1:
        assert code == 75, err[-3000:]
    # the same command, stopped 3 steps later, resumes at the signal's checkpoint and matches a straight run
    more = ["train.total_steps=400", "train.ckpt_every=1000", f"train.stop_at={step + 3}"]
    resumed, _ = run(command("mae", procs, shards, tmp_path / "runs", *more))
    assert f"resumed from {stopped[0]} at step {step}" in resumed
    run(command("mae", procs, shards, tmp_path / "straight", *more))
    straight = only_run_dir(tmp_path / "straight")
    assert per_step(straight) == per_step(run_dir) and len(per_step(straight)) == step + 3
    assert_same_state(model_state(straight / f"checkpoints/step-{step + 3:06d}"),
                      model_state(run_dir / f"checkpoints/step-{step + 3:06d}"))


def training_processes(launcher: int) -> list[int]:
    """The python processes running pretrain/run.py below the launcher (its workers)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = int(next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("PPid:")))
            cmdline = (status.parent / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, StopIteration):
            continue
        if ppid == launcher and "pretrain/run.py" in cmdline:
            found.append(int(status.parent.name))
    return found


def test_a_grace_period_too_short_exits_76_and_keeps_the_previous_checkpoint(shards, tmp_path):
    cmd = command("mae", 1, shards, tmp_path / "runs", "train.total_steps=400", "train.ckpt_every=2",
                  "train.grace_seconds=0.001")
    proc = start(cmd)
    wait_for(tmp_path / "runs", proc)
    run_dir = only_run_dir(tmp_path / "runs")
    wait_for(run_dir / "checkpoints" / "step-000004", proc)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc, timeout=60)
    assert code == 76, err[-2000:]
    assert "the grace period of 0.001 s ran out" in err
    newest = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))[-1]
    resumed, _ = run(cmd[:-1] + ["train.stop_at=" + str(int(newest[5:]) + 1)])
    assert f"resumed from {run_dir}/checkpoints/{newest}" in resumed


def test_a_nan_on_one_rank_of_two_is_skipped_by_both_then_stops_the_run(shards, tmp_path):
    """tests/nan_check.py makes rank 1's loss NaN at step 3 and at steps 6-8 (its gradient stays
    finite, so only the reduced decision keeps rank 0 from stepping): step 3 is skipped on both ranks
    and counted, steps 6-8 reach train.max_nonfinite_steps=3 and stop both ranks with a checkpoint of
    the last good state; no hang."""
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(next(PORTS)), "tests/nan_check.py", str(tmp_path),
           "3,6,7,8", "--recipe", "tiny", *COMMON, f"data.train={shards}", f"train.out_dir={tmp_path / 'runs'}",
           "train.ckpt_every=5", "train.total_steps=20", "train.max_nonfinite_steps=3"]
    code, out, err = finish(start(cmd), timeout=300)
    report = json.loads((tmp_path / "report.json").read_text())
    assert "not finite in 3 steps in a row (steps 6-8" in report["error"] and "the parameters after step 5" in report["error"]
    assert report["params_identical"], "ranks diverged: one stepped while the other skipped"
    assert "step 3: the loss or gradient norm is not finite on some process: step skipped" in out
    run_dir = only_run_dir(tmp_path / "runs")
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000005", "step-000008"]
    assert_same_state(model_state(ckpts / "step-000005"), model_state(ckpts / "step-000008"))  # nothing moved
    steps = per_step(run_dir)
    assert sorted(steps) == [1, 2, 4, 5], "skipped steps must not log a loss"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["nonfinite_steps"] for r in records}[3] == 1
    # torch elastic's report: the ranks exited 3 (the agent SIGTERMs a rank that has not exited yet)
    assert code != 0 and "exitcode  : 3" in err and "SIGABRT" not in err, err[-3000:]


def test_refused_checkpoint_files_on_resume(shards, tmp_path):
    """A relaunch verifies the newest checkpoint before reading it: a malicious pickle in place of the
    optimizer state or an RNG state is refused unread (its payload never runs), a truncated weights
    file is named; each with exit code 2 and the way out."""
    cmd = command("mae", 1, shards, tmp_path / "runs", "train.stop_at=4")
    run(cmd)
    state = only_run_dir(tmp_path / "runs") / "checkpoints" / "step-000004" / "accelerate"
    marker = tmp_path / "pwned"
    original = {p.name: p.read_bytes() for p in state.iterdir()}
    for name in ("optimizer.bin", "random_states_0.pkl"):
        torch.save({"state": Payload(str(marker))}, state / name)
        _, err = run(cmd, expect=2)
        assert f"error: checkpoint file {state / name} holds objects other than tensors" in err
        assert "refused unread" in err and "Traceback" not in err
        assert not marker.exists(), "the pickle's payload ran"
        (state / name).write_bytes(original[name])
    (state / "model.safetensors").write_bytes(original["model.safetensors"][:-100])
    _, err = run(cmd, expect=2)
    assert f"error: checkpoint file {state / 'model.safetensors'} is unreadable" in err and "move " in err
    (state / "model.safetensors").write_bytes(original["model.safetensors"])
    # the launcher's precision is part of what was trained: another one is refused, naming it
    _, err = run(cmd, expect=2, ACCELERATE_MIXED_PRECISION="bf16")
    assert "holds a run with other settings (the launch's mixed precision, no -> bf16)" in err
    resumed, _ = run(cmd[:-1] + ["train.stop_at=5"])
    assert "at step 4" in resumed


def test_a_run_resumes_on_another_number_of_processes(shards, tmp_path):
    """Written by 1 process, resumed by 2 (new ranks have no RNG state of their own): it goes on
    from the checkpoint's step and epoch, and the 2 ranks end with one set of parameters."""
    run(command("mae", 1, shards, tmp_path, "train.stop_at=4"))
    out, err = run(command("mae", 2, shards, tmp_path, "train.stop_at=6"))
    assert "was written by 1 process(es): the data stream restarts epoch 0" in out
    assert "resumed from" in out and "at step 4" in out
    assert (only_run_dir(tmp_path) / "checkpoints" / "step-000006").is_dir()


class Payload:
    """Unpickling this runs `touch PATH`: what a malicious checkpoint would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_an_unreachable_mlflow_server_leaves_the_run_logging_locally(shards, tmp_path):
    out, err = run(command("mae", 1, shards, tmp_path, "train.total_steps=4"), MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    assert "MLflow tracking server http://127.0.0.1:9 is unreachable" in err and "logs to the local store" in err
    run_dir = only_run_dir(tmp_path)
    assert sorted(per_step(run_dir)) == [1, 2, 3, 4]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("vit-ssl").experiment_id])
    assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "loss")] == [1, 2, 3, 4]


def test_a_full_disk_during_a_checkpoint_write_keeps_the_previous_one(shards, tmp_path):
    """A real small filesystem (tmpfs) filled up between two checkpoints: the write fails with a clear
    error, the previous checkpoint stays intact and newest, and the run resumes once there is room."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        cmd = command("mae", 1, shards, disk, "backbone.dim=64", "train.total_steps=8")
        run(cmd[:] + ["train.stop_at=4"])
        ckpt = only_run_dir(disk) / "checkpoints" / "step-000004"
        before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
        used = shutil.disk_usage(disk).used
        size = sum(len(b) for b in before.values())
        subprocess.run(["mount", "-o", f"remount,size={used + size // 3}", str(disk)], check=True)
        _, err = run(cmd, expect=2)
        assert "error: could not write checkpoint" in err and "MiB free on that disk" in err, err[-2000:]
        assert "step-000004 is intact and is where a relaunch resumes" in err
        assert sorted(p.name for p in ckpt.parent.iterdir()) == ["step-000004"]  # no half-written folder left
        assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        resumed, _ = run(cmd)
        assert "at step 4" in resumed and (ckpt.parent / "step-000008").is_dir()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_launch_that_asked_for_two_processes_but_got_one_is_refused(tmp_path):
    """STACK.md: `accelerate launch --num_processes 2` without --multi_gpu on a CPU runs one process."""
    cmd = [ACCELERATE, "launch", "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
           "pretrain/run.py", "--recipe", "tiny", f"train.out_dir={tmp_path}"]
    code, out, err = finish(start(cmd), timeout=120)
    assert code != 0
    assert "error: the launch asked for 2 processes but they do not form one 2-process job" in err
    assert not any(tmp_path.glob("*/checkpoints"))


def test_corrupt_data_on_one_rank_stops_both_ranks_with_the_error(shards, tmp_path):
    """One shard of garbage images, read by one rank only: both ranks stop with that rank's error
    (exit, never a hang in a collective the failing rank has left) and the report names the shard."""
    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    victim = sorted(bad.glob("*.tar"))[3]
    garble_images(victim)
    cmd = command("mae", 2, bad, tmp_path / "runs", "data.max_corrupt_fraction=0.01", "train.total_steps=40")
    code, out, err = finish(start(cmd), timeout=240)
    assert code != 0
    assert "error: " in err and "samples read were corrupt" in err and victim.name in err
    report = json.loads((only_run_dir(tmp_path / "runs") / "data_errors.json").read_text())
    assert [Path(url).name for url in report] == [victim.name]


def garble_images(shard: Path) -> None:
    """Rewrite a tar shard with every image's bytes replaced by noise (the tar itself stays valid)."""
    import io
    import tarfile

    members = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            members.append((m, os.urandom(len(data)) if m.name.endswith((".png", ".jpg")) else data))
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
