"""A full pretraining step vs the bare forward+backward of the same network on the same batch.

The full step is ``Trainer.run_step``: waiting for the loader (which reads fragments,
voxelises, augments and computes correspondences in its workers), the objective (hardest
contrastive by default), backward and the optimizer. The bare step is only
``backbone(view0)``, ``backbone(view1)`` and a backward of their sum, on batches fetched in
advance. Target: full / bare <= 1.15 with the default loader workers (the loader must not be
the bottleneck). It also prints the loader's pairs/s on its own.

Data: the real 7-Scenes frames (../shared/realdata), prepared every 25 frames, or synthetic
scenes where those are absent.

    .venv/bin/python benchmarks/bench_pretrain_step.py [--model Res16UNet34C] [--batch 2]
        [--steps 5] [--workers 2] [--voxel-size 0.025] [--objective hardest_contrastive]
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


def main() -> int:
    from data_prep.scannet.prep import PrepParams, run as run_prep
    from mink_ssl.engine.config import DataConfig, ModelConfig, OptimConfig
    from mink_ssl.engine.pretrain import (build_backbone, build_dataset, build_loader,
                                          build_objectives, build_optimizer,
                                          resolve_num_workers)
    from mink_ssl.engine.profiling import sync_device
    from mink_ssl.engine.trainer import PretrainModule, Trainer
    from mink_ssl.sparse import sparse_tensor

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Res16UNet34C")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--workers", default="auto", help="loader workers: auto (the default of "
                   "data.num_workers: cores - 1, at most 8) or a number")
    p.add_argument("--voxel-size", type=float, default=0.025)
    p.add_argument("--objective", default="hardest_contrastive")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
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
        loader = build_loader(dataset, args.batch, args.workers, 0, 0, 1, 0)
        it = iter(loader)
        next(it)  # start-up
        t0, n = time.perf_counter(), 0
        for batch in itertools.islice(it, 6):
            n += len(batch) if batch is not None else 0
        loader_pps = n / (time.perf_counter() - t0)
        del it, loader

        torch.manual_seed(0)
        backbone = build_backbone(ModelConfig(name=args.model), dataset.in_channels)
        objectives, weights = build_objectives({args.objective: {}}, ModelConfig().out_channels)
        module = PretrainModule(backbone, objectives, weights).to(dev)
        optimizer, scheduler = build_optimizer(OptimConfig(), module.parameters())
        trainer = Trainer(module, optimizer, scheduler,
                          iter(build_loader(dataset, args.batch, args.workers, 0, 0, 1, 0)),
                          max_iterations=10**9, batch_size=args.batch, device=dev)
        module.train()
        trainer.run_step()  # warm-up: workers start, first allocations
        # alternate a full step and a bare step (on a batch taken from the same loader), so
        # that drift of the machine's speed affects both alike
        full, bare, batches = [], [], []
        for _ in range(args.steps):
            sync_device(dev)
            t0 = time.perf_counter()
            trainer.run_step()
            sync_device(dev)
            full.append(time.perf_counter() - t0)
            batch = trainer._next_batch()
            batches.append(batch)
            sync_device(dev)
            t0 = time.perf_counter()
            v0, v1 = batch.views
            out = (backbone(sparse_tensor(v0.coords, v0.feats)).F.sum()
                   + backbone(sparse_tensor(v1.coords, v1.feats)).F.sum())
            out.backward()
            backbone.zero_grad(set_to_none=True)
            sync_device(dev)
            bare.append(time.perf_counter() - t0)
        voxels = sum(len(b.views[0].coords) + len(b.views[1].coords) for b in batches) / len(batches)

    med = lambda xs: sorted(xs)[len(xs) // 2]
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {dev_name} | data: {source}, {len(dataset)} pairs | {args.model}, batch "
          f"{args.batch} pairs (~{voxels:,.0f} voxels), {args.objective}, {args.workers} workers")
    print(f"  full step (loader + matching + forward + loss + backward + optimizer): "
          f"{med(full) * 1e3:9.1f} ms (median of {len(full)}, alternated)")
    print(f"  bare forward+backward on the same batches:                           "
          f"{med(bare) * 1e3:9.1f} ms")
    print(f"  ratio full / bare: {med(full) / med(bare):.3f} (target <= 1.15)")
    print(f"  loader alone: {loader_pps:.2f} pairs/s ({args.workers} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
