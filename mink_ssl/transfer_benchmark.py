"""Synthetic transfer benchmark: does self-supervised pretraining help limited-label segmentation?

Pipeline (everything under ``--out``; each step is skipped when its output exists, so an
interrupted benchmark continues where it stopped):

1. ``data/raw_scannet``: synthetic ScanNet scans (ray-cast RGB-D with Kinect-like depth noise and
   missing depth), ``data/pairs``: ScanNet pair prep (fragments, overlaps, matches);
2. ``data/raw_s3dis`` -> ``data/s3dis``: synthetic S3DIS rooms (objects coloured at random, so
   colour does not give the class) and S3DIS prep (Area 5 = test split);
3. ``pretrain/<objective>/seed<s>``: pretraining of the backbone with each objective, once per
   objective and seed (the pretraining seed is part of the spread);
4. ``finetune/<objective>/<setting>/seed<s>``: segmentation fine-tuning from that backbone
   (``none``: from scratch) in each limited-label setting, with the same seed for the labelled
   subset, so that all objectives see the same labels for a given seed (paired comparison);
5. ``results.json`` (every run's mIoU, mean and std per objective x setting, the preset, library
   versions, timings), ``results.md`` (table, mean +- std over seeds) and ``results.png``.

Settings are ``pts<N>`` (N labelled points per training room), ``frac<F>`` (a fraction F of the
training rooms, fully labelled) and ``full`` (every label).

    mink-ssl-transfer --out runs/transfer --preset full
    # from a source checkout, the same: python experiments/synthetic_transfer/run.py ...

The recorded run and what the benchmark can and cannot tell: ``experiments/synthetic_transfer``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

SCRATCH = "none"
SMALL_MODEL = "Res16UNet14S"  # Res16UNet14A at half width (mink_ssl.models.res16unet)


@dataclass(frozen=True)
class Preset:
    """Sizes of one benchmark scale (data, pretraining, fine-tuning)."""

    model: str = SMALL_MODEL
    out_channels: int = 32
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
    from mink_ssl.objectives import OBJECTIVES

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

def prepare_data(out: Path, preset: Preset, log: Callable[[str], None] = print,
                 pairs: Path | None = None) -> tuple[Path, Path]:
    """(pairs root, segmentation root) under ``out/data``; made once, reused afterwards.
    ``pairs``: an existing pair-prep output to pretrain on instead of new scans."""
    from data_prep.s3dis import run as run_s3dis
    from data_prep.scannet.prep import PrepParams, run as run_pairs
    from data_prep.synthetic import generate_s3dis_rooms, generate_scene

    data = out / "data"
    raw = data / "raw_scannet"
    for k in range(preset.scannet_scenes if pairs is None else 0):
        scene_id = f"scene{k:04d}_00"
        if not (raw / scene_id / f"{scene_id}.txt").is_file():  # written last: complete
            t0 = time.perf_counter()
            generate_scene(raw, scene_id, preset.data_seed + k, n_frames=preset.frames)
            log(f"generated {scene_id} ({time.perf_counter() - t0:.1f} s)")
    if pairs is not None:
        if not (Path(pairs) / "manifest.json").is_file():
            raise FileNotFoundError(f"pairs={pairs} has no manifest.json: pass the output "
                                    "folder of `mink-ssl-prep scannet`")
    else:
        pairs = data / "pairs"
    if not (pairs / "manifest.json").is_file():
        manifest = run_pairs(raw, pairs, PrepParams(frame_skip=preset.frame_skip),
                             progress=False, log=log)
        if not manifest["scenes"]:
            raise RuntimeError(f"pair prep produced no scenes: {manifest['skipped_scenes']}")
    seg = data / "s3dis"
    if not (seg / "manifest.json").is_file():
        raw_s3dis = data / "raw_s3dis"
        for areas, rooms in (((1, 2, 3, 4, 6), preset.rooms_per_area), ((5,), preset.test_rooms)):
            generate_s3dis_rooms(raw_s3dis, areas=areas, rooms_per_area=rooms,
                                 seed=preset.data_seed, defects=False,
                                 points_per_m2=preset.points_per_m2, random_colors=True,
                                 noise=preset.room_noise)
        run_s3dis(raw_s3dis, seg, progress=False, log=log)
    return pairs, seg


# ------------------------------------------------------------------------------------ runs

def _changed(asked: dict, found: dict, default: dict) -> list[str]:
    """Keys of config ``asked`` whose values (recursively) differ in ``found``, a finished run's
    config. A setting that ``found`` lacks because the schema gained it later counts as equal
    when ``asked`` has it at its ``default``."""
    out = []
    for k in sorted(set(asked) | set(found)):
        if k not in asked:
            out.append(k)
        elif k not in found:
            if k not in default or asked[k] != default[k]:
                out.append(k)
        elif isinstance(asked[k], dict) and isinstance(found[k], dict):
            sub = default.get(k)
            if _changed(asked[k], found[k], sub if isinstance(sub, dict) else {}):
                out.append(k)
        elif asked[k] != found[k]:
            out.append(k)
    return out


def _check_same_config(run_dir: Path, cfg) -> None:
    """A finished run is reused only if it was made with the config asked for now."""
    def plain(d: dict) -> dict:  # how a run was started, logged or saved: not what it computes
        return {k: v for k, v in d.items() if k not in (
            "resume", "resume_override", "log_every", "progress", "checkpoint_every")}

    asked = plain(json.loads(json.dumps(asdict(cfg))))
    default = plain(json.loads(json.dumps(asdict(type(cfg)()))))
    diff = _changed(asked, plain(json.loads((run_dir / "config.json").read_text())), default)
    if diff:
        raise ValueError(f"{run_dir} was made with another config (differs in {diff}): use a new "
                         "--out for another preset, or delete that run to redo it")


def _continuing(cfg, run_dir: Path):
    """``cfg``, with ``resume="auto"`` when ``run_dir`` holds an interrupted run (its
    ``config.json`` but no result): the run directory refuses a fresh start over it, and the run
    continues from its last checkpoint (its config is checked to be the same)."""
    return replace(cfg, resume="auto") if (run_dir / "config.json").is_file() else cfg


def _write_json(path: Path, obj) -> None:
    from mink_ssl.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def pretrain_run(out: Path, pairs: Path, objective: str, seed: int, preset: Preset,
                 device: str = "cpu", log: Callable[[str], None] = print) -> tuple[Path, float]:
    """Backbone of ``objective`` (``a+b``: objectives a and b combined, weight 1 each) and
    ``seed``, trained unless ``backbone.pth`` exists, and the seconds its training took."""
    from mink_ssl.engine.config import DataConfig, ModelConfig, OptimConfig, PretrainConfig
    from mink_ssl.engine.pretrain import pretrain

    run_dir = out / "pretrain" / objective / f"seed{seed}"
    backbone, timing = run_dir / "backbone.pth", run_dir / "bench_time.json"
    names = objective.split("+")
    frame_size = [60, 80] if "cluster_render" in names else None  # it renders the frames
    cfg = PretrainConfig(
        model=ModelConfig(name=preset.model, out_channels=preset.out_channels),
        data=DataConfig(root=str(pairs), voxel_size=preset.pretrain_voxel, num_workers=0,
                        features=preset.features, rotation_axis=preset.pretrain_rotation_axis,
                        max_matches=preset.max_matches, frame_size=frame_size),
        optim=OptimConfig(**objective_optim(objective, preset)),
        objectives={n: objective_args(n, preset, seed) for n in names},
        max_iterations=preset.pretrain_iterations, batch_size=preset.pretrain_batch,
        # a checkpoint every 100 steps: a run killed mid-way resumes (bit for bit) from there
        device=device, checkpoint_every=100, log_every=1,  # every loss: the table's curve
        progress=False, seed=seed)
    if backbone.is_file() and timing.is_file():
        _check_same_config(run_dir, cfg)
        return backbone, json.loads(timing.read_text())["seconds"]
    t0 = time.perf_counter()
    pretrain(_continuing(cfg, run_dir), run_dir, print_fn=log)
    seconds = time.perf_counter() - t0
    _write_json(timing, {"seconds": seconds})
    return backbone, seconds


def _seg_run(run_dir: Path, seg: Path, setting: str, seed: int, backbone: Path | None,
             preset: Preset, device: str, log: Callable[[str], None], **extra) -> dict:
    """One segmentation run on the preset's rooms (unless its ``results.json`` exists):
    fine-tuning, or with ``probe=...`` in ``extra`` a probe on the frozen backbone. Returns
    mIoU, mAcc, oAcc and seconds."""
    from mink_ssl.engine.config import ModelConfig
    from mink_ssl.engine.finetune_seg import (FinetuneSegConfig, SegDataConfig, SegEvalConfig,
                                              SegOptimConfig, finetune_seg)

    results, timing = run_dir / "results.json", run_dir / "bench_time.json"
    iterations = extra.pop("max_iterations", preset.finetune_iterations)
    cfg = FinetuneSegConfig(
        model=ModelConfig(name=preset.model, out_channels=preset.out_channels,
                          normalize_output=False),
        data=SegDataConfig(root=str(seg), voxel_size=preset.seg_voxel, eval_split="test",
                           features=preset.features,
                           num_workers=0, label_seed=seed, **parse_setting(setting)),
        optim=SegOptimConfig(name="adam", lr=preset.finetune_lr),
        eval=SegEvalConfig(every=0, ply_scenes=0),
        pretrained=str(backbone) if backbone is not None else None, seed=seed,
        max_iterations=iterations, batch_size=preset.finetune_batch,
        device=device, checkpoint_every=0,
        log_every=max(iterations // 10, 1), progress=False, **extra)
    if results.is_file() and timing.is_file():
        _check_same_config(run_dir, cfg)
    else:
        t0 = time.perf_counter()
        finetune_seg(_continuing(cfg, run_dir), run_dir, print_fn=log)
        _write_json(timing, {"seconds": time.perf_counter() - t0})
    r = json.loads(results.read_text())
    return {"miou": r["miou"], "macc": r["macc"], "oacc": r["oacc"],
            "seconds": json.loads(timing.read_text())["seconds"]}


def finetune_run(out: Path, seg: Path, objective: str, setting: str, seed: int,
                 backbone: Path | None, preset: Preset, device: str = "cpu",
                 log: Callable[[str], None] = print) -> dict:
    """Fine-tune (unless its ``results.json`` exists); returns mIoU, mAcc, oAcc and seconds."""
    run_dir = out / "finetune" / objective / setting / f"seed{seed}"
    r = _seg_run(run_dir, seg, setting, seed, backbone, preset, device, log)
    return {**r, "dir": str(run_dir.relative_to(out))}


def probe_run(out: Path, seg: Path, objective: str, probe: str, seed: int,
              backbone: Path | None, preset: Preset, device: str = "cpu",
              log: Callable[[str], None] = print) -> dict:
    """Probe ``probe`` on the frozen backbone (``None``: the random initialisation of ``seed``)
    with the labels of ``preset.probe_setting`` (unless its ``results.json`` exists)."""
    run_dir = out / "probe" / objective / probe / f"seed{seed}"
    extra = ({"knn_k": preset.knn_k, "knn_bank": preset.knn_bank} if probe == "knn"
             else {"max_iterations": preset.probe_iterations})
    r = _seg_run(run_dir, seg, preset.probe_setting, seed, backbone, preset, device, log,
                 probe=probe, **extra)
    return {**r, "dir": str(run_dir.relative_to(out))}


def loss_curve(run_dir: Path, windows: int = 8) -> dict:
    """A pretraining run's loss from its ``metrics.jsonl``: ``start`` and ``end``, the mean
    over the first and the last tenth of its iterations (single steps are noisy: each batch
    holds other scenes), and ``curve``, the mean over each of ``windows`` equal spans."""
    import numpy as np

    from mink_ssl.engine.hooks import read_metrics

    rows = read_metrics(run_dir)
    loss = np.array([m["loss"] for m in rows.values()], dtype=np.float64)
    if len(loss) == 0:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no loss")
    tenth = max(len(loss) // 10, 1)
    return {"start": float(loss[:tenth].mean()), "end": float(loss[-tenth:].mean()),
            "iterations": len(loss),
            "curve": [float(c.mean()) for c in np.array_split(loss, min(windows, len(loss)))]}


# --------------------------------------------------------------------------------- results

def summarise(runs: list[dict], objectives: Sequence[str], settings: Sequence[str]) -> dict:
    """objective -> setting -> {mean, std (sample, ddof 1; 0 for one seed), n, values}."""
    import numpy as np

    out: dict = {}
    for obj in objectives:
        for s in settings:
            v = np.array([r["miou"] for r in runs if r["objective"] == obj and r["setting"] == s])
            out.setdefault(obj, {})[s] = {
                "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "n": len(v), "values": v.tolist()}
    return out


def paired_gains(runs: list[dict], summary: dict, objectives: Sequence[str],
                 settings: Sequence[str]) -> dict:
    """objective -> setting -> the gain over scratch, paired by seed (same labelled subset):
    {mean, std (ddof 1; 0 for one seed), values (per seed), beyond_spread}. ``beyond_spread``:
    the mean gain exceeds both the objective's and scratch's seed std (needs 2+ seeds).
    Empty without scratch among the objectives."""
    import numpy as np

    if SCRATCH not in objectives:
        return {}
    miou = {(r["objective"], r["setting"], r["seed"]): r["miou"] for r in runs}
    out: dict = {}
    for obj in objectives:
        if obj == SCRATCH:
            continue
        for s in settings:
            seeds = sorted(seed for o, st, seed in miou if o == obj and st == s
                           and (SCRATCH, s, seed) in miou)
            v = np.array([miou[obj, s, seed] - miou[SCRATCH, s, seed] for seed in seeds])
            spread = max(summary[obj][s]["std"], summary[SCRATCH][s]["std"])
            out.setdefault(obj, {})[s] = {
                "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "values": v.tolist(), "seeds": seeds,
                "beyond_spread": bool(len(v) > 1 and v.mean() > spread)}
    return out


def results_table(summary: dict, objectives: Sequence[str], settings: Sequence[str],
                  losses: dict | None = None, scratch: str = "scratch") -> str:
    """Markdown table of mIoU (%) mean +- std over seeds, and the gain over scratch (named
    ``scratch`` in the first column); with ``losses`` (objective -> {start, end}, means over
    seeds) a first column of the pretraining loss, first -> last tenth of the iterations."""
    head = ("| objective | " + ("pretraining loss | " if losses is not None else "")
            + " | ".join(settings) + " |")
    lines = [head, "|" + "---|" * (len(settings) + 1 + (losses is not None))]
    for obj in objectives:
        cells = []
        if losses is not None:
            e = losses.get(obj)
            cells.append("-" if e is None else f"{e['start']:.3g} → {e['end']:.3g}"
                         + ("" if e["end"] < e["start"] else " (does not fall)"))
        for s in settings:
            e = summary[obj][s]
            cell = f"{100 * e['mean']:.1f} ± {100 * e['std']:.1f}"
            if obj != SCRATCH and SCRATCH in summary:
                cell += f" ({100 * (e['mean'] - summary[SCRATCH][s]['mean']):+.1f})"
            cells.append(cell)
        lines.append(f"| {scratch if obj == SCRATCH else obj} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gains_table(gains: dict, settings: Sequence[str]) -> str:
    """Markdown rows of the paired per-seed gains and whether each is beyond the spread."""
    md = "| objective | " + " | ".join(settings) + " |\n|" + "---|" * (len(settings) + 1) + "\n"
    for obj, per in gains.items():
        md += f"| {obj} | " + " | ".join(
            " / ".join(f"{100 * g:+.1f}" for g in per[s]["values"])
            + (" **beyond spread**" if per[s]["beyond_spread"] else "")
            for s in settings) + " |\n"
    return md


def write_plot(path: Path, summary: dict, objectives: Sequence[str], settings: Sequence[str]
               ) -> None:
    """Grouped bars: one group per setting, one bar per objective, error bars = std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from mink_ssl.io import atomic_path

    x = np.arange(len(settings))
    width = 0.8 / len(objectives)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(settings) * max(len(objectives), 2) / 3, 3.6))
    for i, obj in enumerate(objectives):
        mean = [100 * summary[obj][s]["mean"] for s in settings]
        std = [100 * summary[obj][s]["std"] for s in settings]
        ax.bar(x + (i - (len(objectives) - 1) / 2) * width, mean, width, yerr=std, capsize=3,
               label="scratch" if obj == SCRATCH else obj)
    ax.set_xticks(x, settings)
    ax.set_ylabel("test mIoU (%)")
    ax.set_title("synthetic S3DIS (Area 5), mean ± std over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _objective_seed(out: Path, pairs: Path, seg: Path, obj: str, seed: int, preset: Preset,
                    device: str, log: Callable[[str], None], runs: list, probe_runs: list,
                    pretrain_s: dict, losses: dict) -> None:
    """Every run of ``obj`` and ``seed``: pretraining, fine-tuning in each setting, each probe;
    results are appended to ``runs`` / ``probe_runs``, times and loss curves recorded."""
    backbone = None
    if obj != SCRATCH:
        log(f"== pretrain {obj} seed {seed}")
        backbone, sec = pretrain_run(out, pairs, obj, seed, preset, device, log)
        pretrain_s[f"{obj}/seed{seed}"] = sec
        losses.setdefault(obj, {})[seed] = loss_curve(backbone.parent)
    for s in preset.settings:
        log(f"== finetune {obj} {s} seed {seed}")
        r = finetune_run(out, seg, obj, s, seed, backbone, preset, device, log)
        runs.append({"objective": obj, "setting": s, "seed": seed, **r})
        log(f"   mIoU {100 * r['miou']:.1f}")
    for probe in preset.probes:
        log(f"== probe {probe} {obj} seed {seed} ({preset.probe_setting} labels)")
        r = probe_run(out, seg, obj, probe, seed, backbone, preset, device, log)
        probe_runs.append({"objective": obj, "setting": probe, "seed": seed, **r})
        log(f"   mIoU {100 * r['miou']:.1f}")


def run_benchmark(out: Path, preset: Preset | str = "full", *,
                  objectives: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                  settings: Sequence[str] | None = None, device: str = "cpu",
                  pairs: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Run (or continue) the benchmark into ``out``; returns ``results.json``'s content.

    ``pairs``: pretrain on this pair-prep output instead of generating scans (the demo's).
    Several processes may share the work: an objective and seed whose run another process
    holds is skipped (logged), and then nothing is summarised: the call returns
    ``{"incomplete": [<objective>/seed<s>, ...]}`` and a later call writes the summary."""
    from mink_ssl.io import atomic_path, library_versions
    from mink_ssl.objectives import OBJECTIVES
    from mink_ssl.safety import DirectoryLocked

    name = preset if isinstance(preset, str) else "custom"
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; valid choices: {sorted(PRESETS)}")
        preset = PRESETS[preset]
    objectives = list(objectives or preset.objectives)
    seeds = [int(s) for s in (preset.seeds if seeds is None else seeds)]
    settings = list(settings or preset.settings)
    valid = sorted(OBJECTIVES.names())
    bad = [o for o in objectives if o != SCRATCH and not set(o.split("+")) <= set(valid)]
    if bad:
        raise ValueError(f"unknown objective(s) {bad}; valid choices: {[SCRATCH] + valid}")
    if not seeds:
        raise ValueError("seeds is empty; pass at least one seed, e.g. --seeds 0")
    for s in settings:
        parse_setting(s)
    preset = replace(preset, objectives=tuple(objectives), seeds=tuple(seeds),
                     settings=tuple(settings))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    log(f"== data -> {out / 'data'}")
    pairs, seg = prepare_data(out, preset, log, pairs)
    t_data = time.perf_counter() - t_start

    runs, probe_runs, pretrain_s, losses, busy = [], [], {}, {}, []
    for obj in objectives:
        for seed in seeds:
            try:
                _objective_seed(out, pairs, seg, obj, seed, preset, device, log, runs,
                                probe_runs, pretrain_s, losses)
            except DirectoryLocked as e:  # another process of this benchmark runs it
                busy.append(f"{obj}/seed{seed}")
                log(f"== skipped {obj} seed {seed}: {e}")
    if busy:
        log(f"== not summarised: {len(busy)} objective/seed unit(s) in use by another process "
            f"({', '.join(busy)}); call again when they have finished")
        return {"incomplete": busy}

    summary = summarise(runs, objectives, settings)
    gains = paired_gains(runs, summary, objectives, settings)
    table = results_table(summary, objectives, settings)
    probes = list(preset.probes)
    probe_summary = summarise(probe_runs, objectives, probes) if probes else {}
    probe_gains = paired_gains(probe_runs, probe_summary, objectives, probes) if probes else {}
    mean_loss = {obj: {k: float(sum(c[k] for c in per.values()) / len(per))
                       for k in ("start", "end")} for obj, per in losses.items()}
    probe_table = (results_table(probe_summary, objectives, probes, mean_loss, "random init")
                   if probes else "")
    seg_manifest = json.loads((seg / "manifest.json").read_text())
    result = {
        "schema": "mink_ssl.transfer_benchmark/2", "preset": name, "config": asdict(preset),
        "objectives": objectives, "settings": {s: parse_setting(s) for s in settings},
        "seeds": seeds, "metric": "test mIoU (Area 5), fraction in [0, 1]",
        "summary": summary, "gain_over_scratch": gains, "runs": runs,
        "probes": {"setting": preset.probe_setting, "summary": probe_summary,
                   "gain_over_random_init": probe_gains, "runs": probe_runs},
        "pretraining_loss": {obj: {str(seed): c for seed, c in per.items()}
                             for obj, per in losses.items()},
        "data": {"pairs": str(pairs),
                 "pretrain_pairs": len((Path(pairs) / "pairs.txt").read_text().splitlines()),
                 "train_rooms": len(seg_manifest["splits"].get("train", [])),
                 "test_rooms": len(seg_manifest["splits"].get("test", [])),
                 "classes": seg_manifest["classes"]},
        "versions": library_versions(),
        "timings": {"this_call_s": time.perf_counter() - t_start, "data_this_call_s": t_data,
                    "pretrain_s": pretrain_s,
                    "pretrain_total_s": sum(pretrain_s.values()),
                    "finetune_total_s": sum(r["seconds"] for r in runs),
                    "probe_total_s": sum(r["seconds"] for r in probe_runs)},
    }
    _write_json(out / "results.json", result)
    md = (f"# Synthetic transfer benchmark ({name} preset)\n\n"
          f"Test mIoU (%) on synthetic S3DIS Area 5, mean ± std over seeds {seeds} "
          f"(pretraining and fine-tuning seed); in brackets: gain over scratch.\n\n"
          f"## Fine-tuning\n\n{table}\n")
    if gains:
        md += ("\nGain over scratch (mIoU points) paired by seed (same labels), per seed; "
               "**beyond spread**: the mean gain exceeds both seed stds above.\n\n"
               + gains_table(gains, settings))
    if probes:
        md += (f"\n## Probes on the frozen backbone ({preset.probe_setting} labels)\n\n"
               f"linear: one linear layer on the output features, {preset.probe_iterations} "
               f"iterations; linear_multiscale: on the four decoder stages concatenated; knn: "
               f"k = {preset.knn_k} cosine neighbours among at most {preset.knn_bank} labelled "
               f"training voxels. In brackets: gain over the random initialisation of the same "
               f"seed. Pretraining loss: mean over the first -> the last tenth of the "
               f"iterations, mean over seeds.\n\n{probe_table}\n")
        if probe_gains:
            md += ("\nGain over the random initialisation (mIoU points), paired by seed; "
                   "**beyond spread**: the mean gain exceeds both seed stds above.\n\n"
                   + gains_table(probe_gains, probes))
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(md)
    write_plot(out / "results.png", summary, objectives, settings)
    log(table)
    if probe_table:
        log(probe_table)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--preset", default="full", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--objectives", nargs="+", help=f"objectives; '{SCRATCH}' is from scratch")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--settings", nargs="+", help="pts<N>, frac<F> or full")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    args = p.parse_args(argv)
    try:
        result = run_benchmark(args.out, args.preset, objectives=args.objectives,
                               seeds=args.seeds, settings=args.settings, device=args.device)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"mink-ssl-transfer: error: {e}", file=sys.stderr)
        return 2
    return 3 if "incomplete" in result else 0  # 3: other processes still run some of it


if __name__ == "__main__":
    sys.exit(main())
