#!/usr/bin/env bash
# Pretraining on all GPUs of one machine. Extra arguments are Hydra overrides.
#   NGPUS=8 RUN_DIR=runs/pt docker/launch_single_node.sh data.root=/data/scannet_pairs batch_size=4
# batch_size is per GPU: the global batch is batch_size x NGPUS (printed at start). The learning
# rate is not scaled unless you pass optim.scale_lr_with_world_size=true (linear scaling rule).
# DRY_RUN=1 prints the command (environment resolved) instead of running it.
set -euo pipefail
NGPUS=${NGPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[[ ${NGPUS} -ge 1 ]] || NGPUS=1
RUN_DIR=${RUN_DIR:-runs/pretrain/$(date +%Y-%m-%d_%H-%M-%S)}
resume_env=("NGPUS=${NGPUS}" "RUN_DIR=${RUN_DIR}")
cmd=(torchrun --standalone --nproc_per_node "${NGPUS}" -m mink_ssl.cli.pretrain
     "hydra.run.dir=${RUN_DIR}" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
# a stop request (Ctrl-C, docker stop, kill) goes to the training processes, not to torchrun:
# they checkpoint and stop, and this script exits 130 / 143 (docker/torchrun_stop.sh)
source "$(dirname "${BASH_SOURCE[0]}")/torchrun_stop.sh"
run_torchrun "$(resume_command "${resume_env[@]}" -- "$0" "$@")" "${cmd[@]}"
