"""Training runs never mix, lose or silently misread a run directory: one config per directory,
compatible resumes only, one writer, SIGINT / SIGTERM checkpoint at a step boundary, damaged
checkpoints, output-side I/O errors, failed starts. Real processes and signals."""
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mink_ssl.engine.config import ModelConfig, OptimConfig
from mink_ssl.engine.rundir import RunConflict
from mink_ssl.locks import LOCK_NAME
from mink_ssl.tasks.pretrain import DataConfig, PretrainConfig, pretrain

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tiny(root, **kw) -> PretrainConfig:
    cfg = PretrainConfig(
        model=ModelConfig(name="Res16UNet14A", out_channels=16),
        data=DataConfig(root=str(root), voxel_size=0.05, num_workers=0, max_matches=1000),
        optim=OptimConfig(lr=0.05), objectives={"point_info_nce": {"num_matches": 256}},
        max_iterations=4, batch_size=2, device="cpu", checkpoint_every=2, log_every=1,
        progress=False)
    return replace(cfg, **kw)


def quiet(_s):
    pass


@pytest.fixture(scope="module")
def finished(synthetic_pairs, tmp_path_factory):
    """A finished 4-iteration run (checkpoints 2 and 4, backbone.pth)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    pretrain(tiny(synthetic_pairs), out, print_fn=quiet)
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- 3. a run directory belongs to one config -------------------------------------------------
@pytest.mark.slow
def test_new_run_in_a_finished_run_dir_is_refused_and_nothing_written(synthetic_pairs, finished,
                                                                     tmp_path):
    out = copy_run(finished, tmp_path / "run")
    before = digest(out)
    other = tiny(synthetic_pairs, objectives={"hardest_contrastive": {}})
    with pytest.raises(RunConflict, match=r"already holds a run \(config.json, checkpoint_2.pth, "
                       r"checkpoint_4.pth\) whose config differs: objectives.hardest_contrastive"
                       r".*resume=auto.*new directory"):
        pretrain(other, out, print_fn=quiet)
    with pytest.raises(RunConflict, match="with the same config; starting here would overwrite"):
        pretrain(tiny(synthetic_pairs), out, print_fn=quiet)
    assert digest(out) == before and not (out / LOCK_NAME).exists()


def test_resume_with_other_model_objective_or_data_is_refused(synthetic_pairs, finished,
                                                               tmp_path):
    out = copy_run(finished, tmp_path / "run")
    before = digest(out)
    for change, key in [({"objectives": {"hardest_contrastive": {}}}, "objectives."),
                        ({"model": ModelConfig(name="Res16UNet14A", out_channels=32)},
                         "model.out_channels: 16 -> 32"),
                        ({"data": DataConfig(root=str(synthetic_pairs), voxel_size=0.04,
                                             num_workers=0, max_matches=1000)},
                         "data.voxel_size: 0.05 -> 0.04")]:
        cfg = tiny(synthetic_pairs, resume="auto", max_iterations=6, resume_override=True,
                   **change)
        with pytest.raises(RunConflict, match=rf"cannot resume the run in {out}.*{key}"):
            pretrain(cfg, out, print_fn=quiet)
    # another run's checkpoint, resumed into a new directory, is checked the same way
    cfg = tiny(synthetic_pairs, resume=str(out / "checkpoint_4.pth"),
               model=ModelConfig(name="Res16UNet14A", out_channels=32))
    with pytest.raises(RunConflict, match=r"cannot resume from .*checkpoint_4.pth.*"
                                          r"model.out_channels: 16 -> 32"):
        pretrain(cfg, tmp_path / "new", print_fn=quiet)
    assert not (tmp_path / "new").exists()  # a failed start leaves no directory
    assert digest(out) == before


@pytest.mark.slow
def test_resume_changing_the_optimizer_needs_the_override_and_is_recorded(synthetic_pairs,
                                                                           finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    before = digest(out)
    cfg = tiny(synthetic_pairs, resume="auto", max_iterations=6,
               optim=OptimConfig(lr=0.01, lr_step=1, lr_gamma=0.5))
    with pytest.raises(RunConflict, match=r"would change its optimizer / schedule: "
                       r"max_iterations: 4 -> 6; optim.lr: 0.05 -> 0.01; optim.lr_gamma: "
                       r"0.99 -> 0.5; optim.lr_step: 250 -> 1. Pass resume_override=true"):
        pretrain(cfg, out, print_fn=quiet)
    assert digest(out) == before  # a failed resume rewrites nothing (config.json included)
    logs = []
    pretrain(replace(cfg, resume_override=True), out, print_fn=logs.append)
    history = json.loads((out / "config_history.json").read_text())
    assert history[-1]["iteration"] == 4 and history[-1]["resumed_from"].endswith(
        "checkpoint_4.pth")
    assert history[-1]["changes"]["optim.lr"] == [0.05, 0.01]
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 0.01
    ckpt = torch.load(out / "checkpoint_6.pth", weights_only=True)
    # the new schedule from the resumed iteration: 0.01 * 0.5^6 after 6 steps
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.5 ** 6)
    assert any("recorded in" in line for line in logs)


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(synthetic_pairs, finished,
                                                                 tmp_path):
    out = copy_run(finished, tmp_path / "run")
    with open(out / "checkpoint_4.pth", "r+b") as f:
        f.truncate(1000)
    (out / ".checkpoint_6.pth.x1y2z3_4.tmp").write_bytes(b"\0" * 4096)  # a killed write's temp
    logs = []
    cfg = tiny(synthetic_pairs, resume="auto")
    pretrain(cfg, out, print_fn=logs.append)
    assert any(f"checkpoint {out / 'checkpoint_4.pth'} is damaged" in s for s in logs), logs
    assert any(f"resumed from {out / 'checkpoint_2.pth'} at iteration 2" in s for s in logs)
    assert torch.load(out / "checkpoint_4.pth", weights_only=True)["state"]["iteration"] == 4
    assert (out / "checkpoint_4.pth.damaged").stat().st_size == 1000  # set aside, not deleted
    assert not list(out.glob(".*.tmp"))
    # resuming an older checkpoint of this directory while newer ones exist would mix timelines
    with pytest.raises(RunConflict, match=r"holds newer checkpoints \['checkpoint_4.pth'\]"):
        pretrain(replace(cfg, resume=str(out / "checkpoint_2.pth")), out, print_fn=quiet)
    # an explicit damaged path is an error naming it
    with open(out / "checkpoint_2.pth", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(RunConflict, match=r"resume=.*checkpoint_2.pth: cannot read the "
                                          r"checkpoint.*damaged"):
        pretrain(replace(cfg, resume=str(out / "checkpoint_2.pth")), tmp_path / "other",
                 print_fn=quiet)


def test_zero_iterations_is_refused(synthetic_pairs, tmp_path):
    with pytest.raises(ValueError, match="max_iterations=0: must be an integer >= 1"):
        pretrain(tiny(synthetic_pairs, max_iterations=0), tmp_path / "run", print_fn=quiet)
    assert not (tmp_path / "run").exists()


# -- CLI: real processes ------------------------------------------------------------------------
def cli(root, run_dir, *extra):
    return [sys.executable, "-m", "mink_ssl.cli.pretrain", f"data.root={root}",
            "model=res16unet14a", "model.out_channels=16", "data.voxel_size=0.05",
            "data.max_matches=1000", "objective=[point_info_nce]",
            "objectives.point_info_nce.num_matches=256", "batch_size=2", "device=cpu",
            "checkpoint_every=2", "progress=false", f"hydra.run.dir={run_dir}", *extra]


def wait_for(cond, timeout=300.0, what="condition"):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_at_the_next_step_and_says_how_to_resume(sig, synthetic_pairs,
                                                                    tmp_path):
    """The signal goes to the whole process group (as Ctrl-C in a terminal, or SLURM's SIGTERM
    to every task), loader workers included."""
    run = tmp_path / "run"
    proc = subprocess.Popen(cli(synthetic_pairs, run, "max_iterations=1000",
                                "data.num_workers=1"), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for(lambda: (run / "checkpoint_2.pth").exists(), what="the first checkpoint")
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    stopped = max(int(p.stem.split("_")[1]) for p in run.glob("checkpoint_*.pth"))
    assert 2 <= stopped < 1000
    assert (f"pretraining stopped by {signal.Signals(sig).name} at iteration {stopped} of 1000; "
            f"checkpoint {run / f'checkpoint_{stopped}.pth'} saved. Resume with the same command "
            f"plus resume=auto hydra.run.dir={run}") in err
    assert not (run / "backbone.pth").exists() and not (run / LOCK_NAME).exists()
    done = subprocess.run(cli(synthetic_pairs, run, "resume=auto", "resume_override=true",
                              f"max_iterations={stopped + 2}", "data.num_workers=0"),
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {run / f'checkpoint_{stopped}.pth'} at iteration {stopped}" in done.stdout
    assert (run / "backbone.pth").exists()


@pytest.mark.slow
def test_second_concurrent_run_in_one_dir_is_refused(synthetic_pairs, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(cli(synthetic_pairs, run, "max_iterations=6",
                                 "data.num_workers=0"), cwd=REPO, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run / LOCK_NAME).exists(), what="the first run's lock")
    second = subprocess.run(cli(synthetic_pairs, run, "max_iterations=6", "resume=auto",
                                "data.num_workers=0"), cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=300)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 1
    assert f"{run} is in use by another run: pid {first.pid}" in second.stderr
    assert torch.load(run / "checkpoint_6.pth", weights_only=True)["state"]["iteration"] == 6


@pytest.mark.slow
def test_missing_data_root_is_a_clear_error_and_leaves_no_run_dir(tmp_path):
    run = tmp_path / "runs" / "x"
    res = subprocess.run([sys.executable, "-m", "mink_ssl.cli.pretrain",
                          f"hydra.run.dir={run}"], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "data.root is not set" in res.stderr
    assert not run.exists()


def _namespace_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _namespace_available(), reason="needs root and mount namespaces "
                    "(unshare -m) to give the run a full file system")
def test_disk_full_while_checkpointing_names_the_file(synthetic_pairs, tmp_path):
    import shlex

    run = tmp_path / "run"
    run.mkdir()
    cmd = shlex.join(cli(synthetic_pairs, run, "max_iterations=4", "data.num_workers=0"))
    script = (f"set -e; mount --make-rprivate /; mount -t tmpfs -o size=600k tmpfs {run}; "
              f"set +e; {cmd}; rc=$?; ls -a {run} > {tmp_path}/listing; exit $rc")
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    assert f"cannot write {run / 'checkpoint_2.pth'}" in res.stderr
    assert (f"cannot write {run / 'checkpoint_2.pth'}: 0.0 MiB free on its file system: is "
            "the disk full?" in res.stderr
            or f"cannot write {run / 'checkpoint_2.pth'}: No space left on device" in res.stderr)
    assert "Traceback" not in res.stderr
    listing = (tmp_path / "listing").read_text().split()
    assert not [n for n in listing if n.endswith(".tmp")], listing  # no hidden leftovers


def test_plus_prefixed_misspelled_key_is_refused(tmp_path):
    from helpers import compose_config

    from mink_ssl.cli._hydra import check_schema_keys

    with pytest.raises(ValueError, match=r"unknown config key\(s\) 'data.voxle_size' \(did you "
                                         r"mean data.voxel_size\?\)"):
        check_schema_keys(compose_config("pretrain", "data.root=/x", "+data.voxle_size=0.1"))
    check_schema_keys(compose_config("finetune_seg", "data.root=/x"))  # the shipped configs pass
    check_schema_keys(compose_config("finetune_det", "data.root=/x"))
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "mink_ssl.cli.pretrain", "data.root=/x",
                          "+data.voxle_size=0.1", f"hydra.run.dir={run}"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "did you mean data.voxel_size?" in res.stderr, res.stderr
    assert not run.exists()


@pytest.mark.slow
def test_finetune_seg_shares_the_run_dir_rules_and_the_signal(tmp_path):
    """Fine-tuning (segmentation, via its CLI): SIGTERM checkpoints at a step boundary and exits
    143; a fresh start in that directory is refused naming the differing key; resume=auto
    continues."""
    from helpers import SEG_VOXEL as VOXEL, write_benchmark

    rooms = write_benchmark(tmp_path / "rooms", {"train": [f"Area_1/room_{i}" for i in range(4)],
                                                 "val": [], "test": []})
    run = tmp_path / "run"

    def cmd(*extra):
        return [sys.executable, "-m", "mink_ssl.cli.finetune_seg", f"data.root={rooms}",
                "model=res16unet14a", "model.out_channels=16", "pretrained=null",
                f"data.voxel_size={VOXEL}", "data.num_workers=0", "data.eval_split=null",
                "optim.name=adam", "optim.lr=3e-3", "batch_size=2", "checkpoint_every=2",
                "progress=false", f"hydra.run.dir={run}", *extra]

    proc = subprocess.Popen(cmd("max_iterations=1000"), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run / "checkpoint_2.pth").exists(), what="the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    stopped = max(int(p.stem.split("_")[1]) for p in run.glob("checkpoint_*.pth"))
    assert f"finetune-seg stopped by SIGTERM at iteration {stopped} of 1000" in err
    before = digest(run)
    again = subprocess.run(cmd("max_iterations=1000", "optim.lr=1e-3"), cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "optim.lr: 0.003 -> 0.001" in again.stderr, again.stderr
    assert "Continue it with resume=auto" in again.stderr and digest(run) == before
    done = subprocess.run(cmd(f"max_iterations={stopped + 2}", "resume=auto",
                              "resume_override=true"), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(run / f"checkpoint_{stopped + 2}.pth", weights_only=True)["state"][
        "iteration"] == stopped + 2 and (run / "model.pth").exists()


def test_labelled_points_beyond_the_scenes_is_named(tmp_path):
    from helpers import tiny_seg_config as seg_config, write_benchmark

    from mink_ssl.tasks.segmentation import finetune_seg

    rooms = write_benchmark(tmp_path / "rooms", {"train": ["Area_1/room_0", "Area_1/room_1"],
                                                 "val": [], "test": []})
    sizes = {k: v["points"] for k, v in
             json.loads((rooms / "manifest.json").read_text())["scenes"].items()}
    base = seg_config(rooms, max_iterations=2, checkpoint_every=0)
    data = replace(base.data, eval_split=None, labelled_points=max(sizes.values()))
    with pytest.raises(ValueError, match=rf"data.labelled_points={max(sizes.values())} is at "
                                         r"least the size of every training scene .*null"):
        finetune_seg(replace(base, data=data), tmp_path / "all", print_fn=quiet)
    assert not (tmp_path / "all").exists()
    n = min(sizes.values())
    logs = []
    finetune_seg(replace(base, data=replace(data, labelled_points=n)), tmp_path / "some",
                 print_fn=logs.append)
    smallest = min(sizes, key=sizes.get)
    assert any(f"{n} labelled points per scene" in s and f"1 of 2 training scenes have at most "
               f"{n} points (smallest: {smallest}, {n} points) and keep all their labels" in s
               for s in logs), logs


@pytest.mark.slow
def test_resume_changing_only_the_run_length_applies_the_new_schedule_from_its_first_step(
        synthetic_pairs, tmp_path):
    """Cosine to 0 at max_iterations=4, resumed to 6 with resume_override: the first resumed
    step runs at the new schedule's lr (0.25 x lr), not at the old run's last lr (0, which left
    the weights where checkpoint 4 had them)."""
    out = tmp_path / "run"
    cosine = OptimConfig(lr=0.05, schedule="cosine")
    pretrain(tiny(synthetic_pairs, optim=cosine, checkpoint_every=1), out, print_fn=quiet)
    old = torch.load(out / "checkpoint_4.pth", weights_only=True)
    assert old["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    pretrain(tiny(synthetic_pairs, optim=cosine, checkpoint_every=1, max_iterations=6,
                  resume="auto", resume_override=True), out, print_fn=quiet)
    new = torch.load(out / "checkpoint_5.pth", weights_only=True)
    moved = [k for k, v in old["backbone"].items()
             if v.is_floating_point() and not torch.equal(v, new["backbone"][k])]
    assert "conv0p1s1.kernel" in moved
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lr5 = [r["lr"] for r in rows if r.get("iteration") == 5]
    assert lr5 and lr5[-1] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))


@pytest.mark.slow
def test_resuming_a_finished_run_says_it_was_finished(synthetic_pairs, finished, tmp_path):
    """Not 'final loss nan': no step runs, and the last line says why."""
    out = copy_run(finished, tmp_path / "run")
    logs = []
    pretrain(tiny(synthetic_pairs, resume="auto"), out, print_fn=logs.append)
    text = "\n".join(logs)
    assert "nan" not in text
    assert "had already made its 4 iterations; nothing to train" in text


@pytest.mark.slow
@pytest.mark.skipif(not _namespace_available(), reason="needs root and mount namespaces "
                    "(unshare -m) to give the run a full file system")
def test_disk_full_while_logging_metrics_names_the_file(synthetic_pairs, tmp_path):
    """metrics.jsonl on a full file system (a one-page tmpfs, already full, bind-mounted over
    it): the run stops at the first row with the path and what to do, not a bare OSError."""
    import shlex

    run, tiny_fs = tmp_path / "run", tmp_path / "tiny"
    run.mkdir()
    tiny_fs.mkdir()
    (run / "metrics.jsonl").touch()
    cmd = shlex.join(cli(synthetic_pairs, run, "max_iterations=4", "data.num_workers=0",
                         "log_every=1"))
    script = (f"set -e; mount --make-rprivate /; mount -t tmpfs -o size=4k tmpfs {tiny_fs}; "
              f"head -c 4096 /dev/zero > {tiny_fs}/filler || true; : > {tiny_fs}/m; "
              f"mount --bind {tiny_fs}/m {run}/metrics.jsonl; set +e; {cmd}")
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    assert f"cannot append iteration 1 to {run / 'metrics.jsonl'}" in res.stderr, res.stderr[-2000:]
    assert "the disk is full" in res.stderr and "Traceback" not in res.stderr
