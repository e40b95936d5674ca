"""The benchmark's runs: its data, and one pretraining, fine-tuning or probe run each, skipped
when its output exists and resumed when it was interrupted."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from data_prep.pairs.prep import PrepParams, run as run_pairs
from data_prep.segmentation.s3dis import run as run_s3dis
from data_prep.synthetic import generate_s3dis_rooms, generate_scene
from mink_ssl.engine.config import ModelConfig, OptimConfig
from mink_ssl.engine.hooks import read_metrics
from mink_ssl.io import atomic_path
from mink_ssl.tasks.pretrain import DataConfig, PretrainConfig
from mink_ssl.tasks.pretrain import pretrain
from mink_ssl.tasks.segmentation import (FinetuneSegConfig, SegDataConfig, SegEvalConfig,
                                         SegOptimConfig, finetune_seg)
from mink_ssl.tools.transfer_benchmark.presets import (Preset, objective_args, objective_optim,
                                                       parse_setting)


def prepare_data(out: Path, preset: Preset, log: Callable[[str], None] = print,
                 pairs: Path | None = None) -> tuple[Path, Path]:
    """(pairs root, segmentation root) under ``out/data``; made once, reused afterwards.
    ``pairs``: an existing pair-prep output to pretrain on instead of new scans."""
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


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON in ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def pretrain_run(out: Path, pairs: Path, objective: str, seed: int, preset: Preset,
                 device: str = "cpu", log: Callable[[str], None] = print) -> tuple[Path, float]:
    """Backbone of ``objective`` (``a+b``: objectives a and b combined, weight 1 each) and
    ``seed``, trained unless ``backbone.pth`` exists, and the seconds its training took."""
    run_dir = out / "pretrain" / objective / f"seed{seed}"
    backbone, timing = run_dir / "backbone.pth", run_dir / "bench_time.json"
    names = objective.split("+")
    frame_size = [60, 80] if "cluster_render" in names else None  # it renders the frames
    cfg = PretrainConfig(
        model=ModelConfig(name=preset.model, out_channels=preset.out_channels,
                          engine=preset.engine),
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
    write_json(timing, {"seconds": seconds})
    return backbone, seconds


def _seg_run(run_dir: Path, seg: Path, setting: str, seed: int, backbone: Path | None,
             preset: Preset, device: str, log: Callable[[str], None], **extra) -> dict:
    """One segmentation run on the preset's rooms (unless its ``results.json`` exists):
    fine-tuning, or with ``probe=...`` in ``extra`` a probe on the frozen backbone. Returns
    mIoU, mAcc, oAcc and seconds."""
    results, timing = run_dir / "results.json", run_dir / "bench_time.json"
    iterations = extra.pop("max_iterations", preset.finetune_iterations)
    cfg = FinetuneSegConfig(
        model=ModelConfig(name=preset.model, out_channels=preset.out_channels,
                          normalize_output=False, engine=preset.engine),
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
        write_json(timing, {"seconds": time.perf_counter() - t0})
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
    rows = read_metrics(run_dir)
    loss = np.array([m["loss"] for m in rows.values()], dtype=np.float64)
    if len(loss) == 0:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no loss")
    tenth = max(len(loss) // 10, 1)
    return {"start": float(loss[:tenth].mean()), "end": float(loss[-tenth:].mean()),
            "iterations": len(loss),
            "curve": [float(c.mean()) for c in np.array_split(loss, min(windows, len(loss)))]}


# --------------------------------------------------------------------------------- results
