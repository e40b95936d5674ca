"""Synthetic Synthia4D-format frames: street scenes as the Minkowski release stores them.

``generate_synthia_frames(out_dir, ...)`` writes, per sequence and frame::

    out_dir/<SEQUENCE>/point_clouds/<frame:06d>.ply        the frame
    out_dir/<SEQUENCE>/point_clouds/<frame:06d>_label.ply  a label-coloured copy (the release
                                                           has one per frame; prep skips it)

A frame is a binary little-endian PLY whose vertex has ``x y z`` float (centimetres, the
release's frame: x right, y up, z backward, camera at the origin), ``r g b`` uchar and the
Synthia class id ``l`` uchar. The scene: a road with lane markings, sidewalks, building
facades, fences, poles with traffic signs and lights, vegetation, cars, pedestrians and
bicycles, plus void, sky and reserved-id points (which the benchmark ignores). Regions are
axis-aligned boxes sampled uniformly; cars and pedestrians move along z from frame to frame.
Everything is a pure function of the arguments; files are written atomically.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from mink_ssl.io import atomic_path

# Synthia's class ids and label colours (the dataset's table)
SYNTHIA_CLASSES = {0: ("void", (0, 0, 0)), 1: ("sky", (128, 128, 128)),
                   2: ("building", (128, 0, 0)), 3: ("road", (128, 64, 128)),
                   4: ("sidewalk", (0, 0, 192)), 5: ("fence", (64, 64, 128)),
                   6: ("vegetation", (128, 128, 0)), 7: ("pole", (192, 192, 128)),
                   8: ("car", (64, 0, 128)), 9: ("traffic sign", (192, 128, 128)),
                   10: ("pedestrian", (64, 64, 0)), 11: ("bicycle", (0, 128, 192)),
                   12: ("lanemarking", (0, 172, 0)), 13: ("reserved", (0, 0, 0)),
                   14: ("reserved", (0, 0, 0)), 15: ("traffic light", (0, 128, 128))}
SURFACE_COLORS = {0: (20, 20, 20), 1: (150, 180, 230), 2: (170, 150, 130), 3: (80, 80, 85),
                  4: (150, 150, 145), 5: (110, 100, 80), 6: (60, 120, 50), 7: (120, 120, 120),
                  8: (30, 60, 150), 9: (220, 200, 40), 10: (200, 120, 90), 11: (40, 40, 40),
                  12: (235, 235, 235), 13: (90, 30, 30), 14: (30, 90, 30), 15: (30, 30, 30)}


@dataclass
class SynthiaTruth:
    root: Path
    # frame name "<SEQUENCE>/<frame:06d>" -> (xyz (N, 3) float32 cm as written, rgb (N, 3) uint8,
    # Synthia id (N,) uint8)
    frames: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)


def _regions(frame: int, rng: np.random.Generator) -> list[tuple[int, tuple, tuple, float]]:
    """(Synthia id, box lo, box hi, weight) of the scene at ``frame`` (centimetres)."""
    y0 = -160.0  # road surface below the camera
    regs = [(3, (-700, y0 - 2, -4000), (700, y0, -200), 10.0),
            (4, (-1100, y0 + 15, -4000), (-700, y0 + 17, -200), 3.0),
            (4, (700, y0 + 15, -4000), (1100, y0 + 17, -200), 3.0),
            (2, (-1210, y0, -4000), (-1200, 1500, -200), 8.0),
            (2, (1200, y0, -4000), (1210, 1500, -200), 8.0),
            (5, (-1050, y0 + 17, -3000), (-1045, y0 + 117, -500), 1.0),
            (1, (-3000, 3000, -6000), (3000, 3010, 0), 1.0),
            (0, (-1500, y0, -4500), (1500, 1500, -100), 0.3),
            (13, (-200, y0, -900), (200, y0 + 50, -800), 0.1)]
    for k, z in enumerate((-800, -1800, -2800)):  # lane-marking dashes
        regs.append((12, (-20, y0, z - 300), (20, y0 + 1, z), 0.5))
    for side in (-1, 1):  # poles with a sign (left) or a light (right) on top
        x = side * 800
        for z in (-1000, -2500):
            regs.append((7, (x - 8, y0 + 17, z - 8), (x + 8, y0 + 500, z + 8), 0.6))
            cls = 9 if side < 0 else 15
            regs.append((cls, (x - 40, y0 + 500, z - 5), (x + 40, y0 + 560, z + 5), 0.3))
    for _ in range(3):  # vegetation beside the sidewalks
        x = rng.choice([-1, 1]) * rng.uniform(750, 1050)
        z = rng.uniform(-3800, -400)
        regs.append((6, (x - 100, y0 + 17, z - 100), (x + 100, y0 + 300, z + 100), 1.5))
    shift = 150.0 * frame  # moving objects
    for lane, z in ((-350, -1500), (350, -2600)):
        zc = z + (shift if lane < 0 else -shift)
        regs.append((8, (lane - 90, y0, zc - 220), (lane + 90, y0 + 150, zc + 220), 2.0))
    regs.append((10, (850, y0 + 17, -1200 - shift / 3), (900, y0 + 190, -1160 - shift / 3), 0.4))
    regs.append((11, (600, y0, -2000), (640, y0 + 100, -1830), 0.3))
    return regs


def _frame(frame: int, n_points: int, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    regs = _regions(frame, rng)
    w = np.array([r[3] for r in regs])
    per = rng.multinomial(n_points, w / w.sum())  # points per region
    per = np.maximum(per, 5)
    lo = np.array([r[1] for r in regs], dtype=np.float64)  # (R, 3)
    hi = np.array([r[2] for r in regs], dtype=np.float64)
    ids = np.array([r[0] for r in regs], dtype=np.uint8)
    r = np.repeat(np.arange(len(regs)), per)  # (N,) region of each point
    xyz = rng.uniform(lo[r], hi[r]).astype(np.float32)  # (N, 3) cm
    base = np.array([SURFACE_COLORS[int(i)] for i in ids], dtype=np.float64)[r]
    rgb = np.clip(np.round(base + rng.normal(0, 10, base.shape)), 0, 255).astype(np.uint8)
    perm = rng.permutation(len(r))  # the release's points are not grouped by class
    return xyz[perm], rgb[perm], ids[r][perm]


def write_frame_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray, label: np.ndarray) -> None:
    """Binary little-endian PLY, vertex x y z float, r g b uchar, l uchar (atomic)."""
    from plyfile import PlyData, PlyElement

    v = np.empty(len(xyz), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"),
                                  ("g", "u1"), ("b", "u1"), ("l", "u1")])
    v["x"], v["y"], v["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    v["r"], v["g"], v["b"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    v["l"] = label
    with atomic_path(path) as tmp:
        PlyData([PlyElement.describe(v, "vertex")], byte_order="<").write(str(tmp))


def generate_synthia_frames(out_dir: str | os.PathLike,
                            sequences: Sequence[str] = ("SYNTHIA-SEQS-01-DAWN",
                                                        "SYNTHIA-SEQS-05-FOG",
                                                        "SYNTHIA-SEQS-06-SUNSET"),
                            frames_per_sequence: int = 2, points_per_frame: int = 3000,
                            seed: int = 0) -> SynthiaTruth:
    """Write ``frames_per_sequence`` frames of each sequence under ``out_dir`` (the ``--raw``
    folder of ``mink-ssl-prep synthia``) and return what they hold."""
    if frames_per_sequence < 1 or points_per_frame < 100:
        raise ValueError(f"need frames_per_sequence >= 1 and points_per_frame >= 100, got "
                         f"{frames_per_sequence}, {points_per_frame}")
    truth = SynthiaTruth(root=Path(out_dir))
    palette = np.array([SYNTHIA_CLASSES[i][1] for i in range(16)], dtype=np.uint8)
    for s, seq in enumerate(sequences):
        for f in range(frames_per_sequence):
            rng = np.random.default_rng([seed, s, f])
            xyz, rgb, ids = _frame(f, points_per_frame, rng)
            pc = Path(out_dir) / seq / "point_clouds"
            write_frame_ply(pc / f"{f:06d}.ply", xyz, rgb, ids)
            write_frame_ply(pc / f"{f:06d}_label.ply", xyz, palette[ids], ids)
            truth.frames[f"{seq}/{f:06d}"] = (xyz, rgb, ids)
    return truth
