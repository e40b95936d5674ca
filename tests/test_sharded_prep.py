"""Pair prep spread over many processes filling one --out: per-scene claims, shards, finalize.

Real subprocesses of the real CLI (and of docker/slurm_prep.sbatch, under a stand-in sbatch that
runs the array's tasks at the same time) over one output folder, on generated .sens scenes (and
the real 7-Scenes frames where ../shared is present): every scene is prepared exactly once, and
the folder is byte for byte what a single-process run writes, but for two run-specific fields:
``scene.json``'s ``seconds`` and the member timestamps numpy's ``savez`` puts in
``fragments.npz`` (its members compared instead)."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from data_prep.claims import SceneClaims
from data_prep.pairs.claimed import tmp_name
from data_prep.pairs.prep import PrepParams, run

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata" / "7scenes-redkitchen-a"
FAST = ["--frame-skip", "25", "--min-points", "100", "--no-progress"]
SLOW = ["--frame-skip", "2", "--min-points", "100", "--no-progress"]  # ~3 s per scene
PARAMS = PrepParams(frame_skip=25, min_points=100)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Path]:
    from data_prep.synthetic import generate_scene

    src = tmp_path_factory.mktemp("src")
    return [generate_scene(src, f"s{k}", k, n_frames=101, image_size=(160, 120)) / f"s{k}.sens"
            for k in range(3)]


def make_raw(root: Path, sources: list[Path], n: int, bad: bool = True,
             real: bool = True) -> Path:
    """``n`` scenes linking the generated scans in turn, a truncated and an empty scene, and
    the real 7-Scenes frames (exported layout) when present."""
    for k in range(n):
        d = root / f"scene{k:04d}_00"
        d.mkdir(parents=True)
        (d / f"{d.name}.sens").symlink_to(sources[k % len(sources)])
    if bad:
        (root / "scene0900_00").mkdir()
        data = sources[0].read_bytes()
        (root / "scene0900_00" / "scene0900_00.sens").write_bytes(data[: len(data) - 5000])
        (root / "scene0901_00").mkdir()  # neither .sens nor exported frames
    if real and (REALDATA / "depth").is_dir():
        (root / "redkitchen").symlink_to(REALDATA)
    return root


def cli(raw: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "data_prep.cli", "scannet", "--raw", str(raw), "--out",
            str(out), *extra]


def spawn(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str, str]]:
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, outs)]


def wait_for(cond, timeout=120.0, what="condition"):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def npz_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def assert_same_output(a: Path, b: Path) -> None:
    """Every file of ``a`` and ``b`` byte-identical, but scene.json's ``seconds`` and the
    member timestamps of fragments.npz."""
    files = {str(p.relative_to(a)) for p in a.rglob("*") if p.is_file()}
    assert files == {str(p.relative_to(b)) for p in b.rglob("*") if p.is_file()}
    assert not [f for f in files if f.startswith((".claims", ".tmp-")) or "/.tmp-" in f], files
    for rel in sorted(files):
        x, y = (a / rel).read_bytes(), (b / rel).read_bytes()
        if rel.endswith("scene.json"):
            jx, jy = json.loads(x), json.loads(y)
            assert {**jx, "seconds": 0} == {**jy, "seconds": 0}, rel
            assert list(jx) == list(jy), rel
        elif rel.endswith(".npz"):
            assert npz_members(a / rel) == npz_members(b / rel), rel
        else:
            assert x == y, rel


def prepared(logs: list[str]) -> Counter:
    """How many times each scene was prepared (or found bad) by the workers whose logs these
    are: their "prepared <scene>" and "skipped <scene>:" lines."""
    return Counter(m.group(2) for log in logs
                   for m in re.finditer(r"^  (prepared|skipped) (\S+)[:,]", log, re.M))


@pytest.fixture(scope="module")
def single(sources, tmp_path_factory) -> tuple[Path, Path]:
    """A single-process run of the CLI: the reference output."""
    raw = make_raw(tmp_path_factory.mktemp("raw"), sources, 7)
    out = tmp_path_factory.mktemp("single") / "out"
    done = subprocess.run(cli(raw, out, *FAST), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return raw, out


# -- exactly once, byte-identical -------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("shards", [["0/1", "0/1", "0/1"], ["0/3", "1/3", "2/3"]],
                         ids=["three-share-all", "three-shards"])
def test_concurrent_workers_prepare_each_scene_once_and_match_a_single_run(shards, single,
                                                                         tmp_path):
    raw, reference = single
    out = tmp_path / "out"
    procs = [spawn(cli(raw, out, *FAST, "--shard", s, *(["--workers", "2"] if k == 0 else [])))
             for k, s in enumerate(shards)]
    results = finish(procs)
    assert all(rc == 0 for rc, _, _ in results), [err for _, _, err in results]
    scenes = sorted(p.name for p in raw.iterdir())
    counts = prepared([o for _, o, _ in results])
    assert counts == Counter(scenes), counts  # each scene once, by one worker
    assert not (out / "manifest.json").exists() and not (out / "pairs.txt").exists()
    fin = subprocess.run(cli(raw, out, *FAST, "--finalize"), cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert fin.returncode == 0, fin.stderr
    assert not (out / ".claims").exists() and not list(out.glob(".tmp-*"))
    assert_same_output(reference, out)
    # a rerun of the finalize step writes the same bytes
    before = {n: (out / n).read_bytes() for n in ("manifest.json", "pairs.txt")}
    again = subprocess.run(cli(raw, out, *FAST, "--finalize"), cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert {n: (out / n).read_bytes() for n in before} == before


@pytest.mark.slow
def test_slurm_array_and_dependent_finalize(single, tmp_path):
    """docker/slurm_prep.sbatch submits an array and a finalize job; a stand-in sbatch runs
    the array's tasks at the same time with SLURM's variables, then the finalize job."""
    raw, reference = single
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch-calls.jsonl"
    (bin_dir / "sbatch").write_text(f"""#!{sys.executable}
import json, os, subprocess, sys
args = sys.argv[1:]
opts, i = {{}}, 0
while args[i].startswith("--"):
    key = args[i][2:]
    if key == "parsable":
        opts[key] = True; i += 1
    else:
        opts[key] = args[i + 1]; i += 2
script, rest = args[i], args[i + 1:]
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps({{"opts": opts, "args": rest}}) + "\\n")
env = dict(os.environ, SLURM_JOB_ID="77")
log = open({str(calls)!r} + (".array.out" if "array" in opts else ".final.out"), "a")
for item in opts.get("export", "ALL").split(",")[1:]:
    k, v = item.split("=", 1); env[k] = v
if "array" in opts:
    lo, hi = (int(x) for x in opts["array"].split("-"))
    procs = [subprocess.Popen(["bash", script, *rest], env=dict(
        env, SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID=str(t), SLURM_ARRAY_TASK_MIN=str(lo),
        SLURM_ARRAY_TASK_MAX=str(hi), SLURM_ARRAY_TASK_COUNT=str(hi - lo + 1)),
        stdout=log, stderr=log) for t in range(lo, hi + 1)]
    codes = [p.wait() for p in procs]
    with open({str(calls)!r}, "a") as f:
        f.write(json.dumps({{"array_exit_codes": codes}}) + "\\n")
else:
    subprocess.run(["bash", script, *rest], env=env, check=True, stdout=log, stderr=log)
print("77")
""")
    (bin_dir / "sbatch").chmod(0o755)
    out = tmp_path / "out"
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SHARDS": "3",
           "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "docker" / "slurm_prep.sbatch"), "--raw",
                           str(raw), "--out", str(out), *FAST], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    jobs_out = Path(f"{calls}.array.out")  # the jobs' output goes to files, as SLURM's
    assert done.returncode == 0, done.stdout + done.stderr + jobs_out.read_text()
    assert done.stdout.splitlines()[0] == "prep array: job 77 (3 tasks)"
    assert prepared([jobs_out.read_text()]) == Counter(p.name for p in raw.iterdir())
    log = [json.loads(line) for line in calls.read_text().splitlines()]
    array, codes, final = log
    assert array["opts"]["array"] == "0-2" and codes == {"array_exit_codes": [0, 0, 0]}
    assert final["opts"]["dependency"] == "afterany:77" and "PREP_STEP=finalize" in \
        final["opts"]["export"]
    assert_same_output(reference, out)


def test_sbatch_dry_run_prints_the_shard_and_finalize_commands():
    script = str(REPO / "docker" / "slurm_prep.sbatch")
    subprocess.run(["bash", "-n", script], check=True)
    base = {"PATH": os.environ["PATH"], "DRY_RUN": "1", "PYTHON": "python3"}
    task = subprocess.run(["bash", script, "--raw", "/d/scans", "--out", "/s/pairs"],
                          capture_output=True, text=True, check=True,
                          env={**base, "SLURM_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "13",
                               "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "50",
                               "SLURM_CPUS_PER_TASK": "2", "PREP_STEP": "shard"})
    assert task.stdout.split() == ["python3", "-m", "data_prep.cli", "scannet", "--no-progress",
                                   "--shard", "12/50", "--workers", "2", "--raw", "/d/scans",
                                   "--out", "/s/pairs"]
    fin = subprocess.run(["bash", script, "--raw", "/d/scans", "--out", "/s/pairs"],
                         capture_output=True, text=True, check=True,
                         env={**base, "SLURM_JOB_ID": "6", "PREP_STEP": "finalize"})
    assert fin.stdout.split() == ["python3", "-m", "data_prep.cli", "scannet", "--no-progress",
                                  "--finalize", "--raw", "/d/scans", "--out", "/s/pairs"]
    sub = subprocess.run(["bash", script, "--raw", "/d/scans", "--out", "/s/pairs"],
                         capture_output=True, text=True, check=True, env={**base, "SHARDS": "8"})
    lines = sub.stdout.splitlines()
    assert lines[0].split()[:4] == ["sbatch", "--parsable", "--array", "0-7"]
    assert "--dependency" in lines[1] and "afterany:" in lines[1] and "PREP_STEP=finalize" in \
        lines[1]
    bad = subprocess.run(["bash", script], capture_output=True, text=True,
                         env={**base, "SLURM_JOB_ID": "5", "PREP_STEP": "shard"})
    assert bad.returncode != 0 and "SLURM_ARRAY_TASK_ID" in bad.stderr


# -- finalize refuses what is not finished ----------------------------------------------------
def test_finalize_refuses_unfinished_and_claimed_scenes(sources, tmp_path):
    raw = make_raw(tmp_path / "raw", sources, 4, bad=False, real=False)
    out = tmp_path / "out"
    shard = subprocess.run(cli(raw, out, *FAST, "--shard", "0/2"), cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert shard.returncode == 0, shard.stderr
    assert "prepared scene0000_00" in shard.stdout and "prepared scene0002_00" in shard.stdout
    fin = subprocess.run(cli(raw, out, *FAST, "--finalize"), cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert fin.returncode == 1
    assert "2 of 4 scenes" in fin.stderr and "scene0001_00, scene0003_00" in fin.stderr
    assert "Run the shards again" in fin.stderr
    assert not (out / "manifest.json").exists() and not (out / "pairs.txt").exists()
    # a live claim (this process) stops the finalize, naming its holder
    claim = SceneClaims(out).claim("scene0001_00")
    try:
        fin = subprocess.run(cli(raw, out, *FAST, "--finalize"), cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=300)
        assert fin.returncode == 1
        assert f"scene0001_00 by pid {os.getpid()} on host {socket.gethostname()}" in fin.stderr
        assert "being prepared" in fin.stderr
    finally:
        claim.release()


# -- stale claims -----------------------------------------------------------------------------
def plant_claim(out: Path, scene: str, **holder) -> Path:
    (out / ".claims").mkdir(parents=True, exist_ok=True)
    path = out / ".claims" / scene
    path.write_text(json.dumps({"token": "0123456789ab", "command": "a killed worker",
                                **holder}))
    return path


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_claim_of_a_dead_process_on_this_host_is_taken_over(sources, tmp_path):
    raw = make_raw(tmp_path / "raw", sources, 2, bad=False, real=False)
    out = tmp_path / "out"
    plant_claim(out, "scene0001_00", pid=dead_pid(), host=socket.gethostname())
    leftover = out / tmp_name("0123456789ab", "scene0001_00")  # its half-written scene
    leftover.mkdir()
    (leftover / ".mink-ssl-scene").write_text("made by mink-ssl-prep scannet")
    (leftover / "fragments.bin").write_bytes(b"half")
    res = subprocess.run(cli(raw, out, *FAST, "--shard", "0/1"), cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "prepared scene0001_00" in res.stdout and not leftover.exists()
    assert not list((out / ".claims").iterdir())


def test_single_run_clears_the_claims_killed_runs_left(sources, tmp_path):
    """A worker killed between publishing its scene and releasing the claim: the scene is
    complete, its claim stale; the next single-process run removes it (and the folder)."""
    raw = make_raw(tmp_path / "raw", sources, 2, bad=False, real=False)
    out = tmp_path / "out"
    run(raw, out, PARAMS, progress=False)
    plant_claim(out, "scene0000_00", pid=dead_pid(), host=socket.gethostname())
    live = plant_claim(out, "scene0001_00", pid=1, host="some-other-node")  # not stale yet
    logs = []
    run(raw, out, PARAMS, progress=False, log=logs.append)
    assert "(2 already done)" in logs[0]
    assert sorted(p.name for p in (out / ".claims").iterdir()) == ["scene0001_00"]
    live.unlink()
    run(raw, out, PARAMS, progress=False)
    assert not (out / ".claims").exists()


def test_claim_of_another_host_is_stale_only_after_the_timeout(sources, tmp_path):
    raw = make_raw(tmp_path / "raw", sources, 2, bad=False, real=False)
    out = tmp_path / "out"
    claim = plant_claim(out, "scene0001_00", pid=1, host="some-other-node")
    res = subprocess.run(cli(raw, out, *FAST, "--shard", "0/1", "--claim-timeout", "60"),
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "1 left to other processes" in res.stdout
    assert "held scene0001_00: claimed by pid 1 on host some-other-node" in res.stdout
    assert not (out / "scene0001_00").exists()
    old = time.time() - 61  # no heartbeat for longer than --claim-timeout
    os.utime(claim, (old, old))
    res = subprocess.run(cli(raw, out, *FAST, "--shard", "0/1", "--claim-timeout", "60"),
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "prepared scene0001_00" in res.stdout


@pytest.mark.slow
def test_sigkilled_worker_leaves_a_claim_that_the_next_worker_takes_over(sources, tmp_path):
    raw = make_raw(tmp_path / "raw", sources, 3, bad=False, real=False)
    out = tmp_path / "out"
    first = spawn(cli(raw, out, *SLOW, "--shard", "0/1"))
    wait_for(lambda: any(out.glob(".tmp-*/fragments.bin")), what="a scene in progress")
    first.send_signal(signal.SIGSTOP)  # frozen mid-scene: what it holds can be read safely
    (work,) = [p for p in out.glob(".tmp-*") if (p / "fragments.bin").exists()]
    scene = work.name.split("-", 2)[2]
    holder = json.loads((out / ".claims" / scene).read_text())
    assert holder["pid"] == first.pid and work.name == tmp_name(holder["token"], scene)
    assert not (out / scene).exists()
    first.send_signal(signal.SIGKILL)
    first.communicate()
    second = subprocess.run(cli(raw, out, *SLOW, "--shard", "0/1"), cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert f"prepared {scene}" in second.stdout and not work.exists()
    fin = subprocess.run(cli(raw, out, *SLOW, "--finalize"), cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert fin.returncode == 0, fin.stderr
    assert not (out / ".claims").exists() and not list(out.glob(".tmp-*"))
    assert json.loads((out / "manifest.json").read_text())["counts"]["scenes_done"] == 3


def test_the_stale_rule(tmp_path):
    """Same machine (host name and boot id): stale when the process has ended or its pid is
    another process's; otherwise only after the timeout without a heartbeat."""
    from data_prep.claims import BOOT_ID, HOST, _start_ticks

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        ticks = _start_ticks(sleeper.pid)
        here = dict(host=HOST, boot_id=BOOT_ID)
        cases = {"alive": dict(here, pid=sleeper.pid, start_ticks=ticks),
                 "ended": dict(here, pid=dead_pid()),
                 "pid-reused": dict(here, pid=sleeper.pid, start_ticks=(ticks or 0) + 1),
                 "rebooted-or-namesake": dict(host=HOST, boot_id="another-boot", pid=dead_pid()),
                 "other-host": dict(host="some-other-node", pid=sleeper.pid)}
        for name, holder in cases.items():
            plant_claim(tmp_path, name, **holder)
        (tmp_path / ".claims" / "unreadable").write_bytes(b"\x00garbage")
        claims = SceneClaims(tmp_path, timeout=60)
        fresh = {n: claims.stale(*claims.read(n)) for n in [*cases, "unreadable"]}
        assert fresh == {"alive": False, "ended": True, "pid-reused": True,
                         "rebooted-or-namesake": False, "other-host": False,
                         "unreadable": False}
        old = time.time() - 61
        for p in (tmp_path / ".claims").iterdir():
            os.utime(p, (old, old))
        aged = {n: claims.stale(*claims.read(n)) for n in fresh}
        assert aged == {**{n: True for n in fresh}, "alive": False}  # a live process is live
        assert set(claims.live()) == {"alive"} and claims.remove_stale() == sorted(
            set(fresh) - {"alive"})
    finally:
        sleeper.kill()
        sleeper.wait()


def test_heartbeat_keeps_a_held_claim_fresh(tmp_path):
    claims = SceneClaims(tmp_path, timeout=0.5)  # a beat every 0.05 s
    claim = claims.claim("scene0000_00")
    try:
        first = os.stat(claim.path).st_mtime_ns
        wait_for(lambda: os.stat(claim.path).st_mtime_ns != first, 10, "a heartbeat")
        assert claims.claim("scene0000_00") is None  # held: this process lives
        assert claims.live() and claims.live_token("scene0000_00") == claim.token
    finally:
        claim.release()
    assert not claim.path.exists() and claims.claim("scene0000_00") is not None


# -- links are never followed -----------------------------------------------------------------
@pytest.mark.parametrize("where", ["claim", "claims_dir", "records_dir"])
def test_claims_and_records_never_follow_symlinks(where, sources, tmp_path):
    raw = make_raw(tmp_path / "raw", sources, 1, bad=True, real=False)
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    link = {"claim": out / ".claims" / "scene0000_00", "claims_dir": out / ".claims",
            "records_dir": out / ".prep-status"}[where]
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(outside / "keep.txt" if where == "claim" else outside)
    res = subprocess.run(cli(raw, out, *FAST, "--shard", "0/1"), cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"{link} is a symbolic link (to {outside}" in res.stderr and "Remove the link" in \
        res.stderr
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert (outside / "keep.txt").read_text() == "keep"


# -- records: a bad scene is not redone until its input changes --------------------------------
def test_record_of_a_bad_scene_stands_until_its_input_changes(sources, tmp_path):
    raw = make_raw(tmp_path / "raw", sources, 1, bad=True, real=False)
    out = tmp_path / "out"
    m = run(raw, out, PARAMS, progress=False)
    assert set(m["skipped_scenes"]) == {"scene0900_00", "scene0901_00"}
    record = out / ".prep-status" / "scene0900_00.json"
    written = record.stat().st_mtime_ns
    again = run(raw, out, PARAMS, progress=False)
    assert again == m and record.stat().st_mtime_ns == written  # not tried again
    # the truncated scan replaced by a good one: prepared, its record gone
    bad = raw / "scene0900_00" / "scene0900_00.sens"
    bad.unlink()
    shutil.copy(sources[1], bad)
    m = run(raw, out, PARAMS, progress=False)
    assert set(m["skipped_scenes"]) == {"scene0901_00"} and "scene0900_00" in m["scenes"]
    assert sorted(p.name for p in (out / ".prep-status").iterdir()) == ["scene0901_00.json"]


def test_shard_argument_is_checked(tmp_path, capsys):
    from data_prep.cli import main

    for bad in ("3/3", "-1/2", "a/b", "1"):
        with pytest.raises(SystemExit) as e:
            main(["scannet", "--raw", str(tmp_path), "--out", str(tmp_path / "o"),
                  f"--shard={bad}"])
        assert e.value.code == 2
        assert f"{bad!r}: expected I/N with 0 <= I < N" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["scannet", "--raw", str(tmp_path), "--out", str(tmp_path / "o"), "--shard",
              "0/2", "--finalize"])
    assert "not allowed with argument" in capsys.readouterr().err
