"""Inspection: pairs and correspondences, and what a backbone learned, as PLY files and PNGs.

Two products, each a coloured PLY (MeshLab, CloudCompare, Open3D) and a headless snapshot:

- :func:`visualize_pair`: both views of a :class:`~mink_ssl.data.pairs.PairDataset` pair as
  the network sees them (voxel centres after each view's random transform), view 1 shifted
  sideways, plus line segments for a random subset of the correspondences;
- :func:`visualize_features`: a fragment's voxels coloured by the first three principal
  components of the backbone's output features (and the same voxels in their RGB beside it).

Snapshots come from a small software renderer, so they work without a display, EGL or a GPU;
PLY files carry, for pairs, the correspondences as an ``edge`` element
(:mod:`mink_ssl.tools.snapshot`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mink_ssl.data.features import input_features
from mink_ssl.data.pairs import PairDataset
from mink_ssl.formats.fragments import INDEX_FILE, FragmentStore
from mink_ssl.sparse import batched_coordinates, pack_keys, quantize, sparse_tensor
from mink_ssl.tools.snapshot import (Camera, auto_point_size, distinct_colors, draw_points,
                                     save_png, write_ply)

VIEW_TINTS = np.array([[255, 140, 0], [0, 120, 255]], np.float32)  # view 0 orange, view 1 blue


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
    img = draw_points(scene.points, scene.colors, camera=camera,
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
    points, colors = fragment.points()
    q = quantize(points, voxel_size)
    centres = ((q.coords.numpy().astype(np.float64) + 0.5) * voxel_size).astype(np.float32)
    return q.coords, centres, colors[q.index.numpy()]


@torch.no_grad()
def backbone_features(model: torch.nn.Module, coords: torch.Tensor, feats: torch.Tensor,
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """Run ``model`` (eval mode) on one scene's voxels (M, 3) -> output features (M, C) on the
    CPU, rows in the order of ``coords``."""
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
        img = draw_points(centres, cols, camera=camera, point_size=point_size, shade=0.3)
        paths[f"{kind}_png"] = save_png(img, out / f"{kind}_{stem}.png")
    return {**paths, "voxels": len(centres), "channels": int(feats.shape[1]),
            "fragment": frag.name}


__all__ = ["write_ply", "save_png", "Camera", "auto_point_size", "draw_points",
           "distinct_colors", "PairScene", "open_pairs", "layout_pair", "visualize_pair",
           "parse_fragment", "load_fragment", "fragment_voxels",
           "backbone_features", "pca_colors", "resolve_device", "visualize_features"]
