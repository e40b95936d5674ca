"""The Docker image's recipe, parsed with a real Dockerfile parser (no Docker engine needed),
and the launch scripts' syntax."""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dockerfile():
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(path=str(REPO / "docker" / "Dockerfile"))
    return parser


def _runs(parser) -> list[str]:
    return [i["value"] for i in parser.structure if i["instruction"] == "RUN"]


def test_base_image_is_the_proven_cuda13_stack(dockerfile):
    base = dockerfile.baseimage  # resolved from the ARG before FROM
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn\d*-)?devel-ubuntu\d+\.\d+", base)
    assert m and (m.group(1), m.group(2)) == ("13", "0"), base
    # torch 2.11.0 from PyPI is the CUDA 13.0 build that scripts/check_cuda_build.sh compiles
    # MinkowskiEngine against
    assert dockerfile.args["TORCH_SPEC"] == "torch==2.11.0"
    assert dockerfile.args["TORCH_INDEX_URL"] in ("", '""')
    check = (REPO / "scripts" / "check_cuda_build.sh").read_text()
    assert "TORCH_VERSION:-2.11.0" in check and "CUDA_TOOLKIT:-13.0." in check


def test_minkowski_engine_is_forced_to_cuda_through_the_shared_patch_step(dockerfile):
    setup = [r for r in _runs(dockerfile) if "make setup" in r]
    assert len(setup) == 1 and "ME_CUDA=yes" in setup[0]  # no GPU during docker build
    archs = dockerfile.args["TORCH_CUDA_ARCH_LIST"].strip('"').split(";")
    assert archs == ["8.0", "9.0"]  # A100, H100; nvcc 13 no longer compiles sm_70 (V100)
    # the same code path as `make setup` on a workstation: no second copy of the patches
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert "collections.abc" not in text and "numpy.distutils" not in text
    assert "build_minkowski.py" in (REPO / "scripts" / "setup.sh").read_text()


def test_build_fails_without_cuda_and_runs_as_non_root(dockerfile):
    runs = _runs(dockerfile)
    check = [r for r in runs if "is_cuda_available" in r]
    assert check and runs.index(check[0]) > runs.index(next(r for r in runs if "make setup" in r))
    users = [i["value"] for i in dockerfile.structure if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any("useradd" in r for r in runs)


def test_dockerignore_keeps_the_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


@pytest.mark.parametrize("script", ["launch_single_node.sh", "launch_multi_node.sh",
                                    "slurm_pretrain.sbatch"])
def test_launch_scripts_are_valid_bash_and_pass_overrides(script):
    path = REPO / "docker" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "torchrun" in text and '"$@"' in text and "mink_ssl.cli.pretrain" in text
