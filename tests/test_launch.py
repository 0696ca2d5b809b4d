"""The launch paths of launch/, run for real on this CPU: the Accelerate config files, torchrun,
two "nodes" over loopback, and the SLURM batch script's stop-requeue-resume cycle.

The GPU configs (gpu_1, gpu_ddp, fsdp, multi_node) cannot train here: they are checked through
Accelerate's own config loader and launch-argument validation, and multi_node's CPU twin is the
two-node test."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, clean_env, write_fashion_subset, write_id_shards

BIN = Path(sys.executable).parent
LAUNCH = ROOT / "launch"
# every config file and the distributed type it promises
CONFIGS = {"cpu_2proc.yaml": "MULTI_GPU", "gpu_1.yaml": "NO", "gpu_ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP",
           "multi_node.yaml": "MULTI_GPU"}
TINY = ["--recipe", "tiny", "eval.knn=false", "data.num_workers=1", "train.batch_size=16"]
CPU_ENV = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def run(cmd: list[str], env: dict, timeout: int = 300) -> str:
    """Run a launch to its end; its stdout and stderr together, after asserting it succeeded."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def assert_one_two_process_job(output: str, global_batch: int = 32) -> None:
    """The trainer's start line names the world size and global batch; one process wrote the summary."""
    assert "2 process(es)" in output and f"global batch {global_batch}" in output, output[-3000:]
    assert output.count("run directory :") == 1


# ---------------------------------------------------------------------------------------------
# config files
# ---------------------------------------------------------------------------------------------


def test_every_config_loads_with_accelerates_loader_and_names_its_distributed_type():
    from accelerate.commands.config.config_args import load_config_from_file

    assert sorted(p.name for p in LAUNCH.glob("*.yaml")) == sorted(CONFIGS)
    loaded = {name: load_config_from_file(str(LAUNCH / name)) for name in CONFIGS}
    assert {name: c.distributed_type.name for name, c in loaded.items()} == CONFIGS
    assert loaded["cpu_2proc.yaml"].use_cpu and loaded["cpu_2proc.yaml"].num_processes == 2
    assert loaded["cpu_2proc.yaml"].mixed_precision == "no"
    for name in ("gpu_1.yaml", "gpu_ddp.yaml", "fsdp.yaml", "multi_node.yaml"):
        assert loaded[name].mixed_precision == "bf16" and not loaded[name].use_cpu, name
    assert loaded["multi_node.yaml"].num_machines > 1
    fsdp = loaded["fsdp.yaml"].fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and fsdp["fsdp_transformer_layer_cls_to_wrap"] == "Block"


def launch_environment(config: str, *flags: str) -> tuple[str, dict, dict]:
    """What `accelerate launch --config_file CONFIG FLAGS pretrain/run.py` would start, without
    starting it: the launcher (simple / elastic), its torch-elastic arguments and the processes' environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(LAUNCH / config), *flags, "pretrain/run.py"])
    args, _, _ = _validate_launch_command(args)
    if args.multi_gpu or args.use_fsdp:
        env = prepare_multi_gpu_env(args)
        return "elastic", {k: getattr(args, k, None) for k in ("nproc_per_node", "nnodes", "node_rank")}, env
    return "simple", {}, prepare_simple_launcher_cmd_env(args)[1]


def test_each_config_gives_the_processes_the_launch_it_promises():
    """Accelerate's own launch validation turns each file into the launcher and environment the
    trainer's Accelerator reads; the FSDP plugin builds from it and wraps a class our models use."""
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment

    from pretrain.config import build_config
    from pretrain.train import build_objective

    port = ("--main_process_port", "29649")  # checked for being free, never bound
    launcher, _, env = launch_environment("gpu_1.yaml")
    assert launcher == "simple" and env["ACCELERATE_MIXED_PRECISION"] == "bf16" and env["ACCELERATE_USE_CPU"] == "False"
    launcher, topo, env = launch_environment("gpu_ddp.yaml", "--num_processes", "4", *port)
    assert launcher == "elastic" and topo["nproc_per_node"] == "4" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    launcher, topo, _ = launch_environment("multi_node.yaml", "--num_machines", "2", "--machine_rank", "1",
                                           "--main_process_ip", "10.0.0.1", "--num_processes", "16", *port)
    assert launcher == "elastic" and topo == {"nproc_per_node": "8", "nnodes": "2", "node_rank": 1}
    launcher, topo, env = launch_environment("fsdp.yaml", *port)
    assert launcher == "elastic" and topo["nproc_per_node"] == "8" and env["ACCELERATE_USE_FSDP"] == "true"
    with patch_environment(**{k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.transformer_cls_names_to_wrap == ["Block"]
    for recipe in ("mae", "dino"):
        classes = {type(m).__name__ for m in build_objective(build_config(None, recipe, [])).modules()}
        assert "Block" in classes, f"fsdp.yaml wraps Block, which the {recipe} recipe's model does not use"


def test_the_command_lines_process_count_wins_over_the_config_files(tmp_path):
    """`accelerate launch --config_file launch/gpu_ddp.yaml --num_processes 2` starts 2 processes
    (Accelerate lets the command line override the file), so the trainer's launch check must expect
    2, not the file's 8. Checked on the function that reads the launcher's command line, under a
    parent process whose command line is that launch (a stand-in named `accelerate`)."""
    stand_in = tmp_path / "accelerate"
    stand_in.write_text(f"#!{sys.executable}\nimport subprocess, sys\nsys.exit(subprocess.call([sys.executable, '-c', "
                        "'from pretrain.train import requested_processes; print(requested_processes())']))\n")
    stand_in.chmod(0o755)
    cmd = [str(stand_in), "launch", "--config_file", "launch/gpu_ddp.yaml", "--num_processes", "2", "pretrain/run.py"]
    assert run(cmd, clean_env(PYTHONPATH=str(ROOT))).strip().splitlines()[-1] == "2"


# ---------------------------------------------------------------------------------------------
# several processes on one machine: the CPU config file, torchrun
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_fashion_subset(tmp_path_factory.mktemp("fm") / "shards", n=256, shard_size=32)


def test_cpu_config_file_forms_one_two_process_job(tmp_path, shards):
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", "launch/cpu_2proc.yaml", "--main_process_port", "29620",
           "pretrain/run.py", *TINY, f"data.train={shards}", f"train.out_dir={tmp_path}", "train.total_steps=4"]
    assert_one_two_process_job(run(cmd, clean_env(**CPU_ENV)))


def test_torchrun_recipe_forms_one_two_process_job(tmp_path, shards):
    env = clean_env(**CPU_ENV, NPROC_PER_NODE="2", RDZV_ENDPOINT="127.0.0.1:29621", TORCHRUN=str(BIN / "torchrun"))
    cmd = ["bash", "launch/torchrun.sh", *TINY, f"data.train={shards}", f"train.out_dir={tmp_path}", "train.total_steps=4"]
    assert_one_two_process_job(run(cmd, env))


# ---------------------------------------------------------------------------------------------
# two "nodes" over loopback
# ---------------------------------------------------------------------------------------------


def test_two_nodes_over_loopback_train_as_one_job(tmp_path, shards):
    """Two launches at once, one process each, joined by --num_machines 2 --machine_rank 0|1 over
    127.0.0.1: one world of 2, disjoint data, identical parameters, one writer (tests/dist_check.py)."""
    from mlflow import MlflowClient

    id_shards = write_id_shards(tmp_path / "ids", n=200, shard_size=25)  # 8 shards = 2 ranks x 2 workers x 2
    out = tmp_path / "runs"
    script = ["tests/dist_check.py", str(tmp_path), str(id_shards), f"data.train={shards}", f"train.out_dir={out}",
              "train.total_steps=6", "train.ckpt_every=3", "data.num_workers=1", "train.batch_size=16"]
    nodes = [subprocess.Popen(
        [str(BIN / "accelerate"), "launch", "--config_file", "launch/cpu_2proc.yaml", "--num_machines", "2",
         "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", "29622",
         "--num_processes", "2", *script],
        cwd=ROOT, env=clean_env(**CPU_ENV), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank} exited {node.returncode}:\n{output[-5000:]}"
    report = json.loads((tmp_path / "report.json").read_text())

    assert report["world_size"] == 2 and report["result_world_size"] == 2
    a, b = (set(ids) for ids in report["ids_per_rank"])
    assert not a & b, "the two nodes read the same samples"
    assert a | b == set(range(200)) and len(a) + len(b) == 200
    assert report["params_identical"]
    assert "2 process(es)" in outputs[0] and "global batch 32" in outputs[0]
    # one writer: one MLflow run, each checkpoint once, one summary over both nodes
    client = MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    assert len(client.search_runs([client.get_experiment_by_name("vit-ssl").experiment_id])) == 1
    run_dir = Path(report["run_dir"])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    assert sorted(p.name for p in (run_dir / "checkpoints/step-000006/accelerate").glob("random_states_*.pkl")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert sum(o.count("run directory :") for o in outputs) == 1


# ---------------------------------------------------------------------------------------------
# SLURM: stop on the time-limit signal, requeue, resume
# ---------------------------------------------------------------------------------------------

JOB_ID = "4242"


def slurm_env(tmp_path: Path, port: int) -> dict:
    """What SLURM gives a 2-node batch job, with the shims first on PATH and the CPU config."""
    return clean_env(
        **CPU_ENV, PATH=f"{ROOT / 'tests/slurm_shims'}:{BIN}:{os.environ['PATH']}", SLURM_JOB_ID=JOB_ID,
        SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[01-02]", SLURM_SUBMIT_DIR=str(ROOT),
        SLURM_SHIM_LOG=str(tmp_path / "scontrol.log"), VIT_SSL_CONFIG="launch/cpu_2proc.yaml",
        VIT_SSL_PROCS_PER_NODE="1", VIT_SSL_PORT=str(port))


def batch_job(tmp_path: Path, args: list[str], port: int, name: str, usr1_when=None, timeout: float = 240) -> tuple[int, str]:
    """`bash launch/slurm.sbatch ARGS` as SLURM would start it; SIGUSR1 to the batch shell (SLURM's
    --signal=B:USR1) once usr1_when() is true. Returns (exit code, output)."""
    log = tmp_path / f"{name}.out"
    with open(log, "w") as sink:
        job = subprocess.Popen(["bash", "launch/slurm.sbatch", *args], cwd=ROOT, env=slurm_env(tmp_path, port),
                               stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while usr1_when is not None and job.poll() is None and time.time() < deadline:
            if usr1_when(log.read_text()):
                job.send_signal(signal.SIGUSR1)
                break
            time.sleep(0.2)
        job.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        if job.poll() is None:  # leave nothing running behind a failed test (torch elastic's
            for pid in [job.pid, *descendants(job.pid)]:  # workers are in sessions of their own)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            job.wait()
    return job.returncode, log.read_text()


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def forwarded_to(output: str) -> list[int]:
    """The training processes each node wrapper sent the stop signal to."""
    lines = re.findall(r"\[slurm_node \d\] SIGUSR1: forwarding SIGUSR1 to the training processes: ([\d ]+)", output)
    return [int(pid) for line in lines for pid in line.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_slurm_script_stops_on_usr1_requeues_and_resumes(tmp_path, shards):
    """launch/slurm.sbatch on 2 "nodes": SIGUSR1 to the batch shell reaches the training process
    on each node, which checkpoints and exits; the script requeues the job; running it again resumes.

    srun and scontrol are shims (tests/slurm_shims/) because SLURM is not installed here: srun starts
    the node wrapper once per node and forwards signals to it, scontrol answers `show hostnames` with
    127.0.0.1 and records `requeue JOBID`. bash, the node wrapper, Accelerate, torch elastic and the
    trainer are real."""
    out = tmp_path / "runs"
    # a fixed run name: the default name hashes total_steps, which the relaunch below changes
    args = [*TINY, f"data.train={shards}", f"train.out_dir={out}", "train.run_name=slurm", "train.ckpt_every=2"]
    requeues = tmp_path / "scontrol.log"

    code, first = batch_job(tmp_path, [*args, "train.total_steps=1000"], 29623, "first",
                            usr1_when=lambda _: any(out.glob("*/checkpoints/step-*")))
    assert code == 0, first[-6000:]
    assert requeues.read_text() == f"requeue {JOB_ID}\n", first[-6000:]
    trainers = forwarded_to(first)
    assert len(trainers) == 2, first[-6000:]  # one training process per node got the signal from its wrapper
    assert not [pid for pid in trainers if alive(pid)], "training processes outlived the job"
    stopped = re.search(r"stopped by SIGUSR1 after step (\d+), checkpointed", first)
    assert stopped, first[-6000:]
    step = int(stopped.group(1))
    assert 2 <= step < 1000
    ckpt = out / "slurm/checkpoints" / f"step-{step:06d}"
    assert ckpt.is_dir(), sorted(p.name for p in ckpt.parent.iterdir())
    # The trainer's exit code 75 (pretrain/guard.py EXIT_PREEMPTED), as torch elastic reports it for
    # each node's worker; `accelerate launch` itself exits 1, which is why the requeue follows the signal.
    assert first.count("exitcode  : 75") == 2, first[-6000:]
    assert first.count("accelerate launch exited with 1") == 2

    # The relaunch (what the requeued job runs), with a shorter total_steps (a setting a relaunch may
    # change) so that it ends in seconds: it resumes from that checkpoint, finishes, and is not requeued.
    code, second = batch_job(tmp_path, [*args, f"train.total_steps={step + 2}"], 29624, "second")
    assert code == 0, second[-6000:]
    assert f"resumed from {ckpt} at step {step}" in second, second[-6000:]
    assert (ckpt.parent / f"step-{step + 2:06d}").is_dir()
    assert requeues.read_text() == f"requeue {JOB_ID}\n"
    assert mlflow_run(second) == mlflow_run(first), "the resumed run logs to another MLflow run"


def mlflow_run(output: str) -> str:
    """The MLflow run id of the summary the main process prints."""
    found = re.findall(r"MLflow run +: (\w+)", output)
    assert len(found) == 1, output[-3000:]
    return found[0]
