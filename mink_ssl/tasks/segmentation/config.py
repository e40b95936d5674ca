"""Typed schemas of the segmentation fine-tuning config (Hydra validates every key against them);
per-benchmark values live in ``configs/finetune/<benchmark>.yaml``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from mink_ssl.engine.config import ModelConfig, RunConfig


@dataclass
class AugmentConfig:
    """Training augmentations (list and order: :mod:`mink_ssl.data.seg_augment`)."""

    rotation_deg: float = 180.0  # about gravity, uniform in [-r, r]
    tilt_deg: float = 0.0  # about the horizontal axes (S3DIS 5.625 = pi/32, ScanNet pi/64)
    scale: list = field(default_factory=lambda: [0.9, 1.1])
    flip: bool = True  # mirror each horizontal axis with probability 0.5
    elastic: list = field(default_factory=list)  # [[granularity, magnitude], ...] metres
    color_auto_contrast: float = 0.2  # probability
    color_translation: float = 0.1  # ratio of 255
    color_jitter: float = 0.05  # std, ratio of 255
    dropout: float = 0.2  # CSC RandomDropout(0.2): with this probability keep int(M (1 - p)) voxels
    # metres, half size of the training crop (S3DIS 4, Synthia 18); null: no crop (CSC scannet.py)
    clip_bound: Optional[float] = None
    clip_translation: list = field(default_factory=lambda: [0.0, 0.0])  # crop centre shift


@dataclass
class SegDataConfig:
    root: str = "???"  # output directory of segmentation prep (manifest.json + scenes/)
    voxel_size: Optional[float] = None  # metres; null: the manifest's recommendation
    # mink_ssl.data.features mode: rgb (RGB / 255 - 0.5, the released normalize_color) | ones |
    # rgb_jitter | ones_jitter | ones1 (1 channel)
    features: str = "rgb"
    up_axis: str = "z"  # gravity axis of the prepared coordinates
    train_split: str = "train"
    eval_split: Optional[str] = "val"  # null: no evaluation
    augment: bool = True
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    scene_fraction: float = 1.0  # limited labels: this seeded fraction of training scenes
    labelled_points: Optional[int] = None  # limited labels: N random labelled points per scene
    label_seed: int = 0  # seed of both limited-label selections
    num_workers: Any = "auto"  # loader processes per rank; auto: free cores - 1, at most 8
    prevoxel_size: Optional[float] = None  # metres, thin scenes first (Synthia 0.075); all splits
    eval_clip_bound: Optional[float] = None  # metres, voxels evaluation crop (Synthia 25)
    label_rule: str = "uniform"  # voxel labels: uniform (CSC: mixed voxels ignored) | majority


@dataclass
class SegOptimConfig:
    """PointContrast's and CSC's downstream/semseg config/default.yaml and their scripts."""

    name: str = "sgd"  # sgd | adam
    # optimizer.lr=0.1 with PolyLR in PointContrast's and CSC's train_stanford3d.sh (S3DIS); the
    # ScanNet recipe sets 0.8 (train_scannet.sh); Synthia has no released script: this default
    lr: float = 0.1
    momentum: float = 0.9
    dampening: float = 0.1  # sgd only: the released downstream configs' sgd_dampening; no Nesterov
    weight_decay: float = 1e-4
    # poly: lr (1 - t/(T+1))^poly_power (the released PolyLR), stepped every iteration | step:
    # x lr_gamma every lr_step
    scheduler: str = "poly"
    poly_power: float = 0.9
    lr_step: int = 1000
    lr_gamma: float = 0.5
    scale_lr_with_world_size: bool = False


@dataclass
class SegEvalConfig:
    every: int = 1000  # evaluate on data.eval_split every this many iterations (0: at the end)
    rotations: int = 1  # final evaluation: average logits over this many rotations about gravity
    ply_scenes: int = 2  # final evaluation: PLY files of predictions for the first k scenes
    keep_best: bool = True  # best/model.pth + best.json: the best periodic evaluation (mIoU)
    # voxels (the reference, CSC lib/test.py: one vote per test voxel, mixed voxels ignored) |
    # points (every original point)
    protocol: str = "voxels"


@dataclass
class FinetuneSegConfig(RunConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)
    # backbone.pth of pretraining, or a checkpoint_<it>.pth; null: from scratch
    pretrained: Optional[str] = None
    # rebuild: the backbone's final layer becomes the classifier (96 -> C, the released code;
    # pretrained final.* dropped; model.out_channels is then the class count) | keep: a new
    # 32 -> C head on the pretrained 96 -> 32 final
    final_layer: str = "rebuild"
    # a frozen backbone (mink_ssl.tasks.segmentation.probe): null (fine-tune everything) | linear (a
    # linear layer on the output features) | linear_multiscale (on the 4 decoder stages
    # concatenated, 576 wide for Res16UNet34C) | knn (cosine, no training)
    probe: Optional[str] = None
    knn_k: int = 20  # probe=knn: neighbours that vote
    knn_bank: int = 200000  # probe=knn: most labelled training voxels kept (seeded subset)
    # the S3DIS recipe: the paper's 1x schedule (the released train_stanford3d.sh: 60000)
    max_iterations: int = 10000
    # scenes per process (global batch = batch_size x world size): the protocol's 48 on 8 GPUs
    batch_size: int = 6
    evaluate_only: Optional[str] = None  # a fine-tuned model.pth or checkpoint: evaluate it only
    # RunConfig's: device auto | cpu | cuda; checkpoint_every 1000 iterations; resume null, a
    # checkpoint path or "auto"


def check_seg_config(cfg: FinetuneSegConfig) -> list[str]:
    """Every value of ``cfg`` finite and in range, before anything is written; a
    :class:`~mink_ssl.engine.validate.ConfigError` names each key that is not. Returns notes
    for values that run but deserve a word."""
    from mink_ssl.data.features import FEATURE_MODES
    from mink_ssl.data.segmentation import LABEL_RULES, UP_AXES
    from mink_ssl.engine.validate import Checks, check_optimizer, check_run_config, check_workers
    from mink_ssl.models.probe import PROBES

    c = Checks(cfg)
    notes = check_run_config(c)
    check_optimizer(c, ("sgd", "adam"))
    c.number("optim.dampening", minimum=0, below=1)
    c.choice("optim.scheduler", ("poly", "step"))
    c.number("optim.poly_power", minimum=0)
    c.number("optim.lr_step", integer=True, minimum=1, what="iterations")
    c.number("optim.lr_gamma", above=0)
    c.number("max_iterations", integer=True, minimum=1)
    c.number("batch_size", integer=True, minimum=1, what="scenes per process")
    c.choice("final_layer", ("rebuild", "keep"))
    c.choice("probe", PROBES, optional=True)
    c.number("knn_k", integer=True, minimum=1)
    c.number("knn_bank", integer=True, minimum=1)

    if cfg.data.root in ("???", "", None):
        c.fail("data.root", cfg.data.root, "is not set",
               "pass data.root=<output directory of segmentation prep>")
    c.voxel_size("data.voxel_size", optional=True)
    c.voxel_size("data.prevoxel_size", optional=True)
    c.number("data.eval_clip_bound", above=0, optional=True, what="metres")
    c.choice("data.features", sorted(FEATURE_MODES))
    c.choice("data.up_axis", sorted(UP_AXES))
    c.choice("data.label_rule", LABEL_RULES)
    c.number("data.scene_fraction", above=0, maximum=1)
    c.number("data.labelled_points", integer=True, minimum=1, optional=True)
    c.number("data.label_seed", integer=True, minimum=0, below=2**32)
    check_workers(c)
    a = "data.augmentation."
    c.number(a + "rotation_deg", minimum=0, maximum=360, what="degrees")
    c.number(a + "tilt_deg", minimum=0, maximum=90, what="degrees")
    c.numbers(a + "scale", length=2, ordered=True, above=0)
    if not isinstance(cfg.data.augmentation.elastic, (list, tuple)):
        c.fail(a + "elastic", cfg.data.augmentation.elastic,
               "must be a list of [granularity, magnitude] pairs (metres)")
    else:
        for i, pair in enumerate(cfg.data.augmentation.elastic):
            sub = Checks({"elastic": pair})
            sub.numbers("elastic", length=2, above=0)
            if sub.problems:
                c.fail(f"{a}elastic[{i}]", pair, "must be [granularity, magnitude] in metres, "
                       "both > 0")
    c.number(a + "color_auto_contrast", minimum=0, maximum=1, what="a probability")
    c.number(a + "color_translation", minimum=0)
    c.number(a + "color_jitter", minimum=0)
    c.number(a + "dropout", minimum=0, below=1, what="a probability")
    c.number(a + "clip_bound", above=0, optional=True, what="metres")
    c.numbers(a + "clip_translation", length=2, minimum=0)

    c.number("eval.every", integer=True, minimum=0, what="iterations; 0: at the end only")
    c.number("eval.rotations", integer=True, minimum=1)
    c.number("eval.ply_scenes", integer=True, minimum=0)
    c.choice("eval.protocol", ("voxels", "points"))
    c.raise_if_any("segmentation config")
    return notes
