"""Inspection: pairs and correspondences, and what a backbone learned, as PLY files and PNGs.

Two products, each a coloured PLY (MeshLab, CloudCompare, Open3D) and a headless snapshot:

- :func:`visualize_pair`: both views of a :class:`~mink_ssl.data.pairs.PairDataset` pair as
  the network sees them (voxel centres after each view's random transform), view 1 shifted
  sideways, plus line segments for a random subset of the correspondences;
- :func:`visualize_features`: a fragment's voxels coloured by the first three principal
  components of the backbone's output features (and the same voxels in their RGB beside it).

Snapshots come from a small software renderer (:func:`render_points`: numpy z-buffer + Pillow),
so they work without a display, EGL or a GPU.

PLY files are binary little-endian with a ``vertex`` element (x, y, z float32; red, green,
blue uint8) and, for pairs, an ``edge`` element (vertex1, vertex2 int32; red, green, blue
uint8): ``open3d.io.read_point_cloud`` reads the points, ``open3d.io.read_line_set`` the lines.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mink_ssl.data.features import input_features

VIEW_TINTS = np.array([[255, 140, 0], [0, 120, 255]], np.float32)  # view 0 orange, view 1 blue


# --------------------------------------------------------------------------------------- PLY

def write_ply(path: str | os.PathLike, points: np.ndarray, colors: np.ndarray,
              edges: np.ndarray | None = None, edge_colors: np.ndarray | None = None) -> Path:
    """Write points (N, 3) with colours (N, 3) uint8 and optional edges (E, 2) vertex indices
    with colours (E, 3) uint8 as a binary PLY, atomically."""
    from mink_ssl.io import atomic_path

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
    from mink_ssl.io import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


# ---------------------------------------------------------------------------------- renderer

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


def render_points(points: np.ndarray, colors: np.ndarray, *, camera: Camera | None = None,
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


# ------------------------------------------------------------------------------------- pairs

@dataclass
class PairScene:
    """A pair laid out for display: view 0's voxels (rows 0..n0-1) then view 1's (shifted).

    points: (n0 + n1, 3) voxel centres in each view's network frame, view 1 shifted by ``shift``
    colors: (n0 + n1, 3) uint8
    edges:  (L, 2) int64 rows of ``points``, a random subset of the matches (view 1 offset n0)
    edge_colors: (L, 3) uint8
    n_matches: all matches of the pair (M)
    """

    points: np.ndarray
    colors: np.ndarray
    edges: np.ndarray
    edge_colors: np.ndarray
    n0: int
    n1: int
    shift: np.ndarray
    n_matches: int
    names: tuple[str, str]


def _check_data_dir(data: Path) -> None:
    if not data.is_dir():
        raise FileNotFoundError(f"data directory {data} does not exist: pass the --out "
                                "directory of `mink-ssl-prep scannet`")


def open_pairs(data: str | os.PathLike, voxel_size: float = 0.025, augment: bool = True,
               seed: int = 0):
    """The :class:`PairDataset` of ``data`` with rgb features, training's default augmentation
    (or none: rotation 0), all matches and no minimum."""
    from mink_ssl.data.pairs import PairDataset

    data = Path(data)
    _check_data_dir(data)
    if not (data / "manifest.json").is_file():
        raise FileNotFoundError(f"{data} has no manifest.json: pass the --out directory of a "
                                "completed `mink-ssl-prep scannet` run")
    return PairDataset(data, voxel_size=voxel_size, features="rgb", min_matches=0, seed=seed,
                       **({} if augment else {"rotation_deg": 0.0}))


def layout_pair(dataset, index: int, max_lines: int = 500, color: str = "rgb", epoch: int = 0,
                seed: int = 0) -> PairScene:
    """Pair ``index`` of ``dataset`` (a :class:`PairDataset`) as a :class:`PairScene`."""
    if color not in ("rgb", "tint"):
        raise ValueError(f"color must be 'rgb' or 'tint', got {color!r}")
    n = len(dataset)
    if not isinstance(index, (int, np.integer)) or not 0 <= index < n:
        raise IndexError(f"pair index {index} out of range: {dataset.root} lists {n} pairs; "
                         f"use an index in 0..{n - 1}")
    if max_lines < 0:
        raise ValueError(f"max_lines must be >= 0, got {max_lines}")
    sample = dataset[(epoch, int(index))]
    vs = dataset.voxel_size
    pts = [(v.coords.numpy().astype(np.float64) + 0.5) * vs for v in sample.views]  # (N_v, 3)
    gap = 0.1 * max(np.ptp(np.concatenate(pts), axis=0).max(), vs)
    shift = np.array([pts[0][:, 0].max() - pts[1][:, 0].min() + gap, 0.0, 0.0])
    cols = []
    for k, v in enumerate(sample.views):
        rgb = (v.feats.numpy() + 0.5) * 255.0  # (N_v, 3) back from [-0.5, 0.5]
        if color == "tint":
            gray = rgb.mean(1, keepdims=True)
            rgb = 0.55 * VIEW_TINTS[k] + 0.45 * gray
        cols.append(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    n0, n1 = len(pts[0]), len(pts[1])
    matches = sample.matches.numpy()  # (M, 2)
    rng = np.random.default_rng([seed, epoch, int(index)])
    keep = (np.sort(rng.choice(len(matches), max_lines, replace=False))
            if len(matches) > max_lines else np.arange(len(matches)))
    edges = matches[keep] + np.array([0, n0])  # (L, 2) rows of the stacked points
    return PairScene(points=np.concatenate([pts[0], pts[1] + shift]).astype(np.float32),
                     colors=np.concatenate(cols), edges=edges.astype(np.int64),
                     edge_colors=distinct_colors(len(edges), rng), n0=n0, n1=n1, shift=shift,
                     n_matches=len(matches), names=sample.names)


def visualize_pair(data: str | os.PathLike, index: int, out: str | os.PathLike, *,
                   voxel_size: float = 0.025, max_lines: int = 500, augment: bool = True,
                   color: str = "rgb", epoch: int = 0, seed: int = 0,
                   size: tuple[int, int] = (800, 600),
                   point_size: int | None = None) -> dict:
    """Write ``out/pair_<index>.ply`` (points + correspondence edges) and ``pair_<index>.png``."""
    ds = open_pairs(data, voxel_size, augment, seed)
    scene = layout_pair(ds, index, max_lines, color, epoch, seed)
    out = Path(out)
    ply = write_ply(out / f"pair_{index}.ply", scene.points, scene.colors, scene.edges,
                    scene.edge_colors)
    camera = Camera.fit(scene.points, size)
    if point_size is None:
        point_size = auto_point_size(camera, scene.points, voxel_size)
    img = render_points(scene.points, scene.colors, camera=camera,
                        lines=scene.points[scene.edges], line_colors=scene.edge_colors,
                        point_size=point_size, shade=0.3, line_alpha=0.6)
    png = save_png(img, out / f"pair_{index}.png")
    return {"ply": ply, "png": png, "names": scene.names, "voxels": (scene.n0, scene.n1),
            "matches": scene.n_matches, "lines": len(scene.edges)}


# ---------------------------------------------------------------------------------- features

def parse_fragment(name: str) -> tuple[str, int]:
    """'scene0000_00/000025' (or .../25) -> ('scene0000_00', 25)."""
    scene, _, frame = str(name).rpartition("/")
    if not scene or not frame.isdigit():
        raise ValueError(f"fragment must be 'scene/frame' like scene0000_00/000025, got {name!r}")
    return scene, int(frame)


def load_fragment(data: str | os.PathLike, fragment: str):
    """The :class:`~mink_ssl.formats.fragments.Fragment` named ``fragment`` under ``data``."""
    from mink_ssl.formats.fragments import INDEX_FILE, FragmentStore

    data = Path(data)
    _check_data_dir(data)
    scene, frame = parse_fragment(fragment)
    if not (data / scene / INDEX_FILE).is_file():
        scenes = sorted(p.parent.name for p in data.glob(f"*/{INDEX_FILE}"))
        raise KeyError(f"scene {scene!r} of fragment {fragment!r} is not in {data}; it has "
                       f"{len(scenes)} scenes: {', '.join(scenes[:10]) or 'none'}"
                       f"{' ...' if len(scenes) > 10 else ''}")
    store = FragmentStore(data / scene)
    if frame not in {int(f) for f in store.frames}:
        names = store.names()
        raise KeyError(f"fragment {fragment!r} not found: {scene} has {len(names)} fragments: "
                       f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
    return store.by_frame(frame)


def fragment_voxels(fragment, voxel_size: float = 0.025
                    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Voxelise a fragment in world coordinates: voxel coords (M, 3) int32, centres (M, 3)
    float32 metres, colours (M, 3) uint8 (each voxel's first point, as the pair dataset)."""
    from mink_ssl.sparse import quantize

    points, colors = fragment.points()
    q = quantize(points, voxel_size)
    centres = ((q.coords.numpy().astype(np.float64) + 0.5) * voxel_size).astype(np.float32)
    return q.coords, centres, colors[q.index.numpy()]


@torch.no_grad()
def backbone_features(model: torch.nn.Module, coords: torch.Tensor, feats: torch.Tensor,
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """Run ``model`` (eval mode) on one scene's voxels (M, 3) -> output features (M, C) on the
    CPU, rows in the order of ``coords``."""
    from mink_ssl.sparse import batched_coordinates, pack_keys, sparse_tensor

    model = model.to(device).eval()
    bcoords = batched_coordinates([coords])  # (M, 4)
    out = model(sparse_tensor(bcoords, feats, device=device))
    F, C = out.F.detach().float().cpu(), out.C.cpu().to(torch.int64)  # (M', C), (M', 4)
    if len(F) != len(bcoords):
        raise ValueError(f"the model returned {len(F)} rows for {len(bcoords)} voxels")
    if not torch.equal(C, bcoords.to(torch.int64)):  # realign rows to the input order
        both = torch.cat([C, bcoords.to(torch.int64)])
        lo = both.min(0).values
        ext = both.max(0).values - lo + 1
        kc, ki = pack_keys(C, lo, ext), pack_keys(bcoords, lo, ext)
        order = torch.argsort(kc)
        F = F[order[torch.searchsorted(kc[order], ki)]]
    return F


def pca_colors(features: torch.Tensor | np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)
               ) -> np.ndarray:
    """(M, C) features -> (M, 3) uint8: the first three principal components, each mapped to
    [0, 255] between its ``percentiles``. Signs are fixed (each component's largest loading is
    positive), so the colours are a deterministic function of the features."""
    F = torch.as_tensor(features).double()
    if F.ndim != 2 or len(F) == 0:
        raise ValueError(f"features must be a non-empty (M, C) array, got shape {tuple(F.shape)}")
    Fc = F - F.mean(0, keepdim=True)  # (M, C)
    _, _, Vh = torch.linalg.svd(Fc, full_matrices=False)  # (k, C) principal axes, k = min(M, C)
    Vh = Vh[:3]
    big = Vh.abs().argmax(1)  # (k,)
    Vh = Vh * torch.sign(Vh[torch.arange(len(Vh)), big])[:, None]
    comps = (Fc @ Vh.T).numpy()  # (M, k <= 3)
    lo, hi = np.percentile(comps, percentiles, axis=0)  # (k,), (k,)
    scaled = (comps - lo) / np.where(hi - lo > 1e-12, hi - lo, 1.0)
    rgb = np.full((len(F), 3), 0.5)
    rgb[:, :comps.shape[1]] = np.clip(scaled, 0.0, 1.0)
    return np.rint(rgb * 255).astype(np.uint8)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda[:i]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available: use "
                         "--device cpu (or auto)")
    return dev


def visualize_features(model: torch.nn.Module, data: str | os.PathLike, fragment: str,
                       out: str | os.PathLike, *, voxel_size: float = 0.025,
                       device: str | torch.device = "cpu", size: tuple[int, int] = (800, 600),
                       point_size: int | None = None) -> dict:
    """Write ``features_<scene>_<frame>.{ply,png}`` (voxels coloured by the PCA of the
    backbone's features) and ``rgb_<scene>_<frame>.{ply,png}`` (the same voxels in RGB, same
    camera) under ``out``."""
    frag = load_fragment(data, fragment)
    in_channels = getattr(model, "in_channels", 3)
    coords, centres, rgb = fragment_voxels(frag, voxel_size)
    feats = backbone_features(model, coords, input_features(rgb, in_channels), device)
    colors = pca_colors(feats)
    stem = frag.name.replace("/", "_")
    out = Path(out)
    camera = Camera.fit(centres, size)
    if point_size is None:
        point_size = auto_point_size(camera, centres, voxel_size)
    paths = {}
    for kind, cols in (("features", colors), ("rgb", rgb)):
        paths[f"{kind}_ply"] = write_ply(out / f"{kind}_{stem}.ply", centres, cols)
        img = render_points(centres, cols, camera=camera, point_size=point_size, shade=0.3)
        paths[f"{kind}_png"] = save_png(img, out / f"{kind}_{stem}.png")
    return {**paths, "voxels": len(centres), "channels": int(feats.shape[1]),
            "fragment": frag.name}


__all__ = ["write_ply", "save_png", "Camera", "auto_point_size", "render_points",
           "distinct_colors", "PairScene", "open_pairs", "layout_pair", "visualize_pair",
           "parse_fragment", "load_fragment", "fragment_voxels",
           "backbone_features", "pca_colors", "resolve_device", "visualize_features"]
