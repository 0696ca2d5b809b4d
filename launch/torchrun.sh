#!/bin/bash
# Pretraining under torchrun instead of `accelerate launch` (the trainer's Accelerator reads the
# environment torchrun sets up).
#
#   one machine, all its GPUs:   bash launch/torchrun.sh --recipe R [section.key=value ...]
#   several machines, on each:   NNODES=2 RDZV_ENDPOINT=HOST0:29500 bash launch/torchrun.sh --recipe R ...
#   several CPU processes:       ACCELERATE_USE_CPU=1 NPROC_PER_NODE=2 bash launch/torchrun.sh --recipe tiny
#
# NNODES (1), NPROC_PER_NODE (gpu = one per visible GPU), RDZV_ENDPOINT (127.0.0.1:29500: the
# c10d store, hosted by whichever node owns that address) and RDZV_ID (vit-ssl: the same on all
# nodes of one job, another for a second job on the same endpoint) choose the topology; with the
# c10d rendezvous the nodes need no rank of their own.
# On a CPU, ACCELERATE_USE_CPU=1 is required: without it each process trains alone (world size
# 1) and pretrain/train.py refuses the launch.
# Signals: torchrun forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to its workers and kills them after
# --shutdown-timeout (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s); it dies on SIGUSR1 unless listed in
# PET_SIGNALS_TO_HANDLE. See launch/README.md.
set -eu
exec "${TORCHRUN:-torchrun}" --nnodes "${NNODES:-1}" --nproc_per_node "${NPROC_PER_NODE:-gpu}" \
    --rdzv_backend c10d --rdzv_endpoint "${RDZV_ENDPOINT:-127.0.0.1:29500}" --rdzv_id "${RDZV_ID:-vit-ssl}" \
    pretrain/run.py "$@"
