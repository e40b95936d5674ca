"""``make demo``: the main job, end to end, on the embedded default (synthetic ScanNet scenes).

Steps so far (later stages are added here as they land):

1. generate a few synthetic ScanNet-format scenes (``.sens`` + labelled mesh) by ray casting;
2. run ScanNet pair prep on them (fragments every 25 frames, overlaps, pair list, manifest);
3. pretrain the backbone briefly on those pairs (hardest-contrastive, a few iterations);
4. voxelise one prepared fragment at 2.5 cm and time the backbone (Res16UNet34C) forward and
   forward+backward on it.

Everything is written under ``--out`` (default ``runs/demo``); rerunning reuses what is there.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def generate_raw_scenes(raw: Path, n_scenes: int, n_frames: int, seed: int, print_fn=print
                        ) -> list[Path]:
    """Synthetic scenes ``scene%04d_00`` under ``raw``; complete ones (with ``<id>.txt``) kept."""
    from data_prep.synthetic import generate_scene

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
                      repeats: int = 3, device: str = "auto", print_fn=print) -> dict:
    """Time the backbone on one scene given as voxel coordinates (M, 3) and features (M, 3)."""
    from mink_ssl.engine.profiling import measure
    from mink_ssl.models import build_model
    from mink_ssl.sparse import batched_coordinates, sparse_tensor

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    bcoords = batched_coordinates([coords])  # (M, 4)
    model = build_model(model_name, in_channels=feats.shape[1], out_channels=32).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print_fn(f"model: {model_name}, {n_params / 1e6:.2f}M parameters, device {dev}")

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
             device: str = "auto", pretrain_iterations: int = 10,
             objectives: tuple[str, ...] = ("hardest_contrastive",), print_fn=print) -> dict:
    from data_prep.scannet.prep import PrepParams, run as run_prep
    from mink_ssl.data.features import input_features
    from mink_ssl.data.fragments import FragmentStore
    from mink_ssl.sparse import quantize

    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(
        {"n_scenes": n_scenes, "n_frames": n_frames, "seed": seed, "model": model_name,
         "voxel_size": voxel_size, "repeats": repeats, "device": device}, indent=1))
    print_fn(f"== 1. synthetic ScanNet scenes -> {out / 'raw'}")
    generate_raw_scenes(out / "raw", n_scenes, n_frames, seed, print_fn)

    print_fn(f"== 2. pair prep -> {out / 'pairs'}")
    manifest = run_prep(out / "raw", out / "pairs", PrepParams(frame_skip=25), progress=False,
                        log=print_fn)
    if not manifest["scenes"]:
        raise RuntimeError(f"prep produced no scenes: {manifest['skipped_scenes']}")

    print_fn(f"== 3. pretraining {model_name} ({', '.join(objectives)}) for "
             f"{pretrain_iterations} iterations -> {out / 'pretrain'}")
    backbone_path = None
    if pretrain_iterations > 0:
        from mink_ssl.engine.config import DataConfig, ModelConfig, PretrainConfig
        from mink_ssl.engine.pretrain import pretrain

        cfg = PretrainConfig(
            model=ModelConfig(name=model_name), data=DataConfig(
                root=str(out / "pairs"), voxel_size=voxel_size, num_workers=1),
            objectives={name: {} for name in objectives}, max_iterations=pretrain_iterations,
            batch_size=2, device=device, checkpoint_every=0, log_every=1, progress=False,
            seed=seed)
        backbone_path = pretrain(cfg, out / "pretrain", print_fn=print_fn)

    first = sorted(manifest["scenes"])[0]
    frag = FragmentStore(out / "pairs" / first)[0]
    points, colors = frag.points()
    q = quantize(points, voxel_size)
    feats = input_features(colors[q.index.numpy()], 3)  # (M, 3)
    print_fn(f"== 4. backbone on fragment {frag.name}: {len(points):,} points -> "
             f"{len(q.coords):,} voxels at {voxel_size * 100:g} cm")
    result = run_backbone_demo(q.coords, feats, model_name, repeats, device, print_fn)
    return {"prep": manifest["counts"], "pretrained": backbone_path, "backbone": result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mink-ssl-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory")
    p.add_argument("--scenes", type=int, default=3, help="synthetic scenes to generate")
    p.add_argument("--frames", type=int, default=150, help="frames per synthetic scene")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="Res16UNet34C", help="backbone name (default Res16UNet34C)")
    p.add_argument("--voxel-size", type=float, default=0.025, help="voxel edge in metres")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--pretrain-iterations", type=int, default=10,
                   help="pretraining iterations on the prepared pairs (0 skips the step)")
    p.add_argument("--objective", nargs="+", default=["hardest_contrastive"],
                   help="pretraining objective(s) by name, e.g. point_info_nce gmm_likelihood")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        run_demo(args.out, args.scenes, args.frames, args.seed, args.model, args.voxel_size,
                 args.repeats, args.device, args.pretrain_iterations, tuple(args.objective))
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"mink-ssl-demo: error: {e}", file=sys.stderr)
        return 2
    print(f"demo done in {time.perf_counter() - t0:.1f} s; outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
