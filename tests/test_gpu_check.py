"""`make gpu-check` (scripts/gpu_check.py) driven end to end on CPU, so it cannot rot while no
GPU is around: the same checks on real fragments, small sizes, GPU_CHECK_DEVICE=cpu, with
open3d and hydra made unimportable in every process it starts (the GPU machine has neither)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata" / "7scenes-redkitchen-a"
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


# every process started with this on PYTHONPATH refuses open3d, hydra and omegaconf
BLOCKER = """
import importlib.abc, sys
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('open3d', 'hydra', 'omegaconf'):
            raise ImportError(name + ' is blocked by the test (the GPU machine lacks it)')
sys.meta_path.insert(0, _Blocker())
"""


@pytest.mark.slow
@pytest.mark.skipif(not (REALDATA / "depth").is_dir(), reason=f"real frames absent: {REALDATA}")
def test_gpu_check_runs_on_cpu(tmp_path):
    gpu_check.prepare_data(tmp_path / "gc", frame_skip=10)  # `make gpu-wheels`' data step
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, GPU_CHECK_DEVICE="cpu", OMP_NUM_THREADS="1", OUT=str(tmp_path),
               PYTHONPATH=str(blocker))
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "run", "--dir",
         str(tmp_path / "gc"), "--model", "Res16UNet14S", "--voxel-size", "0.1", "--batch", "2",
         "--repeats", "3", "--check-pairs", "2"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gc" / "results.json").read_text())
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == res  # $OUT copy
    assert res["ok"] and res["device"].startswith("CPU") and not res["stack"]["me_cuda"]
    assert set(res["correctness"]) == {"forward_backward", "objectives", "detection_ops",
                                       "distributed", "engines_equal"}
    eq = res["correctness"]["engines_equal"]  # MinkowskiEngine vs spconv, same weights
    assert eq["ok"] and eq["feature_rel_err"] < 1e-5 and eq["params_compared"] > 50
    speed = res["speed"]["engines_speed"]
    assert speed["speedup"]["n"] == 3 and speed["speedup"]["median"] > 0
    assert "speed engines (Res16UNet14S fwd+bwd" in proc.stdout
    fb = res["correctness"]["forward_backward"]
    assert fb["feature_rel_err"] == 0.0 and fb["params_compared"] > 50  # CPU vs CPU: identical
    import mink_ssl.objectives  # noqa: F401
    from mink_ssl.objectives import OBJECTIVES

    ran = res["correctness"]["objectives"]["objectives"]
    assert set(ran) == {n for n in OBJECTIVES.names() if not n.startswith("_")}
    assert all(r["ok"] and r["loss"] == r["loss"] for r in ran.values())
    assert res["correctness"]["distributed"]["world_size"] == 2  # gloo, two ranks on CPU
    step = res["speed"]["pretrain_step"]
    assert step["pairs"] == 2 and step["full_ms"]["n"] == step["bare_ms"]["n"] == 3
    assert step["ratio_full_over_bare"]["median"] > 0 and step["steps_per_s"] > 0
    assert res["speed"]["segmentation_step"]["step_ms"]["median"] > 0
    # the prepared data is real and small enough to travel to the GPU machine
    pairs = tmp_path / "gc" / "data" / "pairs"
    assert (pairs / "manifest.json").exists() and not (tmp_path / "gc" / "data" / "raw" / "redkitchen").exists()
    assert gpu_check._size(pairs) < 16 * 2**20
    assert "full/bare" in proc.stdout and "ok   forward_backward" in proc.stdout
    blocked = subprocess.run([sys.executable, "-c", "import open3d"], env=env, capture_output=True,
                             text=True)
    assert blocked.returncode != 0 and "blocked by the test" in blocked.stderr


def test_cuda_run_without_prepared_data_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="make gpu-wheels"):
        gpu_check.run(tmp_path, "cuda", [])


def test_missing_needs_install_from_the_wheel_folder_only(tmp_path, monkeypatch):
    wheels = REPO / "build" / "gpu-check" / "wheels"
    if not any(wheels.glob("geomloss-*.whl")):
        pytest.skip(f"no prepared wheels in {wheels}: run `make gpu-wheels`")
    (tmp_path / "wheels").mkdir()
    for w in wheels.glob("*.whl"):
        (tmp_path / "wheels" / w.name).write_bytes(w.read_bytes())
    # pretend geomloss is absent: it must come from the folder, with no index (no network)
    monkeypatch.setattr(gpu_check, "NEEDS", {"geomloss_absent_here": "geomloss"})
    site = gpu_check.install_needs(tmp_path)
    assert site is not None and (site / "geomloss" / "__init__.py").exists()
    monkeypatch.setattr(gpu_check, "NEEDS", {"numpy_absent_here": "numpy"})
    with pytest.raises(subprocess.CalledProcessError):  # numpy is not in the folder
        gpu_check.install_needs(tmp_path)
    # a GPU machine without spconv (its CUDA wheels are too big to carry): spconv-triton
    real = importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name, *a: None if name in (
        "spconv", "spconv_triton") else real(name, *a))
    monkeypatch.setattr(gpu_check, "NEEDS", {})
    site = gpu_check.install_needs(tmp_path)
    assert (site / "spconv_triton" / "pytorch" / "ops.py").exists()


def test_no_wheels_prepared_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "NEEDS", {"geomloss_absent_here": "geomloss"})
    with pytest.raises(SystemExit, match="make gpu-wheels"):
        gpu_check.install_needs(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not (REALDATA / "depth").is_dir(), reason=f"real frames absent: {REALDATA}")
def test_one_rank_ddp_is_wrapped_and_matches_the_plain_model(tmp_path):
    """The branch a one-GPU machine takes (world size 1, DDP wrapped by hand), here with gloo."""
    import torch

    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_checks

    root = gpu_check.prepare_data(tmp_path / "gc", frame_skip=10)
    sizes = gpu_checks.Sizes(model="Res16UNet14S", voxel_size=0.1, ddp_world=1)
    r = gpu_checks.check_distributed(root, torch.device("cpu"), sizes)
    assert r["ok"] and r["world_size"] == 1 and r["backend"] == "gloo", r
    assert r["ddp_vs_plain_rel_err"] < 1e-5


@pytest.mark.slow
@pytest.mark.skipif(not (REALDATA / "depth").is_dir(), reason=f"real frames absent: {REALDATA}")
def test_gpu_check_without_minkowski_engine_runs_on_spconv(tmp_path):
    """`--no-me` (a GPU machine where ME's CUDA build does not fit the time): the checks
    process cannot import MinkowskiEngine, every check runs on spconv, and the two engine
    comparisons say they were skipped and why."""
    gpu_check.prepare_data(tmp_path / "gc", frame_skip=10)
    env = dict(os.environ, GPU_CHECK_DEVICE="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "run", "--dir",
         str(tmp_path / "gc"), "--model", "Res16UNet14S", "--voxel-size", "0.1", "--batch", "2",
         "--repeats", "3", "--check-pairs", "2", "--no-me"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gc" / "results.json").read_text())
    assert res["ok"] and res["stack"]["minkowski_engine"] == "missing"
    assert res["stack"]["spconv"] == "spconv"
    for part, name in (("correctness", "engines_equal"), ("speed", "engines_speed")):
        assert "MinkowskiEngine is left out" in res[part][name]["skipped"]
    assert res["correctness"]["forward_backward"]["params_compared"] > 50
    assert "skip engines_equal" in proc.stdout
