"""The camera path of a synthetic ScanNet scan: a smooth handheld-like loop around a room."""
from __future__ import annotations

import numpy as np

from data_prep.synthetic.room import Room


def _look(position: np.ndarray, yaw: np.ndarray, pitch: np.ndarray, roll: np.ndarray
          ) -> np.ndarray:
    """(n, 4, 4) camera-to-world poses (x right, y down, z forward; world z up)."""
    n = len(position)
    fwd = np.stack([np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw), np.sin(pitch)], 1)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right, axis=1, keepdims=True)
    down = np.cross(fwd, right)
    c, s = np.cos(roll)[:, None], np.sin(roll)[:, None]  # roll about the optical axis
    right, down = c * right + s * down, c * down - s * right
    pose = np.tile(np.eye(4), (n, 1, 1))
    pose[:, :3, 0], pose[:, :3, 1], pose[:, :3, 2], pose[:, :3, 3] = right, down, fwd, position
    return pose


def _box_distance(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(n, K) Euclidean distance from ``points`` (n, 3) to axis-aligned ``boxes`` (K, 2, 3)."""
    lo, hi = boxes[None, :, 0], boxes[None, :, 1]  # (1, K, 3)
    p = points[:, None]  # (n, 1, 3)
    return np.linalg.norm(np.maximum(np.maximum(lo - p, p - hi), 0), axis=2)


def camera_trajectory(room: Room, n_frames: int, seed: int, *, deg_per_frame: float = 1.0,
                      clearance: float = 0.4, attempts: int = 64) -> np.ndarray:
    """A smooth handheld-like scan: (n_frames, 4, 4) float64 camera-to-world poses.

    The camera walks an ellipse around (near) the room centre, half-way to the walls, at
    1.25-1.55 m, looking inward across the room at the furniture and the far walls (with a
    slow +-20 degree yaw sway, 22-36 degrees of downward pitch and a little roll). It advances
    ``deg_per_frame`` degrees per frame: at 1.0 a loop takes 360 frames (12 s at 30 fps) and
    frames 25 apart share most of their surfaces (overlap ratio about 0.4-0.8). Paths are
    drawn from ``seed`` until every camera is at least ``clearance`` metres from every box
    (walls, floor, furniture) and below the wall tops; the clearest path is used if none is
    that clear, an error raised if it comes closer than 0.15 m.
    """
    if n_frames <= 0:
        raise ValueError(f"n_frames must be positive, got {n_frames}")
    rng = np.random.default_rng([seed, 1])
    i = np.arange(n_frames, dtype=np.float64)
    best, best_clear = None, -np.inf
    for attempt in range(attempts):
        shrink = 1.0 - 0.6 * attempt / max(attempts - 1, 1)  # later attempts: smaller loops
        centre = room.size[:2] * (0.5 + rng.uniform(-0.12, 0.12, 2))
        radii = room.size[:2] * rng.uniform(0.2, 0.32, 2) * shrink
        phase, direction = rng.uniform(0, 2 * np.pi), rng.choice([-1.0, 1.0])
        wobble = rng.uniform(0, 2 * np.pi, 5)  # phases of the slow oscillations
        height = rng.uniform(1.3, 1.5)
        phi = phase + direction * np.deg2rad(deg_per_frame) * i  # (n,) angle on the loop
        r = 1 + 0.08 * np.sin(2 * np.pi * i / 170 + wobble[0])
        pos = np.stack([centre[0] + radii[0] * r * np.cos(phi),
                        centre[1] + radii[1] * r * np.sin(phi),
                        height + 0.05 * np.sin(2 * np.pi * i / 130 + wobble[1])], 1)  # (n, 3)
        yaw = phi + np.pi + np.deg2rad(20) * np.sin(2 * np.pi * i / 200 + wobble[2])
        pitch = -np.deg2rad(29 + 7 * np.sin(2 * np.pi * i / 150 + wobble[3]))
        roll = np.deg2rad(2) * np.sin(2 * np.pi * i / 110 + wobble[4])
        clear = min(_box_distance(pos, room.boxes).min(), (room.size[2] - pos[:, 2]).min())
        if clear > best_clear:
            best, best_clear = (pos, yaw, pitch, roll), clear
        if clear >= clearance:
            break
    if best_clear < 0.15:
        raise RuntimeError(f"no camera path with 0.15 m clearance in room of size {room.size} "
                           f"after {attempts} attempts (best {best_clear:.3f} m)")
    return _look(*best)
