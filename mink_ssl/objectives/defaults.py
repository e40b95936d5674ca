"""Every built-in objective's arguments, their types, ranges and defaults: the one place the
defaults are written. The objectives' constructors take these fields as keywords
(:func:`~mink_ssl.objectives.args.objective_args`); the configs (``configs/objective/*.yaml``)
hold only what a recipe changes; the argument tables of docs/pretraining.md are generated from
here (``scripts/objective_tables.py``). Where a default comes from a paper or the released code,
the field's text says so (the objective's module docstring explains the adaptation).

``in_channels`` (objectives with heads): ``None`` means the backbone's output width
(``model.out_channels``), filled in when a run builds its objectives
(:func:`~mink_ssl.objectives.args.resolve_in_channels`); an objective constructed directly with
``None`` infers it at its first step (lazy layers) or, for distillation, from the backbone it is
attached to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from mink_ssl.objectives.args import arg

POSITIVE_MODES = ("code", "paper")
NEGATIVE_MODES = ("code", "exclude_matches")
PARTITION_MODES = ("csc4", "csc8", "sectors")
REDUCTIONS = ("csc", "nonempty")
RECONSTRUCTIONS = ("delta", "chamfer")
INPUT_SCALES = ("unit_rms", "none")
FITTING_LOSSES = ("sinkhorn", "l1")
PAPER_NOISE_STD = 0.03  # SeRP Sec. 3.1, on unit-scale shapes
PAPER_ALPHA_CLS, PAPER_ALPHA_REC = 0.001, 1.5  # SeRP eq. 1

IN_CHANNELS = "backbone feature channels C; null: the backbone's out_channels"
SEED = "seed of the objective's sampling generator; null: torch's global RNG"
MAX_POINTS = "voxels used per step (a uniform sample); null or 0: all"


@dataclass
class HardestContrastiveArgs:
    """FCGF's hardest-contrastive loss as the released PointContrast code runs it
    (pretrain/pointcontrast/lib/ddp_trainer.py, config/defaults.yaml; docs/fidelity.md rows 1-2)."""
    num_pos_per_pair: int = arg(1024, "matches sampled per step, per pair of the batch (released "
                                "num_pos_per_batch); all when fewer", minimum=1)
    num_hn_per_pair: int = arg(256, "negative candidates per view, per pair (released "
                               "num_hn_samples_per_batch)", minimum=1)
    pos_margin: float = arg(0.1, "m_p (released pos_thresh)", minimum=0)
    neg_margin: float = arg(1.4, "m_n (released neg_thresh), above pos_margin", above=0)
    pos_weight: float = arg(1.0, "weight of the positive term", minimum=0)
    neg_weight: float = arg(1.0, "weight of the negative term", minimum=0)
    positive: str = arg("code", "code: [d^2 - m_p]_+ (released) | paper: [d - m_p]_+^2",
                        choices=POSITIVE_MODES)
    negatives: str = arg("code", "code: drop the anchor if its closest candidate is a match "
                         "(released) | exclude_matches: closest candidate not a match (ours)",
                         choices=NEGATIVE_MODES)
    seed: Optional[int] = arg(None, SEED)


@dataclass
class PointInfoNCEArgs:
    """PointInfoNCE (PointContrast eq. 3; the released NCE script's npos and nceT)."""
    num_matches: int = arg(4096, "matched pairs sampled per step, over the whole batch",
                           minimum=1)
    temperature: float = arg(0.4, "tau of the softmax", above=0)
    seed: Optional[int] = arg(None, SEED)


@dataclass
class ShapeContextNCEArgs:
    """Contrastive Scene Contexts as its released pretrain_sparseconv.sh script runs it (and
    its lib/shape_context.py; docs/fidelity.md row 3)."""
    num_matches_per_scene: int = arg(4096, "anchors sampled per scene and step (npos)", minimum=1)
    temperature: float = arg(0.4, "tau of each partition's softmax (nceT)", above=0)
    partitions: str = arg("csc4", "csc4: 2 rings x sign(dz) (the script) | csc8: 2 rings x "
                          "sign(dy) x sign(dz) (partition8 checkpoints) | sectors: n_radial x "
                          "n_angular around z (ours)", choices=PARTITION_MODES)
    reduction: str = arg("csc", "csc: sum over partitions of CE / (P x batch) (released) | "
                         "nonempty (ours)", choices=REDUCTIONS)
    n_radial: int = arg(2, "rings of sectors (sectors only)", minimum=1)
    n_angular: int = arg(4, "angular bins of sectors (sectors only)", minimum=1)
    inner_radius: float = arg(0.05, "metres; closer points are never negatives (r1 = 2 voxels "
                              "of 2.5 cm)", above=0)
    outer_radius: float = arg(0.5, "metres; start of the outer ring (r2 = 20 voxels of 2.5 cm)",
                              above=0)
    seed: Optional[int] = arg(None, SEED)


@dataclass
class GMMLikelihoodArgs:
    """ParAE (Eckart et al. 2021, eqs. 5-7, 10): soft partitions of view 0's voxels -> a GMM
    per scene -> negative log-likelihood of the voxel centres (metres)."""
    in_channels: Optional[int] = arg(None, IN_CHANNELS, minimum=1)
    num_components: int = arg(32, "J, the number of partitions (ParAE)", minimum=2)
    hidden_channels: int = arg(64, "width of the head's hidden layer", minimum=1)
    eps: float = arg(1e-4, "covariance regulariser, m^2 (1 cm standard deviation)", above=0)
    max_points: Optional[int] = arg(8192, MAX_POINTS, minimum=0)
    center: bool = arg(True, "centre each scene's coordinates before fitting (numerics only)")
    seed: Optional[int] = arg(None, SEED)
    head_norm: bool = arg(True, "batch norm after the head's hidden layer (without it the "
                          "posteriors start at the loss's stationary uniform point)")


@dataclass
class PerturbationArgs:
    """SeRP (Garg & Chaudhary 2022, Sec. 3.1-3.2, eqs. 1 and 11) on one view's voxels; the
    adaptation's units and weights: mink_ssl/objectives/perturbation.py."""
    in_channels: Optional[int] = arg(None, IN_CHANNELS, minimum=1)
    centre_fraction: float = arg(20 / 1024, "patch centres per voxel of a scene (SeRP: 20 per "
                                 "1024 points)", above=0, maximum=1)
    patch_size: int = arg(20, "voxels per patch, the k nearest its centre (SeRP)", minimum=1)
    noise_std: float = arg(1.0, "Gaussian noise, voxels (2.5 cm at 2.5 cm voxels; SeRP 0.03 on "
                           "a unit shape)", above=0)
    delta_unit: Optional[float] = arg(None, "voxels per unit of the reconstruction loss; null: "
                                      "noise_std", above=0)
    alpha_cls: float = arg(PAPER_ALPHA_CLS / PAPER_NOISE_STD ** 2, "eq. 1: SeRP's 0.001 / 0.03^2 "
                           "(deltas in noise std, not shape units)", minimum=0)
    alpha_rec: float = arg(PAPER_ALPHA_REC, "eq. 1 (SeRP)", minimum=0)
    reconstruction: str = arg("delta", "delta: MSE on the displacement | chamfer: eq. 11 per "
                              "patch", choices=RECONSTRUCTIONS)
    view: int = arg(0, "which view of the pair is perturbed", minimum=0, maximum=1)
    max_pairs: int = arg(1 << 22, "centre-voxel distances held at once by the nearest-neighbour "
                         "search", minimum=1)
    seed: Optional[int] = arg(None, SEED)


@dataclass
class DistillationArgs:
    """DCGLR self-distillation (Fu et al. 2022, eqs. 4-13; DINO's head, centring and schedule)
    at point level. CPU-affordable: 4 local crops (paper 8)."""
    in_channels: Optional[int] = arg(None, IN_CHANNELS, minimum=1)
    num_prototypes: int = arg(512, "K, the projector's output dimension (paper)", minimum=1)
    hidden_channels: int = arg(256, "projector MLP width (DINO: 2048)", minimum=1)
    bottleneck_channels: int = arg(64, "normalised embedding compared to the prototypes "
                                   "(DINO: 256)", minimum=1)
    num_global_crops: int = arg(2, "I (paper): crops seen by teacher and student (eq. 10 "
                                "compares global crops with each other)", minimum=2)
    num_local_crops: int = arg(4, "J (paper: 8): crops seen by the student only", minimum=0)
    global_crop_scale: List[float] = arg([0.7, 1.0], "fraction of a scene's voxels in a global "
                                         "crop (paper r_g1, r_g2)", length=2, above=0, maximum=1)
    local_crop_scale: List[float] = arg([0.2, 0.5], "the same for local crops (paper r_l1, r_l2)",
                                        length=2, above=0, maximum=1)
    voxel_size: Optional[float] = arg(None, "grid (metres) the crops are re-quantised on; "
                                      "null: the batch's (data.voxel_size)", above=0)
    teacher_temperature: float = arg(0.04, "tau_t, sharpening (paper)", above=0)
    student_temperature: float = arg(0.1, "tau_s (DINO)", above=0)
    center_momentum: float = arg(0.9, "q of the centre's EMA, eq. 9 (DINO)", minimum=0, maximum=1)
    momentum: float = arg(0.996, "teacher EMA lambda at the first step, eq. 13 (paper)",
                          minimum=0, maximum=1)
    final_momentum: float = arg(1.0, "lambda at the end of the run (cosine, DINO)", minimum=0,
                                maximum=1)
    global_weight: float = arg(1.0, "w_g, eq. 12", minimum=0)
    local_weight: float = arg(1.0, "w_l, eq. 12", minimum=0)
    max_points: Optional[int] = arg(2048, "shared points sampled per crop pair and step; null "
                                    "or 0: all", minimum=0)
    seed: Optional[int] = arg(None, "seed of the crop and sampling generator; null: torch's "
                              "global RNG")
    input_scale: str = arg("unit_rms", "unit_rms: projector input x sqrt(C), as DINO's "
                           "LayerNorm'ed tokens | none", choices=INPUT_SCALES)


@dataclass
class ClusterRenderArgs:
    """CluRender (Mei et al. 2024): Sinkhorn-Knopp equal-partition soft clustering (eqs. 2,
    12-14) and neural rendering of predicted colours into the views' RGB frames, fitted with a
    Sinkhorn (OT) divergence (eqs. 15-18). Its config also sets data.frame_size."""
    in_channels: Optional[int] = arg(None, IN_CHANNELS, minimum=1)
    clustering: bool = arg(True, "run the clustering part (at least one part runs)")
    rendering: bool = arg(True, "run the rendering part")
    num_clusters: int = arg(64, "J, as in the paper", minimum=2)
    hidden_channels: int = arg(64, "width of both heads' hidden layers", minimum=1)
    epsilon: float = arg(1e-3, "Sinkhorn-Knopp entropy regularisation, as in the paper",
                         above=0)
    sinkhorn_iterations: int = arg(100, "iterations (paper: 20; a sharper plan balances more "
                                   "slowly)", minimum=1)
    cost_scale: float = arg(0.05, "costs / their mean x this: effective temperature 0.02 mean "
                            "costs (0.5 mean costs left the labels uniform)", above=0)
    orth_weight: float = arg(0.01, "omega of the orthogonality regulariser", minimum=0)
    max_points: Optional[int] = arg(8192, "voxels per view clustered per step; null or 0: all",
                                    minimum=0)
    views: List[int] = arg([0, 1], "which views of the pair are clustered and rendered",
                           minimum=0, maximum=1)
    render_other_view: bool = arg(True, "also render each view into the other view's camera")
    radius: float = arg(1.25, "splat disk radius, pixels (the paper's 4 px at 256 px, scaled)",
                        above=0)
    sigma: Optional[float] = arg(None, "Gaussian fall-off, pixels; null: radius / 2", above=0)
    k: int = arg(16, "splats composited per pixel, nearest first", minimum=1)
    eta: float = arg(1.0, "blending exponent", above=0)
    fitting_loss: str = arg("sinkhorn", "sinkhorn (the paper's OT loss) | l1 (cheaper)",
                            choices=FITTING_LOSSES)
    render_weight: float = arg(1.0, "weight of the fitting loss (1 in eq. 1)", minimum=0)
    fit_lambda: float = arg(0.5, "lambda of eq. 18: position vs colour in the OT cost",
                            minimum=0, maximum=1)
    sinkhorn_pixels: int = arg(512, "pixels sampled per image for the OT loss (cost ~ "
                               "pixels^2)", minimum=1)
    sinkhorn_blur: float = arg(0.05, "geomloss' blur (positions / max(h, w), colours in [0, 1])",
                               above=0)
    sinkhorn_scaling: float = arg(0.5, "geomloss' epsilon-scaling", above=0, below=1)
    min_coverage: float = arg(0.5, "pixels rendered with less coverage are not compared",
                              above=0, maximum=1)
    seed: Optional[int] = arg(None, SEED)
