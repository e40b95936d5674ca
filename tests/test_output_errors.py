"""Every output write names its file and the fix on an I/O error, results come before optional
exports, and a run directory Hydra cannot create is one line (#26 items 4 and 9). Real faults
only: a file-size limit (``ulimit -f``: RLIMIT_FSIZE set in the child process), a full tmpfs
bind-mounted in a mount namespace (root only), a read-only bind mount, a 300-byte name."""
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mink_ssl.engine.hooks import read_metrics

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

pytestmark = pytest.mark.slow


def _namespace_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


needs_mount = pytest.mark.skipif(not _namespace_available(), reason="needs root and mount "
                                 "namespaces (unshare -m) for a full or read-only file system")


def file_size_limit(nbytes: int):
    """preexec_fn: the child's files cannot grow beyond ``nbytes`` (EFBIG, as ``ulimit -f``)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


def run(cmd: list[str], limit: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
                          preexec_fn=None if limit is None else file_size_limit(limit))


def in_namespace(setup: str, cmd: list[str]) -> subprocess.CompletedProcess:
    """``cmd`` in a mount namespace after ``setup`` (mounts vanish with it)."""
    script = f"set -e; mount --make-rprivate /; {setup}; set +e; {shlex.join(cmd)}"
    return subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)


def full_tmpfs_over(target: Path, scratch: Path, pages: int = 1, free_pages: int = 0) -> str:
    """Shell lines mounting a tmpfs of ``pages + free_pages`` pages over the folder ``target``,
    ``pages`` of them taken by a filler (4 KiB each): the file system is full, or has room for
    ``free_pages`` pages."""
    size = 4 * (pages + free_pages)
    return (f"mount -t tmpfs -o size={size}k tmpfs {scratch}; "
            f"for i in $(seq {pages}); do head -c 4096 /dev/zero > {scratch}/filler$i || true; "
            f"done; mount --bind {scratch} {target}")


def pretrain_cmd(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mink_ssl.cli.pretrain", f"data.root={root}",
            "model=res16unet14s", "model.out_channels=16", "data.voxel_size=0.05",
            "data.max_matches=1000", "objective=[point_info_nce]",
            "objectives.point_info_nce.num_matches=256", "batch_size=2", "device=cpu",
            "checkpoint_every=2", "log_every=1", "progress=false", "data.num_workers=0",
            f"hydra.run.dir={run_dir}", *extra]


def seg_cmd(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mink_ssl.cli.finetune_seg", f"data.root={root}",
            "model=res16unet14s", "model.out_channels=16", "data.num_workers=0",
            "data.eval_split=val", "optim.name=adam", "optim.lr=3e-3", "max_iterations=1",
            "batch_size=2", "checkpoint_every=1", "eval.every=0", "eval.ply_scenes=1",
            "device=cpu", "progress=false", f"hydra.run.dir={run_dir}", *extra]


def clean(stderr: str) -> None:
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]


# -- checkpoints and TensorBoard ----------------------------------------------------------------
def test_checkpoint_over_the_file_size_limit_names_the_limit_not_a_full_disk(synthetic_pairs,
                                                                            tmp_path):
    """ulimit -f used to be reported as '61329.4 MiB free ... is the disk full?'."""
    run_dir = tmp_path / "run"
    res = run(pretrain_cmd(synthetic_pairs, run_dir, "max_iterations=4"), limit=2**20)
    assert res.returncode == 1, res.stderr[-3000:]
    ckpt = run_dir / "checkpoint_2.pth"
    assert f"cannot write {ckpt}: File too large" in res.stderr, res.stderr[-2000:]
    assert ("the file reached this process's file-size limit of 1.0 MiB (1048576 bytes, "
            "ulimit -f): raise the limit (ulimit -f unlimited)") in res.stderr
    assert "disk is full" not in res.stderr and "MiB free" not in res.stderr
    assert "rerun the command with resume=auto" in res.stderr
    clean(res.stderr)
    assert list(read_metrics(run_dir)) == [1, 2]  # what was written before: intact
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    # the advice works: without the limit, resume=auto finishes the run
    res = run(pretrain_cmd(synthetic_pairs, run_dir, "max_iterations=4", "resume=auto"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run_dir / "backbone.pth").is_file() and list(read_metrics(run_dir)) == [1, 2, 3, 4]


@needs_mount
def test_tensorboard_on_a_full_disk_stops_the_run_naming_the_event_file(synthetic_pairs,
                                                                         tmp_path):
    """tb/ on a file system with one free page: the event file fills it after some steps; the
    run stops there naming the file (was: a background thread's bare OSError traceback)."""
    run_dir, scratch = tmp_path / "run", tmp_path / "tiny"
    (run_dir / "tb").mkdir(parents=True)
    scratch.mkdir()
    res = in_namespace(full_tmpfs_over(run_dir / "tb", scratch, free_pages=1),
                       pretrain_cmd(synthetic_pairs, run_dir, "max_iterations=200"))
    assert res.returncode == 1, res.stderr[-3000:]
    assert f"cannot write TensorBoard events to {run_dir / 'tb'}/events.out.tfevents." \
        in res.stderr, res.stderr[-2000:]
    assert "No space left on device" in res.stderr and "the disk is full" in res.stderr
    assert "rerun the command with resume=auto" in res.stderr
    clean(res.stderr)
    logged = list(read_metrics(run_dir))
    assert logged == list(range(1, len(logged) + 1)) and 2 <= len(logged) < 200, logged
    saved = sorted(int(p.stem.split("_")[1]) for p in run_dir.glob("checkpoint_*.pth"))
    assert saved and saved[-1] <= len(logged)  # at most up to the last logged step
    ckpt = torch.load(run_dir / f"checkpoint_{saved[-1]}.pth", weights_only=True)
    assert ckpt["state"]["iteration"] == saved[-1]


# -- segmentation: results before the exports ---------------------------------------------------
@pytest.fixture(scope="module")
def seg_model(rooms, tmp_path_factory):
    """A one-iteration fine-tuned model, and the results of evaluate_only on it (no limit)."""
    root = tmp_path_factory.mktemp("seg")
    res = run(seg_cmd(rooms, root / "trained"))
    assert res.returncode == 0, res.stderr[-3000:]
    model = root / "trained" / "model.pth"
    ref = root / "reference"
    res = run(seg_cmd(rooms, ref, f"evaluate_only={model}"))
    assert res.returncode == 0, res.stderr[-3000:]
    return model, ref


@pytest.mark.parametrize("fails", ["plot", "ply"])
def test_seg_exports_over_the_file_size_limit_leave_the_results(rooms, seg_model, tmp_path,
                                                                fails):
    """ulimit -f between the results files and the export that fails (the plot, or the
    prediction PLY): results.md and results.json are written, whole, before it."""
    model, ref = seg_model
    ply = ref / "predictions" / "Area_5__room_0.ply"
    sizes = {p.name: p.stat().st_size for p in (ref / "results.md", ref / "results.json",
                                                ref / "config.json", ref / "results_iou.png",
                                                ply)}
    small = max(sizes["results.md"], sizes["results.json"], sizes["config.json"])
    assert small < sizes["results_iou.png"] < sizes[ply.name], sizes
    below = sizes["results_iou.png"] if fails == "plot" else sizes[ply.name]
    above = small if fails == "plot" else sizes["results_iou.png"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")  # the user's file, there before
    res = run(seg_cmd(rooms, run_dir, f"evaluate_only={model}"), limit=(above + below) // 2)
    assert res.returncode == 1, res.stderr[-3000:]
    failed = run_dir / ("results_iou.png" if fails == "plot" else "predictions/" + ply.name)
    assert f"cannot write {failed}: File too large" in res.stderr, res.stderr[-2000:]
    assert "file-size limit" in res.stderr and "disk is full" not in res.stderr
    written = (f"{run_dir / 'results.md'} and {run_dir / 'results.json'}" if fails == "plot"
               else f"{run_dir / 'results.md'}, {run_dir / 'results.json'} and "
                    f"{run_dir / 'results_iou.png'}")
    assert f"(The results, {written}, were written before it and are complete.)" in res.stderr
    assert "rerun the same command when fixed" in res.stderr  # evaluate_only: no resume
    clean(res.stderr)
    for name in ("results.md", "results.json") + (("results_iou.png",) if fails == "ply" else ()):
        assert (run_dir / name).read_bytes() == (ref / name).read_bytes(), name
    assert not failed.exists() and (run_dir / "notes.txt").read_text() == "mine"
    assert not [p for p in run_dir.rglob("*.tmp")]


@needs_mount
def test_seg_predictions_on_a_full_disk_leave_the_results_and_resume_redoes_them(rooms,
                                                                                tmp_path):
    """The issue's case: predictions/*.ply at the final evaluation on a full disk. The results
    are written first; resume=auto, once there is room, redoes the final evaluation."""
    run_dir, scratch = tmp_path / "run", tmp_path / "tiny"
    (run_dir / "predictions").mkdir(parents=True)
    scratch.mkdir()
    res = in_namespace(full_tmpfs_over(run_dir / "predictions", scratch),
                       seg_cmd(rooms, run_dir))
    assert res.returncode == 1, res.stderr[-3000:]
    ply = run_dir / "predictions" / "Area_5__room_0.ply"
    assert f"cannot write {ply}: No space left on device" in res.stderr, res.stderr[-2000:]
    assert "the disk is full" in res.stderr and "rerun the command with resume=auto" in res.stderr
    assert (f"(The results, {run_dir / 'results.md'}, {run_dir / 'results.json'} and "
            f"{run_dir / 'results_iou.png'}, were written before it and are complete.)"
            in res.stderr)
    clean(res.stderr)
    first = json.loads((run_dir / "results.json").read_text())
    assert first["iterations"] == 1 and 0 <= first["miou"] <= 1
    assert (run_dir / "model.pth").is_file() and (run_dir / "checkpoint_1.pth").is_file()

    res = run(seg_cmd(rooms, run_dir, "resume=auto"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "had already made its 1 iterations" in res.stdout
    assert ply.stat().st_size > 0
    again = json.loads((run_dir / "results.json").read_text())
    assert again["confusion"] == first["confusion"] and again["miou"] == first["miou"]


# -- detection: results before the plot --------------------------------------------------------
DETECTION_REPORT = """
import sys, json, resource, torch
from pathlib import Path
from mink_ssl.eval.detection import evaluate_detection
from mink_ssl.errors import RESUME, OutputError
from mink_ssl.tasks.detection.inference import write_det_results

g = torch.Generator().manual_seed(0)
centers = torch.rand(12, 3, generator=g) * 4
gt = torch.cat([centers, torch.full((12, 3), 0.5)], 1)
pred = torch.cat([centers + 0.05 * torch.randn(12, 3, generator=g), torch.full((12, 3), 0.5)], 1)
labels, scene = torch.arange(12) % 3, torch.arange(12) // 6
result = evaluate_detection(pred, torch.rand(12, generator=g), labels, scene, gt, labels, scene,
                            3, class_names=["a", "b", "c"])
extra = {"split": "val", "iterations": 7}
ref, out = Path(sys.argv[1]), Path(sys.argv[2])
write_det_results(ref, result, extra, then=RESUME)
sizes = {p.name: p.stat().st_size for p in ref.iterdir()}
limit = (max(sizes["results.md"], sizes["results.json"]) + sizes["results_pr.png"]) // 2
assert max(sizes["results.md"], sizes["results.json"]) < limit < sizes["results_pr.png"], sizes
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    write_det_results(out, result, extra, then=RESUME)
except OutputError as e:
    print(e)
    sys.exit(1)
"""


def test_detection_plot_over_the_file_size_limit_leaves_the_results(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", DETECTION_REPORT, str(ref), str(out)], cwd=REPO,
                         env=ENV, capture_output=True, text=True, timeout=300,
                         preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"cannot write {out / 'results_pr.png'}: File too large" in res.stdout, res.stdout
    assert "file-size limit" in res.stdout and "resume=auto" in res.stdout
    assert (f"(The results, {out / 'results.md'} and {out / 'results.json'}, were written "
            "before it and are complete.)") in res.stdout
    clean(res.stderr)
    for name in ("results.md", "results.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes()
    data = json.loads((out / "results.json").read_text())
    assert data["split"] == "val" and data["iterations"] == 7 and "mAP@0.25" in data
    assert not (out / "results_pr.png").exists() and not list(out.glob(".*.tmp"))


# -- the run directory Hydra creates (#26 item 9) -----------------------------------------------
def test_run_directory_with_a_300_byte_name_is_one_line_exit_2(synthetic_pairs, tmp_path):
    run_dir = tmp_path / ("x" * 300) / "run"
    res = run(pretrain_cmd(synthetic_pairs, run_dir, "max_iterations=1"))
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"mink-ssl-pretrain: error: cannot create the run directory "
                               f"{run_dir}: the folder name xxxx")
    assert "is 300 bytes long, more than the 255 its file system allows; choose another " \
        "hydra.run.dir with shorter names" in lines[0]
    assert list(tmp_path.iterdir()) == []


@needs_mount
@pytest.mark.parametrize("exists", [False, True])
def test_read_only_run_directory_is_one_line_exit_2(synthetic_pairs, tmp_path, exists):
    parent = tmp_path / "ro"
    run_dir = parent / "run"
    run_dir.mkdir(parents=True) if exists else parent.mkdir()
    (parent / "kept.txt").write_text("before")
    res = in_namespace(f"mount --bind {parent} {parent}; mount -o remount,bind,ro {parent}",
                       pretrain_cmd(synthetic_pairs, run_dir, "max_iterations=1"))
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    if exists:
        assert lines[0] == (f"mink-ssl-pretrain: error: cannot write into the run directory "
                            f"{run_dir}: its file system is read-only; choose another "
                            "hydra.run.dir")
    else:
        assert lines[0] == (f"mink-ssl-pretrain: error: cannot create the run directory "
                            f"{run_dir}: Read-only file system ({run_dir}); the file system is "
                            "read-only: choose a writable hydra.run.dir")
    assert sorted(p.name for p in parent.iterdir()) == ["kept.txt"] + (["run"] if exists else [])
    assert (parent / "kept.txt").read_text() == "before"
