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
#   ME_BUILD      MinkowskiEngine: auto (build it; if the build fails, say so and go on with
#                 spconv alone), yes (a failed build stops setup), no (skip it)  (default: auto)
#   ME_CUDA       MinkowskiEngine build: auto (CUDA if nvcc + GPU), yes, no   (default: auto)
#   SPCONV_SPEC   pip requirement for the spconv engine (default: chosen from the installed
#                 torch: spconv==2.3.8 for a CPU torch, spconv-cu1XX==2.3.8 for a CUDA 11.x/12.x
#                 torch, spconv-triton==1.0.0 where no CUDA wheel matches)
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
ME_BUILD=${ME_BUILD:-auto}
SPCONV_SPEC=${SPCONV_SPEC:-}
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

step "spconv (the default sparse engine)" \
  "pip could not install it; set SPCONV_SPEC to a wheel your machine can get (spconv for CPU, spconv-cu126 for CUDA 12.x, spconv-triton), or use model.engine=minkowski"
if [ -z "$SPCONV_SPEC" ]; then
  SPCONV_SPEC=$("$PY" - <<'PY'
import torch
cuda = torch.version.cuda
if cuda is None:
    print("spconv==2.3.8")  # the CPU build (forward and backward on CPU tensors)
else:
    major, minor = (int(x) for x in cuda.split(".")[:2])
    # spconv 2.3.8's CUDA wheels: cu118 for 11.8+, cu120/cu121/cu124/cu126 for 12.x
    wheels = {(11, 8): "cu118", (12, 0): "cu120", (12, 1): "cu121", (12, 4): "cu124",
              (12, 6): "cu126"}
    best = max((v for v in wheels if v[0] == major and v <= (major, minor)), default=None)
    print(f"spconv-{wheels[best]}==2.3.8" if best else "spconv-triton==1.0.0")
PY
)
fi
have_spconv=$("$PY" -m pip list --format=freeze 2>/dev/null | grep -iE '^spconv(-[a-z0-9]+)?==' | tr '\n' ' ' || true)
if [[ " $have_spconv" == *" ${SPCONV_SPEC} "* ]]; then
  echo "${SPCONV_SPEC} already installed"
else
  # the spconv wheels all provide the module 'spconv': one at a time
  for old in $have_spconv; do "$PY" -m pip uninstall -q -y "${old%%==*}"; done
  "$PY" -m pip install -q "$SPCONV_SPEC"
fi

step "MinkowskiEngine 0.5.4 (patched build, cached wheel; ME_BUILD=$ME_BUILD)" \
  "read the build log above; rerun with ME_CUDA=no to build CPU-only, with ME_BUILD=no to go on with spconv alone, or see README 'Troubleshooting'"
if [ "$ME_BUILD" = "no" ]; then
  echo "skipped (ME_BUILD=no): runs use spconv; model.engine=minkowski and the tests that compare the engines need MinkowskiEngine"
elif ! "$PY" scripts/build_minkowski.py --cuda "$ME_CUDA"; then
  if [ "$ME_BUILD" = "yes" ]; then false; fi
  echo
  echo "!! [setup] MinkowskiEngine could not be built here (log above). Setup goes on with spconv"
  echo "!! alone: every run works on model.engine=spconv (the default); model.engine=minkowski"
  echo "!! and the tests that compare the two engines need MinkowskiEngine and will skip."
fi

step "mink-ssl and its dependencies (pip install -e .[dev])" \
  "read pip's message above; a version conflict usually means a stale $VENV: delete it and rerun make setup"
"$PY" -m pip install -q -e ".[dev]"

step "import check" \
  "an import failed; if it is open3d, install libusb-1.0-0 and libgl1 (apt-get); otherwise delete $VENV and rerun"
"$PY" - <<'PY'
import torch, open3d, numpy, scipy, plyfile, hydra, mink_ssl
from mink_ssl.io import library_versions
from mink_ssl.models.engines import ENGINES, engine_unavailable
engines = {e: engine_unavailable(e) for e in ENGINES}
if all(engines.values()):
    raise SystemExit(f"no sparse engine imports: {engines}")
v = library_versions()
print(f"torch {torch.__version__} | engines: {v['spconv']}, MinkowskiEngine "
      f"{v['MinkowskiEngine']} | open3d {open3d.__version__} | numpy {numpy.__version__} | "
      f"mink_ssl {mink_ssl.__version__}")
for e, why in engines.items():
    if why:
        print(f"!! engine {e} unavailable: {why}")
PY
echo "==> [setup] done in $(( $(date +%s) - T0 )) s"
