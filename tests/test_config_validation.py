"""Every config value is checked before anything is written: a bad one is refused naming its
key, the value and the fix, the output folder is left as it was (no config.json), and the
corrected command then runs there (pretraining, segmentation and detection fine-tuning)."""
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from mink_ssl.engine.config import ModelConfig, OptimConfig
from mink_ssl.engine.validate import ConfigError
from mink_ssl.tasks.detection import FinetuneDetConfig, finetune_det
from mink_ssl.tasks.detection.config import DetDataConfig
from mink_ssl.tasks.pretrain import DataConfig, PretrainConfig, pretrain
from mink_ssl.tasks.segmentation import FinetuneSegConfig, finetune_seg
from mink_ssl.tasks.segmentation.config import SegDataConfig

REPO = Path(__file__).resolve().parents[1]
NAN = math.nan


def tiny(root, **kw) -> PretrainConfig:
    cfg = PretrainConfig(
        model=ModelConfig(name="Res16UNet14S", out_channels=16),
        data=DataConfig(root=str(root), voxel_size=0.05, num_workers=0, max_matches=500),
        optim=OptimConfig(lr=0.05), objectives={"point_info_nce": {"num_matches": 128}},
        max_iterations=2, batch_size=1, device="cpu", checkpoint_every=2, log_every=1,
        progress=False)
    return replace(cfg, **kw)


def changed(cfg, key: str, value):
    """``cfg`` with the dotted ``key`` set to ``value``."""
    head, _, rest = key.partition(".")
    if not rest:
        return replace(cfg, **{head: value})
    return replace(cfg, **{head: changed(getattr(cfg, head), rest, value)})


def user_folder(tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    return out, {"notes.txt": b"the user's"}


def contents(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


PRETRAIN_BAD = [
    ("batch_size", 0, "batch_size=0: must be an integer >= 1 (pairs per process); pass "
                      "batch_size=<value>, e.g. batch_size=8 (the default)"),
    ("objectives", {"point_info_nce": {"weight": NAN}},
     "objectives.point_info_nce.weight=nan: not a finite number"),
    ("objectives", {"point_info_nce": {"weight": -1.0}},
     "objectives.point_info_nce.weight=-1.0: must be a number >= 0 (a negative weight"),
    ("objectives", {"point_info_nce": {"temperature": math.inf}},
     "objectives.point_info_nce.temperature=inf: not a finite number"),
    ("optim.lr", NAN, "optim.lr=nan: not a finite number: must be a number > 0"),
    ("optim.momentum", 1.5, "optim.momentum=1.5: must be a number >= 0 and < 1"),
    ("data.rotation_deg", NAN, "data.rotation_deg=nan: not a finite number: must be a number "
                               ">= 0 and <= 360"),
    ("seed", -1, "seed=-1: must be an integer >= 0 and < 4294967296"),
    ("data.voxel_size", 100.0, "data.voxel_size=100.0: a 10000 cm voxel is outside the "
                               "plausible 1 mm to 1 m: voxel sizes are metres"),
    ("data.voxel_size", 0.0004, "data.voxel_size=0.0004: a 0.4 mm voxel is outside"),
    ("data.voxel_size", -0.05, "data.voxel_size=-0.05: must be a number > 0 (metres)"),
    ("data.min_matches", -5, "data.min_matches=-5: must be an integer >= 1"),
    ("data.min_matches", 600, "data.min_matches=600: is above data.max_matches=500"),
    ("data.scale", [1.2, 0.9], "data.scale=[1.2, 0.9]: must be [low, high] with low <= high"),
    ("data.max_depth", 0.0, "data.max_depth=0.0: must be a number > 0 or null (metres)"),
    ("data.frame_size", [0, 80], "data.frame_size[0]=0: must be an integer >= 1"),
    ("data.num_workers", -2, "data.num_workers=-2: must be auto or an integer >= 0"),
    ("checkpoint_every", -1, "checkpoint_every=-1: must be an integer >= 0"),
    ("max_iterations", 0, "max_iterations=0: must be an integer >= 1"),
    ("optim.warmup_iterations", 2, "optim.warmup_iterations=2: must be below max_iterations=2"),
    ("device", "gpu", "device=gpu: must be auto, cpu, cuda or cuda:<index>"),
]


@pytest.mark.parametrize("key,value,message", PRETRAIN_BAD,
                         ids=[f"{k}={v}" for k, v, _ in PRETRAIN_BAD])
def test_bad_pretraining_value_is_named_and_nothing_is_written(tmp_path, key, value, message):
    out, before = user_folder(tmp_path)
    with pytest.raises(ConfigError) as err:
        pretrain(changed(tiny(tmp_path / "no_data_needed"), key, value), out)
    assert message in str(err.value)
    assert "nothing was written" in str(err.value)
    assert contents(out) == before  # no config.json, no lock, no logs
    with pytest.raises(ConfigError):  # a folder that is not there is not created
        pretrain(changed(tiny(tmp_path / "no_data_needed"), key, value), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_every_problem_is_listed_at_once(tmp_path):
    cfg = changed(changed(tiny(tmp_path), "batch_size", 0), "optim.lr", NAN)
    with pytest.raises(ConfigError, match=r"invalid pretraining config values \(nothing was "
                                          r"written\):\n  optim.lr=nan: .*\n  batch_size=0: "):
        pretrain(cfg, tmp_path / "out")


def test_corrected_values_then_run_in_the_same_folder(synthetic_pairs, tmp_path):
    out, before = user_folder(tmp_path)
    for key, value, _ in PRETRAIN_BAD[:3]:
        with pytest.raises(ConfigError):
            pretrain(changed(tiny(synthetic_pairs), key, value), out)
    assert contents(out) == before
    logs = []
    # checkpoint_every=0 runs, with a word: no periodic checkpoints
    pretrain(tiny(synthetic_pairs, checkpoint_every=0, resume="auto"), out, print_fn=logs.append)
    assert any("checkpoint_every=0: no periodic checkpoints" in line for line in logs), logs
    assert (out / "config.json").is_file() and (out / "backbone.pth").is_file()


@pytest.mark.slow
def test_cli_refuses_bad_values_before_hydra_creates_anything(synthetic_pairs, tmp_path):
    """The issue's commands: each bad value refused (exit 2, no traceback) before the run
    folder exists, an existing folder untouched; the corrected command then runs there."""
    out, before = user_folder(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def cli(*extra):
        return subprocess.run(
            [sys.executable, "-m", "mink_ssl.cli.pretrain", f"data.root={synthetic_pairs}",
             "model=res16unet14s", "model.out_channels=16", "data.num_workers=0",
             "data.voxel_size=0.05", "data.max_matches=500", "objective=[point_info_nce]",
             "objectives.point_info_nce.num_matches=128", "max_iterations=2", "batch_size=1",
             "device=cpu", "progress=false", *extra], cwd=REPO, env=env, capture_output=True,
            text=True, timeout=300)

    bad = ["batch_size=0", "objectives.point_info_nce.weight=nan", "optim.lr=nan",
           "data.rotation_deg=nan", "seed=-1", "data.voxel_size=100", "data.min_matches=-5",
           "checkpoint_every=-3"]
    for run_dir in (out, tmp_path / "new"):
        res = cli(*bad, f"hydra.run.dir={run_dir}")
        assert res.returncode == 2, res.stderr[-3000:]
        assert "Traceback" not in res.stderr and "OverflowError" not in res.stderr
        for arg in bad:
            key, value = arg.split("=")
            assert f"  {key}={value}" in res.stderr or f"{key}={value}.0" in res.stderr, (
                arg, res.stderr)
    assert contents(out) == before and not (tmp_path / "new").exists()

    ok = cli("checkpoint_every=0", f"hydra.run.dir={out}")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "checkpoint_every=0: no periodic checkpoints" in ok.stdout
    assert (out / "config.json").is_file() and (out / "notes.txt").read_text() == "the user's"


SEG_BAD = [
    ("batch_size", 0, "batch_size=0: must be an integer >= 1 (scenes per process)"),
    ("optim.lr", NAN, "optim.lr=nan: not a finite number"),
    ("data.voxel_size", 100.0, "data.voxel_size=100.0: a 10000 cm voxel is outside"),
    ("data.prevoxel_size", 0.0, "data.prevoxel_size=0.0: must be a number > 0 or null"),
    ("data.augmentation.rotation_deg", NAN, "data.augmentation.rotation_deg=nan: not a finite"),
    ("data.augmentation.dropout", 1.0, "data.augmentation.dropout=1.0: must be a number >= 0 "
                                       "and < 1 (a probability)"),
    ("data.augmentation.elastic", [[0.2, NAN]], "data.augmentation.elastic[0]=[0.2, nan]"),
    ("data.scene_fraction", 0.0, "data.scene_fraction=0.0: must be a number > 0 and <= 1"),
    ("eval.rotations", 0, "eval.rotations=0: must be an integer >= 1"),
    ("seed", -1, "seed=-1: must be an integer >= 0"),
    ("probe", "lin", "probe=lin: must be one of linear, linear_multiscale, knn or null"),
]


@pytest.mark.parametrize("key,value,message", SEG_BAD, ids=[f"{k}={v}" for k, v, _ in SEG_BAD])
def test_bad_segmentation_value_is_named_and_nothing_is_written(tmp_path, key, value, message):
    out, before = user_folder(tmp_path)
    cfg = FinetuneSegConfig(data=SegDataConfig(root=str(tmp_path / "no_data_needed")),
                            device="cpu")
    with pytest.raises(ConfigError, match="invalid segmentation config") as err:
        finetune_seg(changed(cfg, key, value), out)
    assert message in str(err.value)
    assert contents(out) == before


DET_BAD = [
    ("epochs", 0, "epochs=0: must be an integer >= 1"),
    ("batch_size", 0, "batch_size=0: must be an integer >= 1 (scenes per process)"),
    ("optim.lr", NAN, "optim.lr=nan: not a finite number"),
    ("head.radius", NAN, "head.radius=nan: not a finite number: must be a number > 0 (metres)"),
    ("eval.nms_iou", 0.0, "eval.nms_iou=0.0: must be a number > 0 and <= 1"),
    ("eval.nms", "rotated", "eval.nms=rotated: must be one of aligned_hull, oriented"),
    ("eval.iou_thresholds", [0.25, 1.5], "eval.iou_thresholds[1]=1.5"),
    ("optim.bn_momentum_min", 0.9, "optim.bn_momentum_min=0.9: is above "
                                   "optim.bn_momentum_init=0.5"),
    ("optim.lr_steps", [80, -1], "optim.lr_steps[1]=-1: must be an integer >= 1 (epochs)"),
    ("data.voxel_size", 0.0001, "data.voxel_size=0.0001: a 0.1 mm voxel is outside"),
    ("data.augmentation.rotation_deg", NAN, "data.augmentation.rotation_deg=nan"),
    ("checkpoint_every", -1, "checkpoint_every=-1: must be an integer >= 0"),
]


@pytest.mark.parametrize("key,value,message", DET_BAD, ids=[f"{k}={v}" for k, v, _ in DET_BAD])
def test_bad_detection_value_is_named_and_nothing_is_written(tmp_path, key, value, message):
    out, before = user_folder(tmp_path)
    cfg = FinetuneDetConfig(data=DetDataConfig(root=str(tmp_path / "no_data_needed")),
                            device="cpu")
    with pytest.raises(ConfigError, match="invalid detection config") as err:
        finetune_det(changed(cfg, key, value), out)
    assert message in str(err.value)
    assert contents(out) == before


def test_the_shipped_configs_pass_the_checks():
    from helpers import compose_config
    from omegaconf import OmegaConf

    from mink_ssl.tasks.detection.config import check_det_config
    from mink_ssl.tasks.pretrain_config import check_pretrain_config
    from mink_ssl.tasks.segmentation.config import check_seg_config

    for name, check, groups in (
            ("pretrain", check_pretrain_config,
             [f"objective=[{p.stem}]" for p in (REPO / "configs" / "objective").glob("*.yaml")]),
            ("finetune_seg", check_seg_config,
             [f"finetune={p.stem}" for p in (REPO / "configs" / "finetune").glob("*.yaml")]),
            ("finetune_det", check_det_config,
             [f"detection={p.stem}" for p in (REPO / "configs" / "detection").glob("*.yaml")])):
        assert groups, name
        for group in groups:
            cfg = OmegaConf.to_object(compose_config(name, "data.root=/x", group))
            assert check(cfg) == [], (name, group)


def test_segmentation_corrected_value_then_runs(rooms, tmp_path):
    from helpers import tiny_seg_config

    out, before = user_folder(tmp_path)
    with pytest.raises(ConfigError, match="eval.rotations=0"):
        finetune_seg(changed(tiny_seg_config(rooms, max_iterations=2), "eval.rotations", 0), out,
                     print_fn=lambda s: None)
    assert contents(out) == before
    finetune_seg(tiny_seg_config(rooms, max_iterations=2), out, print_fn=lambda s: None)
    assert (out / "config.json").is_file() and (out / "model.pth").is_file()
