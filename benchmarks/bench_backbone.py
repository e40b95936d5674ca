"""Both sparse engines side by side: forward and forward+backward of each network on a
realistic frame, MinkowskiEngine (the baseline) against spconv, with the same weights.

The frame is a synthetic ScanNet-like 640x480 depth frame (a room seen from 1.4 m, ray cast
with Kinect noise) voxelised at 2.5 cm: about 21K voxels, within the 20-40K of real ScanNet
frames. ``--real`` uses the densest real Kinect frame of 7-Scenes RedKitchen from
../shared/realdata instead (close range: about 18K voxels).

Each network runs in its own process (so that its peak memory is its own); inside it the two
engines run the same weights on the same input, alternated round by round (a b, b a, ...), so
that a loaded machine slows both alike. Reported: the median and IQR of each, and the per-round
ratio MinkowskiEngine time / spconv time (> 1: spconv is faster), one line per network:

    <network> speed-up fwd+bwd <ratio>x (IQR ...), forward <ratio>x

The outputs of the two engines are compared too (max abs difference relative to the output's
scale), so a fast wrong engine cannot pass unnoticed.

``--threads 1 2`` repeats the CPU measurement with each number of threads (OMP_NUM_THREADS for
the child process: MinkowskiEngine's OpenMP and torch's both read it at start-up).

    .venv/bin/python benchmarks/bench_backbone.py [--device cpu|cuda] [--repeats 5]
        [--models Res16UNet14A Res16UNet34C] [--threads 1] [--real]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import alternate, paired_ratio, summary  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KITCHEN = REPO.parent / "shared" / "realdata" / "7scenes-redkitchen-a"
ENGINE_ORDER = ("minkowski", "spconv")


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


def child(model_name: str, device: str, repeats: int, voxel_size: float, real: bool,
          engines: list[str]) -> dict:
    from mink_ssl.models import build_model
    from mink_ssl.sparse import sparse_tensor
    from mink_ssl.tools.profiling import peak_memory_mb

    dev = torch.device(device)
    coords, feats, source = load_frame(voxel_size, real)
    x = sparse_tensor(coords, feats, device=dev)
    nets = {}
    for e in engines:
        torch.manual_seed(0)  # the same weights on every engine (they draw them alike)
        nets[e] = build_model(model_name, in_channels=3, out_channels=32, engine=e).to(dev)

    def forward(e):
        def fn():
            with torch.no_grad():
                return nets[e](x)
        return fn

    def forward_backward(e):
        def fn():
            nets[e](x).feats.sum().backward()
            nets[e].zero_grad(set_to_none=True)
        return fn

    out = {}
    for e in engines:
        nets[e].eval()
        out[e] = forward(e)().feats.float()
    scale = float(out[engines[0]].abs().max())
    diff = float((out[engines[-1]] - out[engines[0]]).abs().max()) / scale if scale else 0.0
    for net in nets.values():
        net.eval()
    t_fwd = alternate({e: forward(e) for e in engines}, dev, repeats)
    for net in nets.values():
        net.train()
    t_fb = alternate({e: forward_backward(e) for e in engines}, dev, repeats)
    return {"model": model_name, "voxels": len(coords), "source": source,
            "params_m": sum(p.numel() for p in nets[engines[0]].parameters()) / 1e6,
            "fwd": t_fwd, "fwd_bwd": t_fb, "peak_mb": peak_memory_mb(dev),
            "max_rel_diff": diff}


def main() -> int:
    from mink_ssl.models.engines import engine_unavailable

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--voxel-size", type=float, default=0.025)
    p.add_argument("--models", nargs="+", default=["Res16UNet14A", "Res16UNet34C"])
    p.add_argument("--threads", nargs="+", type=int, default=None,
                   help="CPU threads per run (default: OMP_NUM_THREADS, else 1)")
    p.add_argument("--real", action="store_true", help="a real 7-Scenes frame instead")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--engines", nargs="+", default=list(ENGINE_ORDER), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.device, args.repeats, args.voxel_size, args.real,
                               args.engines)))
        return 0
    missing = {e: engine_unavailable(e) for e in ENGINE_ORDER}
    if any(missing.values()):
        print(f"needs both engines; missing: {missing}", file=sys.stderr)
        return 1
    threads = args.threads or [int(os.environ.get("OMP_NUM_THREADS", "1"))]
    if min(threads) < 1 or args.repeats < 1:
        p.error(f"--threads and --repeats must be >= 1, got {threads} and {args.repeats}")
    for n_threads in threads:
        rows = {}
        env = dict(os.environ, OMP_NUM_THREADS=str(n_threads))
        for name in args.models:
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--device",
                                   args.device, "--repeats", str(args.repeats), "--voxel-size",
                                   str(args.voxel_size)] + (["--real"] if args.real else []),
                                  capture_output=True, text=True, cwd=REPO, env=env)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        report(rows, args, n_threads)
    return 0


def report(rows: dict, args, n_threads: int) -> None:
    dev_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else \
        f"CPU, {n_threads} thread(s)"
    first = next(iter(rows.values()))
    print(f"device: {dev_name} | frame: {first['source']}, {first['voxels']:,} voxels at "
          f"{args.voxel_size * 100:g} cm | {args.repeats} alternated rounds, median (IQR)")
    print(f"{'model':14s} {'engine':10s} {'forward ms':>18s} {'fwd+bwd ms':>18s}")
    for r in rows.values():
        for e in ENGINE_ORDER:
            f, fb = summary(r["fwd"][e]), summary(r["fwd_bwd"][e])
            print(f"{r['model']:14s} {e:10s} {f['median'] * 1e3:9.1f} ({f['iqr'] * 1e3:6.1f}) "
                  f"{fb['median'] * 1e3:9.1f} ({fb['iqr'] * 1e3:6.1f})")
    for r in rows.values():
        rf = paired_ratio(r["fwd"]["minkowski"], r["fwd"]["spconv"])
        rb = paired_ratio(r["fwd_bwd"]["minkowski"], r["fwd_bwd"]["spconv"])
        print(f"{r['model']} speed-up (MinkowskiEngine / spconv, {dev_name}) fwd+bwd "
              f"{rb['median']:.2f}x (IQR {rb['iqr']:.2f}), forward {rf['median']:.2f}x (IQR "
              f"{rf['iqr']:.2f}); outputs differ by {r['max_rel_diff']:.1e} of their scale; "
              f"peak memory {r['peak_mb']:.0f} MB ({r['params_m']:.2f}M parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
