#!/usr/bin/env bash
# Detection fine-tuning, the paper's protocol, pretrained or from scratch:
#   experiments/finetune_det.sh scannet|sunrgbd /data/<prep out> <backbone.pth|scratch> [overrides]
# The reference ran one process with the whole batch (ScanNet 32, SUN RGB-D 64): NGPUS=1 by
# default; NGPUS=N splits that batch over N GPUs (batch_size=global/N, batch norm synchronised by
# the recipe's distributed.sync_bn). DRY_RUN=1 prints the command.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
usage="usage: $0 scannet|sunrgbd <data dir> <backbone.pth|scratch> [overrides]"
bench=${1:?${usage}}; data=${2:?${usage}}; weights=${3:?${usage}}
shift 3
case ${bench} in scannet|sunrgbd) ;; *) echo "unknown benchmark ${bench}; ${usage}" >&2; exit 2 ;; esac
if [[ ${weights} == scratch ]]; then pretrained=null; tag=scratch
else [[ -f ${weights} || ${DRY_RUN:-0} == 1 ]] || { echo "no such file: ${weights}" >&2; exit 2; }
     pretrained=${weights}; tag=pretrained; fi
NGPUS=${NGPUS:-1}
global=$([[ ${bench} == scannet ]] && echo 32 || echo 64)
(( NGPUS >= 1 && global % NGPUS == 0 )) || { echo "NGPUS=${NGPUS} must divide the batch of ${global}" >&2; exit 2; }
RUN_DIR=${RUN_DIR:-runs/experiments/pc_det_${bench}_${tag}}
cmd=(torchrun --standalone --nproc_per_node "${NGPUS}" -m mink_ssl.cli.finetune_det
     --config-dir "${here}/configs" "+experiment=pc_det_${bench}" "data.root=${data}"
     "pretrained=${pretrained}" "batch_size=$(( global / NGPUS ))" "hydra.run.dir=${RUN_DIR}" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
