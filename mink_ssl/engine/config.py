"""Typed config schemas every task shares (Hydra validates every key against them): the
backbone, the optimizer and its schedule, distributed training. Their defaults are written here
only: the configs (``configs/model/*.yaml``, ``configs/optim/*.yaml``) hold what a recipe
changes (tests/test_defaults.py fails on a repeat). Each task's own config:
:mod:`mink_ssl.tasks`. Components never see these objects: the run functions unpack them into
explicit arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ModelConfig:
    name: str = "Res16UNet34C"
    out_channels: int = 32
    stem_kernel_size: int = 3  # 3 as in PointContrast pretraining, 5 as in the ME model zoo
    # stem, strided, transposed and projection batch norms (fine-tuning recipes: 0.02)
    bn_momentum: float = 0.05
    # batch norms inside residual blocks keep 0.1, as in the released code (its blocks are built
    # without bn_momentum); null: bn_momentum
    block_bn_momentum: Optional[float] = 0.1
    init: str = "me"  # me: MinkowskiEngine's default kernels (released code) | kaiming
    normalize_output: bool = True  # contrastive losses compare L2-normalised features
    # the sparse engine (mink_ssl.models.engines): spconv | minkowski; same weights on both
    engine: str = "spconv"


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw (decoupled weight decay, DCGLR's and DINO's)
    lr: float = 0.1
    momentum: float = 0.8
    dampening: float = 0.0  # sgd only; pretraining in the released code has none (fine-tuning: 0.1)
    weight_decay: float = 1e-4
    schedule: str = "step"  # step (PointContrast's) | cosine (to 0 at max_iterations)
    lr_step: int = 250  # step: lr x lr_gamma every lr_step iterations
    lr_gamma: float = 0.99
    warmup_iterations: int = 0  # lr rises linearly from lr / warmup to lr, then the schedule
    scale_lr_with_world_size: bool = False  # lr x world_size (linear scaling rule)


@dataclass
class DistributedConfig:
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    sync_bn: bool = False  # CUDA only: SyncBatchNorm over all ranks
    find_unused_parameters: bool = False


@dataclass
class RunConfig:
    """What the run skeleton (:mod:`mink_ssl.engine.run`) reads from every task's config; each
    task's config extends it (and may change a default). ``checkpoint_every`` and ``log_every``
    count iterations in every task."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 1000  # iterations
    log_every: int = 10  # iterations
    progress: bool = True
    resume: Optional[str] = None  # a checkpoint path, or "auto": the latest in the run dir
    # resume with changed optimizer / schedule settings (recorded in config_history.json)
    resume_override: bool = False
