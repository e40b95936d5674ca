"""Time and peak memory of each pretext objective relative to the backbone's forward+backward.

For every registered objective, on the same batch of real pairs (7-Scenes RedKitchen from
../shared/realdata, prepared every 25 frames; synthetic scenes where those are absent), one
training step of the objective alone (``PretrainModule`` forward + backward: the backbone
passes it asks for, its heads and its loss) is compared with the bare backbone forward+backward
on the views of the SAME batch that the objective reads (column ``views``: gmm_likelihood, for
one, reads only view 0, so its baseline is one pass, not two), timed in the same process,
alternated round by round (benchmarks/_timing.py): the ratio is the median of the per-round
ratios, with its IQR, and a warning when the spread is larger than the effect. A step that
contains the bare passes cannot be faster than them (ratio >= 1). Objectives that run the
backbone on inputs of their own (perturbation: a perturbed cloud; distillation: crops and an
EMA teacher) pay for those passes, and the ratio shows it.

Each objective runs in its own process, and its peak memory is measured before any bare step
ran there, so the CPU peak (max RSS above what the process held before the measured work) is
its own; on CUDA it is the peak allocated by torch.

    .venv/bin/python benchmarks/bench_objectives.py [--model Res16UNet34C] [--batch 2]
        [--repeats 5] [--objectives point_info_nce gmm_likelihood ...] [--device cpu|cuda]
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
from _timing import alternate, paired_ratio, ratio_verdict, summary  # noqa: E402

FRAME_SIZE = (60, 80)  # frames for cluster_render's renderer


def prepare(tmp: Path) -> tuple[Path, str]:
    from data_prep.pairs.prep import PrepParams, run as run_prep

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


def _spy_views() -> set:
    """The batch views whose backbone features objectives ask for from now on (this benchmark
    process only: it wraps ``StepContext.features``)."""
    from mink_ssl.objectives.base import StepContext

    read: set = set()
    features = StepContext.features

    def spy(self, view):
        read.add(view)
        return features(self, view)

    StepContext.features = spy
    return read


def child(args) -> dict:
    """One measurement: ``args.child`` is 'backbone' or an objective name."""
    from mink_ssl.data.pairs import PairDataset, collate_pairs
    from mink_ssl.models import build_model
    from mink_ssl.sparse import sparse_tensor
    from mink_ssl.tasks.pretrain import PretrainModule, build_objectives
    from mink_ssl.tools.profiling import measure

    dev = torch.device(args.device)
    ds = PairDataset(args.root, voxel_size=args.voxel_size, frame_size=FRAME_SIZE, seed=0)
    batch = collate_pairs([ds[(0, i)] for i in range(args.batch)]).to(dev)
    torch.manual_seed(0)
    backbone = build_model(args.model, in_channels=3, out_channels=32).to(dev).train()
    views = [0, 1]  # the views the bare baseline runs: those the objective reads

    def bare():
        sum(backbone(sparse_tensor(batch.views[v].coords, batch.views[v].feats)).F.sum()
            for v in views).backward()
        backbone.zero_grad(set_to_none=True)

    if args.child == "backbone":
        step = bare
    else:
        objectives, weights = build_objectives({args.child: {}}, 32)
        module = PretrainModule(backbone, objectives, weights).to(dev).train()

        def step():
            module(batch, 0, 1000)["loss"].backward()
            module.zero_grad(set_to_none=True)
    read = _spy_views()
    before = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev) / 2**20
    peak = measure(step, dev, repeats=1).peak_mem_mb  # this step's own peak, before any other
    if args.child != "backbone":
        views[:] = sorted(read) or [0, 1]
    t = alternate({"step": step, "bare": bare}, dev, args.repeats, warmup=0)
    voxels = len(batch.views[0].coords) + len(batch.views[1].coords)
    return {"name": args.child, "views": views, "ms": summary(t["step"]),
            "bare_ms": summary(t["bare"]),
            "ratio": paired_ratio(t["step"], t["bare"]), "peak_extra_mb": peak - before,
            "voxels": voxels}


def main() -> int:
    import mink_ssl.objectives  # noqa: F401
    from mink_ssl.objectives import OBJECTIVES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Res16UNet34C")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="alternated rounds")
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
          f"({base['voxels']:,} voxels, both views) | {args.repeats} alternated rounds each")
    print(f"{'step':22s} {'views':>5s} {'time':>9s} {'IQR':>7s} {'bare':>8s} {'x bare':>7s} "
          f"{'IQR':>6s} {'peak extra':>11s} {'x backbone':>11s}")
    warnings = []
    for r in rows:
        s, b, q = r["ms"], r["bare_ms"], r["ratio"]
        print(f"{r['name']:22s} {','.join(map(str, r['views'])):>5s} {s['median'] * 1e3:7.0f}ms {s['iqr'] * 1e3:5.0f}ms "
              f"{b['median'] * 1e3:6.0f}ms {q['median']:6.2f}x {q['iqr']:6.2f} "
              f"{r['peak_extra_mb']:9.0f}MB {r['peak_extra_mb'] / base['peak_extra_mb']:10.2f}x")
        verdict = ratio_verdict(q, f"{r['name']} / bare")
        if verdict.startswith(("WARNING", "NOTE")) and r["name"] != "backbone":
            warnings.append(verdict)
    print("x bare: median of per-round ratios of the step to the bare backbone forward+backward "
          "on the views it reads (column views) of the same batch, alternated in the same "
          "process (ratio - 1 is what the objective adds); backbone row: the bare step on both "
          "views against itself (the noise floor)")
    for w in warnings:
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
