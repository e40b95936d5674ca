"""What segmentation prep (S3DIS, Synthia4D, ScanNet) writes per scene and in its manifest.

Output layout (``out/``), the contract read by :mod:`mink_ssl.data.segmentation`::

    manifest.json        schema mink_ssl.seg_scenes/1: classes, ignore_label -1, voxel_size,
                         splits, scenes {name: {file, points}}, skipped_scenes {scene: reason},
                         repairs, parameters, created, versions
    scenes/<file>.npz    one per scene: coords (N, 3) float32 metres, colors (N, 3) uint8,
                         labels (N,) int16 in [0, num_classes) or -1; <file> is the scene name
                         with "/" replaced by "__"
    reports/<file>.json  the scene's record: what prep found in its input (points, repairs) and
                         ``files`` (the .npz's size); written after the .npz, so a rerun can
                         rebuild the manifest without re-reading the input
    params.json          the processing parameters; a rerun with other parameters is refused

Writing (atomic, the report last), resuming, skipping bad scenes and the run's safety are
:mod:`data_prep.scene_store`'s.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from data_prep.scene_store import (SceneJob, SceneKind, SceneResult, run_scenes, scene_file,
                                   store_scene)
from mink_ssl.errors import BadInput
from mink_ssl.formats.manifest import SEG_SCHEMA

IGNORE_LABEL = -1
SPLITS = ("train", "val", "test")


def repair(scene: str, file: str, line: int, what: str) -> dict:
    """A repair entry of the manifest: ``line`` is 1-based, 0 for something about the whole
    file; ``file`` is relative to the raw dataset root."""
    return {"scene": scene, "file": str(file), "line": int(line), "what": what}


@dataclass
class SceneData:
    """One prepared scene: coords (N, 3) float32 metres, colors (N, 3) uint8, labels (N,) int16
    (-1 = ignore), and the repairs its input needed."""

    coords: np.ndarray
    colors: np.ndarray
    labels: np.ndarray
    repairs: list[dict] = field(default_factory=list)


def _check_name(name: str) -> None:
    parts = name.split("/")
    if not name or any(p in ("", ".", "..") for p in parts) or "__" in name or "\\" in name:
        raise ValueError(f"scene name {name!r} is not usable: it needs non-empty '/'-separated "
                         "parts without '.', '..', '__' or backslashes")


def check_scene(name: str, data: SceneData, num_classes: int) -> None:
    """Raise ValueError naming the scene if ``data`` breaks the scene contract (a reader's
    bug), :class:`BadInput` if its coordinates are not finite (the input's)."""
    c, col, lab = data.coords, data.colors, data.labels
    n = len(c)
    problems = []
    if c.dtype != np.float32 or c.ndim != 2 or c.shape[1] != 3:
        problems.append(f"coords must be (N, 3) float32, got {c.shape} {c.dtype}")
    if col.dtype != np.uint8 or col.shape != (n, 3):
        problems.append(f"colors must be ({n}, 3) uint8, got {col.shape} {col.dtype}")
    if lab.dtype != np.int16 or lab.shape != (n,):
        problems.append(f"labels must be ({n},) int16, got {lab.shape} {lab.dtype}")
    elif n and (lab.min() < IGNORE_LABEL or lab.max() >= num_classes):
        problems.append(f"labels must be in [0, {num_classes}) or -1, got range "
                        f"[{lab.min()}, {lab.max()}]")
    if problems:  # what a reader returned breaks the contract: a bug
        raise ValueError(f"scene {name}: " + "; ".join(problems))
    if not np.isfinite(c).all():  # what the input file holds
        raise BadInput(f"scene {name}: {int((~np.isfinite(c)).any(1).sum())} points have "
                       "non-finite coords (NaN or infinite in the input file): remove those "
                       "points or restore the file from the dataset's download")


def write_scene(out: Path, name: str, data: SceneData, num_classes: int) -> dict:
    """Write the scene's ``.npz``, then its report (the record that makes it finished), both
    atomically; returns the report less the scene's name."""
    check_scene(name, data, num_classes)
    return store_scene(out, name, {"points": len(data.coords), "repairs": data.repairs},
                       dict(coords=data.coords, colors=data.colors, labels=data.labels))


class SegScenes(SceneKind):
    """Segmentation scenes (:class:`SceneData`) on the layout of :mod:`data_prep.scene_store`."""

    schema = SEG_SCHEMA
    splits = SPLITS
    packages = ("plyfile",)

    def check_jobs(self, jobs: Sequence[SceneJob]) -> None:
        names = [j.name for j in jobs]
        for j in jobs:
            _check_name(j.name)
            if j.split not in SPLITS:
                raise ValueError(f"scene {j.name}: split {j.split!r} is not one of {SPLITS}")
        files = [scene_file(n) for n in names]
        if len(set(files)) != len(files):
            dup = sorted({n for n, f in zip(names, files) if files.count(f) > 1})
            raise ValueError(f"scenes {dup} map to the same file name")

    def write(self, out: Path, name: str, data: SceneData, num_classes: int) -> dict:
        return write_scene(out, name, data, num_classes)  # the module's, looked up at each call

    def collect(self, done: Sequence[SceneResult]) -> dict:
        return {"repairs": [rep for r in done for rep in r.report["repairs"]]}

    def summary(self, manifest: dict, done: Sequence[SceneResult]) -> tuple[str, list[str]]:
        lines = [f"  repaired {rep['file']}" + (f" line {rep['line']}" if rep["line"] else "")
                 + f": {rep['what']}" for rep in manifest["repairs"]]
        return f"{len(manifest['repairs'])} repairs, ", lines


SEG_SCENES = SegScenes()


def run_prep(out: Path, *, benchmark: str, classes: Sequence[str], voxel_size: float,
             jobs: Sequence[SceneJob], params: dict, inputs: dict,
             skipped: Sequence[dict] = (), workers: int = 1, progress: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Prepare ``jobs`` (each returning :class:`SceneData`) into ``out`` and write the manifest
    (returned); the arguments are :func:`data_prep.scene_store.run_scenes`'."""
    return run_scenes(out, SEG_SCENES, benchmark=benchmark, classes=classes, jobs=jobs,
                      params=params, inputs=inputs,
                      head={"ignore_label": IGNORE_LABEL, "voxel_size": voxel_size},
                      skipped=skipped, workers=workers, progress=progress, log=log)
