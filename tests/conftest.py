"""Shared fixtures. Tests that need ../shared (real sensor data) skip with a reason without it.
Shared helper functions and constants are in tests/helpers.py."""
from __future__ import annotations

import os
from pathlib import Path

# MinkowskiEngine's CPU kernels accumulate in OpenMP thread order, and ME links its own OpenMP
# runtime (torch.set_num_threads does not reach it): tests that compare two runs to 1e-6 (exact
# resume, DDP equivalence) need one thread, set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402  (after OMP_NUM_THREADS)
import pytest  # noqa: E402

# the helpers tests import are in tests/helpers.py (``from helpers import ...``), not here
from helpers import REALDATA, read_depth_png, write_benchmark  # noqa: E402


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"real sensor data not found at {REALDATA} (it sits beside the repo in CI; "
                    "users without it skip these tests)")
    return REALDATA


@pytest.fixture(scope="session")
def kitchen(realdata) -> Path:
    """7-Scenes RedKitchen frames in ScanNet export layout."""
    path = realdata / "7scenes-redkitchen-a"
    if not (path / "depth").is_dir():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="session")
def kitchen_frame(kitchen):
    """(depth uint16 (480, 640), intrinsics 4x4, pose 4x4) of real frame 0."""
    depth = read_depth_png(kitchen / "depth" / "0.png")
    K = np.loadtxt(kitchen / "intrinsic" / "intrinsic_depth.txt")
    pose = np.loadtxt(kitchen / "pose" / "0.txt")
    return depth, K, pose


@pytest.fixture(scope="session")
def synthetic_pairs(tmp_path_factory) -> Path:
    """Pair prep output of one synthetic ScanNet scene (76 frames, fragments every 25)."""
    from data_prep.pairs.prep import PrepParams, run as run_prep
    from data_prep.synthetic import generate_scene

    root = tmp_path_factory.mktemp("one_scene")
    generate_scene(root / "raw", "scene0000_00", 0, n_frames=76)
    run_prep(root / "raw", root / "pairs", PrepParams(frame_skip=25), progress=False)
    return root / "pairs"


@pytest.fixture(scope="module")
def rooms(tmp_path_factory):
    return write_benchmark(tmp_path_factory.mktemp("seg") / "rooms", {
        "train": [f"Area_1/room_{i}" for i in range(6)],
        "val": ["Area_5/room_0", "Area_5/room_1"], "test": []})
