"""No lock file of ours follows a symbolic link (reliability issue, item 2): a
``.mink-ssl.lock`` that is a link to a file elsewhere is refused, by the lock itself, by prep
and by pretraining, and the link's target keeps its bytes."""
from __future__ import annotations

from dataclasses import replace

import pytest

from mink_ssl.engine.config import ModelConfig, OptimConfig
from mink_ssl.locks import LOCK_NAME, DirectoryLocked, DirLock
from mink_ssl.tasks.pretrain import DataConfig, PretrainConfig, pretrain

PRECIOUS = b"a user's file, not ours\n"


def _linked_lock(tmp_path, name="out"):
    """``<tmp>/<name>/.mink-ssl.lock`` -> ``<tmp>/elsewhere/precious.txt``."""
    target = tmp_path / "elsewhere" / "precious.txt"
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(PRECIOUS)
    out = tmp_path / name
    out.mkdir()
    (out / LOCK_NAME).symlink_to(target)
    return out, target


def test_lock_refuses_a_symlinked_lock_file(tmp_path):
    out, target = _linked_lock(tmp_path)
    with pytest.raises(DirectoryLocked, match=r"is a symbolic link \(to .*precious.txt\).*Remove "
                                              r"the link"):
        DirLock(out, "test").acquire()
    assert target.read_bytes() == PRECIOUS and (out / LOCK_NAME).is_symlink()
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / LOCK_NAME).symlink_to(tmp_path / "nowhere" / "x")  # would create the target
    with pytest.raises(DirectoryLocked, match="symbolic link"):
        DirLock(dangling, "test").acquire()
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.slow
def test_prep_refuses_a_symlinked_lock_file(tmp_path):
    from data_prep.pairs.prep import PrepParams, run as run_prep
    from data_prep.synthetic import generate_scene

    generate_scene(tmp_path / "raw", "scene0000_00", 0, n_frames=26)
    out, target = _linked_lock(tmp_path)
    with pytest.raises(Exception, match="symbolic link"):
        run_prep(tmp_path / "raw", out, PrepParams(frame_skip=25), progress=False,
                 log=lambda *a: None)
    assert target.read_bytes() == PRECIOUS
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing else written


@pytest.mark.slow
def test_pretraining_refuses_a_symlinked_lock_file(synthetic_pairs, tmp_path):
    out, target = _linked_lock(tmp_path, "run")
    cfg = PretrainConfig(
        model=ModelConfig(name="Res16UNet14A", out_channels=16),
        data=replace(DataConfig(root=str(synthetic_pairs), voxel_size=0.05, num_workers=0)),
        optim=OptimConfig(lr=0.05), objectives={"point_info_nce": {"num_matches": 256}},
        max_iterations=2, batch_size=2, device="cpu", progress=False)
    with pytest.raises(Exception, match="symbolic link"):
        pretrain(cfg, out, print_fn=lambda *a: None)
    assert target.read_bytes() == PRECIOUS
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
