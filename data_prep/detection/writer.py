"""What detection prep (ScanNet, SUN RGB-D) writes per scene and in its manifest.

Output layout (``out/``), the contract read by the detection datasets and evaluation::

    manifest.json        schema mink_ssl.det_scenes/1: benchmark, classes (index = class id),
                         voxel_size (recommended, metres), splits {train, val}, scenes
                         {name: {file, points, boxes}}, skipped_scenes {scene: reason}, notes
                         [{scene, what}] (objects prep left out, and why), parameters,
                         created, versions
    scenes/<name>.npz    one per scene / image:
                           coords (N, 3) float32 metres
                           colors (N, 3) uint8
                           boxes (K, 7) float32 centre xyz, full extents dx dy dz, heading
                                 (radians about +z, counter-clockwise seen from above: the
                                 box's dx axis points along (cos h, sin h, 0))
                           box_labels (K,) int16 class ids
                           instance (N,) int32 index into boxes of the box the point belongs
                                 to, -1 for none
                         (a benchmark may add arrays, e.g. SUN RGB-D's calibration)
    reports/<name>.json  the scene's record: points, boxes and notes, and ``files`` (the .npz's
                         size); written after the .npz, so a rerun can rebuild the manifest
                         without re-reading the input
    params.json          the processing parameters; a rerun with other parameters is refused

Every file is written atomically (temp file + rename) and a scene's report last: a scene whose
report lists its ``.npz`` at the size it has is finished and a rerun skips it. A scene with bad
or missing input is reported in ``skipped_scenes`` with the reason and leaves nothing behind;
the others go on (the run of :mod:`data_prep.scene_store`).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from data_prep.scene_store import SceneJob, SceneKind, SceneResult, run_scenes, store_scene
from mink_ssl.formats.manifest import DET_SCHEMA
from mink_ssl.geometry import points_in_boxes

#: metres, the voxel size detection trains at (PointContrast's ScanNet and SUN RGB-D runs)
VOXEL_SIZE = 0.025

SPLITS = ("train", "val")
NO_BOX = -1
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


@dataclass
class DetScene:
    """One prepared scene: coords (N, 3) float32, colors (N, 3) uint8, boxes (K, 7) float32,
    box_labels (K,) int16, instance (N,) int32 (-1: in no box); ``extra`` arrays go into the
    ``.npz`` too; ``notes`` say which objects were left out and why."""

    coords: np.ndarray
    colors: np.ndarray
    boxes: np.ndarray
    box_labels: np.ndarray
    instance: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# -- boxes ------------------------------------------------------------------------------------
def first_box(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N,) int32: the first box (in ``boxes`` order) containing each point, -1 for none."""
    inside = points_in_boxes(points, boxes)  # (N, K)
    if inside.shape[1] == 0:
        return np.full(len(inside), NO_BOX, np.int32)
    return np.where(inside.any(1), inside.argmax(1), NO_BOX).astype(np.int32)


# -- scene files ------------------------------------------------------------------------------
def check_scene(name: str, s: DetScene, num_classes: int) -> None:
    """Raise ValueError naming the scene if ``s`` breaks the scene contract."""
    n, k = len(s.coords), len(s.boxes)
    want = [("coords", s.coords, np.float32, (n, 3)), ("colors", s.colors, np.uint8, (n, 3)),
            ("boxes", s.boxes, np.float32, (k, 7)), ("box_labels", s.box_labels, np.int16, (k,)),
            ("instance", s.instance, np.int32, (n,))]
    problems = [f"{key} must be {shape} {np.dtype(dt)}, got {a.shape} {a.dtype}"
                for key, a, dt, shape in want if a.dtype != dt or a.shape != shape]
    if not problems:
        if not (np.isfinite(s.coords).all() and np.isfinite(s.boxes).all()):
            problems.append("coords and boxes must be finite")
        elif k and (s.boxes[:, 3:6] <= 0).any():
            problems.append(f"box sizes must be positive, got {s.boxes[:, 3:6].min():g}")
        if k and (s.box_labels.min() < 0 or s.box_labels.max() >= num_classes):
            problems.append(f"box_labels must be in [0, {num_classes}), got "
                            f"[{s.box_labels.min()}, {s.box_labels.max()}]")
        if n and (s.instance.min() < NO_BOX or s.instance.max() >= k):
            problems.append(f"instance must be in [-1, {k}), got "
                            f"[{s.instance.min()}, {s.instance.max()}]")
    clash = sorted(set(s.extra) & {"coords", "colors", "boxes", "box_labels", "instance"})
    if clash:
        problems.append(f"extra arrays {clash} would replace contract arrays")
    if problems:
        raise ValueError(f"scene {name}: " + "; ".join(problems))


def write_scene(out: Path, name: str, s: DetScene, num_classes: int) -> dict:
    """Write the scene's ``.npz``, then its report (the record that makes it finished), both
    atomically; returns the report less the scene's name."""
    check_scene(name, s, num_classes)
    return store_scene(out, name, {"points": len(s.coords), "boxes": len(s.boxes),
                                   "notes": s.notes},
                       dict(coords=s.coords, colors=s.colors, boxes=s.boxes,
                            box_labels=s.box_labels, instance=s.instance, **s.extra))


class DetScenes(SceneKind):
    """Detection scenes (:class:`DetScene`) on the layout of :mod:`data_prep.scene_store`."""

    schema = DET_SCHEMA
    splits = SPLITS
    packages = ("plyfile", "scipy")

    def check_jobs(self, jobs: Sequence[SceneJob]) -> None:
        names = [j.name for j in jobs]
        bad = [n for n in names if not _NAME.match(n)]
        if bad:
            raise ValueError(f"scene names {bad[:5]} are not usable as file names (letters, "
                             "digits, '_', '-', '.')")
        dup = sorted(n for n, c in Counter(names).items() if c > 1)
        if dup:
            raise ValueError(f"scenes {dup[:5]} are listed more than once")
        wrong = sorted({j.split for j in jobs} - set(SPLITS))
        if wrong:
            raise ValueError(f"splits {wrong} are not among {SPLITS}")

    def write(self, out: Path, name: str, data: DetScene, num_classes: int) -> dict:
        return write_scene(out, name, data, num_classes)

    def entry(self, report: dict) -> dict:
        return {"points": report["points"], "boxes": report["boxes"]}

    def collect(self, done: Sequence[SceneResult]) -> dict:
        return {"notes": [{"scene": r.name, "what": w} for r in done for w in r.report["notes"]]}

    def summary(self, manifest: dict, done: Sequence[SceneResult]) -> tuple[str, list[str]]:
        return (f"{sum(r.report['boxes'] for r in done)} boxes, {len(manifest['notes'])} notes "
                "(see manifest.json), "), []


DET_SCENES = DetScenes()


def run_prep(out: Path, *, benchmark: str, classes: Sequence[str], jobs: Sequence[SceneJob],
             params: dict, inputs: dict, skipped: Sequence[dict] = (), workers: int = 1,
             progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Prepare ``jobs`` (each returning :class:`DetScene`) into ``out`` and write the manifest
    (returned); the arguments are :func:`data_prep.scene_store.run_scenes`'."""
    return run_scenes(out, DET_SCENES, benchmark=benchmark, classes=classes, jobs=jobs,
                      params=params, inputs=inputs, head={"voxel_size": VOXEL_SIZE},
                      skipped=skipped, workers=workers, progress=progress, log=log)
