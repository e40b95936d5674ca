"""The benchmarks stay alive: every ``benchmarks/bench_*.py`` runs with its smallest arguments.

Each script found by the glob runs as a subprocess (one OpenMP thread, from the repository root)
with the arguments of its entry in ``SMALLEST``; the test asserts exit code 0 and that the
output has the lines the script promises, its ratios among them (a number followed by ``x``).
A new script without an entry fails ``test_every_benchmark_has_smallest_arguments`` (and its own
run) until it gets one. The numbers are not judged: one round on a loaded CI machine measures
nothing; what is tested is that the measurement still runs to its report.

Measured on the 2-core development machine with ../shared/realdata present: backbone 8 s,
objectives 33 s, overlap 22 s, pretrain_step 8 s, storage 16 s (88 s in all). Without it,
pretrain_step (67 s), objectives (44 s) and storage (35 s) render synthetic scenes instead, and
overlap, whose baseline comparison needs the real frames, is skipped. scannet_scale (32 s) needs
the real frames too.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
# the real frames the data benchmarks read (benchmarks/_data.py: KITCHEN)
KITCHEN = REPO.parent / "shared" / "realdata" / "7scenes-redkitchen-a"
TIMEOUT_S = 600  # a hung benchmark fails here instead of stalling CI

N = r"\d+(?:\.\d+)?"  # a number as the scripts print it
RATIO = re.compile(rf"(?<![\w.]){N}x\b")  # a ratio: a number followed by x


@dataclass(frozen=True)
class Smallest:
    """How to run a benchmark as briefly as it allows, and what its output must contain."""
    args: list[str]
    # regexes that must each match a line of stdout (re.search; ratios written with {N}x)
    lines: list[str]
    needs_real_frames: bool = False  # it cannot run without ../shared/realdata


SMALLEST: dict[str, Smallest] = {
    "bench_backbone.py": Smallest(
        # both engines on the smallest network; its promised line per network:
        # <network> speed-up ... fwd+bwd <ratio>x (IQR ...), forward <ratio>x
        ["--repeats", "1", "--voxel-size", "0.05", "--models", "Res16UNet14S"],
        [rf"^Res16UNet14S speed-up .*fwd\+bwd {N}x .*forward {N}x"]),
    "bench_objectives.py": Smallest(
        # every registered objective (the run's test adds a row check for each)
        ["--model", "Res16UNet14S", "--batch", "1", "--repeats", "1", "--voxel-size", "0.1"],
        [rf"^backbone\s+0,1\s+{N}ms\s+{N}ms\s+{N}ms\s+{N}x\s+{N}\s+-?{N}MB\s+-?{N}x$"]),
    "bench_overlap.py": Smallest(
        ["--frames", "2", "--repeats", "1", "--rooms", "1"],
        [rf"^  ratio baseline / ours: {N}x \(over ours' range: {N}x to {N}x; target 30x\)$",
         r"^Synthetic scene: 50 fragments, ",
         r"^  target: under 30 s and 2 GB on 2 cores: (met|NOT met)"],
        needs_real_frames=True),
    "bench_prep_scannet.py": Smallest(
        # a 50-frame scene of small images (2 fragments); its stage lines and both ratios
        ["--frames", "50", "--frame-skip", "25", "--color-size", "324x242", "--depth-size",
         "160x120", "--repeats", "1"],
        [r"^  decode : +[\d.]+ s CPU", r"^  overlap: +[\d.]+ s CPU", r"^  write  : +[\d.]+ s CPU",
         rf"^  core-hours: {N} .*PointContrast's 750 core-hours / ours: {N}x",
         rf"^  disk: {N} [GM]B .*PointContrast's 1 TB / ours: {N}x"]),
    "bench_pretrain_step.py": Smallest(
        ["--model", "Res16UNet14S", "--batch", "1", "--steps", "1", "--repeats", "1",
         "--workers", "1", "--voxel-size", "0.05"],
        [rf"^  ratio full / bare \(per round\): median {N}x, IQR {N} \(target <= 1\.15x\)$",
         r"^  loader alone: .* pairs/s: (keeps up|BOTTLENECK)$"]),
    "bench_scannet_scale.py": Smallest(
        # 6 hard-linked scenes of 10 pairs, one worker, one step of the smallest network
        ["--scenes", "6", "--pairs", "60", "--workers", "1", "--steps", "1", "--batch", "1",
         "--model", "res16unet14s", "--voxel-size", "0.1", "--frame-skip", "50",
         "--sweep-items", "12", "--repeats", "1"],
        [rf"^  arrays {N} MB; held: list of tuples / ours {N}x; parse time {N}x; target < 100 MB",
         rf"^  resume after k batches .*: exact; sampler state in a checkpoint {N} bytes .* {N}x",
         rf"^loader start-up, 1 workers .*: {N}x \(IQR {N}; load average",
         rf"^start-up, 1 workers: first step {N} s after start .* {N}x the one-scene folder's",
         rf"^sweep, 1 workers: .*open files {N}x.*, resident memory {N}x"],
        needs_real_frames=True),
    "bench_storage.py": Smallest(
        [],
        [rf"^  float64 xyz npz +: +{N} KB  -> ours is {N}x smaller$",
         rf"^  published \(N, 7\) float64 npz +: +{N} KB  -> ours is {N}x smaller$",
         rf"^  occupied 2\.5 cm voxels preserved +: mean {N}%, min {N}%$"]),
}


def discovered() -> list[str]:
    return sorted(p.name for p in BENCHMARKS.glob("bench_*.py"))


def objective_row(name: str) -> str:
    """bench_objectives' table row of ``name``: its time, IQR, bare time and ratio."""
    return rf"^{re.escape(name)}\s+[0-9,]+\s+{N}ms\s+{N}ms\s+{N}ms\s+{N}x\s"


def test_every_benchmark_has_smallest_arguments():
    scripts = discovered()
    assert scripts, f"no benchmarks/bench_*.py found under {BENCHMARKS}"
    missing = [s for s in scripts if s not in SMALLEST]
    assert not missing, (f"{', '.join(missing)}: no entry in SMALLEST of {Path(__file__).name}; "
                         "add the script's smallest arguments and the ratio lines it prints")
    stale = sorted(set(SMALLEST) - set(scripts))
    assert not stale, f"SMALLEST names scripts that benchmarks/ no longer has: {', '.join(stale)}"
    for name, entry in SMALLEST.items():
        assert any(f"{N}x" in rx for rx in entry.lines), \
            f"{name}: SMALLEST lists no ratio line (a number followed by x) among {entry.lines}"


@pytest.mark.slow
@pytest.mark.parametrize("script", discovered())
def test_benchmark_runs_with_its_smallest_arguments(script):
    if script not in SMALLEST:
        pytest.fail(f"benchmarks/{script} has no entry in SMALLEST of {Path(__file__).name}: "
                    "add its smallest arguments and the ratio lines it prints")
    entry = SMALLEST[script]
    if entry.needs_real_frames and not (KITCHEN / "depth").is_dir():
        pytest.skip(f"{script} needs the real 7-Scenes frames at {KITCHEN} (../shared/realdata)")
    lines = list(entry.lines)
    if script == "bench_objectives.py":  # a row for every registered objective
        from mink_ssl.objectives import OBJECTIVES

        lines += [objective_row(n) for n in OBJECTIVES.names() if not n.startswith("_")]

    cmd = [sys.executable, str(BENCHMARKS / script), *entry.args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    # its own process group: a timeout ends the benchmark's child processes with it
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"{' '.join(cmd[1:])} still running after {TIMEOUT_S} s; its output "
                        f"so far:\n--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-3000:]}")
    res = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    seconds = time.perf_counter() - t0
    print(f"{script} {' '.join(entry.args)}: {seconds:.1f} s")
    report = (f"$ {' '.join(cmd[1:])}  (exit {res.returncode}, {seconds:.0f} s)\n"
              f"--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-4000:]}")
    assert res.returncode == 0, f"{script} failed\n{report}"
    out = res.stdout.splitlines()
    absent = [rx for rx in lines if not any(re.search(rx, line) for line in out)]
    assert not absent, (f"{script} ran but its output lacks lines it promises, matching "
                        f"{absent}\n{report}")
    assert any(RATIO.search(line) for line in out), f"{script} printed no ratio\n{report}"
