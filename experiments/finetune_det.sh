#!/usr/bin/env bash
# Detection fine-tuning, the paper's protocol (8 GPUs), pretrained or from scratch:
#   experiments/finetune_det.sh scannet|sunrgbd /data/<prep out> <backbone.pth|scratch> [overrides]
# DRY_RUN=1 prints the command.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
usage="usage: $0 scannet|sunrgbd <data dir> <backbone.pth|scratch> [overrides]"
bench=${1:?${usage}}; data=${2:?${usage}}; weights=${3:?${usage}}
shift 3
case ${bench} in scannet|sunrgbd) ;; *) echo "unknown benchmark ${bench}; ${usage}" >&2; exit 2 ;; esac
if [[ ${weights} == scratch ]]; then pretrained=null; tag=scratch
else [[ -f ${weights} || ${DRY_RUN:-0} == 1 ]] || { echo "no such file: ${weights}" >&2; exit 2; }
     pretrained=${weights}; tag=pretrained; fi
NGPUS=${NGPUS:-8}
RUN_DIR=${RUN_DIR:-runs/experiments/pc_det_${bench}_${tag}}
cmd=(torchrun --standalone --nproc_per_node "${NGPUS}" -m mink_ssl.cli.finetune_det
     --config-dir "${here}/configs" "+experiment=pc_det_${bench}" "data.root=${data}"
     "pretrained=${pretrained}" "hydra.run.dir=${RUN_DIR}" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
