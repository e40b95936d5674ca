#!/usr/bin/env python3
"""Build, cache and install MinkowskiEngine 0.5.4 for the current Python and torch.

MinkowskiEngine (ME) is unmaintained; its last PyPI sdist (0.5.4, 2021) neither builds nor
imports on a current stack as shipped. This script is the one place where we make it work,
used by ``make setup`` and by ``docker/Dockerfile`` alike:

1. fetch the sdist straight from the PyPI file store and check its sha256 (no ``pip download``:
   that would run ME's ``setup.py`` for metadata, which needs ``numpy.distutils``);
2. patch the unpacked sources (see ``PATCHES`` below, each with the reason it exists);
3. build a wheel, CPU-only or CUDA (``--cuda auto`` picks CUDA when ``nvcc`` and a GPU are
   present, ``--cuda yes`` forces it, e.g. inside ``docker build`` where no GPU is visible);
4. cache the wheel under ``$MINK_SSL_CACHE`` (default ``~/.cache/mink-ssl``) keyed by Python,
   torch, CUDA and patch versions, and reuse it on the next run;
5. install it into the running interpreter and check that it imports with the expected backend.

Run it with the interpreter that should receive ME (it needs torch installed there)::

    .venv/bin/python scripts/build_minkowski.py [--cuda auto|yes|no] [--arch-list "8.0;9.0"]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import urllib.request
from pathlib import Path

ME_VERSION = "0.5.4"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/21/5c/c543c4bc5fbe73ac3e38465b3da4f24a61f7a4ac"
    "5baec867e582e94aa551/MinkowskiEngine-0.5.4.tar.gz"
)
SDIST_SHA256 = "b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94"
# Bump when the patches change, so cached wheels built with older patches are not reused.
PATCH_REVISION = 3
# The revision CPU wheels are keyed by. Revision 3 (CUDA 13) touches only .cu/.cuh files, which a
# CPU-only build never compiles (ME includes them under ``#ifndef CPU_ONLY`` only), and the CUDA
# branch of setup.py; so CPU wheels keep their key and existing venvs and caches stay valid.
# Bump it together with PATCH_REVISION when a patch touches anything a CPU build compiles.
CPU_PATCH_REVISION = 2
# Architectures for a CUDA build when no GPU is visible and none is given: V100, A100, H100
# up to CUDA 12; nvcc 13 dropped sm_70 (V100), so A100 and H100 from CUDA 13 on.
ARCH_LIST_CUDA12 = "7.0;8.0;9.0"
ARCH_LIST_CUDA13 = "8.0;9.0"

# Extra thrust headers that CUDA 12+ no longer pulls in transitively; ME 0.5.4 uses these
# algorithms (thrust::device, remove_if, unique, sort_by_key, sequence, reduce, ...).
THRUST_INCLUDES = "\n".join(
    f"#include <thrust/{h}.h>"
    for h in (
        "execution_policy", "remove", "unique", "sort", "sequence", "reduce", "scan",
        "fill", "copy", "count", "for_each", "transform", "device_vector", "host_vector",
    )
)


# CUDA 13 / CCCL 3 / torch 2.11 patches (revision 3): (file, old text, new text, expected count,
# reason). All touch .cu/.cuh sources or the CUDA branch of setup.py only (see
# CPU_PATCH_REVISION); the new code is valid on CUDA 12 as well.
_CUMAP = "src/3rdparty/concurrent_unordered_map.cuh"
PREFETCH_HELPER = """
// mink-ssl patch: CUDA 13 changed cudaMemPrefetchAsync(ptr, n, int device, stream) into
// cudaMemPrefetchAsync(ptr, n, cudaMemLocation, flags, stream).
inline cudaError_t mink_ssl_prefetch(const void* ptr, size_t n, int dev, cudaStream_t stream)
{
#if CUDART_VERSION >= 13000
  cudaMemLocation loc{};
  loc.type = cudaMemLocationTypeDevice;
  loc.id   = dev;
  return cudaMemPrefetchAsync(ptr, n, loc, 0, stream);
#else
  return cudaMemPrefetchAsync(ptr, n, dev, stream);
#endif
}
"""
CUDA13_PATCHES = (
    # (a) CCCL 3 removed thrust::unary_function; it was only an empty base class of a functor
    #     (it supplied argument_type/result_type typedefs, which nothing in ME reads).
    ("src/coordinate_map_functors.cuh",
     "struct find_coordinate\n    : public thrust::unary_function<uint32_t,\n"
     "                                    thrust::pair<uint32_t, uint32_t>> {\n",
     "struct find_coordinate {  // mink-ssl patch: no thrust::unary_function (gone in CCCL 3)\n",
     1, "no thrust::unary_function base (removed in CCCL 3)"),
    # (b) ME bundles cudf's NVTX3 C++ wrapper; the CUDA 13 toolkit ships its own nvtx3 namespace,
    #     so `nvtx3::domain` becomes ambiguous. The wrapper feeds a single profiling range
    #     (CUDF_FUNC_RANGE in the hash map's create()), which we make a no-op.
    (_CUMAP, "#include <cudf/detail/nvtx/ranges.hpp>\n",
     "// mink-ssl patch: no bundled NVTX3 wrapper (clashes with the CUDA 13 toolkit's nvtx3)\n"
     "#ifndef CUDF_FUNC_RANGE\n#define CUDF_FUNC_RANGE()\n#endif\n",
     1, "bundled NVTX3 wrapper dropped (nvtx3::domain ambiguous with CUDA 13's)"),
    # (c) cudaMemPrefetchAsync takes a cudaMemLocation and flags since CUDA 13 (3 call sites).
    (_CUMAP, "#include <hash/managed.cuh>\n", "#include <hash/managed.cuh>\n" + PREFETCH_HELPER,
     1, "cudaMemPrefetchAsync helper for the CUDA 13 signature"),
    (_CUMAP, "cudaMemPrefetchAsync(m_hashtbl_values", "mink_ssl_prefetch(m_hashtbl_values",
     2, "cudaMemPrefetchAsync (hash table) through the helper"),
    (_CUMAP, "cudaMemPrefetchAsync(this,", "mink_ssl_prefetch(this,",
     1, "cudaMemPrefetchAsync (map object) through the helper"),
    # (d) thrust::pair is cuda::std::pair in CCCL 3, so converting the map's unique_ptr into the
    #     shared_ptr member finds both std::__to_address and cuda::std::__to_address by ADL
    #     (ambiguous). Hand the raw pointer and its deleter to the shared_ptr instead.
    ("src/coordinate_map_gpu.cuh",
     "      m_map = map_type::create(\n"
     "          compute_hash_table_size(size, m_hashtable_occupancy),\n"
     "          m_unused_element, m_unused_key, m_hasher, m_equal, m_map_allocator);\n",
     "      {  // mink-ssl patch: no unique_ptr -> shared_ptr conversion (ambiguous in CCCL 3)\n"
     "        auto created = map_type::create(\n"
     "            compute_hash_table_size(size, m_hashtable_occupancy),\n"
     "            m_unused_element, m_unused_key, m_hasher, m_equal, m_map_allocator);\n"
     "        auto deleter = created.get_deleter();\n"
     "        m_map = std::shared_ptr<map_type>(created.release(), deleter);\n"
     "      }\n",
     1, "hash map unique_ptr handed to shared_ptr as pointer + deleter"),
    # (e) under torch 2.11, ATen/cuda/CUDAUtils.h uses at::Tensor members but only sees its
    #     forward declaration; include ATen's full Tensor first.
    ("src/spmm.cu", "#include <ATen/cuda/CUDAContext.h>\n",
     "#include <ATen/ATen.h>  // mink-ssl patch: full at::Tensor before CUDAUtils.h (torch 2.11)\n"
     "#include <ATen/cuda/CUDAContext.h>\n",
     1, "ATen/ATen.h before ATen/cuda/CUDAUtils.h"),
    # Device memory for the cuSPARSE SpMM workspace instead of managed (unified) memory. Only
    # cusparseSpMM reads it, on the device; managed allocations larger than the free GPU memory
    # can hang a GPU. (The hash map itself already lives in cudaMalloc/c10 device memory.)
    ("src/spmm.cu", "cudaMallocManaged(&workspace_buffer, workspace_buffer_size);",
     "CUDA_CHECK(cudaMalloc(&workspace_buffer, workspace_buffer_size));  // mink-ssl: device memory",
     2, "cuSPARSE workspace in device memory, not managed memory"),
    # (f) CUDA 13 moved thrust/cub/libcu++ to include/cccl. nvcc adds that folder itself, g++
    #     compiling the CUDA build's .cpp files (which include gpu.cuh) does not.
    ("setup.py", '    libraries.append("cusparse")\n',
     '    libraries.append("cusparse")\n'
     "    # mink-ssl patch: CUDA 13 keeps thrust in include/cccl; g++ needs it for the .cpp files\n"
     "    from torch.utils.cpp_extension import CUDA_HOME as _cuda_home\n"
     '    if _cuda_home and os.path.isdir(os.path.join(_cuda_home, "include", "cccl")):\n'
     '        include_dirs.append(os.path.join(_cuda_home, "include", "cccl"))\n',
     1, "setup.py: include/cccl for g++ in CUDA builds"),
)


class BuildError(RuntimeError):
    """A step of the ME build failed; the message says which and what to do."""


def _replace(path: Path, old: str, new: str, count_expected: int | None = None) -> None:
    text = path.read_text()
    n = text.count(old)
    if n == 0 or (count_expected is not None and n != count_expected):
        raise BuildError(
            f"patch failed: expected {count_expected or 'some'} occurrence(s) of {old!r} in "
            f"{path}, found {n}. Is this really the MinkowskiEngine {ME_VERSION} sdist?"
        )
    path.write_text(text.replace(old, new))


def patch_sources(src: Path) -> list[str]:
    """Apply our patches to an unpacked ME 0.5.4 sdist in place; returns what was done."""
    done = []
    # 1. Python 3.10 removed the ABC aliases from ``collections``.
    for py in sorted((src / "MinkowskiEngine").rglob("*.py")):
        text = py.read_text()
        if "from collections import Sequence, namedtuple" in text:
            text = text.replace(
                "from collections import Sequence, namedtuple",
                "from collections import namedtuple\nfrom collections.abc import Sequence",
            )
        elif "from collections import Sequence" in text:
            text = text.replace("from collections import Sequence",
                                "from collections.abc import Sequence")
        else:
            continue
        py.write_text(text)
        done.append(f"collections.abc in {py.relative_to(src)}")

    # 2. ME instantiates its autograd Functions and calls ``instance.apply``; torch deprecates
    #    instantiating them ("will raise an error in a future version"). ``apply`` is a
    #    classmethod, so keep the class itself. Every such use in ME calls ``.apply``.
    for py in sorted((src / "MinkowskiEngine").rglob("*.py")):
        text = py.read_text()
        new_text, n = re.subn(r"\b(Minkowski\w+Function)\(\)", r"\1", text)
        if n:
            py.write_text(new_text)
            done.append(f"autograd Function classes, not instances, in {py.relative_to(src)} ({n})")

    setup_py = src / "setup.py"
    # 3. setup.py runs ``pip uninstall MinkowskiEngine`` with whichever pip is first on PATH
    #    (possibly another environment's) and ``rm -rf build``; we manage installs ourselves.
    _replace(setup_py, 'run_command("rm", "-rf", "build")\n', "", 1)
    _replace(setup_py, 'run_command("pip", "uninstall", "MinkowskiEngine", "-y")\n', "", 1)
    done.append("setup.py: no pip uninstall / rm -rf at import")
    # 4. BLAS discovery used numpy.distutils (removed in numpy 2 / Python 3.12). Look for the
    #    shared libraries with ctypes instead, in the same preference order.
    _replace(
        setup_py,
        "    import numpy.distutils.system_info as sysinfo\n",
        "    import ctypes.util\n"
        "    class sysinfo:  # ctypes stand-in (mink-ssl patch)\n"
        "        @staticmethod\n"
        "        def get_info(name):\n"
        "            return {'libraries': [name]} if ctypes.util.find_library(name) else {}\n",
        1,
    )
    done.append("setup.py: BLAS discovery without numpy.distutils")
    # 5. CUDA 12+: thrust needs explicit includes (no effect on CPU builds). gpu.cuh is
    #    included by every .cu file; the hash map header is included on its own too.
    for header, anchor in (("src/gpu.cuh", "#include <cuda_runtime.h>\n"),
                           ("src/3rdparty/concurrent_unordered_map.cuh",
                            "#include <thrust/count.h>\n")):
        _replace(src / header, anchor, anchor + THRUST_INCLUDES + "\n", 1)
        done.append(f"thrust includes in {header}")
    # 6. CUDA 13 / CCCL 3 / torch 2.11 (see CUDA13_PATCHES for each reason).
    for rel, old, new, count, what in CUDA13_PATCHES:
        _replace(src / rel, old, new, count)
        done.append(f"{what} ({rel})")
    return done


def _torch_facts() -> tuple[str, str | None]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - setup order guarantees torch
        raise BuildError(
            f"torch is not importable from {sys.executable} ({e}); install torch first "
            "(make setup does this before building MinkowskiEngine)"
        ) from e
    return torch.__version__, torch.version.cuda


def want_cuda(mode: str) -> bool:
    """Decide CPU or CUDA: 'yes'/'no' force it, 'auto' needs nvcc, a CUDA torch and a GPU."""
    if mode in ("yes", "no"):
        return mode == "yes"
    if mode != "auto":
        raise BuildError(f"--cuda must be auto, yes or no, got {mode!r}")
    _, torch_cuda = _torch_facts()
    if torch_cuda is None or shutil.which("nvcc") is None:
        return False
    import torch

    return torch.cuda.is_available()


def cache_key(cuda: bool, arch_list: str | None) -> str:
    torch_version, torch_cuda = _torch_facts()
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    dev = f"cu{torch_cuda}-{(arch_list or '').replace(';', '_')}" if cuda else "cpu"
    rev = PATCH_REVISION if cuda else CPU_PATCH_REVISION
    return f"me{ME_VERSION}-p{rev}-{py}-{sysconfig.get_platform()}-torch{torch_version}-{dev}"


def nvcc_version() -> tuple[int, int] | None:
    """(major, minor) of the nvcc that torch's extension builder will use, or None."""
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = Path(CUDA_HOME) / "bin" / "nvcc" if CUDA_HOME else None
    if nvcc is None or not nvcc.exists():
        found = shutil.which("nvcc")
        nvcc = Path(found) if found else None
    if nvcc is None:
        return None
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def default_arch_list(nvcc: tuple[int, int] | None) -> str:
    """Architectures when none is given: the visible GPUs', else all the toolkit supports of
    V100/A100/H100 (nvcc 13 no longer compiles for sm_70)."""
    import torch

    if torch.version.cuda is not None and torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return ARCH_LIST_CUDA13 if nvcc is None or nvcc[0] >= 13 else ARCH_LIST_CUDA12


def check_arch_list(arch_list: str, nvcc: tuple[int, int] | None) -> str:
    """Refuse architectures the toolkit cannot compile for, with the fix in the message."""
    archs = [a.strip() for a in arch_list.split(";") if a.strip()]
    bad = [a for a in archs if not re.fullmatch(r"\d+\.\d+(\+PTX)?", a)]
    if not archs or bad:
        raise BuildError(f"TORCH_CUDA_ARCH_LIST {arch_list!r} is not a ';'-separated list like "
                         f"'8.0;9.0' (bad: {bad or 'empty'})")
    if nvcc is not None and nvcc[0] >= 13 and any(float(a.split("+")[0]) < 7.5 for a in archs):
        raise BuildError(
            f"TORCH_CUDA_ARCH_LIST {arch_list!r} has architectures below 7.5, which nvcc "
            f"{nvcc[0]}.{nvcc[1]} no longer supports (V100 is sm_70); use {ARCH_LIST_CUDA13!r}, "
            "or CUDA 12 (e.g. torch 2.5.1+cu124 with nvcc 12.4) for V100"
        )
    return ";".join(archs)


def cache_dir() -> Path:
    root = os.environ.get("MINK_SSL_CACHE") or Path.home() / ".cache" / "mink-ssl"
    return Path(root) / "wheels"


def fetch_sdist(dest: Path) -> Path:
    """The sdist, from a local copy ($MINK_SSL_ME_SDIST), the cache, or PyPI; sha256-checked."""
    local = os.environ.get("MINK_SSL_ME_SDIST")
    cached = cache_dir().parent / "sdist" / f"MinkowskiEngine-{ME_VERSION}.tar.gz"
    if local:
        path = Path(local)
    elif cached.exists():
        path = cached
    else:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".part")
        print(f"[me] downloading {SDIST_URL}", flush=True)
        try:
            with urllib.request.urlopen(SDIST_URL, timeout=120) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            raise BuildError(
                f"could not download the MinkowskiEngine sdist ({e}); check the network, or "
                "download it by hand and set MINK_SSL_ME_SDIST=/path/to/MinkowskiEngine-0.5.4.tar.gz"
            ) from e
        path = tmp
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise BuildError(f"sha256 of {path} is {digest}, expected {SDIST_SHA256}; delete it and retry")
    if path.suffix == ".part":
        os.replace(path, cached)
        path = cached
    return path


def build_wheel(cuda: bool, arch_list: str | None, workdir: Path) -> Path:
    sdist = fetch_sdist(workdir)
    with tarfile.open(sdist) as tar:
        tar.extractall(workdir, filter="data")
    src = workdir / f"MinkowskiEngine-{ME_VERSION}"
    for line in patch_sources(src):
        print(f"[me] patched: {line}", flush=True)
    cmd = [sys.executable, "setup.py", "bdist_wheel", "--blas=openblas"]
    env = dict(os.environ)
    if cuda:
        cmd.append("--force_cuda")
        env["TORCH_CUDA_ARCH_LIST"] = arch_list
    else:
        cmd.append("--cpu_only")
        env["CUDA_VISIBLE_DEVICES"] = ""  # keep torch from picking CUDA sources
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    print(f"[me] building ({'CUDA ' + env['TORCH_CUDA_ARCH_LIST'] if cuda else 'CPU only'}): "
          f"{' '.join(cmd)}", flush=True)
    log = workdir / "build.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=src, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise BuildError(
            f"MinkowskiEngine build failed (exit {proc.returncode}); last lines of the log:\n{tail}\n"
            "Common causes: missing BLAS headers (apt-get install libopenblas-dev), no C++ "
            "compiler (apt-get install build-essential), or for CUDA an nvcc that does not match "
            "torch.version.cuda."
        )
    wheels = list((src / "dist").glob("*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one wheel in {src / 'dist'}, found {wheels}")
    return wheels[0]


def installed_backend() -> str | None:
    """'cpu' or 'cuda' for an importable ME of the right version, else None."""
    code = ("import MinkowskiEngine as ME; assert ME.__version__ == %r; "
            "print('cpu' if ME.is_cuda_available() is False else 'cuda')" % ME_VERSION)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure(cuda_mode: str, arch_list: str | None, force: bool = False) -> Path:
    cuda = want_cuda(cuda_mode)
    if cuda:
        nvcc = nvcc_version()
        if arch_list is None:
            arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or default_arch_list(nvcc)
        arch_list = check_arch_list(arch_list, nvcc)
    key = cache_key(cuda, arch_list)
    target = cache_dir() / key
    wheels = sorted(target.glob("*.whl")) if target.exists() else []
    if not force and installed_backend() == ("cuda" if cuda else "cpu") and wheels:
        print(f"[me] MinkowskiEngine {ME_VERSION} already installed ({key})", flush=True)
        return wheels[0]
    if force or not wheels:
        with tempfile.TemporaryDirectory(prefix="mink-ssl-me-") as tmp:
            wheel = build_wheel(cuda, arch_list, Path(tmp))
            target.mkdir(parents=True, exist_ok=True)
            staged = target / (wheel.name + ".part")
            shutil.copy2(wheel, staged)
            os.replace(staged, target / wheel.name)
        wheels = [target / wheel.name]
        print(f"[me] cached {wheels[0]}", flush=True)
    else:
        print(f"[me] reusing cached wheel {wheels[0]}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall",
                    str(wheels[0])], check=True)
    backend = installed_backend()
    if backend != ("cuda" if cuda else "cpu"):
        raise BuildError(
            f"MinkowskiEngine installed from {wheels[0]} reports backend {backend!r}, expected "
            f"{'cuda' if cuda else 'cpu'}; delete {target} and rerun to rebuild"
        )
    print(f"[me] MinkowskiEngine {ME_VERSION} ({backend}) installed", flush=True)
    return wheels[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cuda", default=os.environ.get("MINK_SSL_ME_CUDA", "auto"),
                   choices=["auto", "yes", "no"], help="CUDA build: auto-detect, force, or CPU only")
    p.add_argument("--arch-list", default=None,
                   help="TORCH_CUDA_ARCH_LIST for a CUDA build (default: env, else the visible "
                        f"GPUs', else {ARCH_LIST_CUDA13!r} with nvcc 13, {ARCH_LIST_CUDA12!r} before)")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached wheel exists")
    p.add_argument("--patch-only", type=Path, metavar="SRC",
                   help="only patch an unpacked sdist at SRC (for inspection) and exit")
    args = p.parse_args(argv)
    try:
        if args.patch_only:
            for line in patch_sources(args.patch_only):
                print(f"[me] patched: {line}")
            return 0
        ensure(args.cuda, args.arch_list, args.force)
    except (BuildError, subprocess.CalledProcessError) as e:
        print(f"\n[me] ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
