"""Experiment recipes: every Hydra experiment config composes against its command's schema with
the paper's protocol values, and the scripts print the commands they would run."""
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from helpers import compose_config
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
RECIPES = sorted(p.stem for p in (EXPERIMENTS / "configs" / "experiment").glob("*.yaml"))


def compose(config_name: str, *overrides):
    cfg = compose_config(config_name, f"hydra.searchpath=[file://{EXPERIMENTS / 'configs'}]",
                         *overrides)
    return OmegaConf.to_object(cfg)  # validates every key against the typed schema


def command_of(recipe: str) -> str:
    if recipe.startswith(("pc_pretrain", "csc_pretrain")):
        return "pretrain"
    return "finetune_det" if recipe.startswith("pc_det") else "finetune_seg"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_with_the_protocol(recipe):
    cfg = compose(command_of(recipe), f"+experiment={recipe}", "data.root=/data")
    assert cfg.model.name == "Res16UNet34C"
    if command_of(recipe) == "pretrain":
        # the released launch scripts: PointContrast ddp_local.sh (HC), ddp_launch.sh (NCE, lr
        # 0.05), CSC pretrain_sparseconv.sh (100K iterations, lr step 1000)
        iterations, lr, lr_step, objective = {
            "pc_pretrain_hc": (60000, 0.1, 250, "hardest_contrastive"),
            "pc_pretrain_nce": (60000, 0.05, 250, "point_info_nce"),
            "csc_pretrain": (100000, 0.1, 1000, "shape_context_nce")}[recipe]
        assert (cfg.max_iterations, cfg.batch_size * 8) == (iterations, 32)
        assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.lr_step, cfg.optim.lr_gamma) == (
            lr, 0.8, lr_step, 0.99)
        assert list(cfg.objectives) == [objective]
        assert cfg.data.voxel_size == 0.025
    elif recipe.startswith("pc_det"):
        assert (cfg.optim.name, cfg.optim.lr, cfg.epochs, cfg.optim.lr_steps) == (
            "adam", 1e-3, 180, [80, 120, 160])
        # one process with the reference's whole batch (votenet_det_new/scripts/train_*.sh)
        assert cfg.batch_size == {"pc_det_scannet": 32, "pc_det_sunrgbd": 64}[recipe]
        assert cfg.distributed.sync_bn  # split over GPUs, batch norm still sees the whole batch
        assert (cfg.head.size_clusters, cfg.eval.nms) == ("reference", "aligned_hull")
        # the voxel size is the prepared manifest's (2.5 cm, written by detection prep)
        assert cfg.data.voxel_size is None and cfg.pretrained is None
    else:
        # the manifest's: 5 / 15 / 2 cm for S3DIS / Synthia / ScanNet (tests/test_finetune_seg)
        assert cfg.data.voxel_size is None and cfg.pretrained is None
        # the released scripts: train_scannet.sh / by_scenes.sh lr 0.8, train_stanford3d.sh and
        # by_points.sh 0.1, no Synthia script (fidelity row 4); dampening 0.1 (row 10)
        lr = {"pc_seg_scannet": 0.8, "csc_seg_scannet_scenes": 0.8}.get(recipe, 0.1)
        assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.dampening) == (lr, 0.9, 0.1)
        iterations = {"csc_seg_scannet_points": 10000, "csc_seg_scannet_scenes": 5000}
        if recipe in iterations:
            assert cfg.max_iterations == iterations[recipe]
    text = (EXPERIMENTS / "configs" / "experiment" / f"{recipe}.yaml").read_text()
    if recipe.startswith(("pc_seg", "pc_det")):
        assert "Paper (Table" in text  # the expected number sits next to the recipe


def test_data_efficient_recipes_limit_the_labels():
    assert compose("finetune_seg", "+experiment=csc_seg_scannet_points",
                   "data.root=/d").data.labelled_points == 20
    assert compose("finetune_seg", "+experiment=csc_seg_scannet_scenes",
                   "data.root=/d").data.scene_fraction == 0.1


def dry_run(script, *args, **env):
    done = subprocess.run(["bash", str(EXPERIMENTS / script), *args], capture_output=True,
                          text=True, env={**os.environ, "DRY_RUN": "1", **env})
    return done, shlex.split(done.stdout)


def test_scripts_print_their_commands():
    done, cmd = dry_run("pretrain_scannet.sh", "nce", "/data/pairs", "max_iterations=10",
                        NGPUS="8", RUN_DIR="runs/x")
    assert done.returncode == 0, done.stderr
    assert cmd[:4] == ["torchrun", "--standalone", "--nproc_per_node", "8"]
    assert cmd[cmd.index("--config-dir") + 1] == str(EXPERIMENTS / "configs")
    assert {"+experiment=pc_pretrain_nce", "data.root=/data/pairs", "max_iterations=10",
            "hydra.run.dir=runs/x"} <= set(cmd)

    done, cmd = dry_run("finetune_seg.sh", "s3dis", "/data/s3dis", "scratch", NGPUS="4")
    assert done.returncode == 0, done.stderr
    assert "mink_ssl.cli.finetune_seg" in cmd and "pretrained=null" in cmd
    assert "+experiment=pc_seg_s3dis" in cmd and "--nproc_per_node" in cmd
    assert "hydra.run.dir=runs/experiments/pc_seg_s3dis_scratch" in cmd

    done, cmd = dry_run("finetune_seg.sh", "scannet", "/d", "/w/backbone.pth",
                        RECIPE="csc_seg_scannet_points")
    assert "+experiment=csc_seg_scannet_points" in cmd and "pretrained=/w/backbone.pth" in cmd

    done, cmd = dry_run("finetune_det.sh", "sunrgbd", "/d/sun", "scratch", NGPUS="8")
    assert done.returncode == 0, done.stderr
    assert "mink_ssl.cli.finetune_det" in cmd and "+experiment=pc_det_sunrgbd" in cmd
    assert "pretrained=null" in cmd and "data.root=/d/sun" in cmd
    assert "batch_size=8" in cmd  # 64 / 8 GPUs
    done, cmd = dry_run("finetune_det.sh", "scannet", "/d/scan", "scratch")
    assert cmd[cmd.index("--nproc_per_node") + 1] == "1" and "batch_size=32" in cmd
    done, _ = dry_run("finetune_det.sh", "scannet", "/d/scan", "scratch", NGPUS="5")
    assert done.returncode == 2 and "must divide the batch of 32" in done.stderr

    done, _ = dry_run("finetune_seg.sh", "kitti", "/d", "scratch")
    assert done.returncode == 2 and "unknown benchmark" in done.stderr
    done, _ = dry_run("pretrain_scannet.sh", "triplet", "/d")
    assert done.returncode == 2 and "hc or nce" in done.stderr
