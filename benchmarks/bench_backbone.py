"""Forward and forward+backward time and peak memory of Res16UNet34C on a realistic frame.

The frame is a synthetic ScanNet-like 640x480 depth frame (a room seen from 1.4 m, ray cast
with Kinect noise) voxelised at 2.5 cm: about 21K voxels, within the 20-40K of real ScanNet
frames. ``--real`` uses the densest real Kinect frame of 7-Scenes RedKitchen from
../shared/realdata instead (close range: about 18K voxels).
Each network runs in its own process so that CPU peak memory (max RSS) is its own. The baseline,
measured in the same run, is the smallest family member (Res16UNet14A) on the same frame; the
ratios say how much the pretraining backbone costs relative to it.

    .venv/bin/python benchmarks/bench_backbone.py [--device cpu|cuda] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
KITCHEN = REPO.parent / "shared" / "realdata" / "7scenes-redkitchen-a"


def load_frame(voxel_size: float, real: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    from mink_ssl.data.features import input_features
    from mink_ssl.geometry import backproject
    from mink_ssl.sparse import batched_coordinates, quantize

    if real:
        from data_prep.scannet.exported import ExportedFrames

        src = ExportedFrames(KITCHEN)
        frame, source = src.frame(475), "7-Scenes RedKitchen frame 475 (real Kinect)"
    else:
        import tempfile

        from data_prep.scannet.sens import SensReader
        from data_prep.synthetic import generate_scene

        with tempfile.TemporaryDirectory() as tmp:
            scene = generate_scene(tmp, "scene0000_00", 0, n_frames=1, image_size=(640, 480))
            src = SensReader(scene / "scene0000_00.sens")
            frame, source = src.frame(0), "synthetic ScanNet-like frame (640x480)"
    h = src.header
    pts, pixel = backproject(frame.depth(h), h.intrinsic_depth, h.depth_shift,
                             frame.camera_to_world)
    rgb = frame.color(h).reshape(-1, 3)[pixel]
    q = quantize(pts, voxel_size)
    feats = input_features(rgb[q.index.numpy()], 3)
    return batched_coordinates([q.coords]), feats, source


def child(model_name: str, device: str, repeats: int, voxel_size: float, real: bool) -> dict:
    from mink_ssl.models import build_model
    from mink_ssl.sparse import sparse_tensor
    from mink_ssl.tools.profiling import measure

    dev = torch.device(device)
    coords, feats, source = load_frame(voxel_size, real)
    torch.manual_seed(0)
    model = build_model(model_name, in_channels=3, out_channels=32).to(dev)

    def fwd():
        with torch.no_grad():
            model(sparse_tensor(coords, feats, device=dev))

    def fwd_bwd():
        model(sparse_tensor(coords, feats, device=dev)).F.sum().backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    t_fwd = measure(fwd, dev, repeats)
    model.train()
    t_fb = measure(fwd_bwd, dev, repeats)
    return {"model": model_name, "voxels": len(coords), "source": source,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "fwd_ms": t_fwd.median_s * 1e3, "fwd_bwd_ms": t_fb.median_s * 1e3,
            "peak_mb": max(t_fwd.peak_mem_mb, t_fb.peak_mem_mb)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--voxel-size", type=float, default=0.025)
    p.add_argument("--real", action="store_true", help="a real 7-Scenes frame instead")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.device, args.repeats, args.voxel_size, args.real)))
        return 0
    rows = {}
    for name in ("Res16UNet14A", "Res16UNet34C"):
        out = subprocess.run([sys.executable, __file__, "--child", name, "--device", args.device,
                              "--repeats", str(args.repeats), "--voxel-size", str(args.voxel_size)]
                             + (["--real"] if args.real else []),
                             capture_output=True, text=True, cwd=REPO)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return 1
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    dev_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else \
        f"CPU ({torch.get_num_threads()} threads)"
    first = rows["Res16UNet34C"]
    print(f"device: {dev_name} | frame: {first['source']}, {first['voxels']:,} voxels at "
          f"{args.voxel_size * 100:g} cm | median of {args.repeats}")
    print(f"{'model':14s} {'params':>8s} {'forward':>10s} {'fwd+bwd':>10s} {'peak mem':>10s}")
    for r in rows.values():
        print(f"{r['model']:14s} {r['params_m']:7.2f}M {r['fwd_ms']:8.1f}ms {r['fwd_bwd_ms']:8.1f}ms "
              f"{r['peak_mb']:8.0f}MB")
    base, r = rows["Res16UNet14A"], rows["Res16UNet34C"]
    print(f"ratio 34C / 14A (baseline): forward {r['fwd_ms'] / base['fwd_ms']:.2f}x, "
          f"fwd+bwd {r['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f}x, peak mem "
          f"{r['peak_mb'] / base['peak_mb']:.2f}x")
    print(f"ratio 34C fwd+bwd / forward: {r['fwd_bwd_ms'] / r['fwd_ms']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
