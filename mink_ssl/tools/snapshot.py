"""Point clouds to files without a display: binary PLY (vertices, optional edges) and PNG
snapshots from a small software renderer (numpy z-buffer + Pillow), so they work without a
display, EGL or a GPU. Used by :mod:`mink_ssl.tools.viz`.

PLY files are binary little-endian with a ``vertex`` element (x, y, z float32; red, green,
blue uint8) and, optionally, an ``edge`` element (vertex1, vertex2 int32; red, green, blue
uint8): ``open3d.io.read_point_cloud`` reads the points, ``open3d.io.read_line_set`` the lines.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mink_ssl.io import atomic_path


def write_ply(path: str | os.PathLike, points: np.ndarray, colors: np.ndarray,
              edges: np.ndarray | None = None, edge_colors: np.ndarray | None = None) -> Path:
    """Write points (N, 3) with colours (N, 3) uint8 and optional edges (E, 2) vertex indices
    with colours (E, 3) uint8 as a binary PLY, atomically."""
    points = np.asarray(points, np.float32).reshape(-1, 3)
    colors = np.asarray(colors).reshape(-1, 3)
    if len(colors) != len(points):
        raise ValueError(f"{len(points)} points but {len(colors)} colours")
    vertex = np.empty(len(points), [("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                    ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    vertex["x"], vertex["y"], vertex["z"] = points.T
    vertex["red"], vertex["green"], vertex["blue"] = np.clip(colors, 0, 255).astype(np.uint8).T
    header = ["ply", "format binary_little_endian 1.0", "comment written by mink_ssl.tools.viz",
              f"element vertex {len(points)}", "property float x", "property float y",
              "property float z", "property uchar red", "property uchar green",
              "property uchar blue"]
    edge = None
    if edges is not None:
        edges = np.asarray(edges, np.int64).reshape(-1, 2)
        if len(edges) and (edges.min() < 0 or edges.max() >= len(points)):
            raise ValueError(f"edge vertex indices must be in [0, {len(points)}), got "
                             f"[{edges.min()}, {edges.max()}]")
        ec = (np.full((len(edges), 3), 255, np.uint8) if edge_colors is None
              else np.asarray(edge_colors).reshape(-1, 3))
        if len(ec) != len(edges):
            raise ValueError(f"{len(edges)} edges but {len(ec)} edge colours")
        edge = np.empty(len(edges), [("vertex1", "<i4"), ("vertex2", "<i4"),
                                     ("red", "u1"), ("green", "u1"), ("blue", "u1")])
        edge["vertex1"], edge["vertex2"] = edges.T
        edge["red"], edge["green"], edge["blue"] = np.clip(ec, 0, 255).astype(np.uint8).T
        header += [f"element edge {len(edges)}", "property int vertex1", "property int vertex2",
                   "property uchar red", "property uchar green", "property uchar blue"]
    header.append("end_header")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(("\n".join(header) + "\n").encode("ascii"))
            f.write(vertex.tobytes())
            if edge is not None:
                f.write(edge.tobytes())
    return Path(path)


def save_png(image, path: str | os.PathLike) -> Path:
    """Save a PIL image as PNG, atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


@dataclass
class Camera:
    """A pinhole camera. ``rotation`` rows are the camera's right, up and forward (viewing)
    axes in world coordinates; pixel u grows right, v grows down."""

    eye: np.ndarray  # (3,) world position
    rotation: np.ndarray  # (3, 3) rows: right, up, forward
    focal: float  # pixels
    center: tuple[float, float]  # principal point (u, v), pixels
    size: tuple[int, int]  # (width, height)

    @classmethod
    def look_at(cls, eye: Sequence[float], target: Sequence[float],
                up: Sequence[float] = (0.0, 0.0, 1.0), fov_deg: float = 60.0,
                size: tuple[int, int] = (800, 600)) -> "Camera":
        eye, target = np.asarray(eye, np.float64), np.asarray(target, np.float64)
        forward = target - eye
        if np.linalg.norm(forward) == 0:
            raise ValueError("camera eye and target coincide")
        forward /= np.linalg.norm(forward)
        right = np.cross(forward, np.asarray(up, np.float64))
        if np.linalg.norm(right) < 1e-9:  # looking along `up`: any right axis will do
            right = np.cross(forward, [0.0, 1.0, 0.0] if abs(forward[1]) < 0.9 else [1.0, 0, 0])
        right /= np.linalg.norm(right)
        cam_up = np.cross(right, forward)
        W, H = size
        focal = 0.5 * W / np.tan(np.deg2rad(fov_deg) / 2)
        return cls(eye, np.stack([right, cam_up, forward]), float(focal), (W / 2, H / 2),
                   (int(W), int(H)))

    @classmethod
    def fit(cls, points: np.ndarray, size: tuple[int, int] = (800, 600),
            elevation_deg: float = 45.0, azimuth_deg: float = -90.0,
            margin: float = 0.04) -> "Camera":
        """A camera looking down at ``elevation_deg`` onto the bounding box of ``points``
        (azimuth -90: from -y, so world x runs left to right), zoomed so they fill the image."""
        pts = np.asarray(points, np.float64).reshape(-1, 3)
        if len(pts) == 0:
            raise ValueError("cannot fit a camera to an empty point cloud")
        lo, hi = pts.min(0), pts.max(0)
        centre, radius = (lo + hi) / 2, max(np.linalg.norm(hi - lo) / 2, 1e-6)
        el, az = np.deg2rad(elevation_deg), np.deg2rad(azimuth_deg)
        direction = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
        cam = cls.look_at(centre + 3.0 * radius * direction, centre, size=size)
        cam_pts = (pts - cam.eye) @ cam.rotation.T  # (N, 3) right, up, depth (> 0)
        a, b = cam_pts[:, 0] / cam_pts[:, 2], cam_pts[:, 1] / cam_pts[:, 2]  # (N,) image plane
        W, H = size
        span_a, span_b = max(np.ptp(a), 1e-9), max(np.ptp(b), 1e-9)
        cam.focal = float(min(W * (1 - 2 * margin) / span_a, H * (1 - 2 * margin) / span_b))
        cam.center = (W / 2 - cam.focal * (a.min() + a.max()) / 2,
                      H / 2 + cam.focal * (b.min() + b.max()) / 2)
        return cam

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World points (N, 3) -> pixel u (N,), v (N,) float and depth (N,) along the view axis
        (<= 0: behind the camera)."""
        cam_pts = (np.asarray(points, np.float64).reshape(-1, 3) - self.eye) @ self.rotation.T
        depth = cam_pts[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = self.center[0] + self.focal * cam_pts[:, 0] / depth
            v = self.center[1] - self.focal * cam_pts[:, 1] / depth
        return u, v, depth


def auto_point_size(camera: Camera, points: np.ndarray, voxel_size: float,
                    max_size: int = 6) -> int:
    """Splat size (pixels) that roughly covers one voxel at the cloud's median depth."""
    _, _, depth = camera.project(points)
    depth = depth[depth > 0]
    if not len(depth):
        return 1
    return int(np.clip(np.ceil(camera.focal * voxel_size / np.median(depth)), 1, max_size))


def draw_points(points: np.ndarray, colors: np.ndarray, *, camera: Camera | None = None,
                  lines: np.ndarray | None = None, line_colors: np.ndarray | None = None,
                  size: tuple[int, int] = (800, 600), point_size: int = 2,
                  background: Sequence[int] = (255, 255, 255), shade: float = 0.0,
                  line_width: int = 1, line_alpha: float = 1.0):
    """Render coloured points with a z-buffer (nearest point wins each pixel) to a PIL image.

    Args:
        points: (N, 3) world coordinates; colors: (N, 3) uint8.
        camera: default :meth:`Camera.fit` to the points (and line endpoints) at 45 degrees.
        lines: optional (L, 2, 3) segments in world coordinates, drawn over the points.
        line_colors: (L, 3) uint8 (default black).
        point_size: splat edge in pixels.
        shade: darken by up to this fraction with depth (0: exact colours).
        line_alpha: opacity of the lines (1: opaque).
    """
    from PIL import Image, ImageDraw

    pts = np.asarray(points, np.float64).reshape(-1, 3)
    cols = np.asarray(colors).reshape(-1, 3).astype(np.float32)
    if len(cols) != len(pts):
        raise ValueError(f"{len(pts)} points but {len(cols)} colours")
    if point_size < 1:
        raise ValueError(f"point_size must be >= 1, got {point_size}")
    segs = None if lines is None else np.asarray(lines, np.float64).reshape(-1, 2, 3)
    if camera is None:
        ends = [] if segs is None else [segs.reshape(-1, 3)]  # (2L, 3) line endpoints
        camera = Camera.fit(np.concatenate([pts, *ends]), size)
    W, H = camera.size
    image = np.empty((H, W, 3), np.uint8)
    image[:] = np.asarray(background, np.uint8)

    u, v, depth = camera.project(pts)
    front = depth > 1e-9
    u, v, depth, cols = u[front], v[front], depth[front], cols[front]
    if len(depth) and shade > 0:  # nearer points brighter
        rel = (depth - depth.min()) / max(np.ptp(depth), 1e-12)  # (n,) in [0, 1]
        cols = cols * (1.0 - shade * rel)[:, None]
    offs = np.arange(point_size) - (point_size - 1) // 2  # splat offsets, e.g. [0, 1] for 2 px
    du, dv = (o.reshape(-1) for o in np.meshgrid(offs, offs))  # (S,) with S = point_size**2
    pu = (np.floor(u)[:, None] + du[None]).reshape(-1).astype(np.int64)  # (n * S,)
    pv = (np.floor(v)[:, None] + dv[None]).reshape(-1).astype(np.int64)
    pdepth = np.repeat(depth, len(du))  # (n * S,)
    src = np.repeat(np.arange(len(depth)), len(du))  # (n * S,) point of each splat pixel
    inside = (pu >= 0) & (pu < W) & (pv >= 0) & (pv < H)
    key, pdepth, src = (pv * W + pu)[inside], pdepth[inside], src[inside]
    order = np.lexsort((pdepth, key))  # by pixel, then nearest first
    key, src = key[order], src[order]
    first = np.ones(len(key), bool)
    first[1:] = key[1:] != key[:-1]  # the nearest splat of each pixel
    image.reshape(-1, 3)[key[first]] = np.clip(np.rint(cols[src[first]]), 0, 255).astype(np.uint8)

    img = Image.fromarray(image, "RGB")
    if segs is not None and len(segs):
        lc = (np.zeros((len(segs), 3), np.uint8) if line_colors is None
              else np.asarray(line_colors, np.uint8).reshape(-1, 3))
        su, sv, sd = camera.project(segs.reshape(-1, 3))
        su, sv, sd = su.reshape(-1, 2), sv.reshape(-1, 2), sd.reshape(-1, 2)
        overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(overlay)
        alpha = int(round(255 * min(max(line_alpha, 0.0), 1.0)))
        for k in np.flatnonzero((sd > 1e-9).all(1)):  # one call per segment (at most a few 100)
            draw.line([(su[k, 0], sv[k, 0]), (su[k, 1], sv[k, 1])],
                      fill=(*(int(c) for c in lc[k]), alpha), width=line_width)
        img = Image.alpha_composite(img.convert("RGBA"), overlay).convert("RGB")
    return img


def distinct_colors(n: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """(n, 3) uint8 bright colours of random hue (HSV with s = 0.9, v = 0.95)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    h = rng.uniform(0, 6, n)[:, None]  # (n, 1) hue in hue sectors
    k = (np.array([5.0, 3.0, 1.0])[None] + h) % 6  # (n, 3) per channel: R, G, B
    rgb = 0.95 * (1 - 0.9 * np.clip(np.minimum(k, 4 - k), 0, 1))  # HSV -> RGB, s 0.9, v 0.95
    return np.rint(rgb * 255).astype(np.uint8)
