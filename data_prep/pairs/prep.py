"""ScanNet pair prep: scenes -> fragments every ``frame_skip`` frames -> overlap -> pair lists.

Output layout (``out/``)::

    <scene>/fragments.{npz,bin}   the scene's fragments (see mink_ssl.formats.fragments)
    <scene>/overlap.txt           every pair of the scene: ``frag_a frag_b overlap``
    <scene>/scene.json            what was done: fragments, skipped frames with reasons, counts
    pairs.txt                     kept pairs (overlap >= min_overlap) of all scenes, same format
    manifest.json                 schema, parameters, counts, code version, skipped scenes

A scene is prepared in ``out/.tmp-<scene>/`` and renamed into place when complete, so a scene
directory either is whole or does not exist (:mod:`data_prep.pairs.scene`); a rerun skips
complete scenes (every file that ``scene.json`` lists is there with its recorded size) and
redoes the rest, and ``pairs.txt`` / ``manifest.json`` are rebuilt (atomically) from the scene
directories.

Safety (see :mod:`data_prep.runner`): ``--out`` may not overlap ``--raw``; one prep at a time per
``--out`` (a lock file); prep removes only folders that carry its marker file
(``.mink-ssl-scene``) and never follows a symlink out of ``--out``; an output-side I/O error
aborts the run; SIGINT / SIGTERM finish the scenes in progress and stop.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import mink_ssl
from data_prep.pairs.overlap import SELF_CHECK_TOL
from data_prep.pairs.scene import (SCENE_FILE, PrepParams, SceneReport, prepare_scene,
                                   remove_temporaries)
from data_prep.runner import log_skipped, map_scenes, prep_run
from data_prep.scannet.scans import list_scenes
from mink_ssl.formats.fragments import SCHEMA as FRAGMENTS_SCHEMA
from mink_ssl.formats.manifest import PAIRS_SCHEMA, write_manifest
from mink_ssl.io import atomic_path
from mink_ssl.safety import output_error


def run(raw: Path, out: Path, params: PrepParams, workers: int = 1,
        scenes: Sequence[str] | None = None, progress: bool = True,
        log: Callable[[str], None] = print, verify_pairs: int = 32) -> dict:
    """Prepare every scene of ``raw`` into ``out``; returns the manifest (also written).
    ``verify_pairs``: pairs per scene checked against the overlap's definition (0: off)."""
    raw, out = Path(raw), Path(out)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if verify_pairs < 0:
        raise ValueError(f"--verify-pairs must be >= 0 (0 turns the self-check off), got "
                         f"{verify_pairs}")
    scene_dirs = list_scenes(raw, scenes)
    # pairs of one folder must agree: no parameters but the folder's; without params.json
    # (deleted, or an older version) those its scenes record
    with prep_run(out, "mink-ssl-prep scannet", [raw], asdict(params), asked_only=True,
                  recorded=lambda: _recorded_params(out), clean=lambda: remove_temporaries(out),
                  log=log):
        t0 = time.perf_counter()
        reports = map_scenes(prepare_scene, scene_dirs, (out, params, verify_pairs), workers,
                             progress, "scenes")
        reports.sort(key=lambda r: r.scene)
        done = [r for r in reports if r.status in ("done", "already done")]
        _write_pairs(out, done, params.min_overlap)
        manifest = _manifest(raw, params, reports, done, verify_pairs)
        write_manifest(out, manifest)
        _log_run(log, manifest, reports, done, params, time.perf_counter() - t0)
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
        "skipped_scenes": {r.scene: r.reason for r in reports if r.status == "skipped"},
    }


def _log_run(log: Callable[[str], None], manifest: dict, reports: list[SceneReport],
             done: list[SceneReport], params: PrepParams, seconds: float) -> None:
    c = manifest["counts"]
    log(f"prep: {c['scenes_done']}/{c['scenes']} scenes done "
        f"({sum(r.status == 'already done' for r in reports)} already done), "
        f"{c['fragments']} fragments, {c['pairs_kept']}/{c['pairs']} pairs >= "
        f"{params.min_overlap}, {c['frames_skipped']} frames skipped, {seconds:.1f} s")
    for r in done:
        sc = r.self_check
        log(f"  {r.scene}: {r.fragments} fragments, {r.pairs_kept}/{r.pairs} pairs kept; "
            + (f"self-check: {sc['pairs_checked']} pairs against the definition, max |diff| "
               f"{sc['max_abs_diff']:.1e}" if sc else "self-check off"))
    log_skipped(log, manifest["skipped_scenes"].items())
    for r in reports:
        if r.status == "failed":
            log(f"  FAILED {r.scene}: {r.reason}")
    for r in done:  # damaged payloads and implausible poses (lost tracking is routine)
        for reason, fids in r.skipped_frames.items():
            if reason != "non-finite pose" and not reason.startswith("fewer than"):
                log(f"  {r.scene}: skipped frame(s) {fids}: {reason}")
