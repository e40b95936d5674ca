"""``make demo``: the main job on the embedded default (a synthetic indoor scene).

Today it generates a synthetic room, voxelises one scene at 2.5 cm, runs the pretraining
backbone (Res16UNet34C) forward and forward+backward on it, and prints timings. Later stages
(data prep -> pretraining -> fine-tuning) are added here as they land.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def run_backbone_demo(model_name: str = "Res16UNet34C", n_points: int = 30_000,
                      voxel_size: float = 0.025, seed: int = 0, repeats: int = 3,
                      device: str = "auto", print_fn=print) -> dict:
    """Build a synthetic scene, run the backbone, return (and print) the measurements."""
    from data_prep.synthetic import make_room, sample_room_points
    from mink_ssl.engine.profiling import measure
    from mink_ssl.models import build_model
    from mink_ssl.sparse import batched_coordinates, quantize, sparse_tensor

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    room = make_room(seed)
    points, colors, labels, _ = sample_room_points(room, n_points, seed=seed)
    q = quantize(points, voxel_size)
    coords = batched_coordinates([q.coords])  # (M, 4)
    feats = torch.from_numpy(colors[q.index.numpy()]).float() / 255.0 - 0.5  # (M, 3)
    print_fn(f"scene: room {room.size.round(2).tolist()} m, {len(room.boxes)} boxes, "
             f"{len(points):,} points -> {len(coords):,} voxels at {voxel_size * 100:g} cm "
             f"({time.perf_counter() - t0:.2f} s)")

    model = build_model(model_name, in_channels=3, out_channels=32).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print_fn(f"model: {model_name}, {n_params / 1e6:.2f}M parameters, device {dev}")

    def forward():
        with torch.no_grad():
            return model(sparse_tensor(coords, feats, device=dev))

    def forward_backward():
        out = model(sparse_tensor(coords, feats, device=dev))
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
    return {"voxels": len(coords), "params": n_params, "forward": fwd, "forward_backward": fwd_bwd,
            "output_shape": tuple(out.F.shape)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mink-ssl-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Res16UNet34C", help="backbone name (default Res16UNet34C)")
    p.add_argument("--points", type=int, default=30_000,
                   help="points sampled on the room surfaces (30K gives ~29K voxels at 2.5 cm)")
    p.add_argument("--voxel-size", type=float, default=0.025, help="voxel edge in metres")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    args = p.parse_args(argv)
    try:
        run_backbone_demo(args.model, args.points, args.voxel_size, args.seed, args.repeats,
                          args.device)
    except (ValueError, KeyError) as e:
        print(f"mink-ssl-demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
