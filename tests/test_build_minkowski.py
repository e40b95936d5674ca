"""The MinkowskiEngine patch step (scripts/build_minkowski.py), run on the real 0.5.4 sdist."""
import hashlib
import importlib.util
import json
import py_compile
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("build_minkowski", REPO / "scripts" / "build_minkowski.py")
bm = importlib.util.module_from_spec(spec)
sys.modules["build_minkowski"] = bm
spec.loader.exec_module(bm)


def _unpack(tmp_path_factory, name: str) -> Path:
    try:
        sdist = bm.fetch_sdist(tmp_path_factory.mktemp("dl"))  # cached by make setup
    except bm.BuildError as e:
        pytest.skip(f"MinkowskiEngine sdist unavailable: {e}")
    out = tmp_path_factory.mktemp(name)
    with tarfile.open(sdist) as tar:
        tar.extractall(out, filter="data")
    return out / "MinkowskiEngine-0.5.4"


@pytest.fixture(scope="module")
def sdist_src(tmp_path_factory):
    return _unpack(tmp_path_factory, "src")


@pytest.fixture(scope="module")
def patched_and_pristine(tmp_path_factory):
    pristine, patched = _unpack(tmp_path_factory, "pristine"), _unpack(tmp_path_factory, "patched")
    bm.patch_sources(patched)
    return patched, pristine


def test_patches_apply_and_leave_valid_python(sdist_src):
    done = bm.patch_sources(sdist_src)
    assert sum("collections.abc" in d for d in done) == 5
    for py in (sdist_src / "MinkowskiEngine").rglob("*.py"):
        assert "from collections import Sequence" not in py.read_text(), py
        py_compile.compile(str(py), doraise=True)
    setup = (sdist_src / "setup.py").read_text()
    assert "import numpy.distutils" not in setup
    for py in (sdist_src / "MinkowskiEngine").rglob("*.py"):
        assert not re.search(r"Minkowski\w+Function\(\)", py.read_text()), py
    assert 'run_command("pip", "uninstall"' not in setup
    py_compile.compile(str(sdist_src / "setup.py"), doraise=True)
    assert "#include <thrust/execution_policy.h>" in (sdist_src / "src" / "gpu.cuh").read_text()
    # patching twice is refused loudly instead of silently doing something else
    with pytest.raises(bm.BuildError, match="patch failed"):
        bm.patch_sources(sdist_src)


def test_cache_key_separates_builds():
    cpu, cuda = bm.cache_key(False, None), bm.cache_key(True, "8.0;9.0")
    assert cpu != cuda and "cpu" in cpu and "8.0_9.0" in cuda
    assert f"cp{sys.version_info.major}{sys.version_info.minor}" in cpu and "torch" in cpu


def test_installed_minkowski_engine_is_the_patched_cpu_or_cuda_build():
    """Where setup built MinkowskiEngine (a machine where it does not build goes on with
    spconv alone: this test then skips, naming why)."""
    from mink_ssl.models.engines import engine_unavailable

    if engine_unavailable("minkowski"):
        pytest.skip(f"MinkowskiEngine is not installed here: {engine_unavailable('minkowski')}")
    import MinkowskiEngine as ME

    assert ME.__version__ == "0.5.4"
    assert bm.installed_backend() in ("cpu", "cuda")


def test_bad_cuda_mode():
    with pytest.raises(bm.BuildError, match="--cuda must be auto, yes or no, got 'maybe'"):
        bm.want_cuda("maybe")


def test_cuda13_patches_on_the_real_sources(patched_and_pristine):
    src, pristine = patched_and_pristine
    read = lambda rel: (src / rel).read_text()
    # (a) nothing derives from thrust::unary_function any more
    for f in (src / "src").rglob("*.cu*"):
        assert not re.search(r"public\s+thrust::unary_function", f.read_text()), f
    assert "struct find_coordinate {" in read("src/coordinate_map_functors.cuh")
    # (b) the bundled NVTX3 wrapper is no longer included by anything; its one range is a no-op
    for f in [*(src / "src").rglob("*.cu*"), *(src / "src").rglob("*.h*")]:
        assert "nvtx/ranges.hpp" not in f.read_text(), f
    cumap = read("src/3rdparty/concurrent_unordered_map.cuh")
    assert "#define CUDF_FUNC_RANGE()" in cumap and "CUDF_FUNC_RANGE();" in cumap
    # (c) the three prefetch call sites go through the helper; the raw call only inside it,
    #     once per CUDA version branch
    assert cumap.count("mink_ssl_prefetch(") == 4  # definition + 3 call sites
    calls = [ln.strip() for ln in cumap.splitlines()
             if "cudaMemPrefetchAsync(" in ln and not ln.strip().startswith("//")]
    assert calls == ["return cudaMemPrefetchAsync(ptr, n, loc, 0, stream);",
                     "return cudaMemPrefetchAsync(ptr, n, dev, stream);"], calls
    assert "cudaMemLocation loc{}" in cumap and "#if CUDART_VERSION >= 13000" in cumap
    # (d) no unique_ptr -> shared_ptr conversion of the hash map
    gpu_map = read("src/coordinate_map_gpu.cuh")
    assert "m_map = map_type::create(" not in gpu_map
    assert "std::shared_ptr<map_type>(created.release(), deleter)" in gpu_map
    # (e) full ATen before CUDAUtils.h in spmm.cu; cuSPARSE workspace in device memory
    spmm = read("src/spmm.cu")
    assert spmm.index("#include <ATen/ATen.h>") < spmm.index("#include <ATen/cuda/CUDAUtils.h>")
    assert "cudaMallocManaged(" not in spmm and spmm.count("cudaMalloc(&workspace_buffer") == 2
    # (f) include/cccl only in setup.py's CUDA branch, and setup.py still parses
    setup = read("setup.py")
    cuda_branch = setup[setup.index("| CUDA compilation set"):setup.index("if not (CUDA_HOME is False)")]
    assert '"include", "cccl"' in cuda_branch and setup.count('"cccl"') == 2
    py_compile.compile(str(src / "setup.py"), doraise=True)


def test_cuda_patches_leave_what_a_cpu_build_compiles_untouched(patched_and_pristine):
    """Why CPU wheels keep CPU_PATCH_REVISION: a CPU-only build compiles .cpp/.hpp/.h files
    (with -DCPU_ONLY, which keeps every .cuh include out); no patch changes one of those."""
    src, pristine = patched_and_pristine
    changed = {f.relative_to(src) for f in src.rglob("*") if f.is_file()
               and "__pycache__" not in f.parts and f.read_bytes() != (pristine / f.relative_to(src)).read_bytes()}
    cxx = {f for f in changed if f.suffix not in (".py", ".cu", ".cuh")}
    assert cxx == set(), cxx
    assert Path("src/spmm.cu") in changed and Path("src/coordinate_map_gpu.cuh") in changed
    for hpp in (src / "src").glob("*.hpp"):  # .cuh reach C++ files only behind #ifndef CPU_ONLY
        text = hpp.read_text()
        for m in re.finditer(r'#include "[\w/]+\.cuh"', text):
            assert text.rfind("#ifndef CPU_ONLY", 0, m.start()) != -1, (hpp, m.group())
    assert bm.CPU_PATCH_REVISION <= bm.PATCH_REVISION


def test_every_cuda13_patch_says_why():
    text = (REPO / "scripts" / "build_minkowski.py").read_text()
    block = text[text.index("CUDA13_PATCHES = ("):text.index("class BuildError")]
    for tag in ("(a)", "(b)", "(c)", "(d)", "(e)", "(f)", "managed"):
        assert tag in block, tag
    assert all(len(p) == 5 and p[4] for p in bm.CUDA13_PATCHES)


@pytest.mark.parametrize("nvcc, expected", [((13, 0), "8.0;9.0"), ((12, 4), "7.0;8.0;9.0"),
                                            (None, "8.0;9.0")])
def test_default_arch_list_follows_the_toolkit(nvcc, expected, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bm.default_arch_list(nvcc) == expected
    assert bm.check_arch_list(expected, nvcc) == expected


def test_arch_list_checks():
    with pytest.raises(bm.BuildError, match=r"'7.0;8.0;9.0' has architectures below 7.5.*V100"):
        bm.check_arch_list("7.0;8.0;9.0", (13, 0))
    with pytest.raises(bm.BuildError, match="not a ';'-separated list"):
        bm.check_arch_list("sm_90", (13, 0))
    assert bm.check_arch_list(" 8.0; 9.0+PTX ", (13, 0)) == "8.0;9.0+PTX"
    assert bm.check_arch_list("7.0", (12, 1)) == "7.0"


def test_cpu_wheels_keep_their_cache_key():
    cpu, cuda = bm.cache_key(False, None), bm.cache_key(True, "9.0")
    assert f"-p{bm.CPU_PATCH_REVISION}-" in cpu and f"-p{bm.PATCH_REVISION}-" in cuda
    assert bm.PATCH_REVISION == 3 and bm.CPU_PATCH_REVISION == 2


def _ci_tree(tmp_path, record_sha: str | None, cuda_ok: bool = True) -> Path:
    (tmp_path / ".ci").mkdir(parents=True)
    (tmp_path / "scripts").mkdir()
    for rel in (".ci/run", "scripts/build_minkowski.py"):
        (tmp_path / rel).write_bytes((REPO / rel).read_bytes())
    (tmp_path / "Makefile").write_text("test:\n\t@echo tests-ran\n")
    if record_sha is not None:
        (tmp_path / "scripts" / "cuda_build_check.json").write_text(json.dumps(
            {"build_minkowski_sha256": record_sha, "result": {"is_cuda_available": cuda_ok}}))
    return tmp_path


def test_ci_refuses_a_build_script_the_cuda_check_did_not_prove(tmp_path):
    sha = hashlib.sha256((REPO / "scripts" / "build_minkowski.py").read_bytes()).hexdigest()
    for case, tree in (("match", _ci_tree(tmp_path / "a", sha)),
                       ("stale", _ci_tree(tmp_path / "b", "0" * 64)),
                       ("failed", _ci_tree(tmp_path / "c", sha, cuda_ok=False)),
                       ("missing", _ci_tree(tmp_path / "d", None))):
        proc = subprocess.run(["bash", str(tree / ".ci" / "run")], capture_output=True, text=True)
        if case == "match":
            assert proc.returncode == 0 and "tests-ran" in proc.stdout, proc.stderr
        else:
            assert proc.returncode == 1 and "tests-ran" not in proc.stdout, case
            assert "bash scripts/check_cuda_build.sh" in proc.stderr, proc.stderr


def test_committed_cuda_build_record_describes_a_successful_build():
    record = REPO / "scripts" / "cuda_build_check.json"
    if not record.exists():
        pytest.skip("no CUDA build record yet: run bash scripts/check_cuda_build.sh")
    r = json.loads(record.read_text())
    assert r["result"]["compiled"] and r["result"]["imported"] and r["result"]["is_cuda_available"]
    assert r["stack"]["torch"].startswith("2.11") and r["stack"]["nvcc"].startswith("13.")
    assert re.fullmatch(r"[0-9a-f]{64}", r["build_minkowski_sha256"])
