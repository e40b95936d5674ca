"""Prep never loses or silently corrupts data: raw/out overlap, foreign folders and symlinks in
--out, one writer per --out, orphan workers, incomplete scenes, signals, output-side I/O errors,
bad frames and scene names. Faults are real: real processes and signals, a full or read-only
file system (a private mount namespace where the sandbox allows), real damaged bytes."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import main as prep_main
from data_prep.pairs.prep import PrepParams, run
from data_prep.scannet.sens import SensReader
from data_prep.scannet.sens_writer import write_sens
from mink_ssl.locks import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]
FAST = ["--frame-skip", "25", "--min-points", "100", "--no-progress"]
SLOW = ["--frame-skip", "2", "--min-points", "100", "--no-progress"]  # ~3 s per scene


def tree_digest(root: Path) -> dict:
    """{relative path: sha256 or link target} of everything under ``root`` (links not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


@pytest.fixture(scope="module")
def sens_file(tmp_path_factory) -> Path:
    from data_prep.synthetic import generate_scene

    src = tmp_path_factory.mktemp("src")
    generate_scene(src, "scene0000_00", 0, n_frames=101, image_size=(160, 120))
    return src / "scene0000_00" / "scene0000_00.sens"


def make_raw(root: Path, sens: Path, n: int) -> Path:
    """``n`` scene folders whose .sens link to one synthetic scan (plus a mesh-like file)."""
    for k in range(n):
        d = root / f"scene{k:04d}_00"
        d.mkdir(parents=True)
        (d / f"{d.name}.sens").symlink_to(sens)
        (d / f"{d.name}_vh_clean_2.ply").write_bytes(b"ply raw mesh %d" % k)
    return root


def prep_cmd(raw, out, *extra):
    return [sys.executable, "-m", "data_prep.cli", "scannet", "--raw", str(raw), "--out",
            str(out), *extra]


def spawn(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def wait_for(cond, timeout=60.0, what="condition"):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def scene_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("scene*") if (p / "scene.json").is_file())


def assert_complete(out: Path) -> None:
    for d in scene_dirs(out):
        files = json.loads((d / "scene.json").read_text())["files"]
        for name, size in files.items():
            assert (d / name).stat().st_size == size, (d, name)
    assert not list(out.glob(".tmp-*")), list(out.glob(".tmp-*"))


# -- 1. raw and out overlap: refused in every spelling, raw untouched ---------------------------
@pytest.mark.parametrize("spelling", ["same", "dotdot", "trailing", "out_inside_raw",
                                      "raw_inside_out", "symlink_to_raw", "symlink_to_parent"])
def test_out_overlapping_raw_is_refused_and_raw_kept(spelling, sens_file, tmp_path, capsys):
    raw = make_raw(tmp_path / "scans", sens_file, 2)
    before = tree_digest(tmp_path)
    (tmp_path / "link").symlink_to(raw)
    (tmp_path / "plink").symlink_to(tmp_path)
    out = {"same": raw, "dotdot": raw / ".." / "scans", "trailing": Path(f"{raw}/"),
           "out_inside_raw": raw / "pairs", "raw_inside_out": tmp_path,
           "symlink_to_raw": tmp_path / "link", "symlink_to_parent": tmp_path / "plink"}[spelling]
    assert prep_main(["scannet", "--raw", str(raw), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "must be a folder of its own, outside the raw data" in err and str(raw) in err
    (tmp_path / "link").unlink()
    (tmp_path / "plink").unlink()
    assert tree_digest(tmp_path) == before


def test_foreign_folder_and_tmp_symlink_in_out_are_never_removed(sens_file, tmp_path, capsys):
    raw = make_raw(tmp_path / "scans", sens_file, 2)
    out = tmp_path / "out"
    # a folder named like a scene that prep did not make (e.g. copied raw data), no scene.json
    foreign = out / "scene0000_00"
    foreign.mkdir(parents=True)
    (foreign / "scene0000_00_vh_clean_2.ply").write_bytes(b"precious")
    assert prep_main(["scannet", "--raw", str(raw), "--out", str(out), *FAST]) == 1
    err = capsys.readouterr().err
    assert f"{foreign} is a folder prep did not create" in err and "Move it out" in err
    assert (foreign / "scene0000_00_vh_clean_2.ply").read_bytes() == b"precious"
    shutil.rmtree(foreign)
    # a .tmp-<scene> symlink out of --out: never followed, never emptied
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (out / ".tmp-scene0001_00").symlink_to(outside)
    assert prep_main(["scannet", "--raw", str(raw), "--out", str(out), *FAST]) == 1
    assert f"is a symlink to {outside}" in capsys.readouterr().err
    assert tree_digest(outside) == {"keep.txt": hashlib.sha256(b"keep").hexdigest()}
    (out / ".tmp-scene0001_00").unlink()
    assert prep_main(["scannet", "--raw", str(raw), "--out", str(out), *FAST]) == 0
    assert len(scene_dirs(out)) == 2 and (out / "scene0000_00" / ".mink-ssl-scene").is_file()


# -- 2. one writer per --out; orphans; "done" means complete ------------------------------------
@pytest.mark.slow
def test_second_concurrent_prep_is_refused_and_first_completes(sens_file, tmp_path):
    raw = make_raw(tmp_path / "scans", sens_file, 3)
    out = tmp_path / "out"
    first = spawn(prep_cmd(raw, out, *SLOW))
    wait_for(lambda: (out / LOCK_NAME).is_file(), what="the first prep's lock")
    second = spawn(prep_cmd(raw, out, *SLOW))
    _, err2 = second.communicate(timeout=120)
    _, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 1
    assert f"{out} is in use by another run: pid {first.pid}" in err2, err2
    assert len(scene_dirs(out)) == 3
    assert_complete(out)
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_stale_lock_of_a_dead_process_is_taken_over(sens_file, tmp_path, capsys):
    raw = make_raw(tmp_path / "scans", sens_file, 2)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                             "what": "prep", "command": "killed run"}))
    assert prep_main(["scannet", "--raw", str(raw), "--out", str(out), *FAST]) == 0
    assert f"taking over the lock of {out} left by a run that is no longer running (pid " \
           f"{dead.pid}" in capsys.readouterr().out
    assert len(scene_dirs(out)) == 2


@pytest.mark.slow
def test_sigkilled_prep_leaves_no_orphan_workers_and_rerun_repairs(sens_file, tmp_path):
    psutil = pytest.importorskip("psutil")
    raw = make_raw(tmp_path / "scans", sens_file, 6)
    out = tmp_path / "out"
    parent = spawn(prep_cmd(raw, out, *SLOW, "--workers", "2"))
    wait_for(lambda: len(list(out.glob(".tmp-*"))) >= 1, what="a scene in progress")
    workers = psutil.Process(parent.pid).children(recursive=True)
    assert len(workers) >= 2
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"orphaned workers still running: {alive}"
    # the rerun takes the dead run's lock over, removes its temporaries and completes
    rerun = subprocess.run(prep_cmd(raw, out, *SLOW, "--workers", "2"), cwd=REPO,
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert rerun.returncode == 0, rerun.stderr
    assert "taking over the lock" in rerun.stdout
    assert len(scene_dirs(out)) == 6
    assert_complete(out)


def test_scene_with_a_missing_or_truncated_file_is_redone(sens_file, tmp_path):
    raw = make_raw(tmp_path / "scans", sens_file, 2)
    out = tmp_path / "out"
    params = PrepParams(frame_skip=25, min_points=100)
    run(raw, out, params, progress=False)
    good = {d.name: tree_digest(d) for d in scene_dirs(out)}
    (out / "scene0000_00" / "fragments.npz").unlink()
    with open(out / "scene0001_00" / "fragments.bin", "r+b") as f:
        f.truncate(100)
    manifest = run(raw, out, params, progress=False)
    assert manifest["counts"]["scenes_done"] == 2
    assert {d.name: tree_digest(d) for d in scene_dirs(out)}.keys() == good.keys()
    for d in scene_dirs(out):  # byte-identical again (scene.json has timings: not compared)
        now = tree_digest(d)
        assert {k: v for k, v in now.items() if k != "scene.json"} == \
               {k: v for k, v in good[d.name].items() if k != "scene.json"}


def test_missing_params_json_still_refuses_other_parameters(sens_file, tmp_path):
    raw = make_raw(tmp_path / "scans", sens_file, 2)
    out = tmp_path / "out"
    run(raw, out, PrepParams(frame_skip=25, min_points=100), progress=False)
    (out / "params.json").unlink()
    with pytest.raises(ValueError, match=r"prepared with other parameters \{'frame_skip': 25\}"):
        run(raw, out, PrepParams(frame_skip=20, min_points=100), progress=False)


# -- 4. signals ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig, workers", [(signal.SIGINT, 2), (signal.SIGTERM, 2),
                                          (signal.SIGINT, 1)])
def test_signal_stops_scheduling_and_leaves_no_partial_scene(sig, workers, sens_file, tmp_path):
    psutil = pytest.importorskip("psutil")
    raw = make_raw(tmp_path / "scans", sens_file, 6)
    out = tmp_path / "out"
    proc = spawn(prep_cmd(raw, out, *SLOW, "--workers", str(workers)))
    wait_for(lambda: len(list(out.glob(".tmp-*"))) >= 1, what="a scene in progress")
    workers = psutil.Process(proc.pid).children(recursive=True)
    t0 = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert time.time() - t0 < 30  # the scenes in flight, not all 6
    assert f"stopped by {signal.Signals(sig).name}" in err and "Rerun the same command" in err
    done = scene_dirs(out)
    assert 1 <= len(done) < 6, len(done)
    assert_complete(out)
    assert not (out / "manifest.json").exists() and not (out / LOCK_NAME).exists()
    psutil.wait_procs(workers, timeout=10)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    rerun = subprocess.run(prep_cmd(raw, out, *SLOW, "--workers", "2"), cwd=REPO,
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert rerun.returncode == 0, rerun.stderr
    assert f"({len(done)} already done)" in rerun.stdout and len(scene_dirs(out)) == 6


# -- 6. output-side I/O errors: abort, name the path, never "bad input" -------------------------
def _namespace_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


needs_mount = pytest.mark.skipif(not _namespace_available(),
                                 reason="needs root and mount namespaces (unshare -m) to give the "
                                 "prep a full or read-only file system")


def _in_namespace(setup: str, cmd: list[str], after: str = "true"
                  ) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a private mount namespace between the shell commands ``setup`` and
    ``after`` (the mounts vanish with the namespace); returns ``cmd``'s status."""
    import shlex

    script = (f"set -e; mount --make-rprivate /; {setup}; set +e; {shlex.join(cmd)}; rc=$?; "
              f"{after}; exit $rc")
    return subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})


@pytest.mark.slow
@needs_mount
def test_disk_full_aborts_with_the_path_and_keeps_finished_scenes(sens_file, tmp_path):
    raw = make_raw(tmp_path / "scans", sens_file, 4)
    out = tmp_path / "out"
    run(raw, out, PrepParams(frame_skip=2, min_points=100), scenes=["scene0000_00"],
        progress=False)
    before = tree_digest(out)
    size_kb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) // 1024 + 200
    # the same --out, now on a file system with room for ~200 KB more: one scene is ~1 MB
    setup = (f"cp -a {out} {tmp_path}/saved; mount -t tmpfs -o size={size_kb}k tmpfs {out}; "
             f"cp -a {tmp_path}/saved/. {out}/")
    after = tmp_path / "after"  # what the full file system held when prep gave up
    res = _in_namespace(setup, prep_cmd(raw, out, *SLOW), f"cp -a {out} {after}")
    assert res.returncode == 1, res.stderr
    assert "No space left on device" in res.stderr and "the disk is full" in res.stderr
    assert str(out) in res.stderr and "skipped" not in res.stderr + res.stdout
    assert tree_digest(after) == before  # the finished scene and the manifest, intact


@needs_mount
def test_read_only_out_aborts_with_the_path(sens_file, tmp_path):
    raw = make_raw(tmp_path / "scans", sens_file, 2)
    out = tmp_path / "out"
    run(raw, out, PrepParams(frame_skip=25, min_points=100), scenes=["scene0000_00"],
        progress=False)
    before = tree_digest(out)
    res = _in_namespace(f"mount --bind {out} {out}; mount -o remount,bind,ro {out}",
                        prep_cmd(raw, out, *FAST))
    assert res.returncode == 1, res.stderr
    assert "Read-only file system" in res.stderr and str(out) in res.stderr
    assert "skipped" not in res.stderr + res.stdout
    assert tree_digest(out) == before


@pytest.mark.slow
def test_file_size_limit_aborts_the_run_not_the_scene(sens_file, tmp_path):
    """A size-limited output (ulimit -f: EFBIG, no root needed) aborts; finished work is kept
    and the manifest never lists the scene as bad input."""
    import resource

    raw = make_raw(tmp_path / "scans", sens_file, 3)
    out = tmp_path / "out"
    run(raw, out, PrepParams(frame_skip=2, min_points=100), scenes=["scene0000_00"],
        progress=False)
    before = tree_digest(out)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    res = subprocess.run(prep_cmd(raw, out, *SLOW), cwd=REPO, capture_output=True, text=True,
                         timeout=300, preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 1, res.stderr
    assert "File too large" in res.stderr and "file-size limit" in res.stderr
    assert str(out) in res.stderr and "skipped" not in res.stdout + res.stderr
    assert tree_digest(out) == before
    assert json.loads((out / "manifest.json").read_text())["skipped_scenes"] == {}


def test_seg_prep_output_error_aborts_instead_of_skipping(tmp_path):
    """Segmentation prep: a size-limited output aborts the run with the path, exit 1."""
    import resource

    from data_prep.synthetic import generate_s3dis_rooms

    raw = tmp_path / "s3dis"
    generate_s3dis_rooms(raw, areas=(1, 5), rooms_per_area=1, seed=0, defects=False)
    out = tmp_path / "out"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    res = subprocess.run([sys.executable, "-m", "data_prep.cli", "s3dis", "--raw", str(raw),
                          "--out", str(out), "--no-progress"], cwd=REPO, capture_output=True,
                         text=True, timeout=300, preexec_fn=limit,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 1, res.stdout + res.stderr
    assert "File too large" in res.stderr and str(out) in res.stderr
    assert "skipped" not in res.stdout
    assert not (out / "manifest.json").exists()


# -- 5. bad frames and scene names --------------------------------------------------------------
def test_damaged_jpeg_and_absurd_poses_skip_the_frame_with_its_values(sens_file, tmp_path,
                                                                      capsys):
    with SensReader(sens_file) as r:
        h = r.header
        frames = []
        for i in range(0, 101, 25):
            f = r.frame(i)
            pose, color = f.camera_to_world.copy(), f.color_bytes
            if i == 25:
                color = color[: len(color) // 2]  # a truncated JPEG: header fine, data cut
            if i == 50:
                pose[:3, 3] = [1e6, 0, 0]  # a finite but absurd camera position
            if i == 75:
                pose[:3, :3] *= 3  # not a rigid transform
                sheared = np.round(pose.astype(np.float64), 4).tolist()
            frames.append((pose, color, f.depth(h)))
    raw = tmp_path / "scans"
    write_sens(raw / "scene0000_00" / "scene0000_00.sens", h, frames)
    out = tmp_path / "out"
    m = run(raw, out, PrepParams(frame_skip=1, min_points=100), progress=False)
    skipped = m["scenes"]["scene0000_00"]["skipped_frames"]
    reasons = {fid: reason for reason, fids in skipped.items() for fid in fids}
    assert set(reasons) == {1, 2, 3}, skipped  # frames are renumbered 0..4 in the new file
    assert reasons[1].startswith("damaged payload:") and "frame 1" in reasons[1] \
        and "colour payload does not decode" in reasons[1]
    assert "pose translation [1000000.0, 0.0, 0.0] m is beyond 1000 m" in reasons[2]
    assert "not a rigid transform" in reasons[3] and str(sheared) in reasons[3]
    assert m["counts"]["fragments"] == 2
    log = capsys.readouterr().out
    assert "scene0000_00: skipped frame(s) [1]: damaged payload" in log
    from mink_ssl.formats.fragments import FragmentStore

    store = FragmentStore(out / "scene0000_00")  # every kept colour payload decodes
    assert all(store[k].color.shape == (120, 160, 3) for k in range(len(store)))


def test_scene_names_with_whitespace_are_skipped_with_the_reason(sens_file, tmp_path):
    raw = make_raw(tmp_path / "scans", sens_file, 1)
    (raw / "my scene").mkdir()
    (raw / "my scene" / "my scene.sens").symlink_to(sens_file)
    m = run(raw, tmp_path / "out", PrepParams(frame_skip=25, min_points=100), progress=False)
    assert "contains whitespace" in m["skipped_scenes"]["my scene"]
    assert "'my_scene'" in m["skipped_scenes"]["my scene"]
    lines = (tmp_path / "out" / "pairs.txt").read_text().splitlines()
    assert lines and all(len(line.split(" ")) == 3 for line in lines)


# -- segmentation prep: the same run safety; item 8 details --------------------------------------
def test_seg_prep_refuses_out_overlapping_raw(tmp_path, capsys):
    from data_prep.synthetic import generate_s3dis_rooms

    raw = tmp_path / "s3dis"
    generate_s3dis_rooms(raw, areas=(1,), rooms_per_area=1, seed=0, defects=False)
    before = tree_digest(raw)
    assert prep_main(["s3dis", "--raw", str(raw), "--out", str(raw / "prepared"),
                      "--no-progress"]) == 2
    assert "lies inside --raw" in capsys.readouterr().err
    assert tree_digest(raw) == before


def test_s3dis_non_finite_point_is_dropped_naming_file_and_line(tmp_path):
    from data_prep.segmentation.s3dis import S3DISParams, run as run_s3dis
    from data_prep.synthetic import generate_s3dis_rooms

    raw = tmp_path / "s3dis"
    generate_s3dis_rooms(raw, areas=(1, 5), rooms_per_area=1, seed=0, defects=False)
    ann = sorted(raw.glob("Area_1/*/Annotations/*.txt"))[0]
    lines = ann.read_text().splitlines(keepends=True)
    parts = lines[2].split()
    lines[2] = " ".join([parts[0], "nan", *parts[2:]]) + "\n"
    ann.write_text("".join(lines))
    m = run_s3dis(raw, tmp_path / "out", S3DISParams(), progress=False)
    rel = ann.relative_to(raw).as_posix()
    hits = [r for r in m["repairs"] if r["file"] == rel and r["line"] == 3]
    assert hits and "non-finite value(s)" in hits[0]["what"] and "nan" in hits[0]["what"]
    assert not m["skipped_scenes"] and len(m["scenes"]) == 2


def test_s3dis_utf16_file_is_read_as_its_text(tmp_path):
    """An annotation file saved as UTF-16 (with or without a byte-order mark) holds the same
    points as its ASCII original, and the repair is reported; UTF-16 text that is not x y z r
    g b numbers is refused naming the file and the fix (it was called "damaged or binary")."""
    from data_prep.segmentation.s3dis import S3DISParams, parse_xyzrgb, run as run_s3dis
    from data_prep.synthetic import generate_s3dis_rooms

    raw = tmp_path / "s3dis"
    generate_s3dis_rooms(raw, areas=(1, 5), rooms_per_area=1, seed=0, defects=False)
    ref = run_s3dis(raw, tmp_path / "ref", S3DISParams(), progress=False)
    anns = sorted(raw.glob("Area_1/*/Annotations/*.txt"))
    for ann, codec in zip(anns[:2], ("utf-16", "utf-16-le")):
        ann.write_bytes(ann.read_text().encode(codec))
    m = run_s3dis(raw, tmp_path / "out", S3DISParams(), progress=False)
    assert not m["skipped_scenes"] and m["scenes"] == ref["scenes"]  # the same points, scene by scene
    whats = {r["file"]: r["what"] for r in m["repairs"]}
    for ann, codec in zip(anns[:2], ("UTF-16", "UTF-16-LE")):
        assert f"is {codec} text: read as the same ASCII text" in whats[ann.relative_to(raw).as_posix()]
    with pytest.raises(ValueError, match=r"odd\.txt is UTF-16 text holding characters .*iconv"):
        parse_xyzrgb("1 2 3 4 5 6 \u00e9\n".encode("utf-16"), "odd.txt")
