"""Distributed resume is exact: a real 2-rank CPU (gloo) pretraining run stopped by SIGTERM and
resumed ends with the weights of the uninterrupted 2-rank run, bit for bit; a resume on another
number of ranks is refused, naming both counts. Each rank is its own process, joined as torchrun
joins them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: ``env://``)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_prep.pairs.prep import PrepParams, run as run_prep
from data_prep.synthetic import generate_scene
from mink_ssl.engine.hooks import read_metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ranks")
    for k in range(2):
        generate_scene(root / "raw", f"scene{k:04d}_00", k, n_frames=126)
    run_prep(root / "raw", root / "pairs", PrepParams(frame_skip=25), progress=False)
    return root / "pairs"


def _args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    # batch 1 and min_matches=16000: about a third of the pairs (their match counts under the
    # seeded augmentation) are skipped, so the ranks consume different numbers of samples
    return [sys.executable, "-m", "mink_ssl.cli.pretrain", f"data.root={root}",
            "model=res16unet14s", "model.out_channels=16", "data.voxel_size=0.05",
            "data.num_workers=0", "data.max_matches=null", "data.min_matches=16000",
            "objectives.hardest_contrastive.num_pos_per_pair=128",
            "objectives.hardest_contrastive.num_hn_per_pair=64", "batch_size=1",
            "max_iterations=8", "checkpoint_every=2", "log_every=1", "device=cpu",
            "progress=false", f"hydra.run.dir={run_dir}", *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], world: int, log: Path) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        with open(f"{log}.{rank}", "w") as out:
            procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=out,
                                          stderr=subprocess.STDOUT))
    return procs


def _wait(procs, log: Path, timeout: float = 600) -> tuple[list[int], list[str]]:
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes, [Path(f"{log}.{r}").read_text() for r in range(len(procs))]


@pytest.mark.slow
def test_two_rank_run_stopped_by_sigterm_resumes_bit_identically(pairs, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    codes, logs = _wait(_start(_args(pairs, straight), 2, tmp_path / "straight.log"),
                        tmp_path / "straight.log")
    assert codes == [0, 0], logs

    procs = _start(_args(pairs, stopped), 2, tmp_path / "stopped.log")
    deadline = time.time() + 300
    while not (stopped / "checkpoint_2.pth").exists() and time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.02)
    for p in procs:  # as a scheduler's preemption: every rank gets the signal
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    codes, logs = _wait(procs, tmp_path / "stopped.log")
    assert codes == [128 + signal.SIGTERM] * 2, logs
    assert "stopped by SIGTERM" in logs[0]
    assert not (stopped / "backbone.pth").exists()
    saved = sorted(stopped.glob("checkpoint_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    last = int(saved[-1].stem.split("_")[1])
    assert 2 <= last < 8
    ckpt = torch.load(saved[-1], weights_only=True)
    assert len(ckpt["ranks"]) == 2  # each rank's own state
    # the ranks drew different randomness, and skipped different numbers of batches
    assert not torch.equal(ckpt["ranks"][0]["rng"]["torch"], ckpt["ranks"][1]["rng"]["torch"])
    assert ckpt["ranks"][0]["samples"] != ckpt["ranks"][1]["samples"]

    # one rank cannot continue a 2-rank run exactly: refused, the run directory untouched
    before = {p.name: p.stat().st_mtime_ns for p in stopped.iterdir()}
    one = subprocess.run(_args(pairs, stopped, "resume=auto"), cwd=REPO, capture_output=True,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert one.returncode == 2, one.stderr[-2000:]
    assert "written by a run on 2 rank(s)" in one.stderr and "this run has 1" in one.stderr
    assert "resume_override=true" in one.stderr
    assert {p.name: p.stat().st_mtime_ns for p in stopped.iterdir()} == before

    codes, logs = _wait(_start(_args(pairs, stopped, "resume=auto"), 2,
                               tmp_path / "resumed.log"), tmp_path / "resumed.log")
    assert codes == [0, 0], logs
    assert f"resumed from {saved[-1]} at iteration {last}" in logs[0]
    a = torch.load(straight / "backbone.pth", weights_only=True)["state_dict"]
    b = torch.load(stopped / "backbone.pth", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"
    # the loss curve too: every iteration's loss as in the uninterrupted run
    assert read_metrics(straight) == read_metrics(stopped)
    end = torch.load(stopped / "checkpoint_8.pth", weights_only=True)
    reference = torch.load(straight / "checkpoint_8.pth", weights_only=True)
    assert [r["samples"] for r in end["ranks"]] == [r["samples"] for r in reference["ranks"]]
