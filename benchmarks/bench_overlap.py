"""Overlap of all fragment pairs: the published algorithm vs ours, in the same run.

On the 100 real frames of 7-Scenes RedKitchen (../shared/realdata; all 4,950 pairs, 64% of them
overlapping: the worst case for pruning), each method starts from its own stored fragments:

- baseline, as published: float64 ``(N, 7)`` npz fragments, open3d 5 cm ``voxel_down_sample``,
  a KD-tree per fragment and a Python loop of ``search_radius_vector_3d(point, 7.5 cm)`` over
  every point of every other fragment, overlap = max of the two directions;
- ours: the fragment store (zlib depth + JPEG colour), back-projected at load time,
  ``voxel_downsample`` and the pruned ``overlap_matrix``.

It prints the time of each and their ratio (target: 30x or more), the pairs >= 0.3 of each,
the pairs that differ and the largest difference of overlap values, and the time of our
self-check (32 sampled pairs against the brute-force definition, run by prep on every scene).
The baseline runs once (minutes); ours is timed over --repeats runs (median and spread).

Then ours alone on a ScanNet-size synthetic scene: about 200 fragments spanning over 100 m
(rendered rooms side by side, 65.5 m sentinel outliers in every 10th view): wall time, peak
RSS, pairs pruned cheaply and the self-check time (target: under 30 s and 2 GB on 2 cores).
``--rooms`` shrinks that scene (50 fragments a room; the target is for the default 4 rooms).

    .venv/bin/python benchmarks/bench_overlap.py [--frames 100] [--repeats 3] [--rooms 4]
                                                 [--skip-real] [--skip-synthetic]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
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
    from data_prep.pairs.overlap import voxel_downsample
    from mink_ssl.formats.fragments import FragmentStore

    store = FragmentStore(scene)
    frames = store.frames.tolist() if frames is None else frames
    clouds = [voxel_downsample(store.by_frame(f, color=False).points()[0]) for f in frames]
    return clouds if shift is None else [c + shift for c in clouds]


def real_comparison(n_frames: int, repeats: int) -> None:
    from data_prep.pairs.overlap import overlap_matrix, verify_overlap

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
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = overlap_matrix(our_clouds(scene, ids))
            runs.append(time.perf_counter() - t0)
        clouds = our_clouds(scene, ids)
        t0 = time.perf_counter()
        check = verify_overlap(clouds, res, 32)
        t_check = time.perf_counter() - t0
    t_ours = statistics.median(runs)
    spread = max(runs) - min(runs)

    ours = res.overlap
    iu = np.triu_indices(len(ids), k=1)
    b, o = base[iu], ours[iu]
    differ = (b >= 0.3) != (o >= 0.3)
    near = np.minimum(np.abs(b[differ] - 0.3), np.abs(o[differ] - 0.3))
    print(f"7-Scenes RedKitchen, {len(ids)} real frames, {len(b)} pairs")
    print(f"  baseline (published: npz float64, open3d, per-point KD-tree in Python): "
          f"{t_base:8.2f} s, {int((b >= 0.3).sum())} pairs >= 0.3")
    print(f"  ours (fragment store, pruned vectorised overlap):                        "
          f"{t_ours:8.2f} s, {int((o >= 0.3).sum())} pairs >= 0.3 (median of {len(runs)}, "
          f"range {spread:.2f} s)")
    print(f"  ratio baseline / ours: {t_base / t_ours:.1f}x (over ours' range: "
          f"{t_base / max(runs):.1f}x to {t_base / min(runs):.1f}x; target 30x)")
    print(f"  self-check: {check.pairs_checked} pairs against the definition in {t_check:.2f} s "
          f"({100 * t_check / t_ours:.1f}% of ours), max |diff| {check.max_abs_diff:.1e}")
    print(f"  pairs that differ: {int(differ.sum())}"
          + (f" (all within {near.max():.4f} of 0.3)" if differ.any() else ""))
    print(f"  largest |overlap difference|: {np.abs(b - o).max():.2e}")
    print(f"  ours: {res.n_candidates}/{res.n_pairs} candidate pairs, "
          f"{res.n_sure:,} points matched by the cell test, {res.n_kdtree_queries:,} KD queries")


def scannet_size_scene(n_rooms: int = 4, views_per_room: int = 50, outliers_every: int = 10
                       ) -> None:
    """About 200 fragments, as a median ScanNet scan (about 2,000 frames, every 25th kept):
    rendered rooms side by side, and in every ``outliers_every``-th view a few points at 65.5 m
    along its rays (the invalid-depth sentinel the published pipeline back-projects), so the
    scene spans over 100 m: the extent at which int32 cell arithmetic once dropped pairs. Ours
    alone, in a child process so that its peak RSS is its own."""
    from data_prep.synthetic import generate_scene

    with workdir() as tmp:
        tmp = Path(tmp)
        clouds = []
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        for r in range(n_rooms):
            # a view every 6 degrees: views as far apart as ScanNet's frames 25 apart
            raw = generate_scene(tmp / "raw", f"room{r}", seed=100 + r, n_frames=views_per_room,
                                 image_size=(640, 480), deg_per_frame=6.0)
            scene = prepare(raw, tmp / "out")
            clouds += our_clouds(scene, shift=np.array([30.0 * r, 0.0, 0.0]))  # rooms apart
        for i in range(0, len(clouds), outliers_every):
            centre = clouds[i].mean(axis=0)
            rays = rng.normal(size=(20, 3))
            clouds[i] = np.concatenate(
                [clouds[i], centre + 65.5 * rays / np.linalg.norm(rays, axis=1, keepdims=True)])
        t_gen = time.perf_counter() - t0
        path = tmp / "clouds.npz"
        np.savez(path, *clouds)
        out = subprocess.run([sys.executable, __file__, "--child", str(path)],
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the overlap child process failed (exit {out.returncode}):\n"
                         f"{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    span = " x ".join(f"{x:.0f}" for x in r["span"])
    name = "ScanNet-size synthetic scene" if n_rooms == 4 else "Synthetic scene"
    print(f"{name}: {r['fragments']} fragments, {r['points']:,} points at 5 cm, spanning "
          f"{span} m ({n_rooms} rendered rooms, outliers at 65.5 m in every {outliers_every}th "
          f"view; generated and prepped in {t_gen:.0f} s, not timed)")
    print(f"  ours: overlap {r['overlap_s']:.2f} s + self-check {r['check_s']:.2f} s "
          f"({r['checked']} pairs, max |diff| {r['max_diff']:.1e}) = {r['total_s']:.2f} s wall; "
          f"peak RSS {r['rss_mb']:.0f} MB")
    print(f"  pairs: {r['pairs']:,}; {r['pairs'] - r['candidates']:,} pruned cheaply "
          f"({100 * (1 - r['candidates'] / r['pairs']):.1f}%), {r['candidates']:,} candidates, "
          f"{r['kept']:,} pairs >= 0.3")
    met = "met" if r["total_s"] < 30 and r["rss_mb"] < 2048 else "NOT met"
    print(f"  target: under 30 s and 2 GB on 2 cores: {met}"
          + ("" if n_rooms == 4 else f" (the target is for 4 rooms, this scene has {n_rooms})"))


def child(path: str) -> None:
    """Overlap and self-check of the clouds in ``path``; one JSON line with times and peak RSS."""
    import resource

    from data_prep.pairs.overlap import overlap_matrix, verify_overlap

    with np.load(path) as z:
        clouds = [z[k] for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))]
    t0 = time.perf_counter()
    res = overlap_matrix(clouds)
    t1 = time.perf_counter()
    check = verify_overlap(clouds, res, 32)
    t2 = time.perf_counter()
    pts = np.concatenate(clouds)
    print(json.dumps({
        "fragments": len(clouds), "points": len(pts), "span": np.ptp(pts, axis=0).tolist(),
        "overlap_s": t1 - t0, "check_s": t2 - t1, "total_s": t2 - t0,
        "checked": check.pairs_checked, "max_diff": check.max_abs_diff,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "pairs": res.n_pairs, "candidates": res.n_candidates,
        "kept": int((res.overlap[np.triu_indices(len(clouds), 1)] >= 0.3).sum())}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=100, help="real frames to use (all: 100)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of ours (default 3)")
    p.add_argument("--rooms", type=int, default=4, help="rendered rooms of the synthetic "
                   "scene, 50 fragments each (default 4: ScanNet size)")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child)
        return 0
    if not 2 <= args.frames <= 100:
        p.error(f"--frames must be in [2, 100] (the real scene has 100 frames), got {args.frames}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.rooms < 1:
        p.error(f"--rooms must be >= 1, got {args.rooms}")
    if not args.skip_real:
        real_comparison(args.frames, args.repeats)
    if not args.skip_synthetic:
        scannet_size_scene(args.rooms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
