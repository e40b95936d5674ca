"""A full pretraining step vs the bare forward+backward of the same network on the same batch.

The full step is ``Trainer.run_step`` on a batch fetched in advance: the objective (hardest
contrastive by default), backward, the optimizer and scheduler. The bare step is only
``backbone(view0)``, ``backbone(view1)`` and a backward of their sum. Both run on the SAME
batches, alternated round by round (benchmarks/_timing.py), so that a loaded machine slows both
alike; the report is the median and IQR of each and of the per-round ratio full / bare (>= 1 by
construction: the full step contains the bare one), with a warning when the spread is larger
than the effect. Target: full / bare <= 1.15. The loader (reading fragments, voxelising,
augmenting, matching in its workers) is timed on its own and compared with the pairs/s the full
step consumes: it must keep up. The steps run on the default engine; where the other engine is
installed, its full step on the same batches and initial weights joins the alternation, and the
engines' speed-up (other / default, per round) is printed too.

Data: the real 7-Scenes frames (../shared/realdata), prepared every 25 frames, or synthetic
scenes where those are absent.

    .venv/bin/python benchmarks/bench_pretrain_step.py [--model Res16UNet34C] [--batch 2]
        [--steps 3] [--repeats 5] [--workers auto] [--voxel-size 0.025]
        [--objective hardest_contrastive]
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import KITCHEN, workdir  # noqa: E402
from _timing import alternate, paired_ratio, ratio_verdict, summary  # noqa: E402


def main() -> int:
    from data_prep.pairs.prep import PrepParams, run as run_prep
    from mink_ssl.data.pairs import collate_pairs
    from mink_ssl.engine.build import (build_backbone, build_loader, build_optimizer,
                                       resolve_num_workers)
    from mink_ssl.engine.config import ModelConfig, OptimConfig
    from mink_ssl.engine.trainer import Trainer
    from mink_ssl.models.engines import ENGINES, engine_unavailable
    from mink_ssl.sparse import sparse_tensor
    from mink_ssl.tasks.pretrain import DataConfig, PretrainModule, build_dataset, build_objectives

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Res16UNet34C")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="distinct batches")
    p.add_argument("--repeats", type=int, default=5, help="alternated rounds per batch")
    p.add_argument("--workers", default="auto", help="loader workers: auto (the default of "
                   "data.num_workers: cores - 1, at most 8) or a number")
    p.add_argument("--voxel-size", type=float, default=0.025)
    p.add_argument("--objective", default="hardest_contrastive")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    for name in ("batch", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    args.workers = resolve_num_workers(args.workers if args.workers == "auto" else int(args.workers))
    dev = torch.device(args.device)

    with workdir() as tmp:
        tmp = Path(tmp)
        if (KITCHEN / "depth").is_dir():
            (tmp / "raw").mkdir()
            (tmp / "raw" / "redkitchen").symlink_to(KITCHEN)
            source = "7-Scenes RedKitchen (real)"
        else:
            from data_prep.synthetic import generate_scene

            for k in range(2):
                generate_scene(tmp / "raw", f"scene{k:04d}_00", k, n_frames=151,
                               image_size=(640, 480))
            source = "synthetic scenes"
        run_prep(tmp / "raw", tmp / "pairs", PrepParams(frame_skip=25), progress=False,
                 log=lambda s: None)
        data = DataConfig(root=str(tmp / "pairs"), voxel_size=args.voxel_size,
                          num_workers=args.workers)
        dataset = build_dataset(data, seed=0)

        # the loader alone
        loader = build_loader(dataset, args.batch, args.workers, 0, 0, 1, 0, collate_pairs)
        it = iter(loader)
        next(it)  # start-up
        t0, n = time.perf_counter(), 0
        for batch in itertools.islice(it, 6):
            n += len(batch) if batch is not None else 0
        loader_pps = n / (time.perf_counter() - t0)
        del it, loader

        # the batches both steps run on, fetched in advance
        it = iter(build_loader(dataset, args.batch, args.workers, 0, 0, 1, 0, collate_pairs))
        batches, fetched, limit = [], 0, args.steps + -(-len(dataset) // args.batch)
        while len(batches) < args.steps:
            if fetched == limit:  # the loader is endless: a pass with too few kept pairs ends it
                raise SystemExit(f"only {len(batches)} of {args.steps} batches in {fetched} "
                                 f"fetched: the others held only pairs skipped for fewer than "
                                 f"{data.min_matches} matches (--voxel-size {args.voxel_size}); "
                                 "ask for fewer --steps or prepare more overlapping pairs")
            b, fetched = next(it), fetched + 1
            if b is not None:
                batches.append(b.to(dev))
        del it

        def make_trainer(engine: str):
            torch.manual_seed(0)  # the same initial weights on every engine
            backbone = build_backbone(ModelConfig(name=args.model, engine=engine),
                                      dataset.in_channels)
            objectives, weights = build_objectives({args.objective: {}},
                                                   ModelConfig().out_channels)
            module = PretrainModule(backbone, objectives, weights).to(dev).train()
            optimizer, scheduler = build_optimizer(OptimConfig(), module.parameters())
            return backbone, Trainer(module, optimizer, scheduler, iter(()),
                                     max_iterations=10**9, batch_size=args.batch, device=dev)

        engine = ModelConfig().engine  # the default engine: full and bare steps
        backbone, trainer = make_trainer(engine)
        # the other engine's full step, alternated with them: the engines' speed-up
        other = [e for e in ENGINES if e != engine and engine_unavailable(e) is None]
        others = {e: make_trainer(e)[1] for e in other}
        full, bare, full_other = [], [], {e: [] for e in other}
        for batch in batches:
            def full_step(batch=batch, trainer=trainer):
                trainer.batches = iter((batch,))
                trainer.run_step()

            def bare_step(batch=batch):
                v0, v1 = batch.views
                (backbone(sparse_tensor(v0.coords, v0.feats)).F.sum()
                 + backbone(sparse_tensor(v1.coords, v1.feats)).F.sum()).backward()
                backbone.zero_grad(set_to_none=True)

            fns = {"full": full_step, "bare": bare_step}
            fns.update({f"full_{e}": (lambda batch=batch, t=t: full_step(batch, t))
                        for e, t in others.items()})
            t = alternate(fns, dev, args.repeats)
            full += t["full"]
            bare += t["bare"]
            for e in other:
                full_other[e] += t[f"full_{e}"]
        voxels = sum(len(b.views[0].coords) + len(b.views[1].coords) for b in batches) / len(batches)

    f, b, r = summary(full), summary(bare), paired_ratio(full, bare)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {dev_name} | data: {source}, {len(dataset)} pairs | {args.model} on "
          f"{engine}, batch "
          f"{args.batch} pairs (~{voxels:,.0f} voxels), {args.objective}")
    print(f"  {args.steps} batches x {args.repeats} alternated rounds, the same batches for both")
    print(f"  full step (matching + forward + loss + backward + optimizer): "
          f"{f['median'] * 1e3:9.1f} ms  IQR {f['iqr'] * 1e3:7.1f} ms")
    print(f"  bare forward+backward:                                        "
          f"{b['median'] * 1e3:9.1f} ms  IQR {b['iqr'] * 1e3:7.1f} ms")
    print(f"  ratio full / bare (per round): median {r['median']:.3f}x, IQR {r['iqr']:.3f} "
          f"(target <= 1.15x)")
    print(f"  {ratio_verdict(r)}")
    for e, times in full_other.items():
        o, ro = summary(times), paired_ratio(times, full)
        print(f"  full step on {e}: {o['median'] * 1e3:9.1f} ms  IQR {o['iqr'] * 1e3:7.1f} ms; "
              f"engine speed-up ({e} / {engine}, per round): median {ro['median']:.2f}x, IQR "
              f"{ro['iqr']:.2f}")
    need = args.batch / f["median"]
    print(f"  loader alone: {loader_pps:.2f} pairs/s ({args.workers} workers); the full step "
          f"consumes {need:.2f} pairs/s: {'keeps up' if loader_pps >= need else 'BOTTLENECK'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
