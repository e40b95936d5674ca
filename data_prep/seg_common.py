"""Shared machinery of segmentation prep (S3DIS, Synthia4D, ScanNet): scene files, resumable
runs, the manifest, and a fast PLY vertex reader.

Output layout (``out/``), the contract read by :mod:`mink_ssl.data.segmentation`::

    manifest.json        schema mink_ssl.seg_scenes/1: classes, ignore_label -1, voxel_size,
                         splits, scenes {name: {file, points}}, skipped, repairs, parameters,
                         created, versions
    scenes/<file>.npz    one per scene: coords (N, 3) float32 metres, colors (N, 3) uint8,
                         labels (N,) int16 in [0, num_classes) or -1; <file> is the scene name
                         with "/" replaced by "__"
    reports/<file>.json  what prep found in that scene's input (points, repairs); written just
                         before the .npz, so a rerun can rebuild the manifest without re-reading
    params.json          the processing parameters; a rerun with other parameters is refused

A scene is written atomically (temp file + rename) and its ``.npz`` is written last, so a scene
whose ``.npz`` exists is complete: a rerun skips it. A scene whose input is bad is reported in
``skipped`` with the reason and leaves nothing behind; the others go on. The run safety of
:mod:`data_prep.runner` applies: ``--out`` may not overlap the raw folders, one prep per
``--out``, an output-side I/O error aborts the run (never a "skipped" scene), SIGINT / SIGTERM
finish the scenes in progress and stop without a manifest.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from mink_ssl.formats.manifest import SEG_SCHEMA, write_manifest

IGNORE_LABEL = -1
SPLITS = ("train", "val", "test")


class SceneSkipped(Exception):
    """A scene that cannot be prepared; the message is the reason reported in the manifest."""


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


@dataclass(frozen=True)
class SceneJob:
    """Prepare scene ``name`` of ``split`` with ``fn(*args) -> SceneData`` (a module-level
    function, so jobs can go to worker processes)."""

    name: str
    split: str
    fn: Callable[..., SceneData]
    args: tuple = ()


@dataclass
class SceneResult:
    name: str
    split: str
    status: str  # "done" | "already done" | "skipped"
    points: int = 0
    repairs: list[dict] = field(default_factory=list)
    reason: str = ""


def scene_file(name: str) -> str:
    """``scenes/<name with "/" -> "__">.npz``, relative to the output directory."""
    return f"scenes/{name.replace('/', '__')}.npz"


def _check_name(name: str) -> None:
    parts = name.split("/")
    if not name or any(p in ("", ".", "..") for p in parts) or "__" in name or "\\" in name:
        raise ValueError(f"scene name {name!r} is not usable: it needs non-empty '/'-separated "
                         "parts without '.', '..', '__' or backslashes")


def check_scene(name: str, data: SceneData, num_classes: int) -> None:
    """Raise ValueError naming the scene if ``data`` breaks the scene contract."""
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
    if not problems and not np.isfinite(c).all():
        problems.append(f"{int((~np.isfinite(c)).any(1).sum())} points have non-finite coords")
    if problems:
        raise ValueError(f"scene {name}: " + "; ".join(problems))


def write_scene(out: Path, name: str, data: SceneData, num_classes: int) -> int:
    """Write the scene's report then its ``.npz`` (the completion marker), both atomically;
    returns the number of points."""
    from mink_ssl.io import atomic_path

    check_scene(name, data, num_classes)
    rel = scene_file(name)
    report = out / "reports" / (Path(rel).stem + ".json")
    with atomic_path(report) as tmp:
        tmp.write_text(json.dumps({"scene": name, "points": len(data.coords),
                                   "repairs": data.repairs}, indent=1))
    with atomic_path(out / rel) as tmp, open(tmp, "wb") as f:  # np.savez(path) would add .npz
        np.savez(f, coords=data.coords, colors=data.colors, labels=data.labels)
    return len(data.coords)


def _done(out: Path, name: str) -> dict | None:
    """The report of a complete scene, or None if the scene still has to be prepared."""
    rel = scene_file(name)
    report = out / "reports" / (Path(rel).stem + ".json")
    if not ((out / rel).is_file() and report.is_file()):
        return None
    return json.loads(report.read_text())


def _run_job(job: SceneJob, out: Path, num_classes: int) -> SceneResult:
    """Prepare one scene; bad input data becomes a "skipped" result, bugs propagate."""
    from mink_ssl.safety import is_output_error, output_error

    old = _done(out, job.name)
    if old is not None:
        return SceneResult(job.name, job.split, "already done", old["points"], old["repairs"])
    try:
        data = job.fn(*job.args)
        points = write_scene(out, job.name, data, num_classes)
    except (SceneSkipped, OSError, ValueError, EOFError) as e:
        if is_output_error(e, out):  # disk full, read-only ...: abort, not bad input
            raise output_error(e, out / scene_file(job.name),
                               f"cannot write scene {job.name} into {out}") from None
        return SceneResult(job.name, job.split, "skipped", reason=str(e))
    return SceneResult(job.name, job.split, "done", points, data.repairs)


def check_params(out: Path, params: dict) -> None:
    """Refuse to mix processing parameters in one output directory."""
    from mink_ssl.io import atomic_path

    path = out / "params.json"
    params = json.loads(json.dumps(params))  # as it reads back (tuples -> lists)
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
        if diff:
            raise ValueError(f"{out} was prepared with other parameters "
                             f"{ {k: old.get(k) for k in diff} }, now "
                             f"{ {k: params.get(k) for k in diff} }; use a new --out directory "
                             "or the same parameters")
    else:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(params, indent=1))


def versions() -> dict[str, str]:
    """Versions of what produced the files (no torch import: prep does not need it)."""
    import platform
    from importlib import metadata

    import mink_ssl

    out = {"mink_ssl": mink_ssl.__version__, "numpy": np.__version__,
           "python": platform.python_version()}
    try:
        out["plyfile"] = metadata.version("plyfile")
    except metadata.PackageNotFoundError:  # pragma: no cover - plyfile is a dependency
        out["plyfile"] = "missing"
    return out


def run_prep(out: Path, *, benchmark: str, classes: Sequence[str], voxel_size: float,
             jobs: Sequence[SceneJob], params: dict, inputs: dict,
             skipped: Sequence[dict] = (), workers: int = 1, progress: bool = True,
             log: Callable[[str], None] = print) -> dict:
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
    for j in jobs:
        _check_name(j.name)
        if j.split not in SPLITS:
            raise ValueError(f"scene {j.name}: split {j.split!r} is not one of {SPLITS}")
    files = [scene_file(n) for n in names]
    if len(set(files)) != len(files):
        dup = sorted({n for n, f in zip(names, files) if files.count(f) > 1})
        raise ValueError(f"scenes {dup} map to the same file name")
    with prep_run(out, benchmark, inputs, params, log):
        t0 = time.perf_counter()
        results = {r.name: r for r in map_jobs(_run_job, jobs, (out, len(classes)), workers,
                                               progress, benchmark)}
        return _finish(out, benchmark, classes, voxel_size, names, results, params, inputs,
                       skipped, t0, log)


@contextmanager
def prep_run(out: Path, benchmark: str, inputs: dict, params: dict,
             log: Callable[[str], None]) -> Iterator[None]:
    """What a segmentation / detection prep does around its scenes: refuse an ``--out`` that
    overlaps ``inputs["raw"]``, lock ``out`` (held inside the block), check the parameters and
    remove the temporaries of a killed run."""
    from data_prep.runner import check_out_vs_raw, prep_lock

    raw = inputs.get("raw")
    check_out_vs_raw([raw] if isinstance(raw, (str, Path)) else raw or [], out)
    with prep_lock(out, f"mink-ssl-prep {benchmark}", log):
        check_params(out, params)
        for sub in ("scenes", "reports"):  # temp files of a killed run (atomic_path's)
            for stale in (out / sub).glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        yield


def _finish(out, benchmark, classes, voxel_size, names, results, params, inputs, skipped, t0,
            log) -> dict:
    ordered = [results[n] for n in names]
    done = [r for r in ordered if r.status != "skipped"]
    manifest = {
        "schema": SEG_SCHEMA, "benchmark": benchmark, "classes": list(classes),
        "ignore_label": IGNORE_LABEL, "voxel_size": voxel_size,
        "splits": {s: [r.name for r in done if r.split == s] for s in SPLITS},
        "scenes": {r.name: {"file": scene_file(r.name), "points": r.points} for r in done},
        "skipped": list(skipped) + [{"scene": r.name, "reason": r.reason}
                                    for r in ordered if r.status == "skipped"],
        "repairs": [rep for r in done for rep in r.repairs],
        "parameters": {**params, **inputs},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    write_manifest(out, manifest)
    log(f"{benchmark}: {len(done)}/{len(ordered)} scenes done "
        f"({sum(r.status == 'already done' for r in ordered)} already done), "
        f"{sum(r.points for r in done)} points, {len(manifest['repairs'])} repairs, "
        f"{len(manifest['skipped'])} skipped, {time.perf_counter() - t0:.1f} s")
    for rep in manifest["repairs"]:
        log(f"  repaired {rep['file']}" + (f" line {rep['line']}" if rep["line"] else "")
            + f": {rep['what']}")
    for s in manifest["skipped"]:
        log(f"  skipped {s['scene']}: {s['reason']}")
    return manifest


def map_jobs(run_job: Callable, jobs: Sequence, args: tuple, workers: int, progress: bool,
             desc: str) -> list:
    """``[run_job(job, *args) for job in jobs]`` with a progress bar, in ``workers`` processes
    when more than one (``run_job`` must then be a module-level function); any order. Signals
    and output errors: :func:`data_prep.runner.map_scenes`."""
    from data_prep.runner import map_scenes

    return map_scenes(run_job, jobs, args, workers, progress, desc)


# -- PLY --------------------------------------------------------------------------------------
_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2",
              "int16": "i2", "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4",
              "uint": "u4", "uint32": "u4", "float": "f4", "float32": "f4", "double": "f8",
              "float64": "f8"}


def read_ply_vertices(path: Path) -> np.ndarray:
    """The ``vertex`` element of a PLY file as a structured array (one field per property).

    Binary files whose vertex element comes first (ScanNet meshes, point clouds) are read with
    one ``np.frombuffer``, without touching the faces; anything else goes through plyfile.
    Raises ValueError for a file that is not PLY, has no vertex element or is truncated.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(65536)
    if not head.startswith(b"ply"):
        raise ValueError(f"{path} is not a PLY file (it does not start with 'ply')")
    end = head.find(b"end_header")
    if end < 0:
        raise ValueError(f"{path}: no end_header in the first 64 KiB (not a PLY header)")
    body = head.index(b"\n", end) + 1 if b"\n" in head[end:] else len(head)
    lines = head[:end].decode("ascii", "replace").splitlines()
    fmt, elements = None, []  # [(name, count, [(prop, type) | None for lists])]
    for line in lines:
        tok = line.split()
        if not tok:
            continue
        if tok[0] == "format":
            fmt = tok[1]
        elif tok[0] == "element":
            elements.append((tok[1], int(tok[2]), []))
        elif tok[0] == "property" and elements:
            elements[-1][2].append(None if tok[1] == "list" else (tok[-1], tok[1]))
    if not elements or elements[0][0] != "vertex" or fmt == "ascii" \
            or any(p is None or p[1] not in _PLY_TYPES for p in elements[0][2]):
        return _read_ply_vertices_plyfile(path)
    order = "<" if fmt == "binary_little_endian" else ">"
    dtype = np.dtype([(name, order + _PLY_TYPES[t]) for name, t in elements[0][2]])
    count = elements[0][1]
    with open(path, "rb") as f:
        f.seek(body)
        data = f.read(count * dtype.itemsize)
    if len(data) < count * dtype.itemsize:
        raise ValueError(f"{path} is truncated: the header declares {count} vertices "
                         f"({count * dtype.itemsize} bytes), the file holds {len(data)} bytes "
                         "of them")
    return np.frombuffer(data, dtype=dtype, count=count)


def _read_ply_vertices_plyfile(path: Path) -> np.ndarray:
    from plyfile import PlyData

    try:
        ply = PlyData.read(str(path))
    except Exception as e:  # plyfile raises several types for malformed files
        raise ValueError(f"{path}: cannot read PLY ({type(e).__name__}: {e})") from e
    if "vertex" not in ply:
        raise ValueError(f"{path} has no vertex element (elements: "
                         f"{[el.name for el in ply.elements]})")
    return ply["vertex"].data


def ply_fields(vertices: np.ndarray, path: Path, *names: Sequence[str]) -> list[np.ndarray]:
    """For each group of alternative property names, the first one present (as an array);
    ValueError listing the properties the file has if a group has none."""
    have = vertices.dtype.names or ()
    out = []
    for alternatives in names:
        hit = next((a for a in alternatives if a in have), None)
        if hit is None:
            raise ValueError(f"{path}: vertex has no property {' / '.join(alternatives)} "
                             f"(it has {list(have)})")
        out.append(np.asarray(vertices[hit]))
    return out


def colors_uint8(rgb: np.ndarray, where: str) -> np.ndarray:
    """(N, 3) colours as uint8; ValueError if they are not integers in 0..255."""
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        return rgb
    bad = ~((rgb >= 0) & (rgb <= 255) & (rgb == np.round(rgb))).all(1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}: colours must be integers in 0..255; {int(bad.sum())} points "
                         f"are not (first: point {i}, {rgb[i].tolist()})")
    return rgb.astype(np.uint8)


def as_json(value: Any) -> Any:
    """Paths and tuples as JSON-friendly values (for the parameters of the manifest)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    return value
