"""The package installs as a package: a wheel built from the checkout, installed (not editable)
into a folder of its own, runs its CLIs from another directory with the configs it ships."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A wheel of the checkout installed with --target (no dependencies: they are this venv's)."""
    root = tmp_path_factory.mktemp("install")
    wheels, target, source = root / "wheels", root / "site", root / "source"
    # a copy without build outputs, so that nothing stale (build/lib) can enter the wheel
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
                           capture_output=True, text=True, cwd=root)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("mink_ssl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n for n in names if n.startswith("mink_ssl/configs/") and n.endswith(".yaml"))
    in_repo = sorted("mink_ssl/configs/" + p.relative_to(REPO / "configs").as_posix()
                     for p in (REPO / "configs").rglob("*.yaml"))
    assert shipped == in_repo  # every config, nothing else under that name
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                           "--target", str(target), str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return target


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          env=env)


def test_the_installed_package_is_the_one_imported(installed, tmp_path):
    done = _run(installed, tmp_path, "-c", "import mink_ssl, mink_ssl.cli._hydra as h; "
                "print(mink_ssl.__file__); print(h.CONFIG_DIR)")
    assert done.returncode == 0, done.stderr
    module, configs = done.stdout.split()
    assert module.startswith(str(installed)) and configs == str(installed / "mink_ssl/configs")
    help_ = _run(installed, tmp_path, "-m", "mink_ssl.cli.weights", "--help")
    assert help_.returncode == 0 and "inspect" in help_.stdout


@pytest.mark.slow
def test_a_two_iteration_pretraining_from_another_directory(installed, synthetic_pairs,
                                                            tmp_path):
    run = tmp_path / "run"
    done = _run(installed, tmp_path, "-m", "mink_ssl.cli.pretrain",
                f"data.root={synthetic_pairs}", "model=res16unet14a", "model.out_channels=16",
                "data.voxel_size=0.05", "data.num_workers=0", "data.max_matches=2000",
                "objective=[hardest_contrastive]",
                "objectives.hardest_contrastive.num_pos_per_pair=128",
                "objectives.hardest_contrastive.num_hn_per_pair=64", "max_iterations=2",
                "batch_size=2", "device=cpu", "checkpoint_every=2", "log_every=1",
                "progress=false", f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(run / "checkpoint_2.pth", weights_only=True)["state"]["iteration"] == 2
    assert (run / "backbone.pth").is_file()
