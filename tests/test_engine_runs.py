"""The engines in real runs: every objective's loss on the same batch, training continued on the
other engine, a resume onto the other engine refused with its reason, the kNN probe of one
backbone file giving the same mIoU on both, and the CLIs on spconv (tests/test_engines.py
proves the layers and networks equal)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from helpers import (SEG_VOXEL as VOXEL, REPO, pretrained_backbone, tiny_seg_config,
                      write_benchmark)

from mink_ssl.engine.config import ModelConfig, OptimConfig
from mink_ssl.engine.rundir import RunConflict
from mink_ssl.models import build_model, load_model
from mink_ssl.models.engines import ENGINES, engine_unavailable
from mink_ssl.models.res16unet import DEFAULT_ENGINE
from mink_ssl.objectives import OBJECTIVES
from mink_ssl.tasks.pretrain import (DataConfig, PretrainConfig, PretrainModule, build_dataset,
                                     build_objectives, pretrain)

MISSING = {e: engine_unavailable(e) for e in ENGINES}
needs_both = pytest.mark.skipif(any(MISSING.values()), reason=f"needs both engines: {MISSING}")

#: small settings that keep each objective's step short (defaults otherwise)
SMALL = {"hardest_contrastive": {"num_pos_per_pair": 256, "num_hn_per_pair": 64},
         "point_info_nce": {"num_matches": 256}, "shape_context_nce": {"num_matches_per_scene": 256}}


def test_config_default_engine_is_the_models_default():
    assert ModelConfig().engine == DEFAULT_ENGINE


def _batch(pairs, frames: bool):
    from mink_ssl.data.pairs import collate_pairs

    dataset = build_dataset(DataConfig(root=str(pairs), voxel_size=0.05, num_workers=0,
                                       max_matches=2000, features="rgb",
                                       frame_size=[60, 80] if frames else None), seed=0)
    return collate_pairs([dataset[0], dataset[1]]), dataset.in_channels


@needs_both
@pytest.mark.slow
# registered objectives, not the test doubles other test files register ("_test_...")
@pytest.mark.parametrize("name", sorted(n for n in OBJECTIVES.names() if not n.startswith("_")))
def test_every_objective_gives_the_same_losses_on_both_engines(name, synthetic_pairs):
    """The same batch of real pairs (synthetic ScanNet scans through prep), the same weights and
    the same random draws: every loss and statistic an objective returns agrees across engines
    to float32 rounding, and so do the backbone's gradients."""
    batch, in_channels = _batch(synthetic_pairs, frames=name == "cluster_render")
    results, grads = {}, {}
    for engine in ("minkowski", "spconv"):
        torch.manual_seed(0)
        backbone = build_model("Res16UNet14A", in_channels=in_channels, out_channels=16,
                               normalize_output=True, engine=engine)
        objectives, weights = build_objectives({name: dict(SMALL.get(name, {}))}, 16)
        module = PretrainModule(backbone, objectives, weights)
        torch.manual_seed(1)
        out = module(batch)
        out["loss"].backward()
        results[engine] = {k: float(v) for k, v in out.items()}
        grads[engine] = torch.cat([p.grad.flatten() for p in backbone.parameters()])
    ref, got = results["minkowski"], results["spconv"]
    assert set(ref) == set(got) and any(k.startswith("loss_") for k in ref)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-3, abs=1e-5), (k, got[k], ref[k])
    g_ref, g_sp = grads["minkowski"], grads["spconv"]
    assert float((g_sp - g_ref).norm() / g_ref.norm()) < 1e-2


def _tiny(root, engine, iterations, **kw) -> PretrainConfig:
    return PretrainConfig(
        model=ModelConfig(name="Res16UNet14A", out_channels=16, engine=engine),
        data=DataConfig(root=str(root), voxel_size=0.05, num_workers=0, max_matches=2000,
                        features="rgb"),
        optim=OptimConfig(lr=0.05), objectives={"point_info_nce": {"num_matches": 256}},
        max_iterations=iterations, batch_size=2, device="cpu", checkpoint_every=2,
        log_every=1, progress=False, **kw)


@needs_both
@pytest.mark.slow
def test_training_continued_on_the_other_engine_matches_one_engine(synthetic_pairs, tmp_path):
    """4 steps on MinkowskiEngine, resumed for 2 more on spconv, ends within float32 drift of 6
    steps on MinkowskiEngine alone (every weight and statistic, relative L2); the resume without
    resume_override is refused with the reason, and the switch is recorded."""
    logs = []
    pretrain(_tiny(synthetic_pairs, "minkowski", 6), tmp_path / "me", print_fn=logs.append)
    assert "Res16UNet14A on minkowski" in logs[0]
    pretrain(_tiny(synthetic_pairs, "minkowski", 4), tmp_path / "mixed", print_fn=lambda *a: None)
    with pytest.raises(RunConflict, match=r"another sparse engine \(minkowski -> spconv\).*"
                                          r"not bit for bit.*model.engine=minkowski"):
        pretrain(_tiny(synthetic_pairs, "spconv", 6, resume="auto"), tmp_path / "mixed",
                 print_fn=lambda *a: None)
    logs = []
    pretrain(_tiny(synthetic_pairs, "spconv", 6, resume="auto", resume_override=True),
             tmp_path / "mixed", print_fn=logs.append)
    assert "Res16UNet14A on spconv" in logs[0]
    history = json.loads((tmp_path / "mixed" / "config_history.json").read_text())
    assert "model.engine" in json.dumps(history)
    a = load_model(tmp_path / "me" / "backbone.pth").state_dict()
    b = load_model(tmp_path / "mixed" / "backbone.pth").state_dict()
    assert load_model(tmp_path / "mixed" / "backbone.pth").engine == "spconv"
    keys = [k for k, v in a.items() if v.is_floating_point()]
    wa = torch.cat([a[k].flatten() for k in keys])
    wb = torch.cat([b[k].flatten() for k in keys])
    drift = float((wb - wa).norm() / wa.norm())
    assert drift < 1e-3, drift  # float32 rounding and ReLU flips over 2 steps: measured 3.4e-5


@pytest.fixture(scope="module")
def rooms(tmp_path_factory):
    return write_benchmark(tmp_path_factory.mktemp("engine_rooms") / "rooms", {
        "train": [f"Area_1/room_{i}" for i in range(3)], "val": ["Area_5/room_0"], "test": []},
        seed=5)


@needs_both
@pytest.mark.slow
def test_knn_probe_of_one_backbone_file_gives_the_same_miou_on_both_engines(rooms, tmp_path):
    """The features of one backbone file agree across engines: the kNN probe (no training)
    predicts the same classes for (nearly) every voxel and gives the same mIoU."""
    from mink_ssl.tasks.segmentation import finetune_seg

    pretrained_backbone(tmp_path / "backbone.pth")
    results = {}
    for engine in ("minkowski", "spconv"):
        cfg = tiny_seg_config(rooms, probe="knn", knn_k=5,
                              pretrained=str(tmp_path / "backbone.pth"))
        cfg = replace(cfg, model=replace(cfg.model, engine=engine),
                      data=replace(cfg.data, voxel_size=VOXEL))
        results[engine] = finetune_seg(cfg, tmp_path / engine, print_fn=lambda *a: None)
    me, sp = results["minkowski"], results["spconv"]
    assert me["points"] == sp["points"] > 500
    assert sp["miou"] == pytest.approx(me["miou"], abs=1e-3)


@pytest.mark.slow
def test_pretrain_cli_runs_on_spconv(synthetic_pairs, tmp_path):
    """The pretraining CLI with model.engine=spconv end to end; its first line names the
    engine, its checkpoints and exported backbone record it."""
    if MISSING["spconv"]:
        pytest.skip(MISSING["spconv"])
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "mink_ssl.cli.pretrain", f"data.root={synthetic_pairs}",
         "model=res16unet14a", "model.out_channels=16", "model.engine=spconv",
         "data.voxel_size=0.05", "data.num_workers=0", "data.max_matches=2000",
         "objective=[hardest_contrastive]", "objectives.hardest_contrastive.num_pos_per_pair=128",
         "objectives.hardest_contrastive.num_hn_per_pair=64", "max_iterations=2", "batch_size=2",
         "device=cpu", "checkpoint_every=2", "log_every=1", "progress=false",
         f"hydra.run.dir={run}"], capture_output=True, text=True, cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Res16UNet14A on spconv" in done.stdout.splitlines()[0]
    ckpt = torch.load(run / "checkpoint_2.pth", weights_only=True)
    assert ckpt["config"]["model"]["engine"] == "spconv"
    assert load_model(run / "backbone.pth").engine == "spconv"
    with pytest.raises(ValueError, match="model.engine must be one of"):
        build_model("Res16UNet14A", in_channels=3, out_channels=4, engine="mink")
