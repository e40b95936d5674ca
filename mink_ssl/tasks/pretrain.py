"""Pretraining, end to end: build the pieces from a :class:`PretrainConfig`, train, export.

    from mink_ssl.tasks.pretrain import pretrain
    pretrain(config, out_dir=Path("runs/pt"))     # what `mink-ssl-pretrain` calls

The module is the backbone plus weighted objectives (:class:`PretrainModule`); the batches are
pairs of overlapping views with their matches (:mod:`mink_ssl.data.pairs`); checkpoints are
``mink_ssl.checkpoint/1`` and the run exports ``backbone.pth`` (``mink_ssl.model/1``).
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from mink_ssl.data.pairs import PairDataset, collate_pairs
from mink_ssl.engine.build import build_backbone, build_optimizer, describe_schedule, import_plugins
from mink_ssl.engine.checkpoint import (load_checkpoint as load_tagged_checkpoint,
                                        restore_training, save_checkpoint as save_tagged, unwrap)
from mink_ssl.engine.config import ModelConfig, OptimConfig, RunConfig
from mink_ssl.engine.distributed import wrap_ddp
from mink_ssl.engine.run import TaskRun, task_run
from mink_ssl.engine.trainer import Hook
from mink_ssl.formats.model_files import CHECKPOINT_FORMAT
from mink_ssl.models import save_model
from mink_ssl.objectives import OBJECTIVES
from mink_ssl.objectives.args import DEFAULT_WEIGHT, declared_defaults, resolve_in_channels
from mink_ssl.objectives.base import Objective, StepContext
from mink_ssl.tasks.pretrain_config import check_pretrain_config

# ------------------------------------------------------------------------------------ config

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
class PretrainConfig(RunConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # objective name -> {weight: float, **constructor arguments}; chosen by the `objective`
    # config group (configs/pretrain.yaml selects hardest_contrastive). Empty here, or a schema
    # default would be merged into every command-line selection.
    objectives: dict[str, Any] = field(default_factory=dict)
    # Python modules imported before the objectives are built: objectives of your own,
    # registered with @OBJECTIVES.register, without editing mink-ssl
    imports: list = field(default_factory=list)
    # batch-norm layers keep their running statistics and use them in training (eval mode):
    # makes a step independent of how the batch is split across ranks (DDP equivalence)
    freeze_bn: bool = False
    max_iterations: int = 60000
    batch_size: int = 8  # pairs per process (the global batch is batch_size x world size)


def build_objectives(spec: dict, feature_channels: int | None = None) -> tuple[dict, dict]:
    """``{name: {weight, **kwargs}}`` -> (objectives, weights); unknown names or arguments
    are errors that list the valid choices. Objectives with heads get ``in_channels`` =
    ``feature_channels`` (the backbone's output width) unless the spec sets it."""
    if not spec:
        raise ValueError(f"no objective configured; choose from {OBJECTIVES.names()}")
    objectives, weights = {}, {}
    for name, args in spec.items():
        cls = OBJECTIVES.get(name)
        args = dict(args or {})
        weights[name] = float(args.pop("weight", DEFAULT_WEIGHT))
        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(args) - set(params))
        if unknown:
            raise ValueError(f"objective {name!r} has no argument(s) {unknown}; valid: "
                             f"{['weight'] + params}")
        objectives[name] = cls(**resolve_in_channels(cls, args, feature_channels))
    return objectives, weights


def build_dataset(cfg: DataConfig, seed: int) -> PairDataset:
    """The pairs of ``cfg.root`` (ScanNet pair prep), with the pretraining augmentations."""
    if cfg.root in ("???", "", None):
        raise ValueError("data.root is not set: pass data.root=<output of mink-ssl-prep scannet>")
    return PairDataset(cfg.root, voxel_size=cfg.voxel_size, rotation_deg=cfg.rotation_deg,
                       rotation_axis=cfg.rotation_axis, scale=tuple(cfg.scale),
                       translation=cfg.translation, features=cfg.features,
                       match_radius=cfg.match_radius, max_matches=cfg.max_matches,
                       min_matches=cfg.min_matches, max_depth=cfg.max_depth, seed=seed,
                       frame_size=None if cfg.frame_size is None else tuple(cfg.frame_size))


# ---------------------------------------------------------------------------- module, hooks

class PretrainModule(nn.Module):
    """Backbone plus weighted objectives; ``forward(batch)`` -> losses and stats.

    Objectives share one backbone forward per view (see :class:`StepContext`). Their heads live
    here, so they are optimised, checkpointed and synchronised with the backbone, and dropped
    when the backbone is exported.
    """

    def __init__(self, backbone: nn.Module, objectives: dict[str, Objective],
                 weights: dict[str, float], freeze_bn: bool = False):
        super().__init__()
        self.freeze_bn = freeze_bn
        if not objectives:
            raise ValueError("at least one objective is needed")
        missing = set(objectives) ^ set(weights)
        if missing:
            raise ValueError(f"objectives and weights disagree on {sorted(missing)}")
        self.backbone = backbone
        self.objectives = nn.ModuleDict(objectives)
        self.weights = dict(weights)
        for objective in self.objectives.values():
            objective.attach(backbone)
        exporters = [n for n, o in self.objectives.items() if o.export_backbone() is not None]
        if len(exporters) > 1:
            raise ValueError(f"objectives {exporters} each export their own backbone; combine "
                             "at most one of them in a run")

    def train(self, mode: bool = True) -> "PretrainModule":
        """``freeze_bn``: batch-norm layers stay in eval mode (running statistics, no updates)."""
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def exported_backbone(self) -> nn.Module:
        """What the run exports: an objective's choice (e.g. an EMA teacher) or the backbone."""
        for objective in self.objectives.values():
            chosen = objective.export_backbone()
            if chosen is not None:
                return chosen
        return self.backbone

    def objective_hooks(self) -> list["Hook"]:
        return [h for objective in self.objectives.values() for h in objective.hooks()]

    def forward(self, batch, iteration: int = 0, max_iterations: int = 1) -> dict:
        ctx = StepContext(batch, self.backbone, iteration, max_iterations)
        out: dict[str, torch.Tensor] = {}
        total = None
        for name, objective in self.objectives.items():
            for key, value in objective(ctx).items():
                if key.startswith("stat_"):  # diagnostics: namespaced, objectives may share names
                    key = f"stat_{name}/{key[len('stat_'):]}"
                if key in out:
                    raise KeyError(f"objective {name!r} returned {key!r}, already returned by "
                                   "another objective; give the terms distinct names")
                out[key] = value
                if key.startswith("loss_"):
                    term = self.weights[name] * value
                    total = term if total is None else total + term
        if total is None:
            raise ValueError(f"objectives {list(self.objectives)} returned no loss_* term")
        out["loss"] = total
        return out


class PairTallies(Hook):
    """Pair batches' bookkeeping: ``skipped_pairs`` (pairs dropped for too few matches: those
    a stepped batch lost, and all of a batch the loader gives as None) in the trainer state's
    tallies, and each step's ``matches`` among its metrics."""

    def __init__(self):
        self.matches = 0

    def before_train(self, trainer) -> None:  # both tallies in every checkpoint, 0 or not
        for name in ("skipped_pairs", "skipped_batches"):
            trainer.state.count(name, 0)

    def on_skipped_batch(self, trainer) -> None:
        trainer.state.count("skipped_pairs", trainer.batch_size)

    def before_step(self, trainer, batch) -> None:
        trainer.state.count("skipped_pairs", getattr(batch, "skipped", 0))
        self.matches = len(batch.matches)

    def step_metrics(self, trainer) -> dict[str, float]:
        return {"matches": float(self.matches)}


# ------------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, trainer, config: dict) -> Path:
    """A pretraining checkpoint: the backbone (arguments and weights) and the objectives'
    heads, with everything a resume needs."""
    module = unwrap(trainer.module)
    return save_tagged(path, trainer, config, CHECKPOINT_FORMAT, {
        "model": module.backbone.config(), "backbone": module.backbone.state_dict(),
        "objectives": module.objectives.state_dict()})


def load_checkpoint(path: Path) -> dict:
    return load_tagged_checkpoint(path, CHECKPOINT_FORMAT, "a mink-ssl pretraining checkpoint")


def restore(ckpt: dict, trainer):
    """Put a trainer back where the checkpoint left it (the sampler restarts from samples)."""
    module = unwrap(trainer.module)
    module.backbone.load_state_dict(ckpt["backbone"], strict=True)
    module.objectives.load_state_dict(ckpt["objectives"], strict=True)
    return restore_training(ckpt, trainer)


def export_backbone(trainer, out_dir: Path) -> None:
    """``backbone.pth``: the trained backbone, or the one an objective chooses (e.g.
    distillation's EMA teacher), without the objectives' heads."""
    save_model(unwrap(trainer.module).exported_backbone(), Path(out_dir) / "backbone.pth")


# --------------------------------------------------------------------------------------- run

def pretrain(cfg: PretrainConfig, out_dir: Path, print_fn=print) -> Path:
    """Train as ``cfg`` says, writing into ``out_dir``; returns the exported backbone's path."""
    out_dir = Path(out_dir)
    notes = check_pretrain_config(cfg)  # every value, before anything is written
    with task_run(cfg, out_dir, "pretraining", print_fn, comparable_config) as tr:
        for note in notes:
            tr.say(note)
        # the run's objects (module, loader, trainer) live in the call below and are freed
        # when it returns, before the process group goes
        return _pretrain(cfg, tr)


def comparable_config(config: dict) -> dict:
    """A pretraining config (plain data) as a resume compares it: each objective's arguments
    complete (a run recorded before the arguments were typed lists only those its YAML named)
    and ``in_channels`` resolved to the backbone's width, so configs that build the same
    objectives compare equal. Objectives not registered here are left as recorded."""
    config = copy.deepcopy(config)
    width = (config.get("model") or {}).get("out_channels")
    objectives = config.get("objectives")
    for name, args in (objectives.items() if isinstance(objectives, dict) else ()):
        if isinstance(args, dict) and name in OBJECTIVES:
            cls = OBJECTIVES.get(name)
            objectives[name] = resolve_in_channels(cls, {**declared_defaults(cls), **args}, width)
    return config


def no_progress_hint(cfg: DataConfig) -> str:
    """What to change when no pair gives enough matches."""
    return (f"every pair had fewer than data.min_matches={cfg.min_matches} matches within "
            f"data.match_radius={cfg.match_radius:g} voxels of data.voxel_size="
            f"{cfg.voxel_size:g} m: lower data.min_matches or raise data.match_radius (and check "
            "that data.root holds overlapping pairs)")


def check_pairs_usable(dataset: PairDataset, cfg: DataConfig, samples: int = 16) -> None:
    """Up to ``samples`` pairs spread over the dataset, until one is usable: if none is, no
    step could ever be made, and the user learns it now rather than after a whole pass."""
    n = len(dataset)
    if n == 0:
        return  # build_dataset has said so already
    picks = sorted({i * n // min(samples, n) for i in range(min(samples, n))})
    for i in picks:
        if dataset[(0, i)] is not None:
            return
    raise ValueError(f"none of {len(picks)} pairs sampled across the {n} pairs of "
                     f"{cfg.root} can be trained on: {no_progress_hint(cfg)}")


def _pretrain(cfg: PretrainConfig, tr: TaskRun) -> Path:
    out_dir = tr.out_dir
    info, device = tr.info, tr.device
    torch.manual_seed(cfg.seed)  # same initial weights on every rank

    import_plugins(cfg.imports)
    dataset = build_dataset(cfg.data, cfg.seed)
    check_pairs_usable(dataset, cfg.data)
    backbone = build_backbone(cfg.model, dataset.in_channels)
    objectives, weights = build_objectives(cfg.objectives, cfg.model.out_channels)
    module = PretrainModule(backbone, objectives, weights, cfg.freeze_bn).to(device)
    module = wrap_ddp(module, info, device, cfg.distributed.sync_bn,
                      cfg.distributed.find_unused_parameters)
    trainable = [p for p in module.parameters() if p.requires_grad]  # not an EMA teacher
    optimizer, scheduler = build_optimizer(cfg.optim, trainable, info.world_size,
                                           cfg.max_iterations)
    workers = tr.loader_workers(cfg.data.num_workers)
    scaling = (f"{cfg.optim.lr:g} x {info.world_size} ranks (linear scaling)"
               if cfg.optim.scale_lr_with_world_size and info.world_size > 1
               else "not scaled with world size")
    tr.say(f"pretrain: {len(dataset)} pairs, {cfg.model.name} on {cfg.model.engine}, objectives "
           f"{weights}, batch {cfg.batch_size} per rank x {info.world_size} ranks = "
           f"{cfg.batch_size * info.world_size} global, lr "
           f"{optimizer.defaults['lr']:g} ({scaling}{describe_schedule(cfg.optim)}), "
           f"{workers} loader workers, device {device}, out {out_dir}")

    # objectives' hooks (e.g. an EMA teacher update) act in after_step, before logs and
    # checkpoints are written (record_step), so that these see their result
    trainer = tr.build_trainer(
        cfg, module, optimizer, scheduler, max_iterations=cfg.max_iterations,
        batch_size=cfg.batch_size, dataset=dataset, collate_fn=collate_pairs, workers=workers,
        seed=cfg.seed, load_fn=load_checkpoint, restore_fn=restore,
        save_fn=save_checkpoint, export_fn=export_backbone, desc="pretrain",
        hooks=[PairTallies(), *unwrap(module).objective_hooks()],
        counts={"skipped_pairs": "pairs skipped (too few matches)"},
        no_progress_hint=no_progress_hint(cfg.data))
    tr.train(trainer)
    return out_dir / "backbone.pth"
