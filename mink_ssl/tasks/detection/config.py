"""Typed schemas of the detection fine-tuning config (Hydra validates every key against them);
per-benchmark recipes live in ``configs/detection/<benchmark>.yaml``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from mink_ssl.engine.config import ModelConfig, RunConfig


@dataclass
class DetAugmentConfig:
    """VoteNet's training augmentations (:class:`mink_ssl.data.detection.DetAugmentation`)."""

    flip_x: bool = True  # mirror x with probability 0.5
    flip_y: bool = True  # mirror y with probability 0.5 (ScanNet; SUN RGB-D: false)
    rotation_deg: float = 5.0  # about +z, uniform in [-r, r] (ScanNet 5, SUN RGB-D 30)
    scale: list = field(default_factory=lambda: [1.0, 1.0])  # SUN RGB-D [0.85, 1.15]


@dataclass
class DetDataConfig:
    root: str = "???"  # output directory of detection prep (manifest.json + scenes/)
    voxel_size: Optional[float] = None  # metres; null: the manifest's (prep writes 2.5 cm)
    # mink_ssl.data.features mode: ones (3 x 1.0, PointContrast's detection) | rgb | ones_jitter |
    # rgb_jitter | ones1 (1 channel, for ones1 backbones)
    features: str = "ones"
    num_points: Optional[int] = 40000  # random points per scene before voxelisation; null: all
    max_votes: int = 1  # ground-truth votes per voxel (VoteNet: 3 for SUN RGB-D)
    train_split: str = "train"
    eval_split: Optional[str] = "val"  # null: no evaluation
    augment: bool = True
    augmentation: DetAugmentConfig = field(default_factory=DetAugmentConfig)
    num_workers: Any = "auto"  # loader processes per rank; auto: free cores - 1, at most 8


@dataclass
class DetHeadConfig:
    """The VoteNet head (:class:`mink_ssl.models.votenet.VoteNetHead`): VoteNet's 1,024 seeds of
    256 channels, 256 proposals, 0.3 m balls of 16 votes."""

    num_heading_bins: int = 1  # 1: axis-aligned boxes (ScanNet); SUN RGB-D 12
    # reference (VoteNet's fixed per-class sizes: scannet_means.npz, model_util_sunrgbd.py) |
    # train_mean (this split's)
    size_clusters: str = "reference"
    num_seeds: int = 1024
    seed_channels: int = 256
    num_proposals: int = 256
    radius: float = 0.3  # metres, vote aggregation ball
    group_size: int = 16  # votes per ball
    # rebuild: the backbone's final layer gives the seeds' seed_channels (96 -> 256, the released
    # SparseConvBackbone) | keep: the pretrained 96 -> 32 final + Linear/BN/ReLU to seed_channels
    final_layer: str = "rebuild"


@dataclass
class DetOptimConfig:
    """VoteNet's schedule (kept by PointContrast): Adam 1e-3, x0.1 at epochs 80, 120, 160 of 180;
    batch-norm momentum 0.5, x0.5 every 20 epochs, at least 0.001."""

    name: str = "adam"  # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    lr_steps: list = field(default_factory=lambda: [80, 120, 160])  # epochs
    lr_gamma: float = 0.1
    bn_momentum_init: Optional[float] = 0.5  # VoteNet's batch-norm momentum decay; null: off
    bn_momentum_decay: float = 0.5  # factor every bn_momentum_step epochs
    bn_momentum_step: int = 20
    bn_momentum_min: float = 0.001
    scale_lr_with_world_size: bool = False


@dataclass
class DetEvalConfig:
    """VoteNet's evaluation: per-class 3D NMS, per-class proposals."""

    every: int = 10  # evaluate on data.eval_split every this many epochs (0: at the end only)
    iou_thresholds: list = field(default_factory=lambda: [0.25, 0.5])
    conf_threshold: float = 0.05  # objectness probability a proposal needs
    nms_iou: float = 0.25  # per-class 3D NMS
    # aligned_hull (VoteNet: IoU of the boxes' axis-aligned hulls; the same as oriented for
    # axis-aligned boxes) | oriented (true oriented 3D IoU)
    nms: str = "aligned_hull"
    per_class_proposal: bool = True  # each kept box once per class, score p(class) p(object)
    batch_size: int = 4  # scenes per evaluation forward pass
    # best/model.pth + best.json: the best periodic evaluation's (first threshold: mAP@0.25)
    keep_best: bool = True


@dataclass
class FinetuneDetConfig(RunConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    head: DetHeadConfig = field(default_factory=DetHeadConfig)
    optim: DetOptimConfig = field(default_factory=DetOptimConfig)
    eval: DetEvalConfig = field(default_factory=DetEvalConfig)
    # backbone.pth of pretraining, or a checkpoint_<it>.pth; null: from scratch
    pretrained: Optional[str] = None
    epochs: int = 180
    batch_size: int = 8  # scenes per process (global batch = batch_size x world size)
    # checkpoint_every: RunConfig's, in iterations as in every task (it counted epochs here
    # before #27; eval.every and the schedule's lr_steps still count epochs)
    # RunConfig's: device auto | cpu | cuda; resume null, a checkpoint path or "auto"


def check_det_config(cfg: FinetuneDetConfig) -> list[str]:
    """Every value of ``cfg`` finite and in range, before anything is written; a
    :class:`~mink_ssl.engine.validate.ConfigError` names each key that is not. Returns notes
    for values that run but deserve a word."""
    from mink_ssl.data.features import FEATURE_MODES
    from mink_ssl.engine.validate import Checks, check_optimizer, check_run_config, check_workers
    from mink_ssl.ops.nms import NMS_MODES

    c = Checks(cfg)
    notes = check_run_config(c)
    check_optimizer(c, ("adam", "sgd"))
    c.numbers("optim.lr_steps", integer=True, minimum=1, what="epochs")
    c.number("optim.lr_gamma", above=0)
    c.number("optim.bn_momentum_init", above=0, maximum=1, optional=True)
    c.number("optim.bn_momentum_decay", above=0, maximum=1)
    c.number("optim.bn_momentum_step", integer=True, minimum=1, what="epochs")
    c.number("optim.bn_momentum_min", minimum=0, maximum=1)
    low, init = cfg.optim.bn_momentum_min, cfg.optim.bn_momentum_init
    if isinstance(init, (int, float)) and isinstance(low, (int, float)) and 0 <= init < low:
        c.fail("optim.bn_momentum_min", low, f"is above optim.bn_momentum_init={init}",
               "pass optim.bn_momentum_min <= optim.bn_momentum_init")
    c.number("epochs", integer=True, minimum=1)
    c.number("batch_size", integer=True, minimum=1, what="scenes per process")

    if cfg.data.root in ("???", "", None):
        c.fail("data.root", cfg.data.root, "is not set",
               "pass data.root=<output directory of detection prep>")
    c.voxel_size("data.voxel_size", optional=True)
    c.choice("data.features", sorted(FEATURE_MODES))
    c.number("data.num_points", integer=True, minimum=1, optional=True)
    c.number("data.max_votes", integer=True, minimum=1)
    check_workers(c)
    c.number("data.augmentation.rotation_deg", minimum=0, maximum=360, what="degrees")
    c.numbers("data.augmentation.scale", length=2, ordered=True, above=0)

    c.number("head.num_heading_bins", integer=True, minimum=1)
    c.choice("head.size_clusters", ("reference", "train_mean"))
    for key in ("num_seeds", "seed_channels", "num_proposals", "group_size"):
        c.number(f"head.{key}", integer=True, minimum=1)
    c.number("head.radius", above=0, what="metres")
    c.choice("head.final_layer", ("rebuild", "keep"))

    c.number("eval.every", integer=True, minimum=0, what="epochs; 0: at the end only")
    c.numbers("eval.iou_thresholds", above=0, maximum=1)
    c.number("eval.conf_threshold", minimum=0, maximum=1)
    c.number("eval.nms_iou", above=0, maximum=1)
    c.choice("eval.nms", NMS_MODES)
    c.number("eval.batch_size", integer=True, minimum=1)
    c.raise_if_any("detection config")
    return notes
