#!/usr/bin/env bash
# Pretraining over several machines; run this on every node with the same environment:
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0 host> MASTER_PORT=29500 NGPUS=8 \
#   RUN_DIR=/shared/runs/pt docker/launch_multi_node.sh data.root=/data/scannet_pairs
# Rendezvous is torchrun's c10d at MASTER_ADDR:MASTER_PORT. RUN_DIR must be on a filesystem all
# nodes see (only global rank 0 writes to it). Extra arguments are Hydra overrides.
# DRY_RUN=1 prints the command (environment resolved) instead of running it.
set -euo pipefail
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR}" "${RUN_DIR:?set RUN_DIR (shared)}"
NODE_RANK=${NODE_RANK:-0}
MASTER_PORT=${MASTER_PORT:-29500}
NGPUS=${NGPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[[ ${NGPUS} -ge 1 ]] || NGPUS=1
resume_env=("NNODES=${NNODES}" "NODE_RANK=${NODE_RANK}" "MASTER_ADDR=${MASTER_ADDR}"
            "MASTER_PORT=${MASTER_PORT}" "NGPUS=${NGPUS}" "RUN_DIR=${RUN_DIR}")
cmd=(torchrun --nnodes "${NNODES}" --node_rank "${NODE_RANK}" --nproc_per_node "${NGPUS}"
     --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR}:${MASTER_PORT}"
     --rdzv_id "${RDZV_ID:-mink-ssl}" -m mink_ssl.cli.pretrain "hydra.run.dir=${RUN_DIR}" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
# a stop request (Ctrl-C, docker stop, kill) goes to the training processes, not to torchrun:
# they checkpoint and stop, and this script exits 130 / 143 (docker/torchrun_stop.sh)
source "$(dirname "${BASH_SOURCE[0]}")/torchrun_stop.sh"
run_torchrun "$(resume_command "${resume_env[@]}" -- "$0" "$@")" "${cmd[@]}"
