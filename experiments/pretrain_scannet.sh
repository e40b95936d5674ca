#!/usr/bin/env bash
# PointContrast pretraining on ScanNet pairs, the paper's protocol (8 GPUs, one node):
#   experiments/pretrain_scannet.sh hc|nce /data/scannet_pairs [extra Hydra overrides]
# Writes runs/experiments/pretrain_<loss>/ (backbone.pth at the end). NGPUS, RUN_DIR and DRY_RUN
# are passed to docker/launch_single_node.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
loss=${1:?usage: $0 hc|nce <pairs dir> [overrides]}
data=${2:?usage: $0 hc|nce <pairs dir> [overrides]}
shift 2
case ${loss} in hc|nce) ;; *) echo "loss must be hc or nce, got ${loss}" >&2; exit 2 ;; esac
export NGPUS=${NGPUS:-8} RUN_DIR=${RUN_DIR:-runs/experiments/pretrain_${loss}}
exec "${here}/../docker/launch_single_node.sh" --config-dir "${here}/configs" \
    "+experiment=pc_pretrain_${loss}" "data.root=${data}" "$@"
