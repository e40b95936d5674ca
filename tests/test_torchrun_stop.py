"""A clean stop under torchrun is reported as a clean stop (#26 item 9). Real torchrun, two CPU
(gloo) processes, a tiny model, real signals:

- SIGTERM to the training processes (as the issue sent it): they checkpoint, exit 0 under
  torchrun, and torchrun ends with 0, not ChildFailedError; resume=auto finishes the run;
- SIGTERM to torchrun and the training processes at once (as SLURM signals every process of a
  job step; torchrun forwards it again): the repeat is the same request, the checkpoint is
  written (it used to abort with KeyboardInterrupt);
- SIGTERM / SIGINT to docker/launch_single_node.sh: passed on to the training processes only,
  no torchrun traceback, the script exits 143 / 130 with the command to resume.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

pytestmark = pytest.mark.slow


def overrides(root: Path, max_iterations: int = 2000) -> list[str]:
    return [f"data.root={root}", "model=res16unet14s", "model.out_channels=16",
            "data.voxel_size=0.05", "data.max_matches=1000", "objective=[point_info_nce]",
            "objectives.point_info_nce.num_matches=256", "batch_size=1", "device=cpu",
            "checkpoint_every=1000", "log_every=1", "progress=false", "data.num_workers=0",
            f"max_iterations={max_iterations}"]


def torchrun(root: Path, run: Path, *extra: str, max_iterations: int = 2000) -> list[str]:
    return [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "mink_ssl.cli.pretrain",
            *overrides(root, max_iterations), f"hydra.run.dir={run}", *extra]


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)


def wait_for_training(proc: subprocess.Popen, run: Path, log: Path) -> None:
    """Until the first step is logged (both ranks are training)."""
    deadline = time.time() + 300
    metrics = run / "metrics.jsonl"
    while not (metrics.is_file() and metrics.stat().st_size):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "no step within 300 s:\n" + log.read_text()[-3000:]
        time.sleep(0.05)


def descendants(pid: int) -> list[int]:
    found = children(pid)
    return found + [d for c in found for d in descendants(c)]


def process_report(pid: int) -> str:
    """What a hung process tree is doing: each process's state, kernel wait channel and signal
    masks (pending, blocked, ignored, caught), its command line, then its children's."""
    lines = []
    for p in [pid, *descendants(pid)]:
        try:
            status = dict(line.split(":\t", 1) for line in
                          Path(f"/proc/{p}/status").read_text().splitlines() if ":\t" in line)
            wchan = Path(f"/proc/{p}/wchan").read_text()
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:160].decode()
        except OSError:
            continue
        lines.append(f"pid {p} ppid {status.get('PPid')} {status.get('State')} wchan {wchan} "
                     + " ".join(f"{k} {status.get(k)}" for k in
                                ("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")) + f": {cmd}")
    return "\n".join(lines)


def finish(proc: subprocess.Popen, log: Path) -> tuple[int, str]:
    """The exit code and output; a process tree still running after 300 s is killed (torchrun
    runs in a session of its own under the launch script), and what each of its processes was
    doing is reported."""
    try:
        code = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        raise AssertionError("still running 300 s after the stop; its processes:\n"
                             + process_report(proc.pid) + "\nits output:\n"
                             + log.read_text()[-4000:]) from None
    finally:
        if proc.poll() is None:
            for pid in descendants(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait()
    return code, log.read_text()


def checkpoints(run: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in run.glob("checkpoint_*.pth"))


def test_sigterm_to_the_training_processes_under_torchrun_is_a_clean_stop(synthetic_pairs,
                                                                          tmp_path):
    run, log = tmp_path / "run", tmp_path / "stop.log"
    proc = start(torchrun(synthetic_pairs, run, max_iterations=60), log)
    wait_for_training(proc, run, log)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    for pid in workers:  # the training processes only, as the issue did
        os.kill(pid, signal.SIGTERM)
    code, out = finish(proc, log)
    assert code == 0, out[-3000:]
    assert "ChildFailedError" not in out and "Traceback" not in out, out[-3000:]
    assert out.count("pretraining stopped by SIGTERM at iteration") == 2, out[-3000:]
    assert "exits 0, not 143, under torchrun" in out
    assert f"resume=auto hydra.run.dir={run}" in out
    saved = checkpoints(run)
    assert saved and saved[-1] < 60 and not (run / "backbone.pth").exists()

    # the line's resume command continues the run to its end
    code, out = finish(start(torchrun(synthetic_pairs, run, "resume=auto", max_iterations=60),
                             tmp_path / "resume.log"), tmp_path / "resume.log")
    assert code == 0, out[-3000:]
    assert f"resumed from {run / f'checkpoint_{saved[-1]}.pth'} at iteration {saved[-1]}" in out
    assert (run / "backbone.pth").is_file() and checkpoints(run)[-1] == 60


def test_sigterm_to_torchrun_and_the_training_processes_at_once_keeps_the_checkpoint(
        synthetic_pairs, tmp_path):
    """SLURM signals every process of the job step; torchrun forwards the signal again, so each
    training process receives it twice within milliseconds: one stop request."""
    run, log = tmp_path / "run", tmp_path / "stop.log"
    proc = start(torchrun(synthetic_pairs, run), log)
    wait_for_training(proc, run, log)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    for pid in [proc.pid, *workers]:
        os.kill(pid, signal.SIGTERM)
    code, out = finish(proc, log)
    assert "KeyboardInterrupt" not in out, out[-3000:]
    assert out.count("pretraining stopped by SIGTERM at iteration") == 2, out[-3000:]
    assert checkpoints(run) and not (run / "backbone.pth").exists()
    # torchrun itself got the signal: it ends with its SignalException whatever its workers did
    assert code == 1 and "SignalException" in out, out[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_launch_script_passes_a_stop_to_the_training_processes(synthetic_pairs, tmp_path, sig):
    run, log = tmp_path / "run", tmp_path / "launch.log"
    script = [str(REPO / "docker" / "launch_single_node.sh"), *overrides(synthetic_pairs)]
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", *script], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**ENV, "NGPUS": "2", "RUN_DIR": str(run)})
    wait_for_training(proc, run, log)
    proc.send_signal(sig)
    code, out = finish(proc, log)
    name = signal.Signals(sig).name
    assert code == 128 + sig, out[-3000:]
    assert f"launch: {name} passed on to the training processes" in out
    assert out.count(f"pretraining stopped by {name} at iteration") == 2, out[-3000:]
    for noise in ("Traceback", "ChildFailedError", "SignalException", "KeyboardInterrupt"):
        assert noise not in out, out[-3000:]
    assert (f"launch: stopped by {name} with a checkpoint (exit {128 + sig}); resume with: "
            f"NGPUS=2 RUN_DIR={run} {REPO / 'docker' / 'launch_single_node.sh'}") in out
    assert out.rstrip().endswith("resume=auto"), out[-500:]
    assert checkpoints(run) and not (run / "backbone.pth").exists()
