"""The MinkowskiEngine patch step (scripts/build_minkowski.py), run on the real 0.5.4 sdist."""
import importlib.util
import py_compile
import re
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("build_minkowski", REPO / "scripts" / "build_minkowski.py")
bm = importlib.util.module_from_spec(spec)
sys.modules["build_minkowski"] = bm
spec.loader.exec_module(bm)


@pytest.fixture(scope="module")
def sdist_src(tmp_path_factory):
    try:
        sdist = bm.fetch_sdist(tmp_path_factory.mktemp("dl"))  # cached by make setup
    except bm.BuildError as e:
        pytest.skip(f"MinkowskiEngine sdist unavailable: {e}")
    out = tmp_path_factory.mktemp("src")
    with tarfile.open(sdist) as tar:
        tar.extractall(out, filter="data")
    return out / "MinkowskiEngine-0.5.4"


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
    import MinkowskiEngine as ME

    assert ME.__version__ == "0.5.4"
    assert bm.installed_backend() in ("cpu", "cuda")


def test_bad_cuda_mode():
    with pytest.raises(bm.BuildError, match="--cuda must be auto, yes or no, got 'maybe'"):
        bm.want_cuda("maybe")
