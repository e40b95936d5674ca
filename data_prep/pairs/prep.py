"""ScanNet pair prep: scenes -> fragments every ``frame_skip`` frames -> overlap -> pair lists.

Output layout (``out/``)::

    <scene>/fragments.{npz,bin}   the scene's fragments (see mink_ssl.formats.fragments)
    <scene>/overlap.txt           every pair of the scene: ``frag_a frag_b overlap``
    <scene>/scene.json            what was done: fragments, skipped frames with reasons, counts
    pairs.txt                     kept pairs (overlap >= min_overlap) of all scenes, same format
    manifest.json                 schema, parameters, counts, code version, skipped scenes
                                  (``skipped_scenes`` {scene: reason}, as every prep writes)
    params.json                   the processing parameters (other ones are refused)
    .prep-status/<scene>.json     the record of a scene skipped or failed (no scene folder)
    .claims/<scene>               while a scene is being prepared: who prepares it

A scene is prepared in a temporary folder and renamed into place when complete, so a scene
directory either is whole or does not exist (:mod:`data_prep.pairs.scene`); a rerun skips
complete scenes (every file that ``scene.json`` lists is there with its recorded size) and
recorded ones (:mod:`data_prep.pairs.claimed`), and redoes the rest. ``pairs.txt`` and
``manifest.json`` are written (atomically) from these files alone: a rerun, or a finalize,
writes them byte for byte the same.

Three ways to run it:

- :func:`run`: one process (and its ``workers``) prepares every scene and writes the pair list
  and the manifest, holding the folder's lock (:class:`mink_ssl.locks.DirLock`) throughout.
- :func:`run_shard`: one of many processes, on one machine or many, sharing ``out``: it
  prepares the scenes of its shard (every ``n``-th scene of the sorted list, from the
  ``i``-th), one scene per claim (:mod:`data_prep.claims`), and writes no folder-wide file.
  Several processes may run the same shard (e.g. ``0/1`` everywhere: they share all scenes).
- :func:`finalize`: after the shards, writes ``pairs.txt`` and ``manifest.json`` from the
  finished scenes, under the folder's lock; refused while a scene is unfinished or claimed.

Safety (see :mod:`data_prep.runner`): ``--out`` may not overlap ``--raw``; prep removes only
folders that carry its marker file (``.mink-ssl-scene``) and never follows a symlink out of
``--out``; an output-side I/O error aborts the run; SIGINT / SIGTERM finish the scenes in
progress and stop.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import mink_ssl
from data_prep.claims import CLAIM_TIMEOUT_S, SceneClaims
from data_prep.pairs.claimed import (ClaimSettings, any_record, finished, prepare_claimed,
                                     remove_temporaries)
from data_prep.pairs.overlap import SELF_CHECK_TOL
from data_prep.pairs.scene import SCENE_FILE, PrepParams, SceneReport
from data_prep.runner import check_out_vs_raw, check_params, log_skipped, map_scenes, prep_run
from data_prep.scannet.scans import list_scenes
from mink_ssl.formats.fragments import SCHEMA as FRAGMENTS_SCHEMA
from mink_ssl.formats.manifest import PAIRS_SCHEMA, SKIPPED, skipped_scenes, write_manifest
from mink_ssl.io import atomic_path
from mink_ssl.errors import output_error


class PrepIncomplete(RuntimeError):
    """Scenes are not prepared yet (or are being prepared): no manifest was written."""


def _check(workers: int, verify_pairs: int, claim_timeout: float) -> None:
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if verify_pairs < 0:
        raise ValueError(f"--verify-pairs must be >= 0 (0 turns the self-check off), got "
                         f"{verify_pairs}")
    if not claim_timeout > 0:
        raise ValueError(f"--claim-timeout must be positive (seconds), got {claim_timeout}")


def _prep_run(raw: Path, out: Path, params: PrepParams, clean: Callable[[], None],
              log: Callable[[str], None]):
    """Lock ``out`` and check it (pairs of one folder must agree: no parameters but the
    folder's; without params.json, deleted or of an older version, those its scenes record)."""
    return prep_run(out, "mink-ssl-prep scannet", [raw], asdict(params), asked_only=True,
                    recorded=lambda: _recorded_params(out), clean=clean, log=log)


def run(raw: Path, out: Path, params: PrepParams, workers: int = 1,
        scenes: Sequence[str] | None = None, progress: bool = True,
        log: Callable[[str], None] = print, verify_pairs: int = 32,
        claim_timeout: float = CLAIM_TIMEOUT_S) -> dict:
    """Prepare every scene of ``raw`` into ``out``; returns the manifest (also written).
    ``verify_pairs``: pairs per scene checked against the overlap's definition (0: off)."""
    raw, out = Path(raw), Path(out)
    _check(workers, verify_pairs, claim_timeout)
    scene_dirs = list_scenes(raw, scenes)
    claims = SceneClaims(out, claim_timeout)

    def clean():  # what killed runs left: temporaries and claims no live process holds
        remove_temporaries(out, claims)
        claims.remove_stale()

    with _prep_run(raw, out, params, clean, log):
        t0 = time.perf_counter()
        try:
            reports = map_scenes(prepare_claimed, scene_dirs,
                                 (out, params, verify_pairs, ClaimSettings(claim_timeout)),
                                 workers, progress, "scenes")
        finally:
            claims.drop_dir()  # when no other process claims a scene
        manifest = _write_outputs(raw, out, params, scene_dirs, verify_pairs)
        reports.sort(key=lambda r: r.scene)
        _log_run(log, manifest, reports, time.perf_counter() - t0)
        return manifest


def run_shard(raw: Path, out: Path, params: PrepParams, shard: tuple[int, int],
              workers: int = 1, scenes: Sequence[str] | None = None, progress: bool = True,
              log: Callable[[str], None] = print, verify_pairs: int = 32,
              claim_timeout: float = CLAIM_TIMEOUT_S) -> list[SceneReport]:
    """Prepare shard ``(i, n)`` of ``raw``'s scenes into ``out`` alongside other processes;
    returns this process's reports (status "held": left to the live process holding it)."""
    raw, out = Path(raw), Path(out)
    _check(workers, verify_pairs, claim_timeout)
    i, n = shard
    if not (isinstance(i, int) and isinstance(n, int) and n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard must be I/N with 0 <= I < N, got {i}/{n} (e.g. --shard "
                         "0/50, or $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array "
                         "0-49)")
    scene_dirs = list_scenes(raw, scenes)
    mine = scene_dirs[i::n]
    check_out_vs_raw([raw], out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(e, out, f"cannot create the output directory {out}") from None
    check_params(out, asdict(params), recorded=lambda: _recorded_params(out), asked_only=True)
    t0 = time.perf_counter()
    args = (out, params, verify_pairs, ClaimSettings(claim_timeout))
    reports = map_scenes(prepare_claimed, mine, args, workers, progress, f"shard {i}/{n}")
    held = [d for d in mine if d.name in {r.scene for r in reports if r.status in ("held",
                                                                                  "lost")}]
    if held:  # a second look: done by now, or their holder gone
        again = {r.scene: r for r in map_scenes(prepare_claimed, held, args, workers, False,
                                                f"shard {i}/{n}")}
        reports = [again.get(r.scene, r) for r in reports]
    reports.sort(key=lambda r: r.scene)
    count = Counter("recorded" if r.recorded else r.status for r in reports)
    log(f"prep shard {i}/{n}: {len(mine)} of {len(scene_dirs)} scenes: {count['done']} "
        f"prepared, {count['already done']} already done, {count['skipped']} skipped, "
        f"{count['failed']} failed, {count['recorded']} skipped or failed earlier, "
        f"{count['held'] + count['lost']} left to other processes, "
        f"{time.perf_counter() - t0:.1f} s; run --finalize when every shard is done")
    for r in reports:
        if r.status == "done":
            log(f"  prepared {r.scene}: {r.fragments} fragments, {r.pairs_kept}/{r.pairs} pairs "
                "kept")
        elif r.status in ("skipped", "failed", "held", "lost") and not r.recorded:
            log(f"  {r.status} {r.scene}: {r.reason}")
    return reports


def finalize(raw: Path, out: Path, params: PrepParams, scenes: Sequence[str] | None = None,
             log: Callable[[str], None] = print, verify_pairs: int = 32,
             claim_timeout: float = CLAIM_TIMEOUT_S) -> dict:
    """Write ``pairs.txt`` and ``manifest.json`` of ``out`` from its finished scenes (the same
    bytes a single-process run writes); returns the manifest. :class:`PrepIncomplete` while a
    scene of ``raw`` is unfinished or claimed by a live process."""
    raw, out = Path(raw), Path(out)
    _check(1, verify_pairs, claim_timeout)
    scene_dirs = list_scenes(raw, scenes)
    if not (out / "params.json").is_file() and not _recorded_params(out):
        raise PrepIncomplete(f"{out} holds no prepared scene: run the shards (--shard I/N) "
                             "first, then --finalize")
    claims = SceneClaims(out, claim_timeout)

    def clean():
        live = claims.live()
        if live:
            raise PrepIncomplete(
                f"{len(live)} scene(s) of {out} are being prepared: " + "; ".join(
                    f"{s} by {h}" for s, h in list(live.items())[:10])
                + ". Run --finalize when those processes have ended (a claim of another "
                f"machine counts as abandoned {claim_timeout:.0f} s after its last heartbeat)")
        remove_temporaries(out, claims)
        claims.remove_stale()

    with _prep_run(raw, out, params, clean, log):
        t0 = time.perf_counter()
        manifest = _write_outputs(raw, out, params, scene_dirs, verify_pairs)
        reports = [_report(d, out, params, verify_pairs) for d in scene_dirs]
        _log_run(log, manifest, reports, time.perf_counter() - t0)
        return manifest


def _report(scene_dir: Path, out: Path, params: PrepParams, verify_pairs: int) -> SceneReport:
    r = finished(scene_dir, out, params, verify_pairs, retry=True)
    return r if r is not None else SceneReport(scene_dir.name, "unfinished")


def _write_outputs(raw: Path, out: Path, params: PrepParams, scene_dirs: list[Path],
                   verify_pairs: int) -> dict:
    """``pairs.txt`` and ``manifest.json`` from the scenes' files; PrepIncomplete (writing
    neither) if a scene is neither complete nor recorded."""
    reports = [_report(d, out, params, verify_pairs) for d in scene_dirs]
    missing = [r.scene for r in reports if r.status == "unfinished"]
    if missing:
        claims = SceneClaims(out)
        why = []
        for scene in missing[:10]:
            rec, got = any_record(out, scene), claims.read(scene)
            why.append(scene + (" (claimed)" if got else " (its record is out of date: the "
                                "input changed)" if rec else ""))
        raise PrepIncomplete(
            f"{len(missing)} of {len(reports)} scenes of {raw} are not prepared in {out}: "
            f"{', '.join(why)}{' ...' if len(missing) > 10 else ''}. Run the shards again "
            "(each prepares only what is missing), then --finalize")
    done = [r for r in reports if r.status == "already done"]
    _write_pairs(out, done, params.min_overlap)
    manifest = _manifest(raw, params, reports, done, verify_pairs)
    write_manifest(out, manifest)
    return manifest


def _recorded_params(out: Path) -> dict | None:
    """The parameters recorded in the ``scene.json`` of the folder's first readable scene."""
    for meta in sorted(out.glob(f"*/{SCENE_FILE}")):
        try:
            return json.loads(meta.read_text())["params"]
        except (OSError, ValueError, KeyError):
            continue
    return None


def _write_pairs(out: Path, done: list[SceneReport], min_overlap: float) -> None:
    """``pairs.txt``: the pairs of the scenes done at or above ``min_overlap``, atomically."""
    try:
        with atomic_path(out / "pairs.txt") as tmp, open(tmp, "w") as f:
            for r in done:
                for line in open(out / r.scene / "overlap.txt"):
                    if float(line.rsplit(" ", 1)[1]) >= min_overlap:
                        f.write(line)
    except OSError as e:
        raise output_error(e, out / "pairs.txt", f"cannot write {out / 'pairs.txt'}") from None


def _manifest(raw: Path, params: PrepParams, reports: list[SceneReport],
              done: list[SceneReport], verify_pairs: int) -> dict:
    failed = [r for r in reports if r.status == "failed"]
    return {
        "schema": PAIRS_SCHEMA, "mink_ssl_version": mink_ssl.__version__,
        "params": asdict(params), "raw": str(raw.resolve()),
        "fragment_format": FRAGMENTS_SCHEMA, "pairs_file": "pairs.txt",
        "counts": {"scenes": len(reports), "scenes_done": len(done),
                   "scenes_skipped": sum(r.status == "skipped" for r in reports),
                   "scenes_failed": len(failed),
                   "fragments": sum(r.fragments for r in done),
                   "pairs": sum(r.pairs for r in done),
                   "pairs_kept": sum(r.pairs_kept for r in done),
                   "frames_skipped": sum(len(v) for r in done for v in r.skipped_frames.values())},
        "scenes": {r.scene: {"fragments": r.fragments, "pairs_kept": r.pairs_kept,
                             "skipped_frames": r.skipped_frames, "self_check": r.self_check}
                   for r in done},
        "self_check": {"pairs_per_scene": verify_pairs, "tolerance": SELF_CHECK_TOL,
                       "pairs_checked": sum(r.self_check.get("pairs_checked", 0) for r in done),
                       "max_abs_diff": max([r.self_check.get("max_abs_diff", 0.0)
                                            for r in done], default=0.0)},
        "failed_scenes": {r.scene: {"reason": r.reason, "self_check": r.self_check}
                          for r in failed},
        SKIPPED: {r.scene: r.reason for r in reports if r.status == "skipped"},
    }


def _log_run(log: Callable[[str], None], manifest: dict, reports: list[SceneReport],
             seconds: float) -> None:
    """The run's summary; ``reports`` are this run's (statuses "done" / "already done" ...),
    the counts the manifest's."""
    c, done = manifest["counts"], [r for r in reports if r.status in ("done", "already done")]
    log(f"prep: {c['scenes_done']}/{c['scenes']} scenes done "
        f"({sum(r.status == 'already done' for r in reports)} already done), "
        f"{c['fragments']} fragments, {c['pairs_kept']}/{c['pairs']} pairs >= "
        f"{manifest['params']['min_overlap']}, {c['frames_skipped']} frames skipped, "
        f"{seconds:.1f} s")
    for r in done:
        sc = r.self_check
        log(f"  {r.scene}: {r.fragments} fragments, {r.pairs_kept}/{r.pairs} pairs kept; "
            + (f"self-check: {sc['pairs_checked']} pairs against the definition, max |diff| "
               f"{sc['max_abs_diff']:.1e}" if sc else "self-check off"))
    log_skipped(log, skipped_scenes(manifest).items())
    for scene, failed in manifest["failed_scenes"].items():
        log(f"  FAILED {scene}: {failed['reason']}")
    for r in done:  # damaged payloads and implausible poses (lost tracking is routine)
        for reason, fids in r.skipped_frames.items():
            if reason != "non-finite pose" and not reason.startswith("fewer than"):
                log(f"  {r.scene}: skipped frame(s) {fids}: {reason}")
