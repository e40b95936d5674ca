#!/usr/bin/env bash
# Prove the CUDA build of MinkowskiEngine without a GPU: a throwaway venv with torch 2.11 (built
# for CUDA 13.0) and the CUDA 13 compiler wheels from PyPI, a CUDA_HOME assembled from those
# wheels, then our real build path (scripts/build_minkowski.py --cuda yes), an import and
# ME.is_cuda_available(). On success it writes scripts/cuda_build_check.json (the sha256 of
# build_minkowski.py, the stack, the result, the date); .ci/run fails when build_minkowski.py no
# longer matches that record, so whoever changes the patches reruns this and commits the record.
#
# Not run by CI: it downloads ~4 GB of wheels and compiles for 10-25 minutes on 2 cores.
#   bash scripts/check_cuda_build.sh            # or: nice -n 15 bash scripts/check_cuda_build.sh
# Variables: WORK (default /tmp/mink-ssl-cuda-check; reused by a rerun, delete it to start clean),
#   PYTHON (python3), TORCH_VERSION (2.11.0), CUDA_TOOLKIT (13.0.2), ARCH (9.0).
set -Eeuo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-/tmp/mink-ssl-cuda-check}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
CUDA_TOOLKIT=${CUDA_TOOLKIT:-13.0.2}
ARCH=${ARCH:-9.0}
RECORD="$REPO/scripts/cuda_build_check.json"
STEP=start
trap 'echo "!! [cuda-check] failed at: $STEP" >&2' ERR
step() { STEP=$1; echo; echo "==> [cuda-check] $STEP ($(date -u +%H:%M:%S))"; }
T0=$(date +%s)
mkdir -p "$WORK"
# a snapshot of the build script: the record's hash is of exactly the code that was built
BUILD_SCRIPT="$WORK/build_minkowski.py"
cp "$REPO/scripts/build_minkowski.py" "$BUILD_SCRIPT"
VENV="$WORK/venv"
PY="$VENV/bin/python"

step "venv $VENV: torch==$TORCH_VERSION, cuda-toolkit[nvcc,cccl,crt,nvvm]==$CUDA_TOOLKIT"
[ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
"$PY" -m pip install -q --upgrade "pip>=23" "setuptools>=68" wheel ninja "numpy>=1.24,<3"
"$PY" -m pip install -q "torch==$TORCH_VERSION" "cuda-toolkit[nvcc,cccl,crt,nvvm]==$CUDA_TOOLKIT"
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CU="$SITE/nvidia/cu13"
[ -x "$CU/bin/nvcc" ] || { echo "no nvcc at $CU/bin/nvcc: the cuda-toolkit wheels' layout changed" >&2; exit 1; }

step "CUDA_HOME assembled from the wheels"
# nvcc finds nvcc.profile, cicc (nvvm) and the headers relative to the folder it is called from,
# so bin/ is a real folder of links (a linked folder would resolve into site-packages, where
# lib64 is missing); the wheels ship only versioned libraries (libcudart.so.13), so lib64 adds
# the unversioned names the linker looks for.
CUDA_HOME="$WORK/cuda"
rm -rf "$CUDA_HOME"
mkdir -p "$CUDA_HOME/bin" "$CUDA_HOME/lib64"
for f in "$CU"/bin/*; do ln -s "$f" "$CUDA_HOME/bin/"; done
ln -s "$CU/include" "$CUDA_HOME/include"
ln -s "$CU/nvvm" "$CUDA_HOME/nvvm"
for f in "$CU"/lib/*.so*; do
  ln -s "$f" "$CUDA_HOME/lib64/"
  base=$(basename "$f")
  unversioned=${base%%.so*}.so
  [ -e "$CUDA_HOME/lib64/$unversioned" ] || ln -s "$f" "$CUDA_HOME/lib64/$unversioned"
done
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
export LIBRARY_PATH="$CUDA_HOME/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}"
NVCC_VERSION=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\), V\([0-9.]*\).*/\2/p')
echo "nvcc $NVCC_VERSION, $(gcc --version | head -1)"

step "scripts/build_minkowski.py --cuda yes --arch-list $ARCH (the real build path)"
# a wheel cache of our own, keyed by the script's hash: a rerun with unchanged patches only
# re-checks the import, a changed script always compiles; the sdist comes from the user's cache
SCRIPT_SHA=$(sha256sum "$BUILD_SCRIPT" | cut -c1-16)
export MINK_SSL_CACHE="$WORK/cache/$SCRIPT_SHA"
sdist=${MINK_SSL_CACHE_USER:-$HOME/.cache/mink-ssl}/sdist/MinkowskiEngine-0.5.4.tar.gz
[ -f "$sdist" ] && export MINK_SSL_ME_SDIST="$sdist"
TB=$(date +%s)
"$PY" "$BUILD_SCRIPT" --cuda yes --arch-list "$ARCH"
BUILD_S=$(( $(date +%s) - TB ))

step "import MinkowskiEngine, is_cuda_available()"
"$PY" - "$RECORD" "$BUILD_SCRIPT" "$NVCC_VERSION" "$CUDA_TOOLKIT" "$ARCH" \
    "$BUILD_S" "$MINK_SSL_CACHE" <<'PY'
import datetime, glob, hashlib, json, os, platform, subprocess, sys
record, script, nvcc, toolkit, arch, build_s, cache = sys.argv[1:]
import torch
import MinkowskiEngine as ME
cuda = bool(ME.is_cuda_available())
print(f"MinkowskiEngine {ME.__version__} imported from {ME.__file__}; is_cuda_available() = {cuda}")
if not cuda:
    sys.exit("MinkowskiEngine imported but was built CPU-only")
wheels = glob.glob(os.path.join(cache, "wheels", "*cu*", "*.whl"))
gcc = subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True).stdout.strip()
out = {
    "build_minkowski_sha256": hashlib.sha256(open(script, "rb").read()).hexdigest(),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "stack": {"python": platform.python_version(), "torch": torch.__version__,
              "torch_cuda": torch.version.cuda, "cuda_toolkit_wheels": toolkit, "nvcc": nvcc,
              "gcc": gcc, "arch_list": arch, "platform": platform.platform()},
    "result": {"compiled": True, "imported": True, "is_cuda_available": cuda,
               "build_seconds": int(build_s),
               "wheel": os.path.basename(wheels[0]) if wheels else None,
               "wheel_bytes": os.path.getsize(wheels[0]) if wheels else None},
}
tmp = record + ".part"
with open(tmp, "w") as f:
    json.dump(out, f, indent=2)
    f.write("\n")
os.replace(tmp, record)
print(f"record written: {record}")
PY
echo "==> [cuda-check] OK in $(( $(date +%s) - T0 )) s"
