"""Procedural indoor rooms built from boxes, with NYU40 class ids and instance ids.

A :class:`Room` is a list of axis-aligned boxes (each a part of one object instance). It is the
layout from which point clouds are sampled here and, for ScanNet-format scenes, meshes are built.
Everything is a pure function of the seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# NYU40 ids used by ScanNet (the subset our rooms contain) and a base colour per class.
NYU40 = {"wall": 1, "floor": 2, "cabinet": 3, "bed": 4, "chair": 5, "sofa": 6, "table": 7,
         "bookshelf": 10, "desk": 14}
CLASS_COLORS = {1: (200, 200, 190), 2: (140, 110, 80), 3: (120, 90, 60), 4: (180, 60, 60),
                5: (60, 90, 160), 6: (90, 140, 90), 7: (150, 120, 70), 10: (100, 70, 50),
                14: (170, 150, 110)}


@dataclass
class Room:
    """Boxes as (K, 2, 3) min/max corners in metres, with per-box class and instance ids."""

    size: np.ndarray  # (3,) room extent x, y, z (z up), metres
    boxes: np.ndarray  # (K, 2, 3) float64 min and max corners
    labels: np.ndarray  # (K,) int64 NYU40 class id
    instances: np.ndarray  # (K,) int64 instance id (>= 1; parts of one object share it)


def _furniture(kind: str, origin: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Boxes (2, 3) of one object standing on the floor with its min corner at ``origin``."""
    o = origin
    if kind == "table" or kind == "desk":
        w, d, h = rng.uniform(0.8, 1.6), rng.uniform(0.6, 1.0), rng.uniform(0.7, 0.78)
        leg = 0.05
        parts = [np.array([[0, 0, h - 0.04], [w, d, h]])]
        for x in (0, w - leg):
            for y in (0, d - leg):
                parts.append(np.array([[x, y, 0], [x + leg, y + leg, h - 0.04]]))
    elif kind == "chair":
        w, h = rng.uniform(0.4, 0.5), rng.uniform(0.42, 0.48)
        parts = [np.array([[0, 0, h - 0.05], [w, w, h]]),
                 np.array([[0, w - 0.05, h], [w, w, h + rng.uniform(0.35, 0.5)]])]
        for x in (0, w - 0.04):
            for y in (0, w - 0.04):
                parts.append(np.array([[x, y, 0], [x + 0.04, y + 0.04, h - 0.05]]))
    elif kind == "sofa":
        w, d = rng.uniform(1.5, 2.2), rng.uniform(0.8, 1.0)
        parts = [np.array([[0, 0, 0], [w, d, 0.42]]), np.array([[0, d - 0.2, 0.42], [w, d, 0.8]]),
                 np.array([[0, 0, 0.42], [0.18, d - 0.2, 0.62]]),
                 np.array([[w - 0.18, 0, 0.42], [w, d - 0.2, 0.62]])]
    elif kind == "bed":
        w, d = rng.uniform(1.4, 1.8), rng.uniform(1.9, 2.1)
        parts = [np.array([[0, 0, 0], [w, d, 0.5]]), np.array([[0, d - 0.08, 0], [w, d, 1.0]])]
    elif kind in ("cabinet", "bookshelf"):
        w, d = rng.uniform(0.6, 1.2), rng.uniform(0.35, 0.5)
        h = rng.uniform(0.8, 1.0) if kind == "cabinet" else rng.uniform(1.6, 2.0)
        parts = [np.array([[0, 0, 0], [w, d, h]])]
    else:
        raise ValueError(f"unknown furniture kind {kind!r}; choose from {sorted(NYU40)[2:]}")
    return [p + o for p in parts]


def make_room(seed: int, n_objects: int | None = None) -> Room:
    """A random rectangular room with walls, floor and furniture; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    size = np.array([rng.uniform(4.0, 7.0), rng.uniform(4.0, 7.0), rng.uniform(2.5, 3.0)])
    t = 0.1  # wall thickness
    boxes = [np.array([[0, 0, -t], [size[0], size[1], 0]])]  # floor
    labels, instances = [NYU40["floor"]], [1]
    walls = [[[-t, 0, 0], [0, size[1], size[2]]], [[size[0], 0, 0], [size[0] + t, size[1], size[2]]],
             [[0, -t, 0], [size[0], 0, size[2]]], [[0, size[1], 0], [size[0], size[1] + t, size[2]]]]
    for w in walls:
        boxes.append(np.array(w, dtype=np.float64))
        labels.append(NYU40["wall"])
        instances.append(len(instances) + 1)
    kinds = ["table", "chair", "chair", "sofa", "bed", "cabinet", "bookshelf", "desk"]
    n = int(rng.integers(5, 10)) if n_objects is None else n_objects
    for _ in range(n):
        kind = kinds[int(rng.integers(len(kinds)))]
        origin = np.array([rng.uniform(0.1, size[0] - 2.3), rng.uniform(0.1, size[1] - 2.3), 0])
        inst = max(instances) + 1
        for part in _furniture(kind, origin, rng):
            boxes.append(part)
            labels.append(NYU40[kind])
            instances.append(inst)
    return Room(size=size, boxes=np.stack(boxes), labels=np.array(labels, dtype=np.int64),
                instances=np.array(instances, dtype=np.int64))


def sample_room_points(room: Room, n_points: int, seed: int = 0, noise: float = 0.005
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sample ``n_points`` on the box surfaces, uniformly by area.

    Returns points (N, 3) float32, colours (N, 3) uint8, labels (N,) and instances (N,) int64.
    """
    if n_points <= 0:
        raise ValueError(f"n_points must be positive, got {n_points}")
    rng = np.random.default_rng(seed)
    lo, hi = room.boxes[:, 0], room.boxes[:, 1]  # (K, 3)
    ext = hi - lo
    # face areas (K, 6): pairs of faces normal to x, y, z
    a = np.stack([ext[:, 1] * ext[:, 2], ext[:, 0] * ext[:, 2], ext[:, 0] * ext[:, 1]], axis=1)
    areas = np.repeat(a, 2, axis=1).reshape(-1)  # (K*6,)
    face = rng.choice(len(areas), size=n_points, p=areas / areas.sum())  # (N,)
    box, axis, side = face // 6, (face % 6) // 2, face % 2
    pts = lo[box] + rng.random((n_points, 3)) * ext[box]  # (N, 3) inside the box
    pts[np.arange(n_points), axis] = np.where(side == 1, hi[box, axis], lo[box, axis])
    pts += rng.normal(0, noise, pts.shape)
    labels, instances = room.labels[box], room.instances[box]
    base = np.array([CLASS_COLORS[int(c)] for c in room.labels], dtype=np.float64)[box]  # (N, 3)
    colors = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return pts.astype(np.float32), colors, labels, instances
