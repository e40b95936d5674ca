"""Detection prep (ScanNet, SUN RGB-D): the scene files, resumable runs and the manifest they share.

Output layout (``out/``), the contract read by the detection datasets and evaluation::

    manifest.json        schema mink_ssl.det_scenes/1: benchmark, classes (index = class id),
                         splits {train, val}, scenes {name: {file, points, boxes}}, skipped
                         [{scene, reason}], notes [{scene, what}] (objects prep left out, and
                         why), parameters, created, versions
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
    reports/<name>.json  points, boxes and notes of the scene; written just before the .npz so
                         a rerun can rebuild the manifest without re-reading the input
    params.json          the processing parameters; a rerun with other parameters is refused

Every file is written atomically (temp file + rename) and a scene's ``.npz`` last, so a scene
whose ``.npz`` exists is complete and a rerun skips it. A scene with bad or missing input is
reported in ``skipped`` with the reason and leaves nothing behind; the others go on.
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from data_prep.seg_common import SceneJob, map_jobs, prep_run, scene_file
from mink_ssl.formats.manifest import DET_SCHEMA, write_manifest

SPLITS = ("train", "val")
NO_BOX = -1
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
_CHUNK_ELEMENTS = 1 << 20  # (points x boxes) per chunk of the point-in-box test (~8 MB float64)


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


@dataclass
class DetResult:
    name: str
    split: str
    status: str  # "done" | "already done" | "skipped"
    points: int = 0
    boxes: int = 0
    notes: list[str] = field(default_factory=list)
    reason: str = ""


# -- geometry ---------------------------------------------------------------------------------
def points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N, K) bool: point n lies inside or on oriented box k.

    points (N, 3); boxes (K, 7) centre, full extents, heading about +z. A point is expressed in
    each box's frame (rotated by -heading about the centre) and compared with the half extents;
    points are processed in chunks so the (n, K) temporaries stay small.
    """
    points = np.asarray(points, np.float64)
    boxes = np.asarray(boxes, np.float64)
    n, k = len(points), len(boxes)
    inside = np.zeros((n, k), bool)
    if n == 0 or k == 0:
        return inside
    centre, half = boxes[:, :3], boxes[:, 3:6] / 2  # (K, 3)
    cos, sin = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])  # (K,)
    step = max(1, _CHUNK_ELEMENTS // k)
    for s in range(0, n, step):  # chunks of points, not single points
        d = points[s:s + step, None, :] - centre[None]  # (n, K, 3) offsets from the centres
        u = d[..., 0] * cos + d[..., 1] * sin  # (n, K) along the box's dx axis
        v = d[..., 1] * cos - d[..., 0] * sin  # (n, K) along its dy axis
        inside[s:s + step] = ((np.abs(u) <= half[:, 0]) & (np.abs(v) <= half[:, 1])
                              & (np.abs(d[..., 2]) <= half[:, 2]))
    return inside


def first_box(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N,) int32: the first box (in ``boxes`` order) containing each point, -1 for none."""
    inside = points_in_boxes(points, boxes)  # (N, K)
    if inside.shape[1] == 0:
        return np.full(len(inside), NO_BOX, np.int32)
    return np.where(inside.any(1), inside.argmax(1), NO_BOX).astype(np.int32)


# -- scene files ------------------------------------------------------------------------------
def _report_path(out: Path, name: str) -> Path:
    return out / "reports" / f"{name}.json"


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


def write_scene(out: Path, name: str, s: DetScene, num_classes: int) -> None:
    """Write the scene's report, then its ``.npz`` (the completion marker), both atomically."""
    from mink_ssl.io import atomic_path

    check_scene(name, s, num_classes)
    with atomic_path(_report_path(out, name)) as tmp:
        tmp.write_text(json.dumps({"scene": name, "points": len(s.coords), "boxes": len(s.boxes),
                                   "notes": s.notes}, indent=1))
    with atomic_path(out / scene_file(name)) as tmp, open(tmp, "wb") as f:
        np.savez(f, coords=s.coords, colors=s.colors, boxes=s.boxes, box_labels=s.box_labels,
                 instance=s.instance, **s.extra)  # to a file object: savez(path) adds .npz


def _run_job(job: SceneJob, out: Path, num_classes: int) -> DetResult:
    """Prepare one scene; bad input data becomes a "skipped" result, bugs propagate."""
    from data_prep.seg_common import SceneSkipped
    from mink_ssl.safety import is_output_error, output_error

    report = _report_path(out, job.name)
    if (out / scene_file(job.name)).is_file() and report.is_file():
        old = json.loads(report.read_text())
        return DetResult(job.name, job.split, "already done", old["points"], old["boxes"],
                         old["notes"])
    try:
        s = job.fn(*job.args)
        write_scene(out, job.name, s, num_classes)
    except (SceneSkipped, OSError, ValueError, EOFError) as e:
        if is_output_error(e, out):  # disk full, read-only ...: abort, not bad input
            raise output_error(e, out / scene_file(job.name),
                               f"cannot write scene {job.name} into {out}") from None
        return DetResult(job.name, job.split, "skipped", reason=str(e))
    return DetResult(job.name, job.split, "done", len(s.coords), len(s.boxes), s.notes)


def versions() -> dict[str, str]:
    """Versions of what produced the files."""
    from importlib import metadata

    from data_prep.seg_common import versions as seg_versions

    out = seg_versions()
    try:
        out["scipy"] = metadata.version("scipy")
    except metadata.PackageNotFoundError:  # pragma: no cover - scipy is a dependency
        out["scipy"] = "missing"
    return out


def run_prep(out: Path, *, benchmark: str, classes: Sequence[str], jobs: Sequence[SceneJob],
             params: dict, inputs: dict, skipped: Sequence[dict] = (), workers: int = 1,
             progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Prepare ``jobs`` into ``out`` and write the manifest (returned).

    Args:
        params: the processing parameters (a rerun with others is refused).
        inputs: where the data came from (raw paths ...), recorded but not compared.
        skipped: scenes reported as skipped before any work (e.g. listed in a split file but
            missing), as manifest entries {"scene", "reason"}.
    """
    out = Path(out)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    names = [j.name for j in jobs]
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise ValueError(f"scene names {bad[:5]} are not usable as file names (letters, digits, "
                         "'_', '-', '.')")
    dup = sorted(n for n, c in Counter(names).items() if c > 1)
    if dup:
        raise ValueError(f"scenes {dup[:5]} are listed more than once")
    wrong = sorted({j.split for j in jobs} - set(SPLITS))
    if wrong:
        raise ValueError(f"splits {wrong} are not among {SPLITS}")
    with prep_run(out, benchmark, inputs, params, log):  # raw/out check, lock, parameters
        t0 = time.perf_counter()
        results = {r.name: r for r in map_jobs(_run_job, jobs, (out, len(classes)), workers,
                                               progress, benchmark)}
        return _finish(out, benchmark, classes, names, results, params, inputs, skipped, t0,
                       log)


def _finish(out, benchmark, classes, names, results, params, inputs, skipped, t0, log) -> dict:
    ordered = [results[n] for n in names]
    done = [r for r in ordered if r.status != "skipped"]
    manifest = {
        "schema": DET_SCHEMA, "benchmark": benchmark, "classes": list(classes),
        "splits": {s: [r.name for r in done if r.split == s] for s in SPLITS},
        "scenes": {r.name: {"file": scene_file(r.name), "points": r.points, "boxes": r.boxes}
                   for r in done},
        "skipped": list(skipped) + [{"scene": r.name, "reason": r.reason}
                                    for r in ordered if r.status == "skipped"],
        "notes": [{"scene": r.name, "what": w} for r in done for w in r.notes],
        "parameters": {**params, **inputs},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    write_manifest(out, manifest)
    log(f"{benchmark}: {len(done)}/{len(ordered)} scenes done "
        f"({sum(r.status == 'already done' for r in ordered)} already done), "
        f"{sum(r.points for r in done)} points, {sum(r.boxes for r in done)} boxes, "
        f"{len(manifest['notes'])} notes (see manifest.json), {len(manifest['skipped'])} skipped, "
        f"{time.perf_counter() - t0:.1f} s")
    for s in manifest["skipped"]:
        log(f"  skipped {s['scene']}: {s['reason']}")
    return manifest
