"""The run machinery every prep shares (pairs, segmentation, detection): the raw / output path
check, the output lock, the parameter check, the scene scheduler, and the facts a manifest
records (versions, JSON-friendly parameters).

A prep run is: refuse an ``--out`` that overlaps a raw folder, lock ``--out``, refuse parameters
other than those ``--out`` was prepared with, remove the temporaries of a killed run
(:func:`prep_run`), prepare every scene that is not done yet, in worker processes
(:func:`map_scenes`), then write the manifest (:func:`mink_ssl.formats.manifest.write_manifest`)
and log the skipped scenes (:func:`log_skipped`). The scene-file layout segmentation and
detection share is :mod:`data_prep.scene_store`.

- ``--out`` must not overlap any raw input folder, however spelled (same folder, either one
  inside the other, through symlinks): prep only ever deletes what it created, and an output
  inside the input (or the reverse) would mix the two.
- One prep per output folder (:class:`mink_ssl.locks.DirLock`). ScanNet pair prep can also
  be spread over many processes and machines that share the folder, one scene per claim
  (:func:`data_prep.pairs.prep.run_shard`, :mod:`data_prep.claims`); its ``--finalize`` takes
  the lock to write the folder-wide files.
- One set of processing parameters per output folder (``params.json``).
- SIGINT / SIGTERM: no new scene is started, the scenes in progress finish (each is written
  atomically), and the run ends with :class:`mink_ssl.errors.Interrupted` (exit 128 + signal);
  rerunning the command continues. A second signal aborts at once (in-progress scenes leave
  only hidden temporaries, removed by the next run).
- What a scene's error means (:func:`scene_error`): only :class:`mink_ssl.errors.BadInput`,
  raised by the readers of the input files, makes a skipped scene (reported in the manifest;
  the others go on). An :class:`mink_ssl.errors.OutputError` (disk full, read-only, no
  permission) stops scheduling and aborts the run once the scenes in progress are done. Any
  other exception is a bug: it stops the run as :class:`SceneFailed`, naming the scene, with the
  original error and its traceback chained; finished scenes are kept.
"""
from __future__ import annotations

import json
import os
import platform
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

import mink_ssl
from mink_ssl.io import atomic_path
from mink_ssl.errors import (BadInput, Interrupted, OutputError, is_output_error,
                             output_error)
from mink_ssl.locks import DirLock
from mink_ssl.signals import StopSignals, worker_init


class SceneFailed(RuntimeError):
    """A scene's prep raised an error that is neither bad input nor an output error: a bug (or
    an input case prep does not know). The run stops; the cause is chained."""


def scene_error(e: BaseException, scene: str, out: Path, writing: Path) -> BadInput:
    """What the error ``e`` of scene ``scene`` is: :class:`BadInput` is returned (the scene is
    skipped); an output-side ``OSError`` (writing ``writing`` in ``out``) is raised as an
    :class:`OutputError`; anything else is raised as :class:`SceneFailed` naming the scene and
    chaining ``e`` (a KeyboardInterrupt and the like as they are). Call it in an ``except``."""
    if isinstance(e, BadInput):
        return e
    if isinstance(e, OutputError) or not isinstance(e, Exception):
        raise e
    if is_output_error(e, out):  # disk full, read-only ...: abort, never bad input
        raise output_error(e, writing, f"cannot write scene {scene} into {out}") from None
    raise SceneFailed(
        f"scene {scene}: {type(e).__name__}: {e}. This is not reported as bad input: it is a "
        "bug in mink-ssl or an input case prep does not handle, so the run stopped (finished "
        "scenes are kept; a rerun continues from them). Please report it with this "
        "traceback.") from e


def check_out_vs_raw(raws: Iterable[str | os.PathLike], out: str | os.PathLike,
                     out_flag: str = "--out", raw_flag: str = "--raw") -> None:
    """ValueError if ``out`` and any raw folder are the same folder or one lies inside the other
    (compared as resolved paths: ``..``, relative spellings and symlinks do not hide it)."""
    o = Path(out).resolve()
    for raw in raws:
        r = Path(raw).resolve()
        if o == r:
            how = "is the same folder as"
        elif r in o.parents:
            how = "lies inside"
        elif o in r.parents:
            how = "contains"
        else:
            continue
        raise ValueError(f"{out_flag} {out} {how} {raw_flag} {raw} (both resolve to {o} and "
                         f"{r}); prep writes and removes files in {out_flag}, so it must be a "
                         f"folder of its own, outside the raw data: e.g. {out_flag} "
                         f"{r.parent / (r.name + '_prepared')}")


def prep_lock(out: Path, what: str, log: Callable[[str], None] = print) -> DirLock:
    """The exclusive lock of a prep's output folder (creates the folder)."""
    return DirLock(out, what, notice=log)


def check_params(out: Path, params: dict, *, recorded: Callable[[], dict | None] | None = None,
                 asked_only: bool = False) -> None:
    """Refuse to mix processing parameters in one output directory: ValueError naming the
    differences if ``out/params.json`` holds others than ``params``; writes it when absent.

    Args:
        recorded: without ``params.json`` (deleted, or written by an older version), the
            parameters the folder records elsewhere (None: none), compared instead.
        asked_only: compare only the keys of ``params`` (a key recorded by an older version and
            since dropped is no difference); otherwise every key of either side.
    """
    path = out / "params.json"
    params = json.loads(json.dumps(params))  # as it reads back (tuples -> lists)
    old = json.loads(path.read_text()) if path.is_file() else recorded() if recorded else None
    if old is not None:
        keys = list(params) if asked_only else sorted(set(old) | set(params))
        diff = [k for k in keys if old.get(k) != params.get(k)]
        if diff:
            raise ValueError(f"{out} was prepared with other parameters "
                             f"{ {k: old.get(k) for k in diff} }, now "
                             f"{ {k: params.get(k) for k in diff} }; use a new --out directory "
                             "or the same parameters")
    if not path.is_file():
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(params, indent=1))


@contextmanager
def prep_run(out: Path, what: str, raws: Iterable[str | os.PathLike], params: dict, *,
             clean: Callable[[], None], recorded: Callable[[], dict | None] | None = None,
             asked_only: bool = False, log: Callable[[str], None] = print) -> Iterator[None]:
    """What every prep does around its scenes: refuse an ``out`` that overlaps ``raws``, lock
    ``out`` (held inside the block; ``what`` names the command in the lock's messages), check
    the parameters (:func:`check_params`) and ``clean()`` away the temporaries of a killed run."""
    check_out_vs_raw(raws, out)
    with prep_lock(out, what, log):
        check_params(out, params, recorded=recorded, asked_only=asked_only)
        clean()
        yield


def log_skipped(log: Callable[[str], None], skipped: Iterable[tuple[str, str]]) -> None:
    """One line per skipped scene: ``  skipped <scene>: <reason>``."""
    for scene, reason in skipped:
        log(f"  skipped {scene}: {reason}")


def versions(*packages: str) -> dict[str, str]:
    """Versions of what produced the files: mink_ssl, numpy, python and ``packages`` (no torch
    import: prep does not need it)."""
    out = {"mink_ssl": mink_ssl.__version__, "numpy": np.__version__,
           "python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # pragma: no cover - dependencies of prep
            out[name] = "missing"
    return out


def as_json(value: Any) -> Any:
    """Paths and tuples as JSON-friendly values (for the parameters of the manifest)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    return value


def map_scenes(run_job: Callable, jobs: Sequence, args: tuple, workers: int, progress: bool,
               desc: str) -> list:
    """``[run_job(job, *args) for job in jobs]`` with a progress bar, in ``workers`` processes
    when more than one (``run_job`` must then be a module-level function); any order.

    At most ``workers`` jobs are in flight, so stopping means starting no more. Workers die with
    this process (no orphan keeps writing) and ignore SIGINT / SIGTERM (this process decides).
    Raises :class:`OutputError` (the first one a job raised) or :class:`Interrupted` once the
    jobs in flight have finished.
    """
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=desc, unit="scene", disable=not progress)
    results: list = []
    failure: OutputError | None = None
    with StopSignals(f"{desc}: finishing the scenes in progress, starting no new ones") as stop:
        if workers == 1:
            for job in jobs:
                if stop.requested:
                    break
                results.append(run_job(job, *args))
                bar.update()
        else:
            failure = _pool_map(run_job, jobs, args, workers, stop, results, bar)
    bar.close()
    if failure is not None:
        raise failure
    if stop.requested:
        raise Interrupted(f"{desc}: stopped by {stop.name}: {len(results)} of {len(jobs)} scenes "
                          f"processed in this run, {len(jobs) - len(results)} not started; no "
                          "manifest written. Rerun the same command to continue (finished "
                          "scenes are kept).", stop.signum)
    return results


def _pool_map(run_job, jobs, args, workers, stop: StopSignals, results: list, bar):
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    failure = None
    todo = iter(jobs)
    pool = ProcessPoolExecutor(max_workers=workers, initializer=worker_init,
                               initargs=(os.getpid(),))
    try:
        running = set()
        while True:
            while len(running) < workers and not stop.requested and failure is None:
                job = next(todo, None)
                if job is None:
                    break
                running.add(pool.submit(run_job, job, *args))
            if not running:
                break
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                try:
                    results.append(fut.result())
                except OutputError as e:
                    failure = failure or e
                bar.update()
    except BaseException:  # a second signal, or a bug in a job: end the workers now
        for p in list(getattr(pool, "_processes", {}).values()):
            p.kill()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return failure

