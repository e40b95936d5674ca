"""The benchmark's presets (data, pretraining, fine-tuning and probe sizes), its label settings,
and the per-objective pretraining arguments and optimizers."""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

from mink_ssl.engine.config import ModelConfig
from mink_ssl.objectives import OBJECTIVES

SCRATCH = "none"
SMALL_MODEL = "Res16UNet14S"  # Res16UNet14A at half width (mink_ssl.models.res16unet)


@dataclass(frozen=True)
class Preset:
    """Sizes of one benchmark scale (data, pretraining, fine-tuning)."""

    model: str = SMALL_MODEL
    out_channels: int = 32
    engine: str = ModelConfig.engine  # the sparse engine of every run (same weights on both)
    features: str = "ones"  # network input in both domains: ones (geometry only) | rgb
    # pretraining data: synthetic ScanNet scans
    scannet_scenes: int = 6
    frames: int = 150
    frame_skip: int = 25
    pretrain_voxel: float = 0.1
    pretrain_iterations: int = 800
    pretrain_rotation_axis: str = "z"  # views rotated about gravity, as fine-tuning augments
    pretrain_batch: int = 4
    pretrain_lr: float = 0.1
    max_matches: int = 4096
    num_matches: int = 1024  # points per view and step that the objectives sample
    # fine-tuning data: synthetic S3DIS rooms
    rooms_per_area: int = 3  # training rooms in each of Areas 1-4 and 6
    test_rooms: int = 8  # rooms of Area 5, the test split
    points_per_m2: float = 150.0
    room_noise: float = 0.01
    seg_voxel: float = 0.1
    finetune_iterations: int = 60
    finetune_batch: int = 2
    finetune_lr: float = 2e-3
    settings: tuple = ("pts20", "pts200", "full")
    # probes on the frozen backbone of every objective (scratch's row: the random
    # initialisation, the floor), trained on the labels of ``probe_setting``
    probes: tuple = ("linear", "linear_multiscale", "knn")
    probe_setting: str = "full"
    probe_iterations: int = 200  # linear probes: Adam, finetune_lr, poly decay, batch as above
    knn_k: int = 20
    knn_bank: int = 20000  # labelled training voxels in the kNN probe's bank (seeded subset)
    objectives: tuple = (SCRATCH, "point_info_nce", "hardest_contrastive")
    seeds: tuple = (0, 1, 2)
    data_seed: int = 0


PRESETS = {
    "full": Preset(),
    "demo": Preset(scannet_scenes=3, pretrain_iterations=300, rooms_per_area=2, test_rooms=4,
                   finetune_iterations=60, settings=("pts200",), probes=(),
                   objectives=(SCRATCH, "point_info_nce"), seeds=(0,)),
    "tiny": Preset(out_channels=16, scannet_scenes=2, frames=60, pretrain_iterations=2,
                   pretrain_batch=2, max_matches=1000, num_matches=256, rooms_per_area=1,
                   test_rooms=2, points_per_m2=40.0, seg_voxel=0.2, finetune_iterations=2,
                   finetune_batch=2, settings=("pts20", "full"), probe_iterations=2,
                   knn_k=3, knn_bank=500,
                   objectives=(SCRATCH, "point_info_nce", "hardest_contrastive"), seeds=(0,)),
}


# ------------------------------------------------------------------------------- settings

def parse_setting(name: str) -> dict:
    """``pts<N>`` / ``frac<F>`` / ``full`` -> {scene_fraction, labelled_points}."""
    m = re.fullmatch(r"pts(\d+)|frac(0?\.\d+|1(?:\.0*)?)|full", name)
    if not m or (m.group(1) is not None and int(m.group(1)) < 1):
        raise ValueError(f"unknown setting {name!r}; use pts<N> (N >= 1 labelled points per "
                         "room), frac<F> (0 < F <= 1 of the rooms) or full")
    if m.group(1) is not None:
        return {"scene_fraction": 1.0, "labelled_points": int(m.group(1))}
    if m.group(2) is not None:
        frac = float(m.group(2))
        if frac <= 0:
            raise ValueError(f"setting {name!r}: the fraction must be > 0")
        return {"scene_fraction": frac, "labelled_points": None}
    return {"scene_fraction": 1.0, "labelled_points": None}


def objective_args(name: str, preset: Preset, seed: int) -> dict:
    """Constructor arguments of objective ``name`` scaled to the preset (small samples)."""
    n = preset.num_matches
    args = {
        "point_info_nce": {"num_matches": n},
        # anchors per scene, n per batch as every objective here (CSC: npos per scene);
        # r1, r2 = 2, 20 voxels as CSC's script
        "shape_context_nce": {"num_matches_per_scene": max(n // preset.pretrain_batch, 1),
                              "inner_radius": 2 * preset.pretrain_voxel,
                              "outer_radius": 20 * preset.pretrain_voxel},
        # per pair, as the released trainer scales them: n and max(n // 4, 64) per batch
        "hardest_contrastive": {"num_pos_per_pair": max(n // preset.pretrain_batch, 1),
                                "num_hn_per_pair": max(n // 4, 64) // preset.pretrain_batch},
        "gmm_likelihood": {"max_points": 2 * n},
        "perturbation": {},
        # the teacher averages the last ~100 student steps (momentum 0.99 rising to 1): at
        # 0.996 (the paper's, for ~1e5 steps) the teacher exported after 800 steps still holds
        # 20% of its random initial weights (experiments/synthetic_transfer/README.md)
        "distillation": {"voxel_size": preset.pretrain_voxel, "max_points": n,
                         "momentum": 0.99},
        "cluster_render": {"max_points": 2 * n},
    }.get(name, {})
    if "seed" in inspect.signature(OBJECTIVES.get(name)).parameters:
        args["seed"] = seed  # the objective's own sampling follows the benchmark seed
    return args


def objective_optim(name: str, preset: Preset) -> dict:
    """Pretraining optimizer of objective ``name`` (``a+b``: the first that has its own), as
    :class:`~mink_ssl.engine.config.OptimConfig` fields: PointContrast's SGD at the preset's lr
    for every objective but distillation, which trains as DCGLR does (AdamW, a linear warm-up
    over the first tenth of the run, then cosine; DINO's weight decay 0.04 at its start). With
    SGD 0.1 from the first step its student collapsed the EMA teacher to uniform targets
    within 30 steps and its loss rose (experiments/synthetic_transfer/README.md)."""
    if "distillation" in name.split("+"):
        return {"name": "adamw", "lr": 1e-3, "weight_decay": 0.04, "schedule": "cosine",
                "warmup_iterations": preset.pretrain_iterations // 10}
    return {"lr": preset.pretrain_lr}


# ------------------------------------------------------------------------------------ data
