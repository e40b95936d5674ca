"""Typed schemas of the pretraining config (Hydra validates every key against them).

Components never see these objects: ``pretrain()`` unpacks them into explicit arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelConfig:
    name: str = "Res16UNet34C"
    out_channels: int = 32
    stem_kernel_size: int = 3
    bn_momentum: float = 0.05  # stem, strided, transposed and projection batch norms
    block_bn_momentum: Optional[float] = 0.1  # inside residual blocks (released code); null: same
    init: str = "me"  # me: MinkowskiEngine's default kernels (released code) | kaiming
    normalize_output: bool = True


@dataclass
class DataConfig:
    root: str = "???"  # output directory of `mink-ssl-prep scannet`
    voxel_size: float = 0.025
    rotation_deg: float = 360.0
    rotation_axis: str = "random"
    scale: list = field(default_factory=lambda: [1.0, 1.0])
    translation: float = 0.0
    features: str = "ones_jitter"  # mink_ssl.data.features mode (PointContrast pretraining)
    match_radius: float = 1.5
    max_matches: Optional[int] = None
    min_matches: int = 32
    max_depth: Optional[float] = None
    # [h, w]: each view also carries its RGB frame resized to h x w, intrinsics and pose, for
    # rendering objectives (cluster_render); null: no frames
    frame_size: Optional[list] = None
    num_workers: Any = "auto"  # loader processes per rank; auto: free cores - 1, at most 8


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw (decoupled weight decay, DCGLR's and DINO's)
    lr: float = 0.1
    momentum: float = 0.8
    dampening: float = 0.0  # sgd only; pretraining in the released code has none
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
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # objective name -> {weight: float, **constructor arguments}; chosen by the `objective`
    # config group (configs/pretrain.yaml selects hardest_contrastive). Empty here, or a schema
    # default would be merged into every command-line selection.
    objectives: dict[str, Any] = field(default_factory=dict)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # Python modules imported before the objectives are built: objectives of your own,
    # registered with @OBJECTIVES.register, without editing mink-ssl
    imports: list = field(default_factory=list)
    # batch-norm layers keep their running statistics and use them in training (eval mode):
    # makes a step independent of how the batch is split across ranks (DDP equivalence)
    freeze_bn: bool = False
    seed: int = 0
    max_iterations: int = 60000
    batch_size: int = 8  # pairs per process (the global batch is batch_size x world size)
    device: str = "auto"
    checkpoint_every: int = 1000
    log_every: int = 10
    progress: bool = True
    resume: Optional[str] = None  # a checkpoint path, or "auto": the latest in the run dir
    # resume with changed optimizer / schedule settings (recorded in config_history.json)
    resume_override: bool = False
