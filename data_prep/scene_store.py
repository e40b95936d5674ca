"""The output layout segmentation and detection prep share, and their resumable run.

Output layout (``out/``)::

    manifest.json        schema, benchmark, classes, splits, scenes {name: {file, points, ...}},
                         skipped_scenes {scene: reason}, parameters, created, versions, and
                         what the kind of prep adds (:class:`SceneKind`)
    scenes/<file>.npz    one per scene; <file> is the scene name with "/" replaced by "__"
    reports/<file>.json  the scene's record: what prep found in its input (points, ...) and
                         ``files`` {"scenes/<file>.npz": size}; written after the .npz, so a
                         rerun can rebuild the manifest without re-reading the input
    params.json          the processing parameters; a rerun with other parameters is refused

Each file is written atomically (temp file + rename), the report last: a scene is finished when
its report lists the size of its ``.npz`` and the ``.npz`` has that size, the definition every
prep shares (:func:`mink_ssl.formats.scene_record.finished_record`); a rerun skips it. A scene
whose input is bad (:class:`mink_ssl.errors.BadInput`, raised by the readers) is reported in
``skipped_scenes`` with the reason and leaves nothing behind; the others go on. The run safety
of :mod:`data_prep.runner` applies: ``--out`` may not overlap the raw folders, one prep per
``--out``, an output-side I/O error aborts the run (never a "skipped" scene), any other error is
a bug that stops the run naming the scene (:func:`data_prep.runner.scene_error`), SIGINT /
SIGTERM finish the scenes in progress and stop without a manifest.

What a scene holds, how its names are checked and what the manifest adds is the kind's:
:mod:`data_prep.segmentation.writer` and :mod:`data_prep.detection.writer`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from data_prep.runner import log_skipped, map_scenes, prep_run, scene_error, versions
from mink_ssl.formats.manifest import SKIPPED, skipped_scenes, write_manifest
from mink_ssl.formats.scene_record import FILES, file_sizes, finished_record
from mink_ssl.io import atomic_path


@dataclass(frozen=True)
class SceneJob:
    """Prepare scene ``name`` of ``split`` with ``fn(*args)`` (a module-level function, so jobs
    can go to worker processes), which returns what the kind writes."""

    name: str
    split: str
    fn: Callable[..., Any]
    args: tuple = ()


@dataclass
class SceneResult:
    name: str
    split: str
    status: str  # "done" | "already done" | "skipped"
    report: dict = field(default_factory=dict)  # the scene's report less its name: points, ...
    reason: str = ""

    @property
    def points(self) -> int:
        return self.report.get("points", 0)


class SceneKind:
    """What one kind of prep writes per scene and adds to the manifest (subclassed by
    segmentation and detection; an instance goes to the worker processes)."""

    schema: str
    splits: tuple[str, ...]
    packages: tuple[str, ...] = ()  # recorded in the manifest's versions besides the defaults

    def check_jobs(self, jobs: Sequence[SceneJob]) -> None:
        """ValueError if the scene names or splits cannot be written."""
        raise NotImplementedError

    def write(self, out: Path, name: str, data: Any, num_classes: int) -> dict:
        """Write the scene's report, then its ``.npz``; returns the report less its name."""
        raise NotImplementedError

    def entry(self, report: dict) -> dict:
        """The scene's manifest entry besides its file."""
        return {"points": report["points"]}

    def collect(self, done: Sequence[SceneResult]) -> dict:
        """Manifest fields after ``skipped``, gathered from the scenes done."""
        return {}

    def summary(self, manifest: dict, done: Sequence[SceneResult]) -> tuple[str, list[str]]:
        """The run's log: counts after the points (ending in ", ") and lines before the
        skipped scenes."""
        return "", []


def scene_file(name: str) -> str:
    """``scenes/<name with "/" -> "__">.npz``, relative to the output directory."""
    return f"scenes/{name.replace('/', '__')}.npz"


def report_file(name: str) -> str:
    """``reports/<file>.json`` of the scene, relative to the output directory."""
    return f"reports/{Path(scene_file(name)).stem}.json"


def store_scene(out: Path, name: str, report: dict, arrays: dict) -> dict:
    """The scene's files in the layout's order: its ``.npz`` of ``arrays``, then its report
    listing the ``.npz``'s size (the scene's record: what makes it finished), both atomically;
    returns ``report``."""
    npz = scene_file(name)
    with atomic_path(out / npz) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # to a file object: savez(path) would add .npz
    with atomic_path(out / report_file(name)) as tmp:
        tmp.write_text(json.dumps({"scene": name, **report, FILES: file_sizes(out, [npz])},
                                  indent=1))
    return report


def _done(out: Path, name: str) -> dict | None:
    """The report of a finished scene, less its name and files, or None if the scene still has
    to be prepared."""
    record = finished_record(out / report_file(name), out)
    if record is None:
        return None
    return {k: v for k, v in record.items() if k not in ("scene", FILES)}


def _run_job(job: SceneJob, out: Path, kind: SceneKind, num_classes: int) -> SceneResult:
    """Prepare one scene; bad input (:class:`BadInput`) becomes a "skipped" result, an output
    error or a bug stops the run (:func:`data_prep.runner.scene_error`)."""
    old = _done(out, job.name)
    if old is not None:
        return SceneResult(job.name, job.split, "already done", old)
    try:
        report = kind.write(out, job.name, job.fn(*job.args), num_classes)
    except BaseException as e:
        bad = scene_error(e, job.name, out, out / scene_file(job.name))
        return SceneResult(job.name, job.split, "skipped", reason=str(bad))
    return SceneResult(job.name, job.split, "done", report)


def _remove_temporaries(out: Path) -> None:
    for sub in ("scenes", "reports"):  # temp files of a killed run (atomic_path's)
        for stale in (out / sub).glob(".*.tmp"):
            stale.unlink(missing_ok=True)


def run_scenes(out: Path, kind: SceneKind, *, benchmark: str, classes: Sequence[str],
               jobs: Sequence[SceneJob], params: dict, inputs: dict, head: dict | None = None,
               skipped: Sequence[dict] = (), workers: int = 1, progress: bool = True,
               log: Callable[[str], None] = print) -> dict:
    """Prepare ``jobs`` into ``out`` and write the manifest (returned).

    Args:
        params: the processing parameters (a rerun with others is refused).
        inputs: where the data came from (raw paths ...), recorded but not compared;
            ``inputs["raw"]`` (a path or a list of them) may not overlap ``out``.
        head: manifest fields after ``classes`` (e.g. segmentation's ignore label).
        skipped: scenes reported as skipped before any work (e.g. listed in a split file but
            missing), as {"scene", "reason"} entries.
    """
    out = Path(out)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    kind.check_jobs(jobs)
    raw = inputs.get("raw")
    raws = [raw] if isinstance(raw, (str, Path)) else raw or []
    with prep_run(out, f"mink-ssl-prep {benchmark}", raws, params,
                  clean=lambda: _remove_temporaries(out), log=log):
        t0 = time.perf_counter()
        results = {r.name: r for r in map_scenes(_run_job, jobs, (out, kind, len(classes)),
                                                 workers, progress, benchmark)}
        ordered = [results[j.name] for j in jobs]
        done = [r for r in ordered if r.status != "skipped"]
        manifest = {
            "schema": kind.schema, "benchmark": benchmark, "classes": list(classes),
            **(head or {}),
            "splits": {s: [r.name for r in done if r.split == s] for s in kind.splits},
            "scenes": {r.name: {"file": scene_file(r.name), **kind.entry(r.report)}
                       for r in done},
            SKIPPED: {**{s["scene"]: s["reason"] for s in skipped},
                      **{r.name: r.reason for r in ordered if r.status == "skipped"}},
            **kind.collect(done),
            "parameters": {**params, **inputs},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(*kind.packages),
        }
        write_manifest(out, manifest)
        counts, lines = kind.summary(manifest, done)
        log(f"{benchmark}: {len(done)}/{len(ordered)} scenes done "
            f"({sum(r.status == 'already done' for r in ordered)} already done), "
            f"{sum(r.points for r in done)} points, {counts}{len(manifest[SKIPPED])} skipped, "
            f"{time.perf_counter() - t0:.1f} s")
        for line in lines:
            log(line)
        log_skipped(log, skipped_scenes(manifest).items())
        return manifest
