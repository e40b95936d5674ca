"""ScanNet v2 detection prep: annotated scans -> per-scene points, axis-aligned boxes, instances.

Input, per scene folder ``<raw>/<scene>/`` (ScanNet's ``scans/``)::

    <scene>_vh_clean_2.ply                    mesh; its vertices (x y z red green blue) are
                                              the points
    <scene>_vh_clean_2.0.010000.segs.json     segIndices: the over-segment of every vertex
    <scene>.aggregation.json                  segGroups: one object each (objectId, label = raw
                                              category, segments)
    <scene>.txt                               meta; ``axisAlignment = `` 16 numbers, a row-major
                                              4x4 transform applied to the vertices

plus ScanNet's ``scannetv2-labels.combined.tsv`` (``--label-map``; raw_category -> nyu40id) and,
optionally, the official split lists ``scannetv2_train.txt`` / ``scannetv2_val.txt``
(``--splits-dir``; without it every scene is in ``train``).

What is computed follows VoteNet's ``scannet/load_scannet_data.py`` and
``scannet/batch_load_scannet_data.py`` (facebookresearch/votenet; read for the facts, not
copied): vertices are axis-aligned with ``axisAlignment``; a vertex belongs to the object whose
segments contain its segment (a later group wins where groups share a segment, as VoteNet's
loop over groups does); an object's class is its raw category mapped to NYU40 by the label map,
and it gets a box when its NYU40 id is one of the 18 detection classes of VoteNet's
``model_util_scannet.py`` (ids 3 4 5 6 7 8 9 10 11 12 14 16 24 28 33 34 36 39, class ids 0-17 in
that order); the box is the axis-aligned min / max of the object's aligned vertices (centre and
full extents, heading 0). Adapted: every mesh vertex is kept (VoteNet samples 50k; the dataset
samples at load time); an object's class comes from its own group label rather than from its
first vertex; objects of a detection class with no vertex, or with a zero extent, get no box
and are listed in the notes; a label missing from the label map, a segment that the
over-segmentation does not have, a duplicate objectId, or a missing / malformed file skips the
scene with the reason (VoteNet stops with an exception).

All per-vertex work is vectorised: segment ids are mapped to groups through ``np.unique`` and
``np.searchsorted`` (one call per object, not per vertex), and per-object min / max come from one
sort and ``np.minimum.reduceat``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from data_prep.detection.writer import NO_BOX, DetScene, run_prep
from data_prep.ply import colors_uint8, ply_fields, read_ply_vertices
from data_prep.reading import read_bytes, read_text
from data_prep.runner import as_json
from data_prep.scannet.labels import LABEL_MAP_NAME, read_label_map
from data_prep.scannet.scans import list_scenes
from data_prep.scene_store import SceneJob
from mink_ssl.errors import BadInput

CLASSES = ("cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
           "counter", "desk", "curtain", "refrigerator", "showercurtrain", "toilet", "sink",
           "bathtub", "garbagebin")
NYU40_IDS = (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)  # class id = index
SPLIT_FILES = {"train": "scannetv2_train.txt", "val": "scannetv2_val.txt"}


def raw_to_class(label_map: dict[str, int]) -> dict[str, int]:
    """``raw_category -> class id`` (0-17), -1 for categories that are not detection classes."""
    cls = {nyu: i for i, nyu in enumerate(NYU40_IDS)}
    return {raw: cls.get(nyu, -1) for raw, nyu in label_map.items()}


def read_axis_alignment(path: Path) -> np.ndarray:
    """The (4, 4) float64 ``axisAlignment`` transform of a ScanNet meta ``.txt``."""
    for line in read_text(path, errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "axisAlignment":
            try:
                m = np.array(value.split(), dtype=np.float64)
            except ValueError:
                raise BadInput(f"{path}: axisAlignment {value.strip()[:80]!r} is not 16 "
                               "numbers") from None
            if m.shape != (16,) or not np.isfinite(m).all():
                raise BadInput(f"{path}: axisAlignment must be 16 finite numbers (a row-major "
                               f"4x4), got {m.size}")
            m = m.reshape(4, 4)
            if not np.allclose(m[3], [0, 0, 0, 1], atol=1e-6):
                raise BadInput(f"{path}: axisAlignment's last row is {m[3].tolist()}, not "
                               "[0, 0, 0, 1] (not a rigid transform)")
            return m
    raise BadInput(f"{path} has no 'axisAlignment = ...' line (ScanNet's test scans have "
                   "none: they carry no annotations either)")


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise BadInput(f"missing {path.name}")
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise BadInput(f"{path.name} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path.name} holds a {type(data).__name__}, expected an object")
    return data


def _groups(agg: dict, name: str) -> list[tuple[int, str, np.ndarray]]:
    """[(objectId, label, segments (S,) int64)] of an aggregation, in file order."""
    groups = agg.get("segGroups")
    if not isinstance(groups, list):
        raise BadInput(f"{name} has no segGroups list")
    out, ids = [], set()
    for i, g in enumerate(groups):
        try:
            oid, label = int(g["objectId"]), str(g["label"])
            segs = np.asarray(g["segments"], dtype=np.int64).reshape(-1)
        except (KeyError, TypeError, ValueError) as e:
            raise BadInput(f"{name}: segGroups[{i}] needs objectId, label and integer "
                           f"segments ({type(e).__name__}: {e})") from None
        if oid in ids:
            raise BadInput(f"{name}: objectId {oid} appears twice")
        ids.add(oid)
        out.append((oid, label, segs))
    return out


def vertex_groups(seg_indices: np.ndarray, group_segments: Sequence[np.ndarray]) -> np.ndarray:
    """(V,) int64 index of the group whose segments hold each vertex's segment, -1 for none.

    Where groups share a segment the later group wins. ValueError naming the first group with
    segments that no vertex has.
    """
    uniq, inv = np.unique(seg_indices, return_inverse=True)  # (U,), (V,)
    seg_group = np.full(len(uniq), -1, np.int64)  # (U,)
    for g, segs in enumerate(group_segments):  # one call per object
        pos = np.minimum(np.searchsorted(uniq, segs), max(len(uniq) - 1, 0))
        missing = segs[uniq[pos] != segs] if len(uniq) else segs
        if len(missing):
            raise ValueError(f"group {g} lists segments {missing[:5].tolist()} that no vertex has")
        seg_group[pos] = g
    return seg_group[inv.reshape(-1)]


def group_bounds(points: np.ndarray, group: np.ndarray, n_groups: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group vertex count (G,) and min / max corners (G, 3) (inf / -inf where empty).

    points (V, 3); group (V,) in [-1, n_groups), -1 ignored.
    """
    on = group >= 0
    g, p = group[on], points[on]
    count = np.bincount(g, minlength=n_groups)
    lo = np.full((n_groups, 3), np.inf)
    hi = np.full((n_groups, 3), -np.inf)
    if len(g):
        order = np.argsort(g, kind="stable")
        gs, ps = g[order], p[order]
        starts = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]])  # first row of each group
        lo[gs[starts]] = np.minimum.reduceat(ps, starts, axis=0)
        hi[gs[starts]] = np.maximum.reduceat(ps, starts, axis=0)
    return count, lo, hi


def prepare_scene(scene_dir: Path, classes_of: dict[str, int]) -> DetScene:
    """One ScanNet scan as a :class:`DetScene`; ``classes_of`` maps raw categories to class ids
    (-1: not a detection class). Raises :class:`BadInput` for bad input."""
    scene_dir, sid = Path(scene_dir), Path(scene_dir).name
    mesh = scene_dir / f"{sid}_vh_clean_2.ply"
    meta = scene_dir / f"{sid}.txt"
    for path in (mesh, meta):
        if not path.is_file():
            raise BadInput(f"missing {path.name}")
    segs = _load_json(scene_dir / f"{sid}_vh_clean_2.0.010000.segs.json")
    agg_name = f"{sid}.aggregation.json"
    groups = _groups(_load_json(scene_dir / agg_name), agg_name)

    vertices = read_ply_vertices(mesh)
    x, y, z, r, g, b = ply_fields(vertices, mesh, ("x",), ("y",), ("z",), ("red", "r"),
                                  ("green", "g"), ("blue", "b"))
    if len(x) == 0:
        raise BadInput(f"{mesh.name} has no vertices")
    colors = colors_uint8(np.stack([r, g, b], 1), str(mesh))  # (V, 3)
    A = read_axis_alignment(meta)
    xyz = np.stack([x, y, z], 1).astype(np.float64) @ A[:3, :3].T + A[:3, 3]  # (V, 3) aligned
    if not np.isfinite(xyz).all():
        raise BadInput(f"{mesh.name} has {int((~np.isfinite(xyz)).any(1).sum())} "
                       "non-finite vertices")

    try:
        seg = np.asarray(segs.get("segIndices"))
    except ValueError:  # a ragged nest of lists
        seg = np.zeros((0, 0))
    if seg.ndim != 1 or seg.dtype.kind not in "iu":
        raise BadInput(f"segs.json segIndices must be a list of integers, got "
                       f"{seg.dtype} {seg.shape}")
    if len(seg) != len(xyz):
        raise BadInput(f"segs.json has {len(seg)} segIndices but {mesh.name} has "
                       f"{len(xyz)} vertices (files of different meshes?)")
    unknown = sorted({lab for _, lab, _ in groups if lab not in classes_of})
    if unknown:
        raise BadInput(f"{agg_name}: labels {unknown[:5]} are not in the label map (pass "
                       f"ScanNet's {LABEL_MAP_NAME})")
    try:
        vgroup = vertex_groups(seg.astype(np.int64), [s for _, _, s in groups])  # (V,)
    except ValueError as e:
        raise BadInput(f"{agg_name}: {e}") from None

    cls = np.array([classes_of[lab] for _, lab, _ in groups], np.int64)  # (G,)
    count, lo, hi = group_bounds(xyz, vgroup, len(groups))
    size = hi - lo  # (G, 3); -inf where a group has no vertex
    keep = (cls >= 0) & (count > 0) & (size > 0).all(1)  # (G,)
    notes = []
    for i in np.flatnonzero((cls >= 0) & ~keep):  # a handful of objects at most
        oid, lab, _ = groups[i]
        notes.append(f"object {oid} ({lab}): " + ("no vertices" if count[i] == 0 else
                     f"zero extent {np.round(size[i], 6).tolist()}") + ", no box")
    box_of_group = np.full(len(groups) + 1, NO_BOX, np.int64)  # last entry: vertices in no group
    box_of_group[np.flatnonzero(keep)] = np.arange(int(keep.sum()))
    centre = (lo[keep] + hi[keep]) / 2
    boxes = np.concatenate([centre, size[keep], np.zeros((len(centre), 1))], 1)  # (K, 7)
    return DetScene(coords=xyz.astype(np.float32), colors=colors,
                    boxes=boxes.astype(np.float32).reshape(-1, 7),
                    box_labels=cls[keep].astype(np.int16),
                    instance=box_of_group[vgroup].astype(np.int32), notes=notes)


def _read_split_lists(splits_dir: Path) -> dict[str, str]:
    """``scene -> split`` from ``scannetv2_{train,val}.txt`` in ``splits_dir``."""
    where: dict[str, str] = {}
    for split, fname in SPLIT_FILES.items():
        path = Path(splits_dir) / fname
        if not path.is_file():
            raise FileNotFoundError(f"--splits-dir {splits_dir} has no {fname} (ScanNet's "
                                    "Tasks/Benchmark split lists)")
        for name in read_text(path).split():
            if where.setdefault(name, split) != split:
                raise BadInput(f"{name} is listed in both {SPLIT_FILES['train']} and "
                               f"{SPLIT_FILES['val']} of {splits_dir}")
    return where


def run(raw: Path, out: Path, label_map: Path, splits_dir: Path | None = None,
        scenes: Sequence[str] | None = None, workers: int = 1, progress: bool = True,
        log: Callable[[str], None] = print) -> dict:
    """Prepare the annotated scans of ``raw`` into ``out``; returns the manifest (also written).

    Scenes of ``raw`` not in the split lists, and listed scenes missing from ``raw`` (when
    ``scenes`` is not given), are reported as skipped.
    """
    raw, out, label_map = Path(raw), Path(out), Path(label_map)
    classes_of = raw_to_class(read_label_map(label_map))
    scene_dirs = list_scenes(raw, scenes)
    skipped = []
    if splits_dir is None:
        where = {d.name: "train" for d in scene_dirs}
        log(f"scannet-det: no --splits-dir, all {len(scene_dirs)} scenes go to 'train'")
    else:
        where = _read_split_lists(splits_dir)
        if not scenes:
            present = {d.name for d in scene_dirs}
            skipped += [{"scene": n, "reason": f"listed in {SPLIT_FILES[s]} but not in {raw}"}
                        for n, s in sorted(where.items()) if n not in present]
        skipped += [{"scene": d.name, "reason": f"not listed in {SPLIT_FILES['train']} or "
                     f"{SPLIT_FILES['val']}"} for d in scene_dirs if d.name not in where]
    jobs = [SceneJob(d.name, where[d.name], prepare_scene, (d, classes_of))
            for d in scene_dirs if d.name in where]
    params = {"classes": list(CLASSES), "nyu40_ids": list(NYU40_IDS),
              "label_map_sha256": hashlib.sha256(read_bytes(label_map)).hexdigest()}
    inputs = as_json({"raw": raw.resolve(), "label_map": label_map.resolve(),
                      "splits_dir": None if splits_dir is None else Path(splits_dir).resolve()})
    return run_prep(out, benchmark="scannet", classes=CLASSES, jobs=jobs, params=params,
                    inputs=inputs, skipped=skipped, workers=workers, progress=progress, log=log)
