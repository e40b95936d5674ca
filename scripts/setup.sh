#!/usr/bin/env bash
# One-command setup for mink-ssl (run by `make setup`; safe to run again, skips what is done).
#
# Variables (all optional):
#   PYTHON        interpreter used to create the venv          (default: python3)
#   VENV          virtual environment directory                (default: .venv)
#   TORCH_SPEC    pip requirement for torch                    (default: torch==2.13.0, this
#                 machine's local CPU wheel; e.g. "torch==2.5.1" with TORCH_INDEX_URL below
#                 for a CUDA build elsewhere)
#   TORCH_INDEX_URL  extra index for torch, e.g. https://download.pytorch.org/whl/cu124
#   ME_CUDA       MinkowskiEngine build: auto (CUDA if nvcc + GPU), yes, no   (default: auto)
#   TORCH_CUDA_ARCH_LIST  architectures for a CUDA build (default: the visible GPUs, else 8.0;9.0
#                 with nvcc 13, 7.0;8.0;9.0 with nvcc 12)
#   MINK_SSL_CACHE  where built wheels are cached               (default: ~/.cache/mink-ssl)
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
ME_CUDA=${ME_CUDA:-auto}
APT_PACKAGES=(build-essential ninja-build libopenblas-dev libusb-1.0-0 libgomp1 libgl1)

STEP="start"
HINT=""
step() { STEP=$1; HINT=$2; echo; echo "==> [setup] $STEP"; }
trap 'echo; echo "!! [setup] step failed: $STEP"; echo "!! what to do: $HINT"; exit 1' ERR
T0=$(date +%s)

step "system packages (${APT_PACKAGES[*]})" \
  "install them by hand: apt-get install -y ${APT_PACKAGES[*]} (needs root or sudo), then rerun make setup"
missing=()
if command -v dpkg-query >/dev/null; then
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "installing: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "all present"
  fi
else
  echo "no dpkg here: make sure the equivalents of ${APT_PACKAGES[*]} are installed"
fi

step "virtual environment $VENV" \
  "check that $PYTHON -m venv works (Debian: apt-get install python3-venv), or set PYTHON=/path/to/python3.11"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade "pip>=23" "setuptools>=68" wheel ninja "numpy>=1.24,<3"

step "torch ($TORCH_SPEC)" \
  "pip could not install $TORCH_SPEC; set TORCH_SPEC (and TORCH_INDEX_URL for CUDA builds) to one your machine can get"
want=${TORCH_SPEC#torch==}
have=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [[ "$TORCH_SPEC" == torch==* && "$have" == "$want" ]]; then
  echo "torch $have already installed"
else
  "$PY" -m pip install -q "$TORCH_SPEC" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
fi

step "MinkowskiEngine 0.5.4 (patched build, cached wheel)" \
  "read the build log above; rerun with ME_CUDA=no to build CPU-only, or see README 'Troubleshooting'"
"$PY" scripts/build_minkowski.py --cuda "$ME_CUDA"

step "mink-ssl and its dependencies (pip install -e .[dev])" \
  "read pip's message above; a version conflict usually means a stale $VENV: delete it and rerun make setup"
"$PY" -m pip install -q -e ".[dev]"

step "import check" \
  "an import failed; if it is open3d, install libusb-1.0-0 and libgl1 (apt-get); otherwise delete $VENV and rerun"
"$PY" - <<'PY'
import torch, MinkowskiEngine as ME, open3d, numpy, scipy, plyfile, hydra, mink_ssl
print(f"torch {torch.__version__} | MinkowskiEngine {ME.__version__} "
      f"({'cuda' if ME.is_cuda_available() else 'cpu'}) | open3d {open3d.__version__} | "
      f"numpy {numpy.__version__} | mink_ssl {mink_ssl.__version__}")
PY
echo "==> [setup] done in $(( $(date +%s) - T0 )) s"
