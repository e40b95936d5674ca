"""A failed start removes only what it created: folders and files that were there before (another
tool's ``.hydra/`` and logs, an empty folder the user made, the user's own ``.*.tmp`` files) are
never deleted; what the start made itself (the run folder and the parents it needed, Hydra's job
log, ``config.json`` and logs of a start that failed before its first step) is removed, so the
corrected command starts afresh."""
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from mink_ssl.engine.config import ModelConfig, OptimConfig
from mink_ssl.engine.rundir import RunDir
from mink_ssl.tasks.pretrain import DataConfig, PretrainConfig, pretrain

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def tiny(root, **kw) -> PretrainConfig:
    cfg = PretrainConfig(
        model=ModelConfig(name="Res16UNet14S", out_channels=16),
        data=DataConfig(root=str(root), voxel_size=0.05, num_workers=0, max_matches=500),
        optim=OptimConfig(lr=0.05), objectives={"point_info_nce": {"num_matches": 128}},
        max_iterations=2, batch_size=1, device="cpu", checkpoint_every=0, log_every=1,
        progress=False)
    return replace(cfg, **kw)


def listing(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder``: a file's bytes, None for a folder."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(folder.rglob("*"))}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mink_ssl.cli.pretrain", "model=res16unet14s",
                           "data.num_workers=0", "device=cpu", "progress=false", *args],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_failed_cli_starts_leave_every_folder_they_did_not_create(tmp_path):
    # another tool's run folder: its .hydra/ and its (still empty) logs, one of them named as
    # Hydra names ours
    other = tmp_path / "other_tool"
    (other / ".hydra").mkdir(parents=True)
    (other / ".hydra" / "config.yaml").write_text("lr: 3\n")
    (other / "train.log").touch()
    (other / "_hydra.log").touch()
    before = listing(other)
    res = cli("data.root=/x", "+data.voxle_size=0.1", f"hydra.run.dir={other}")
    assert res.returncode == 2 and "did you mean data.voxel_size?" in res.stderr, res.stderr
    assert listing(other) == before

    # the same folder, a start that fails inside the run (no prepared data there)
    missing = tmp_path / "no_data"
    res = cli(f"data.root={missing}", f"hydra.run.dir={other}")
    assert res.returncode == 2 and f"{missing}" in res.stderr, res.stderr
    assert listing(other) == before

    # an empty folder the user made stays
    empty = tmp_path / "made_by_user"
    empty.mkdir()
    res = cli(f"data.root={missing}", f"hydra.run.dir={empty}")
    assert res.returncode == 2, res.stderr
    assert empty.is_dir() and listing(empty) == {}

    # a folder the start created, with the parents it needed: all gone again
    res = cli(f"data.root={missing}", f"hydra.run.dir={tmp_path / 'new' / 'deep' / 'run'}")
    assert res.returncode == 2, res.stderr
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["made_by_user", "other_tool"]


def test_start_removes_only_temporaries_of_ours(tmp_path):
    """A killed write of ours leaves ``.<our file>.<8 random characters>.tmp`` (mkstemp's name
    next to the file it replaces): a start removes those, and no other ``.tmp`` file."""
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    user = {".notes.tmp": b"mine", ".my.settings.tmp": b"8 chars", ".config.json.tmp": b"x",
            ".checkpoint_2.pth.tmp": b"x", ".results.json.ABCDEFGH.tmp": b"upper case",
            ".data.json.abcdefgh.tmp": b"not ours", "best/.draft.tmp": b"y"}
    ours = [".checkpoint_6.pth.k2x9q0_a.tmp", ".config.json.0a1b2c3d.tmp",
            "best/.model.pth.zz_9y8x7.tmp", "best/.best.json.qwertyui.tmp",
            ".checkpoint_8.pth.mink-ssl-4121-k2x9q0_a.tmp",  # today's names carry our pid
            ".results_iou.png.mink-ssl-77-abcdefgh.tmp",
            "predictions/.Area_5_room_0.ply.mink-ssl-77-abcdefgh.tmp"]
    (run / "predictions").mkdir()
    user[".scan.ply.abcdefgh.tmp"] = b"a user's, outside predictions/"
    from mink_ssl.engine.rundir import OUR_TEMPORARY
    from mink_ssl.io import atomic_path

    with atomic_path(tmp_path / "config.json") as tmp:  # the name atomic_path really uses
        assert OUR_TEMPORARY.fullmatch(tmp.name) and f"mink-ssl-{os.getpid()}-" in tmp.name
    for name, data in user.items():
        (run / name).write_bytes(data)
    for name in ours:
        (run / name).write_bytes(b"\0" * 64)
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep")
    (run / ".val_history.json.abcdefgh.tmp").symlink_to(target)  # a link is not ours either

    rd = RunDir(run, {"seed": 0}, None).open()
    rd.close()
    assert {name: (run / name).read_bytes() for name in user} == user
    assert not any((run / name).exists() for name in ours)
    assert (run / ".val_history.json.abcdefgh.tmp").is_symlink() and target.read_text() == "keep"


def test_a_real_start_keeps_user_tmp_files(synthetic_pairs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".notes.tmp").write_text("my notes")
    (run / ".checkpoint_4.pth.k2x9q0_a.tmp").write_bytes(b"\0" * 64)  # a killed write's
    pretrain(tiny(synthetic_pairs), run, print_fn=lambda s: None)
    assert (run / ".notes.tmp").read_text() == "my notes"
    assert not (run / ".checkpoint_4.pth.k2x9q0_a.tmp").exists()
    assert (run / "backbone.pth").is_file()


@pytest.mark.slow
def test_a_start_failing_before_its_first_step_removes_what_it_wrote(synthetic_pairs, tmp_path):
    """A weight of 1e39 is finite, but not in float32: the first loss is infinite, after
    config.json and the logs were written. The start removes them again (and only them), so the
    corrected command runs in the same folder."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "README.txt").write_text("the user's")
    bad = tiny(synthetic_pairs, objectives={"point_info_nce": {"num_matches": 128,
                                                              "weight": 1e39}})
    with pytest.raises(FloatingPointError, match="non-finite loss at iteration 0"):
        pretrain(bad, run, print_fn=lambda s: None)
    assert listing(run) == {"README.txt": b"the user's"}

    # in a folder the start created: the folder goes too
    with pytest.raises(FloatingPointError):
        pretrain(bad, tmp_path / "fresh", print_fn=lambda s: None)
    assert not (tmp_path / "fresh").exists()

    # a run that made steps keeps its record (config.json, checkpoints, logs)
    pretrain(tiny(synthetic_pairs), run, print_fn=lambda s: None)
    assert {"config.json", "metrics.jsonl", "tb", "backbone.pth", "checkpoint_2.pth",
            "README.txt"} <= {p.name for p in run.iterdir()}
