"""Shared test helpers (imported as ``from helpers import ...``; the fixtures are in conftest.py)."""
from __future__ import annotations

import os
from pathlib import Path

# one OpenMP thread before torch is imported, as conftest.py sets it (see there)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402  (after OMP_NUM_THREADS)
import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REALDATA = SHARED / "realdata"


def read_depth_png(path: Path) -> np.ndarray:
    import open3d as o3d

    img = np.asarray(o3d.io.read_image(str(path)))
    assert img.dtype == np.uint16, f"{path} is not a 16-bit depth PNG"
    return img


def compose_config(config_name: str, *overrides):
    """``configs/<config_name>.yaml`` composed by Hydra with every command's typed schema
    registered, as the CLIs do (shared by the config tests)."""
    from hydra import compose, initialize_config_dir

    from mink_ssl.cli import finetune_det, finetune_seg, pretrain

    for cli in (pretrain, finetune_seg, finetune_det):
        cli._register_schema()
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


# ------------------------------------------------------------ synthetic pair batches (objectives)

def random_pair_batch(num_scenes=2, voxel=0.05, seed=0, channels=1, n=300):
    """Each scene: ``n`` random voxels of a 14^3 grid per view (random offsets), no matches."""
    from mink_ssl.data.batch import PairBatch, View
    from mink_ssl.sparse import batched_coordinates

    rng = np.random.default_rng(seed)
    views = []
    for _ in range(2):
        coords, feats, world = [], [], []
        for _ in range(num_scenes):
            flat = rng.choice(14 ** 3, n, replace=False)
            grid = np.stack(np.unravel_index(flat, (14, 14, 14)), 1).astype(np.int32)
            coords.append(grid)
            feats.append(rng.uniform(-0.5, 0.5, (n, channels)))
            world.append(grid * voxel + voxel / 2 + rng.uniform(-2, 2, 3))
        views.append(View(batched_coordinates(coords),
                          torch.from_numpy(np.concatenate(feats)).float(),
                          torch.from_numpy(np.concatenate(world)).float()))
    return PairBatch(tuple(views), torch.zeros(0, 2, dtype=torch.long),
                     names=[("a", "b")] * num_scenes)


def tiny_net(in_channels=1):
    """A small real backbone (Res16UNet14A, 16 output channels), seeded, in training mode."""
    from mink_ssl.models import build_model

    torch.manual_seed(0)
    return build_model("Res16UNet14A", in_channels=in_channels, out_channels=16).train()


def matched_pair_batch(num_scenes=2, voxel=0.05, seed=0, with_matches=True):
    """Each scene: 400 random voxels; view 0 holds ids 0..299, view 1 ids 100..399, both in
    random order and view 1 translated; matches are the 200 shared voxels."""
    from mink_ssl.data.batch import PairBatch, View
    from mink_ssl.sparse import batched_coordinates

    rng = np.random.default_rng(seed)
    c0, c1, w0, w1, f0, f1, matches = [], [], [], [], [], [], []
    n0 = n1 = 0
    for _ in range(num_scenes):
        flat = rng.choice(14 ** 3, 400, replace=False)
        grid = np.stack(np.unravel_index(flat, (14, 14, 14)), 1).astype(np.int32)  # (400, 3)
        ids0, ids1 = rng.permutation(300), 100 + rng.permutation(300)
        c0.append(grid[ids0])
        c1.append(grid[ids1] + np.array([3, -2, 5], np.int32))
        w0.append(grid[ids0] * voxel + voxel / 2)
        w1.append(grid[ids1] * voxel + voxel / 2)
        f0.append(rng.uniform(-0.5, 0.5, (300, 1)))
        f1.append(rng.uniform(-0.5, 0.5, (300, 1)))
        row0 = np.empty(400, np.int64)
        row0[ids0] = np.arange(300)
        row1 = np.empty(400, np.int64)
        row1[ids1] = np.arange(300)
        shared = np.arange(100, 300)
        matches.append(np.stack([row0[shared] + n0, row1[shared] + n1], 1))
        n0, n1 = n0 + 300, n1 + 300
    views = tuple(View(batched_coordinates(c), torch.from_numpy(np.concatenate(f)).float(),
                       torch.from_numpy(np.concatenate(w)).float())
                  for c, f, w in ((c0, f0, w0), (c1, f1, w1)))
    m = torch.from_numpy(np.concatenate(matches)) if with_matches else torch.zeros(0, 2).long()
    return PairBatch(views, m, names=[("a", "b")] * num_scenes)


# ------------------------------------------------- synthetic segmentation benchmark (rooms)

SEG_CLASSES = ["floor", "wall", "table", "cabinet"]
SEG_VOXEL = 0.25  # coarse, so that CPU training is quick


def _plane(rng, origin, u, v, density):
    """Points uniformly on the parallelogram origin + s u + t v, s, t in [0, 1]."""
    n = max(int(np.linalg.norm(np.cross(u, v)) * density), 1)
    st = rng.random((n, 2))
    return origin + st[:, :1] * u + st[:, 1:] * v


def _box(rng, lo, size, density):
    x, y, z = np.diag(size)
    faces = [(lo + [0, 0, size[2]], x, y), (lo, x, z), (lo + [0, size[1], 0], x, z), (lo, y, z),
             (lo + [size[0], 0, 0], y, z)]  # top and the four sides
    return np.concatenate([_plane(rng, np.asarray(o, float), u, v, density) for o, u, v in faces])


def make_room(rng, density=150.0):
    """A room: floor, four walls, two low wide tables and two tall narrow cabinets, plus
    unlabelled clutter. Every surface gets a random colour, so colour says nothing about the
    class: the network must use geometry (height, orientation, extent)."""
    w, d, h = rng.uniform(3.0, 4.0), rng.uniform(3.0, 4.0), 2.0
    parts, labels, colors = [], [], []

    def add(points, label):
        parts.append(points)
        labels.append(np.full(len(points), label))
        colors.append(np.clip(rng.uniform(60, 200, 3) + rng.normal(0, 12, points.shape), 0, 255))

    add(_plane(rng, np.zeros(3), np.array([w, 0, 0]), np.array([0, d, 0]), density), 0)
    for o, u in (((0, 0, 0), (w, 0, 0)), ((0, d, 0), (w, 0, 0)), ((0, 0, 0), (0, d, 0)),
                 ((w, 0, 0), (0, d, 0))):
        add(_plane(rng, np.asarray(o, float), np.asarray(u, float), np.array([0, 0, h]),
                   density), 1)
    for k in range(4):
        table = k % 2 == 0
        size = (np.r_[rng.uniform(0.8, 1.2, 2), rng.uniform(0.5, 0.7)] if table
                else np.r_[rng.uniform(0.4, 0.6, 2), rng.uniform(1.2, 1.6)])
        lo = np.r_[rng.uniform(0.2, w - size[0] - 0.2), rng.uniform(0.2, d - size[1] - 0.2), 0]
        add(_box(rng, lo, size, density), 2 if table else 3)
    add(rng.uniform([0, 0, 0], [w, d, h], (200, 3)), -1)  # clutter, unlabelled
    points = np.concatenate(parts)
    points += rng.normal(0, 0.005, points.shape)
    return (points.astype(np.float32), np.concatenate(colors).astype(np.uint8),
            np.concatenate(labels).astype(np.int16))


def write_benchmark(root: Path, splits: dict, seed: int = 0) -> Path:
    """A prepared benchmark in the segmentation data contract (manifest + scenes/*.npz)."""
    rng = np.random.default_rng(seed)
    (root / "scenes").mkdir(parents=True)
    scenes = {}
    for names in splits.values():
        for name in names:
            points, colors, labels = make_room(rng)
            file = f"scenes/{name.replace('/', '__')}.npz"
            np.savez(root / file, coords=points, colors=colors, labels=labels)
            scenes[name] = {"file": file, "points": len(points)}
    manifest = {"schema": "mink_ssl.seg_scenes/1", "benchmark": "rooms", "classes": SEG_CLASSES,
                "ignore_label": -1, "voxel_size": SEG_VOXEL, "splits": splits, "scenes": scenes,
                "skipped": [], "repairs": [], "parameters": {"seed": seed},
                "created": "2026-01-01T00:00:00", "versions": {}}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def tiny_seg_config(root, **kw):
    """A fine-tuning config small enough for CPU tests (4 iterations of Res16UNet14A)."""
    from mink_ssl.engine.config import ModelConfig
    from mink_ssl.tasks.segmentation import (FinetuneSegConfig, SegDataConfig, SegEvalConfig,
                                             SegOptimConfig)

    cfg = FinetuneSegConfig(
        model=ModelConfig(name="Res16UNet14A", out_channels=16, normalize_output=False),
        data=SegDataConfig(root=str(root), num_workers=0),
        optim=SegOptimConfig(name="adam", lr=3e-3), eval=SegEvalConfig(every=0, ply_scenes=1),
        max_iterations=4, batch_size=2, device="cpu", checkpoint_every=2, log_every=1,
        progress=False)
    return replace(cfg, **kw)


def pretrained_backbone(path: Path, seed: int = 123):
    """A Res16UNet14A saved to ``path`` as if trained (every tensor moved a little); its state."""
    from mink_ssl.models import build_model, save_model

    torch.manual_seed(seed)
    net = build_model("Res16UNet14A", in_channels=3, out_channels=16)
    with torch.no_grad():  # as after training: every weight and statistic moved a little
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                v.add_(torch.randn_like(v).abs_() if k.endswith("running_var") else
                       torch.randn_like(v) * 0.01)
    save_model(net, path)
    return net.state_dict()
