"""One scene of pair prep under its claim (:mod:`data_prep.claims`), and what a scene that is not
written leaves behind: its *record*.

Every prep run, single-process or one of many sharing ``--out``, prepares a scene this way:
skip it if it is complete or recorded, claim it (or leave it to the live process that holds
it), prepare it in a temporary folder of its own (``.tmp-<claim token>-<scene>``), publish it
while the claim is still ours, release the claim.

A scene that is skipped (bad input) or failed (the overlap self-check) writes no scene folder;
its record ``<out>/.prep-status/<scene>.json`` holds the status and reason the manifest lists,
so that ``--finalize`` can write the same manifest from the files alone. A record stands (the
scene is not tried again) while the scene's input is unchanged (a fingerprint of the names,
sizes, modification times and modes of the scene folder's files and of its sub-folders'),
the parameters and the mink-ssl version are the same, and, for a failed scene, the number of
self-checked pairs. A scene skipped because its input could not be read (an I/O error) is
tried again by any later run.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import mink_ssl
from data_prep.claims import CLAIM_TIMEOUT_S, SceneClaims, describe
from data_prep.pairs.scene import (PrepParams, SceneReport, complete_scene, prepare_scene,
                                   remove_ours, scene_counts, scene_name_problem)
from mink_ssl.io import atomic_path
from mink_ssl.errors import OutputError, output_error

STATUS_DIR = ".prep-status"
TOKEN_LEN = 12  # hex characters of a claim token


@dataclass(frozen=True)
class ClaimSettings:
    timeout: float = CLAIM_TIMEOUT_S  # seconds without a heartbeat before another host's claim
    # is stale


def tmp_name(token: str, scene: str) -> str:
    return f".tmp-{token}-{scene}"


def tmp_owner(name: str) -> tuple[str | None, str]:
    """(claim token, scene) of a temporary folder's name; token None for the older
    ``.tmp-<scene>`` names."""
    rest = name[len(".tmp-"):]
    token = rest[:TOKEN_LEN]
    if len(rest) > TOKEN_LEN + 1 and rest[TOKEN_LEN] == "-" and all(
            c in "0123456789abcdef" for c in token):
        return token, rest[TOKEN_LEN + 1:]
    return None, rest


def remove_temporaries(out: Path, claims: SceneClaims) -> None:
    """The temporary folders in ``out`` that no live claim owns (only prep's own are removed;
    anything else there is an OutputError: :func:`data_prep.pairs.scene.remove_ours`)."""
    for stale in sorted(out.glob(".tmp-*")):
        token, scene = tmp_owner(stale.name)
        if token is None or claims.live_token(scene) != token:
            remove_ours(stale)


# -- records --------------------------------------------------------------------------------
def input_fingerprint(scene_dir: Path) -> str:
    """sha256 over (name, size, mtime, mode) of the scene folder's entries and of its
    sub-folders' entries (links followed: a scene folder may link its data)."""
    h = hashlib.sha256()

    def add(folder: Path, prefix: str, depth: int) -> None:
        try:
            names = sorted(os.listdir(folder))
        except OSError as e:
            h.update(f"{prefix}: unreadable {e.errno}\n".encode())
            return
        for name in names:
            p = folder / name
            try:
                st = p.stat()
            except OSError as e:
                h.update(f"{prefix}{name}: unreadable {e.errno}\n".encode())
                continue
            h.update(f"{prefix}{name} {st.st_size} {st.st_mtime_ns} {st.st_mode:o}\n".encode())
            if depth and p.is_dir():
                add(p, f"{prefix}{name}/", depth - 1)

    add(scene_dir, "", 1)
    return h.hexdigest()


def _record_path(out: Path, scene: str) -> Path:
    folder = out / STATUS_DIR
    if os.path.islink(folder):
        raise OutputError(f"{folder} is a symbolic link (to {os.readlink(folder)}), not the "
                          f"records folder of prep; prep follows no link out of --out. Remove "
                          f"the link (rm {folder}) and rerun")
    return folder / f"{scene}.json"


def _identity(params: PrepParams, verify_pairs: int, status: str, fingerprint: str) -> dict:
    return {"params": asdict(params), "mink_ssl_version": mink_ssl.__version__,
            "input": fingerprint, **({"verify_pairs": verify_pairs} if status == "failed" else {})}


def read_record(out: Path, scene_dir: Path, params: PrepParams, verify_pairs: int,
                retry: bool = True) -> SceneReport | None:
    """The recorded "skipped" / "failed" report of the scene, if its record stands; with
    ``retry`` False, not the record of an input that could not be read (to be tried again)."""
    path = _record_path(out, scene_dir.name)
    if path.is_symlink() or not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        status = rec["status"]
        if (rec.get("retry") and not retry) or status not in ("skipped", "failed"):
            return None
        want = _identity(params, verify_pairs, status, input_fingerprint(scene_dir))
        if any(rec.get(k) != v for k, v in want.items()):
            return None
        return SceneReport(scene_dir.name, status, reason=rec["reason"],
                           self_check=rec.get("self_check", {}), recorded=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_record(out: Path, scene_dir: Path, report: SceneReport, params: PrepParams,
                 verify_pairs: int) -> None:
    path = _record_path(out, report.scene)
    rec = {"scene": report.scene, "status": report.status, "reason": report.reason,
           "self_check": report.self_check, "retry": report.input_error,
           **_identity(params, verify_pairs, report.status, input_fingerprint(scene_dir))}
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(rec, indent=1))
    except OSError as e:
        raise output_error(e, path, f"cannot write {path}") from None


def remove_record(out: Path, scene: str) -> None:
    path = _record_path(out, scene)
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise output_error(e, path, f"cannot remove {path}") from None


def any_record(out: Path, scene: str) -> dict | None:
    """The scene's record, whether it stands or not (for messages)."""
    path = _record_path(out, scene)
    try:
        return None if path.is_symlink() else json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -- one scene ------------------------------------------------------------------------------
def finished(scene_dir: Path, out: Path, params: PrepParams, verify_pairs: int,
             retry: bool = False) -> SceneReport | None:
    """The scene's report if nothing is left to do: a bad name, complete, or recorded (with
    ``retry``, also recorded as unreadable: what the manifest lists; prep tries it again)."""
    scene = scene_dir.name
    bad_name = scene_name_problem(scene)
    if bad_name is not None:
        return SceneReport(scene, "skipped", reason=bad_name)
    done = complete_scene(out / scene)
    if done is not None:
        return SceneReport(scene, "already done", **scene_counts(done))
    return read_record(out, scene_dir, params, verify_pairs, retry)


def prepare_claimed(scene_dir: Path, out: Path, params: PrepParams, verify_pairs: int = 32,
                    settings: ClaimSettings = ClaimSettings()) -> SceneReport:
    """Prepare one scene under its claim (module docstring); a module-level function, so it
    runs in pool workers. Status "held": another live process holds the claim (reason: who)."""
    report = finished(scene_dir, out, params, verify_pairs)
    if report is not None:
        return report
    claims = SceneClaims(out, settings.timeout)
    claim = claims.claim(scene_dir.name)
    if claim is None:
        got = claims.read(scene_dir.name)
        return SceneReport(scene_dir.name, "held",
                           reason="claimed by " + (describe(got[0]) if got else "another process"))
    try:
        report = finished(scene_dir, out, params, verify_pairs)  # done while we claimed it
        if report is not None:
            return report
        if claim.took_over and isinstance(claim.took_over.get("token"), str):
            remove_ours(out / tmp_name(claim.took_over["token"], scene_dir.name))
        remove_ours(out / f".tmp-{scene_dir.name}")  # of an older version
        report = prepare_scene(scene_dir, out, params, verify_pairs,
                               tmp_name=tmp_name(claim.token, scene_dir.name),
                               still_ours=claim.still_ours)
        if report.status in ("skipped", "failed") and claim.still_ours():
            write_record(out, scene_dir, report, params, verify_pairs)
        elif report.status == "done":
            remove_record(out, scene_dir.name)  # of an earlier input of this scene
        return report
    finally:
        claim.release()
