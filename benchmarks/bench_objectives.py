"""Time and peak memory of each pretext objective relative to the backbone's forward+backward.

For every registered objective, on the same batch of real pairs (7-Scenes RedKitchen from
../shared/realdata, prepared every 25 frames; synthetic scenes where those are absent), one
training step of the objective alone (``PretrainModule`` forward + backward: the backbone
passes it asks for, its heads and its loss) is compared with the baseline measured in the same
run: the bare backbone forward+backward on both views of the batch. Objectives that run the
backbone on inputs of their own (perturbation: a perturbed cloud; distillation: crops and an
EMA teacher) pay for those passes, and the ratio shows it.

Each measurement runs in its own process, so the CPU peak memory (max RSS above what the process
held before the measured work) is its own; on CUDA it is the peak allocated by torch.

    .venv/bin/python benchmarks/bench_objectives.py [--model Res16UNet34C] [--batch 2]
        [--repeats 3] [--objectives point_info_nce gmm_likelihood ...] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import KITCHEN, REPO, workdir  # noqa: E402

FRAME_SIZE = (60, 80)  # frames for cluster_render's renderer


def prepare(tmp: Path) -> tuple[Path, str]:
    from data_prep.scannet.prep import PrepParams, run as run_prep

    if (KITCHEN / "depth").is_dir():
        (tmp / "raw").mkdir()
        (tmp / "raw" / "redkitchen").symlink_to(KITCHEN)
        source = "7-Scenes RedKitchen (real)"
    else:
        from data_prep.synthetic import generate_scene

        generate_scene(tmp / "raw", "scene0000_00", 0, n_frames=151, image_size=(640, 480))
        source = "synthetic scene"
    run_prep(tmp / "raw", tmp / "pairs", PrepParams(frame_skip=25), progress=False,
             log=lambda s: None)
    return tmp / "pairs", source


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(args) -> dict:
    """One measurement: ``args.child`` is 'backbone' or an objective name."""
    from mink_ssl.data.pairs import PairDataset, collate_pairs
    from mink_ssl.engine.pretrain import build_objectives
    from mink_ssl.engine.profiling import measure
    from mink_ssl.engine.trainer import PretrainModule
    from mink_ssl.models import build_model
    from mink_ssl.sparse import sparse_tensor

    dev = torch.device(args.device)
    ds = PairDataset(args.root, voxel_size=args.voxel_size, frame_size=FRAME_SIZE, seed=0)
    batch = collate_pairs([ds[(0, i)] for i in range(args.batch)]).to(dev)
    torch.manual_seed(0)
    backbone = build_model(args.model, in_channels=3, out_channels=32).to(dev).train()
    if args.child == "backbone":
        def step():
            v0, v1 = batch.views
            (backbone(sparse_tensor(v0.coords, v0.feats)).F.sum()
             + backbone(sparse_tensor(v1.coords, v1.feats)).F.sum()).backward()
            backbone.zero_grad(set_to_none=True)
    else:
        objectives, weights = build_objectives({args.child: {}}, 32)
        module = PretrainModule(backbone, objectives, weights).to(dev).train()

        def step():
            module(batch, 0, 1000)["loss"].backward()
            module.zero_grad(set_to_none=True)
    before = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev) / 2**20
    t = measure(step, dev, repeats=args.repeats)
    voxels = len(batch.views[0].coords) + len(batch.views[1].coords)
    return {"name": args.child, "ms": t.median_s * 1e3, "peak_extra_mb": t.peak_mem_mb - before,
            "voxels": voxels}


def main() -> int:
    import mink_ssl.objectives  # noqa: F401
    from mink_ssl.objectives import OBJECTIVES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Res16UNet34C")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--voxel-size", type=float, default=0.025)
    p.add_argument("--objectives", nargs="+", default=None,
                   help=f"default: all registered ({', '.join(OBJECTIVES.names())})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    names = args.objectives or [n for n in OBJECTIVES.names() if not n.startswith("_")]
    for name in names:
        OBJECTIVES.get(name)  # unknown names fail here, listing the valid ones

    with workdir() as tmp:
        root, source = prepare(Path(tmp))
        rows = []
        for name in ["backbone", *names]:
            out = subprocess.run(
                [sys.executable, __file__, "--child", name, "--root", str(root),
                 "--model", args.model, "--batch", str(args.batch), "--repeats",
                 str(args.repeats), "--voxel-size", str(args.voxel_size), "--device",
                 args.device], capture_output=True, text=True, cwd=REPO)
            if out.returncode != 0:
                print(f"{name} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                return 1
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    dev_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else \
        f"CPU ({torch.get_num_threads()} threads)"
    base = rows[0]
    print(f"device: {dev_name} | data: {source} | {args.model}, batch {args.batch} pairs "
          f"({base['voxels']:,} voxels, both views) | median of {args.repeats}")
    print(f"{'step':22s} {'time':>10s} {'x backbone':>11s} {'peak extra':>11s} {'x backbone':>11s}")
    for r in rows:
        print(f"{r['name']:22s} {r['ms']:8.0f}ms {r['ms'] / base['ms']:10.2f}x "
              f"{r['peak_extra_mb']:9.0f}MB {r['peak_extra_mb'] / base['peak_extra_mb']:10.2f}x")
    print("baseline: bare backbone forward+backward on both views of the same batch; "
          "ratio - 1 is what the objective adds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
