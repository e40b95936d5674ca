"""Overlap of all fragment pairs: the published algorithm vs ours, in the same run.

On the 100 real frames of 7-Scenes RedKitchen (../shared/realdata; all 4,950 pairs, 64% of them
overlapping: the worst case for pruning), each method starts from its own stored fragments:

- baseline, as published: float64 ``(N, 7)`` npz fragments, open3d 5 cm ``voxel_down_sample``,
  a KD-tree per fragment and a Python loop of ``search_radius_vector_3d(point, 7.5 cm)`` over
  every point of every other fragment, overlap = max of the two directions;
- ours: the fragment store (zlib depth + JPEG colour), back-projected at load time,
  ``voxel_downsample`` and the pruned ``overlap_matrix``.

It prints the time of each and their ratio, the pairs >= 0.3 of each, the pairs that differ
and the largest difference of overlap values. Then it times ours alone on a synthetic scene of
300 views (5 rooms x 60 views, as a large ScanNet scan where most pairs are disjoint) and
prints how many candidate pairs were pruned cheaply.

    .venv/bin/python benchmarks/bench_overlap.py [--frames 100] [--skip-synthetic]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import prepare, require_kitchen, workdir  # noqa: E402


def baseline_store(kitchen: Path, ids: list[int], out: Path) -> list[Path]:
    """The published fragment format: np.savez(pcd=(N, 7) float64: xyz world, rgb, pad)."""
    from data_prep.scannet.exported import ExportedFrames
    from mink_ssl.geometry import backproject

    src, paths = ExportedFrames(kitchen), []
    for i in ids:
        f = src.frame(i)
        pts, pixel = backproject(f.depth(src.header), src.header.intrinsic_depth, 1000.0,
                                 f.camera_to_world)
        pcd = np.zeros((len(pts), 7))
        pcd[:, :3] = pts
        pcd[:, 3:6] = f.color(src.header).reshape(-1, 3)[pixel]
        paths.append(out / f"{i}.npz")
        np.savez(paths[-1], pcd=pcd)
    return paths


def baseline_overlap(paths: list[Path], voxel: float = 0.05) -> np.ndarray:
    """The published algorithm, step for step."""
    import open3d as o3d

    clouds = []
    for p in paths:
        pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.load(p)["pcd"][:, :3]))
        clouds.append(pcd.voxel_down_sample(voxel))
    n = len(clouds)
    matching = np.zeros((n, n))
    for i in range(n):
        tree = o3d.geometry.KDTreeFlann(clouds[i])
        for j in range(n):
            if i == j:
                continue
            hits = 0
            for point in np.asarray(clouds[j].points):
                _, idx, _ = tree.search_radius_vector_3d(point, 1.5 * voxel)
                hits += len(idx[:1])
            matching[i, j] = hits / len(clouds[j].points)
    return np.maximum(matching, matching.T)


def our_clouds(scene: Path, frames: list[int] | None = None, shift: np.ndarray | None = None
               ) -> list[np.ndarray]:
    from data_prep.scannet.overlap import voxel_downsample
    from mink_ssl.data.fragments import FragmentStore

    store = FragmentStore(scene)
    frames = store.frames.tolist() if frames is None else frames
    clouds = [voxel_downsample(store.by_frame(f, color=False).points()[0]) for f in frames]
    return clouds if shift is None else [c + shift for c in clouds]


def real_comparison(n_frames: int) -> None:
    from data_prep.scannet.overlap import overlap_matrix

    kitchen = require_kitchen()
    ids = list(range(0, 500, 5))[:n_frames]
    with workdir() as tmp:
        tmp = Path(tmp)
        (tmp / "base").mkdir()
        paths = baseline_store(kitchen, ids, tmp / "base")
        scene = prepare(kitchen, tmp / "ours")

        t0 = time.perf_counter()
        base = baseline_overlap(paths)
        t_base = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = overlap_matrix(our_clouds(scene, ids))
        t_ours = time.perf_counter() - t0

    ours = res.overlap
    iu = np.triu_indices(len(ids), k=1)
    b, o = base[iu], ours[iu]
    differ = (b >= 0.3) != (o >= 0.3)
    near = np.minimum(np.abs(b[differ] - 0.3), np.abs(o[differ] - 0.3))
    print(f"7-Scenes RedKitchen, {len(ids)} real frames, {len(b)} pairs")
    print(f"  baseline (published: npz float64, open3d, per-point KD-tree in Python): "
          f"{t_base:8.2f} s, {int((b >= 0.3).sum())} pairs >= 0.3")
    print(f"  ours (fragment store, pruned vectorised overlap):                        "
          f"{t_ours:8.2f} s, {int((o >= 0.3).sum())} pairs >= 0.3")
    print(f"  ratio baseline / ours: {t_base / t_ours:.1f}x")
    print(f"  pairs that differ: {int(differ.sum())}"
          + (f" (all within {near.max():.4f} of 0.3)" if differ.any() else ""))
    print(f"  largest |overlap difference|: {np.abs(b - o).max():.2e}")
    print(f"  ours: {res.n_candidates}/{res.n_pairs} candidate pairs, "
          f"{res.n_sure:,} points matched by the cell test, {res.n_kdtree_queries:,} KD queries")


def synthetic_large_scene(n_rooms: int = 5, views_per_room: int = 60) -> None:
    from data_prep.scannet.overlap import overlap_matrix
    from data_prep.synthetic import generate_scene

    with workdir() as tmp:
        tmp = Path(tmp)
        clouds = []
        t0 = time.perf_counter()
        for r in range(n_rooms):
            # a view every 6 degrees: views as far apart as ScanNet's frames 25 apart
            raw = generate_scene(tmp / "raw", f"room{r}", seed=100 + r, n_frames=views_per_room,
                                 image_size=(640, 480), deg_per_frame=6.0)
            scene = prepare(raw, tmp / "out")
            clouds += our_clouds(scene, shift=np.array([30.0 * r, 0.0, 0.0]))  # rooms apart
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = overlap_matrix(clouds)
        t_ours = time.perf_counter() - t0
    kept = int((res.overlap[np.triu_indices(len(clouds), 1)] >= 0.3).sum())
    print(f"synthetic scene, {len(clouds)} views ({n_rooms} rooms; generated and prepped in "
          f"{t_gen:.0f} s, not timed)")
    print(f"  ours: {t_ours:.2f} s for {res.n_pairs:,} pairs; {res.n_pairs - res.n_candidates:,} "
          f"pruned cheaply ({100 * (1 - res.n_candidates / res.n_pairs):.1f}%), "
          f"{res.n_candidates:,} candidates, {kept:,} pairs >= 0.3")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=100, help="real frames to use (all: 100)")
    p.add_argument("--skip-synthetic", action="store_true")
    args = p.parse_args()
    real_comparison(args.frames)
    if not args.skip_synthetic:
        synthetic_large_scene()
    return 0


if __name__ == "__main__":
    sys.exit(main())
