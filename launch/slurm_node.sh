#!/bin/bash
# One SLURM task per node (started by launch/slurm.sbatch through srun): runs this node's
# `accelerate launch` and passes a stop signal on to the training processes.
#
#   bash launch/slurm_node.sh [pretrain/run.py arguments ...]
#
# Reads SLURM_NODEID (this node's machine rank) and, from slurm.sbatch, VIT_SSL_NODES,
# VIT_SSL_MAIN_IP, VIT_SSL_PORT, VIT_SSL_PROCS_PER_NODE, VIT_SSL_CONFIG.
#
# Why a wrapper (measured with accelerate 1.15 / torch 2.14, see launch/README.md):
# - SLURM delivers a step's signal to every process of the step, launcher included. `accelerate
#   launch` dies on SIGUSR1 (both launchers) and on SIGTERM (single-process launcher) without passing
#   it on, leaving the training processes orphaned; when the task ends, SLURM kills what is left.
#   So the launcher starts with SIGUSR1 and SIGTERM ignored, and the torch elastic agent is told not
#   to take SIGTERM over (PET_SIGNALS_TO_HANDLE): it stays up until its workers have exited.
# - The training processes inherit "ignored" and install their own SIGTERM/SIGUSR1 handlers
#   (checkpoint, exit 75). This wrapper forwards the signal it receives to the launcher's children
#   (the training processes; with SLURM they may also get it directly: one stop request, twice).
# - When one worker exits, the elastic agent SIGTERMs the others and SIGKILLs them after
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30): raised here above train.grace_seconds, so
#   that a checkpoint in progress on a slower rank is not cut (raise both together).
set -u

nodes=${VIT_SSL_NODES:?VIT_SSL_NODES is not set: start this script through launch/slurm.sbatch}
rank=${SLURM_NODEID:?SLURM_NODEID is not set: start this script with srun (one task per node)}
per_node=${VIT_SSL_PROCS_PER_NODE:-1}
tag="[slurm_node $rank]"

(
    trap '' USR1 TERM
    export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGINT,SIGHUP,SIGQUIT}
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}  # > train.grace_seconds (90)
    # --num_processes (the total over all nodes) overrides the config file's count
    exec "${VIT_SSL_ACCELERATE:-accelerate}" launch --num_processes "$((nodes * per_node))" \
        --config_file "${VIT_SSL_CONFIG:-launch/multi_node.yaml}" --num_machines "$nodes" --machine_rank "$rank" \
        --main_process_ip "${VIT_SSL_MAIN_IP:?}" --main_process_port "${VIT_SSL_PORT:?}" \
        pretrain/run.py "$@"
) &
launcher=$!

forward() {
    local children
    children=$(pgrep -P "$launcher" | tr '\n' ' ')
    echo "$tag SIG$1: forwarding SIG$1 to the training processes: ${children:-none running}"
    [ -n "$children" ] && kill -"$1" $children 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

while kill -0 "$launcher" 2>/dev/null; do wait "$launcher"; done  # a trapped signal interrupts wait
wait "$launcher"
rc=$?
echo "$tag accelerate launch exited with $rc"
exit "$rc"
