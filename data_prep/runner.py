"""What every prep run shares around its per-scene work: the raw / output path check, the output
lock, and the scene scheduler (pool workers, signals, output-side I/O errors).

- ``--out`` must not overlap any raw input folder, however spelled (same folder, either one
  inside the other, through symlinks): prep only ever deletes what it created, and an output
  inside the input (or the reverse) would mix the two.
- One prep per output folder (:class:`mink_ssl.safety.DirLock`).
- SIGINT / SIGTERM: no new scene is started, the scenes in progress finish (each is written
  atomically), and the run ends with :class:`mink_ssl.safety.Interrupted` (exit 128 + signal);
  rerunning the command continues. A second signal aborts at once (in-progress scenes leave
  only hidden temporaries, removed by the next run).
- An :class:`mink_ssl.safety.OutputError` from a scene (disk full, read-only, no permission)
  stops scheduling and aborts the run once the scenes in progress are done.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

from mink_ssl.safety import DirLock, Interrupted, OutputError, StopSignals, worker_init


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

