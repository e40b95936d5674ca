"""``make demo``: the main job, end to end, on the embedded default (synthetic ScanNet scenes).

Steps:

1. generate a few synthetic ScanNet-format scenes (``.sens`` + labelled mesh) by ray casting;
2. run ScanNet pair prep on them (fragments every 25 frames, overlaps, pair list, manifest);
3. pretrain a small backbone on those pairs (the synthetic transfer benchmark's ``demo`` preset:
   Res16UNet14S at 10 cm; PointInfoNCE unless ``--objective`` says otherwise);
4. voxelise one prepared fragment at 2.5 cm and time the backbone (Res16UNet34C) forward and
   forward+backward on it;
5. generate synthetic S3DIS-format rooms, prepare them, fine-tune segmentation with limited
   labels from scratch and from the step-3 checkpoint, and print both test mIoUs as a table
   (the reduced synthetic transfer benchmark, :mod:`mink_ssl.tools.transfer_benchmark`: one objective
   against scratch, one seed).

Everything is written under ``--out`` (default ``runs/demo``; steps 3 and 5 in
``<out>/transfer``); rerunning reuses what is there.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from data_prep.pairs.prep import PrepParams, run as run_prep
from data_prep.synthetic import generate_scene
from mink_ssl.data.features import input_features
from mink_ssl.engine.config import ModelConfig
from mink_ssl.formats.fragments import FragmentStore
from mink_ssl.models import MODELS, build_model
from mink_ssl.models.engines import check_engine
from mink_ssl.objectives import OBJECTIVES
from mink_ssl.sparse import batched_coordinates, quantize, sparse_tensor
from mink_ssl.tools import transfer_benchmark as bench
from mink_ssl.tools.transfer_benchmark.runs import pretrain_run
from mink_ssl.tools.profiling import measure


def generate_raw_scenes(raw: Path, n_scenes: int, n_frames: int, seed: int, print_fn=print
                        ) -> list[Path]:
    """Synthetic scenes ``scene%04d_00`` under ``raw``; complete ones (with ``<id>.txt``) kept."""
    scenes = []
    for k in range(n_scenes):
        scene_id = f"scene{k:04d}_00"
        if not (raw / scene_id / f"{scene_id}.txt").is_file():
            t0 = time.perf_counter()
            generate_scene(raw, scene_id, seed + k, n_frames=n_frames)
            print_fn(f"generated {scene_id}: {n_frames} frames ({time.perf_counter() - t0:.1f} s)")
        scenes.append(raw / scene_id)
    return scenes


def run_backbone_demo(coords: torch.Tensor, feats: torch.Tensor, model_name: str = "Res16UNet34C",
                      repeats: int = 3, device: str = "auto", print_fn=print,
                      engine: str = ModelConfig.engine) -> dict:
    """Time the backbone on one scene given as voxel coordinates (M, 3) and features (M, 3)."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    bcoords = batched_coordinates([coords])  # (M, 4)
    model = build_model(model_name, in_channels=feats.shape[1], out_channels=32,
                        engine=engine).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print_fn(f"model: {model_name} on {engine}, {n_params / 1e6:.2f}M parameters, device {dev}")

    def forward():
        with torch.no_grad():
            return model(sparse_tensor(bcoords, feats, device=dev))

    def forward_backward():
        out = model(sparse_tensor(bcoords, feats, device=dev))
        out.F.square().mean().backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    out = forward()
    fwd = measure(forward, dev, repeats=repeats)
    model.train()
    fwd_bwd = measure(forward_backward, dev, repeats=repeats)
    print_fn(f"forward          : {fwd}")
    print_fn(f"forward+backward : {fwd_bwd}")
    print_fn(f"output: {tuple(out.F.shape)} features, one row per input voxel")
    return {"voxels": len(bcoords), "params": n_params, "forward": fwd,
            "forward_backward": fwd_bwd, "output_shape": tuple(out.F.shape)}


def run_demo(out: Path, n_scenes: int = 3, n_frames: int = 150, seed: int = 0,
             model_name: str = "Res16UNet34C", voxel_size: float = 0.025, repeats: int = 3,
             device: str = "auto", pretrain_iterations: int | None = None,
             objectives: tuple[str, ...] = ("point_info_nce",), preset: str = "demo",
             finetune_iterations: int | None = None, engine: str | None = None,
             print_fn=print) -> dict:
    """The demo; ``preset`` (a synthetic transfer benchmark preset) sizes steps 3 and 5, and
    ``pretrain_iterations`` / ``finetune_iterations`` override it (0 skips the step), and
    ``engine`` its sparse engine (default: the preset's)."""
    if preset not in bench.PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid choices: {sorted(bench.PRESETS)}")
    cfg = bench.PRESETS[preset]
    cfg = replace(cfg, pretrain_iterations=(cfg.pretrain_iterations if pretrain_iterations is None
                                            else pretrain_iterations),
                  finetune_iterations=(cfg.finetune_iterations if finetune_iterations is None
                                       else finetune_iterations),
                  engine=cfg.engine if engine is None else check_engine(engine))
    if model_name not in MODELS:  # checked before any work
        MODELS.get(model_name)
    for name in objectives:
        OBJECTIVES.get(name)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    objective = "+".join(objectives)

    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(
        {"n_scenes": n_scenes, "n_frames": n_frames, "seed": seed, "model": model_name,
         "voxel_size": voxel_size, "repeats": repeats, "device": device, "preset": preset,
         "objective": objective, "engine": cfg.engine,
         "pretrain_iterations": cfg.pretrain_iterations,
         "finetune_iterations": cfg.finetune_iterations}, indent=1))
    print_fn(f"== 1. synthetic ScanNet scenes -> {out / 'raw'}")
    generate_raw_scenes(out / "raw", n_scenes, n_frames, seed, print_fn)

    print_fn(f"== 2. pair prep -> {out / 'pairs'}")
    manifest = run_prep(out / "raw", out / "pairs", PrepParams(frame_skip=25), progress=False,
                        log=print_fn)
    if not manifest["scenes"]:
        raise RuntimeError(f"prep produced no scenes: {manifest['skipped_scenes']}")

    transfer = out / "transfer"
    print_fn(f"== 3. pretraining {cfg.model} at {100 * cfg.pretrain_voxel:g} cm ({objective}) "
             f"for {cfg.pretrain_iterations} iterations -> {transfer / 'pretrain'}")
    backbone_path = None
    if cfg.pretrain_iterations > 0:
        backbone_path, _ = pretrain_run(transfer, out / "pairs", objective, seed, cfg, dev,
                                        print_fn)

    first = sorted(manifest["scenes"])[0]
    frag = FragmentStore(out / "pairs" / first)[0]
    points, colors = frag.points()
    q = quantize(points, voxel_size)
    feats = input_features(colors[q.index.numpy()], 3)  # (M, 3)
    print_fn(f"== 4. backbone on fragment {frag.name}: {len(points):,} points -> "
             f"{len(q.coords):,} voxels at {voxel_size * 100:g} cm")
    result = run_backbone_demo(q.coords, feats, model_name, repeats, device, print_fn,
                               engine=cfg.engine)

    transfer_result = None
    if cfg.pretrain_iterations > 0 and cfg.finetune_iterations > 0:
        print_fn(f"== 5. fine-tuning on synthetic S3DIS rooms ({', '.join(cfg.settings)}; "
                 f"{cfg.finetune_iterations} iterations), from scratch and from step 3 -> "
                 f"{transfer}")
        transfer_result = bench.run_benchmark(
            transfer, cfg, objectives=[bench.SCRATCH, objective], seeds=[seed],
            device=dev, pairs=out / "pairs", log=print_fn)
    return {"prep": manifest["counts"], "pretrained": backbone_path, "backbone": result,
            "transfer": transfer_result}
