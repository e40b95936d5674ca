"""A pretraining run recorded before the objectives' arguments were typed resumes (#27 item 3).

Such a run's ``config.json`` and checkpoints list only the arguments its YAML named, and an
objective with a head recorded ``in_channels`` as the backbone's width (the YAML interpolated
``${model.out_channels}``); today's config lists every argument, with ``in_channels: null`` for
"the backbone's width". The resume compares both in one form
(:func:`mink_ssl.tasks.pretrain.comparable_config`): the same objectives compare equal, a real
change is still refused. The runs are real: a pretraining on synthetic pairs, its recorded
config and checkpoint rewritten to the older shape on disk (the checkpoint with its checksum
recomputed, as that version wrote none, then re-checked)."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from mink_ssl.engine.config import ModelConfig, OptimConfig
from mink_ssl.engine.rundir import RunConflict
from mink_ssl.io import with_checksum
from mink_ssl.tasks.pretrain import DataConfig, PretrainConfig, comparable_config, pretrain

#: what an older configs/objective/*.yaml named (a subset of today's arguments)
OLD_ARGS = {"point_info_nce": {"weight": 1.0, "num_matches": 512, "temperature": 0.4},
            "gmm_likelihood": {"weight": 1.0, "in_channels": 16}}


def config(root, **kw) -> PretrainConfig:
    cfg = PretrainConfig(
        model=ModelConfig(name="Res16UNet14A", out_channels=16),
        data=DataConfig(root=str(root), voxel_size=0.05, num_workers=0, max_matches=2000),
        optim=OptimConfig(lr=0.05),
        objectives={"point_info_nce": {"num_matches": 512, "temperature": 0.4},
                    "gmm_likelihood": {}},
        max_iterations=2, batch_size=2, device="cpu", checkpoint_every=1, log_every=1,
        progress=False)
    return replace(cfg, **kw)


def to_old_shape(recorded: dict) -> dict:
    old = json.loads(json.dumps(recorded))
    old["objectives"] = json.loads(json.dumps(OLD_ARGS))
    return old


@pytest.fixture(scope="module")
def old_run(synthetic_pairs, tmp_path_factory):
    """A run of 2 iterations taken back to its checkpoint after the first (as if stopped
    there), its records rewritten to the older shape."""
    out = tmp_path_factory.mktemp("old") / "run"
    pretrain(config(synthetic_pairs), out, print_fn=lambda s: None)
    for name in ("backbone.pth", "checkpoint_2.pth"):
        (out / name).unlink()
    cfg_file = out / "config.json"
    cfg_file.write_text(json.dumps(to_old_shape(json.loads(cfg_file.read_text()))))
    for path in out.glob("checkpoint_*.pth"):
        ckpt = torch.load(path, weights_only=True)
        ckpt["config"] = to_old_shape(ckpt["config"])
        torch.save(with_checksum(ckpt), path)
    return out


def test_the_older_shape_compares_equal_to_todays_config(synthetic_pairs):
    from dataclasses import asdict

    new = asdict(config(synthetic_pairs))
    old = to_old_shape(new)
    assert old["objectives"] != new["objectives"]
    assert comparable_config(old) == comparable_config(new)
    # in_channels given as another width is a real difference
    wider = json.loads(json.dumps(old))
    wider["objectives"]["gmm_likelihood"]["in_channels"] = 8
    assert comparable_config(wider) != comparable_config(new)


def test_an_older_run_resumes_and_a_real_change_is_refused(old_run, synthetic_pairs, tmp_path):
    import shutil

    changed = tmp_path / "changed"
    shutil.copytree(old_run, changed)
    bad = config(synthetic_pairs, resume="auto",
                 objectives={"point_info_nce": {"num_matches": 512, "temperature": 0.07},
                             "gmm_likelihood": {}})
    with pytest.raises(RunConflict, match=r"objectives\.point_info_nce\.temperature: 0\.4 -> "
                                          r"0\.07"):
        pretrain(bad, changed, print_fn=lambda s: None)

    logs: list[str] = []
    pretrain(config(synthetic_pairs, resume="auto"), old_run, print_fn=logs.append)
    assert any("resumed from" in line and "iteration 1" in line for line in logs), logs
    assert (old_run / "backbone.pth").is_file()
    last = (old_run / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(last)["iteration"] == 2  # the resumed step
