#!/usr/bin/env bash
# Segmentation fine-tuning, the paper's protocol (8 GPUs), pretrained or from scratch:
#   experiments/finetune_seg.sh s3dis|synthia|scannet /data/<prep out> <backbone.pth|scratch> [overrides]
# Data-efficient ScanNet: RECIPE=csc_seg_scannet_points (data.labelled_points=N) or
# RECIPE=csc_seg_scannet_scenes (data.scene_fraction=F). DRY_RUN=1 prints the command.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
usage="usage: $0 s3dis|synthia|scannet <data dir> <backbone.pth|scratch> [overrides]"
bench=${1:?${usage}}; data=${2:?${usage}}; weights=${3:?${usage}}
shift 3
case ${bench} in s3dis|synthia|scannet) ;; *) echo "unknown benchmark ${bench}; ${usage}" >&2; exit 2 ;; esac
if [[ ${weights} == scratch ]]; then pretrained=null; tag=scratch
else [[ -f ${weights} || ${DRY_RUN:-0} == 1 ]] || { echo "no such file: ${weights}" >&2; exit 2; }
     pretrained=${weights}; tag=pretrained; fi
recipe=${RECIPE:-pc_seg_${bench}}
NGPUS=${NGPUS:-8}
RUN_DIR=${RUN_DIR:-runs/experiments/${recipe}_${tag}}
cmd=(torchrun --standalone --nproc_per_node "${NGPUS}" -m mink_ssl.cli.finetune_seg
     --config-dir "${here}/configs" "+experiment=${recipe}" "data.root=${data}"
     "pretrained=${pretrained}" "hydra.run.dir=${RUN_DIR}" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
