"""One scene of ScanNet pair prep: its fragments every ``frame_skip`` frames, the overlap of every
pair of them and ``scene.json``, written into ``out/<scene>/`` atomically (see
:mod:`data_prep.pairs.prep` for the layout).

A scene is prepared in a temporary folder of ``out`` (``.tmp-<claim token>-<scene>``, see
:mod:`data_prep.pairs.claimed`) and renamed into place when complete, so a scene directory
either is whole or does not exist; a complete scene (every file that ``scene.json`` lists is
there with its recorded size) is not redone, nor replaced by another worker's. Prep removes
only folders that carry its marker file (``.mink-ssl-scene``) and never follows a symlink out
of ``--out``.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from data_prep.pairs.overlap import (RADIUS_FACTOR, SELF_CHECK_TOL, VOXEL_SIZE, overlap_matrix,
                                     verify_overlap, voxel_downsample)
from data_prep.runner import scene_error
from data_prep.scannet.scans import open_scene
from data_prep.scannet.sens import SensFormatError
from mink_ssl.formats.fragments import FragmentWriter, encode_color, encode_depth, fragment_name
from mink_ssl.geometry import backproject
from mink_ssl.errors import BadInput, OutputError, output_error
from mink_ssl.formats.scene_record import finished_record

SCENE_FILE = "scene.json"
MARKER = ".mink-ssl-scene"  # in every folder prep creates: the only folders it may remove
MAX_TRANSLATION = 1000.0  # m; a camera farther than this from the origin is a broken pose


class SelfCheckFailed(Exception):
    """The fast overlap disagrees with the definition on a sampled pair: a bug, not bad input.
    The scene is not written; the manifest lists it under ``failed_scenes``."""

    def __init__(self, scene: str, check: dict):
        i, j = check["worst_pair"]
        super().__init__(
            f"overlap self-check failed for {scene}: fragments {i} and {j} have overlap "
            f"{check['fast']} by the fast path but {check['direct']} by the definition "
            f"(|difference| {check['max_abs_diff']:.3g} > {SELF_CHECK_TOL:g}); the scene was not "
            "written. This is a bug in mink-ssl: please report it with this message")
        self.check = check


@dataclass(frozen=True)
class PrepParams:
    frame_skip: int = 25  # take frames whose index in the sequence is a multiple of this
    min_overlap: float = 0.3  # pairs at or above this ratio are kept
    voxel_size: float = VOXEL_SIZE  # m, downsampling for the overlap test
    radius_factor: float = RADIUS_FACTOR  # neighbour radius in voxels
    max_depth: float | None = None  # m; None keeps every valid depth (the original pipeline)
    min_points: int = 1000  # a frame with fewer valid depth points is skipped as empty
    jpeg_quality: int = 90
    invalid_depth: int | None = None  # raw depth value marking invalid pixels besides 0 (e.g.
    # 65535 in 7-Scenes-style exports); None treats only 0 as invalid, as the original pipeline

    def __post_init__(self):
        checks = [("frame_skip", self.frame_skip >= 1, "an integer >= 1"),
                  ("min_overlap", 0.0 <= self.min_overlap <= 1.0, "in [0, 1]"),
                  ("voxel_size", self.voxel_size > 0, "positive (metres)"),
                  ("radius_factor", self.radius_factor > 0, "positive"),
                  ("max_depth", self.max_depth is None or self.max_depth > 0, "positive or None"),
                  ("min_points", self.min_points >= 1, "an integer >= 1"),
                  ("jpeg_quality", 1 <= self.jpeg_quality <= 100, "in 1..100"),
                  ("invalid_depth", self.invalid_depth is None
                   or 1 <= self.invalid_depth <= 65535, "a raw uint16 depth value in 1..65535")]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")


@dataclass
class SceneReport:
    scene: str
    # "done" | "already done" | "skipped" | "failed" (self-check); sharded prep adds "held"
    # (claimed by another live worker) and "lost" (our claim was taken over: work discarded)
    status: str
    reason: str = ""
    fragments: int = 0
    pairs: int = 0
    pairs_kept: int = 0
    skipped_frames: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0
    self_check: dict = field(default_factory=dict)  # overlap.SelfCheck.summary(); {} if off
    input_error: bool = field(default=False, repr=False)  # skipped: an input file was unreadable
    recorded: bool = field(default=False, repr=False)  # skipped / failed by an earlier run


class StageClock:
    """Seconds a scene's prep spends per stage (for benchmarks; prep runs without one):
    ``decode`` (read the sampled frames, decode depth and colour, re-encode colour at the depth
    size), ``clouds`` (back-projection, 5 cm downsampling), ``overlap`` (all pairs and the
    self-check) and ``write`` (fragment files, overlap.txt, scene.json, the rename): wall
    seconds in :attr:`seconds`, CPU seconds of the process in :attr:`cpu`. :attr:`current`
    names the stage in progress (None between stages)."""

    STAGES = ("decode", "clouds", "overlap", "write")

    def __init__(self):
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.cpu = dict.fromkeys(self.STAGES, 0.0)
        self.current: str | None = None

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self.current, t0, c0 = stage, time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t0
            self.cpu[stage] += time.process_time() - c0
            self.current = None


def _stage(clock: StageClock | None, stage: str):
    return nullcontext() if clock is None else clock(stage)


def pose_problem(pose: np.ndarray) -> str | None:
    """Why a camera-to-world pose is unusable (None if it is fine): non-finite (ScanNet's lost
    tracking), not a rigid transform, or a camera farther than MAX_TRANSLATION from the origin."""
    if not np.isfinite(pose).all():
        return "non-finite pose"
    p = np.asarray(pose, np.float64).reshape(4, 4)
    rot, t = p[:3, :3], p[:3, 3]
    if (not np.allclose(p[3], [0, 0, 0, 1], atol=1e-4)
            or not np.allclose(rot.T @ rot, np.eye(3), atol=1e-2) or np.linalg.det(rot) < 0):
        return (f"pose is not a rigid transform (rotation not orthonormal with det +1, or last "
                f"row not 0 0 0 1): {np.round(p, 4).tolist()}")
    if np.abs(t).max() > MAX_TRANSLATION:
        return f"pose translation {np.round(t, 4).tolist()} m is beyond {MAX_TRANSLATION:g} m"
    return None


def scene_name_problem(name: str) -> str | None:
    """Why a scene folder name cannot be used (pair lists are space-separated lines)."""
    if not name or any(c.isspace() for c in name) or not name.isprintable():
        return (f"scene name {name!r} contains whitespace or control characters; pairs.txt is "
                "space-separated, one pair per line: rename the folder (e.g. "
                f"{'_'.join(name.split())!r})")
    return None


def _fragments(reader, params: PrepParams, writer, skipped: dict[str, list[int]],
               clock: StageClock | None = None):
    """Yield the 5 cm overlap cloud of each usable sampled frame, writing it to ``writer``.

    Only the sampled frames are read (the reader hops over the others' payloads by their
    headers). A frame is skipped (its index recorded under the reason in ``skipped``) when its
    pose is unusable (:func:`pose_problem`) or its colour or depth payload does not decode:
    every payload that is kept is decoded here, so training never meets a damaged one."""
    h = reader.header
    ids = list(getattr(reader, "frame_ids", range(len(reader))))
    for fid in (i for i in ids if i % params.frame_skip == 0):
        with _stage(clock, "decode"):
            frame = reader.frame(fid)
            pose = frame.camera_to_world
            bad = pose_problem(pose)
            if bad is not None:
                skipped.setdefault(bad, []).append(fid)
                continue
            try:
                depth = frame.depth(h)  # (H, W) uint16
                color = frame.color(h)  # (h, w, 3) uint8: decoded to prove the payload is intact
            except SensFormatError as e:
                skipped.setdefault(f"damaged payload: {e}", []).append(fid)
                continue
            changed = (params.invalid_depth is not None
                       and bool((depth == params.invalid_depth).any()))
            if changed:  # a sensor's "no reading" value besides 0: stored and back-projected as 0
                depth = np.where(depth == params.invalid_depth, np.uint16(0), depth)
        with _stage(clock, "clouds"):
            pts, _ = backproject(depth, h.intrinsic_depth, h.depth_shift, pose,
                                 max_depth=params.max_depth)
        if len(pts) < params.min_points:
            skipped.setdefault(f"fewer than {params.min_points} valid depth points", []).append(fid)
            continue
        with _stage(clock, "decode"):
            same_size = (h.color_height, h.color_width) == depth.shape
            color_bytes = (frame.color_bytes if same_size and h.color_compression == "jpeg"
                           else encode_color(color, depth.shape, params.jpeg_quality))
            depth_bytes = (frame.depth_bytes
                           if h.depth_compression == "zlib_ushort" and not changed
                           else encode_depth(depth))
        with _stage(clock, "write"):
            writer.add(fid, pose, depth_bytes, color_bytes)
        with _stage(clock, "clouds"):
            cloud = voxel_downsample(pts, params.voxel_size)
        yield cloud


def prepare_scene(scene_dir: Path, out: Path, params: PrepParams, verify_pairs: int = 32, *,
                  clock: StageClock | None = None, tmp_name: str | None = None,
                  still_ours: Callable[[], bool] | None = None) -> SceneReport:
    """Prepare one scene atomically; returns its report (never raises for bad input data).

    ``verify_pairs`` sampled pairs are recomputed by the overlap's definition
    (:func:`~data_prep.pairs.overlap.verify_overlap`); a disagreement fails the scene
    (status "failed") instead of writing it. 0 turns the self-check off.

    Args:
        clock: times the stages (:class:`StageClock`); None: not timed.
        tmp_name: the scene's working folder in ``out`` (default ``.tmp-<scene>``); sharded
            prep gives each claim its own.
        still_ours: asked before the scene is published; False (its claim was taken over)
            discards the work (status "lost"). A complete scene that appeared meanwhile is
            kept and ours discarded ("already done"): a scene is published once.
    """
    scene, t0 = scene_dir.name, time.perf_counter()
    bad_name = scene_name_problem(scene)
    if bad_name is not None:
        return SceneReport(scene, "skipped", reason=bad_name)
    final = out / scene
    done = complete_scene(final)
    if done is not None:
        return SceneReport(scene, "already done", **scene_counts(done))
    if not _ours(final):  # e.g. --out holds a folder of the raw data, or a user's own folder
        raise _not_ours(final)
    tmp = out / (tmp_name or f".tmp-{scene}")
    remove_ours(tmp)
    try:
        os.mkdir(tmp)
        (tmp / MARKER).write_text("made by mink-ssl-prep scannet; removed or replaced by it\n")
    except OSError as e:
        raise output_error(e, tmp, f"cannot create {tmp}") from None
    skipped: dict[str, list[int]] = {}
    try:
        with _stage(clock, "decode"):
            reader = open_scene(scene_dir)
        h = reader.header
        writer = FragmentWriter(tmp, h.intrinsic_depth, h.depth_shift,
                                (h.depth_height, h.depth_width))
        try:
            clouds = list(_fragments(reader, params, writer, skipped, clock))
        except BaseException:
            writer.__exit__(*sys.exc_info())  # closes the payload file, writes no index
            raise
        with _stage(clock, "write"):
            writer.close()  # the index
        frames = writer.frames
        if len(clouds) < 2:
            raise BadInput(f"fewer than 2 usable fragments ({len(clouds)}; skipped frames: "
                           f"{ {k: len(v) for k, v in skipped.items()} })")
        with _stage(clock, "overlap"):
            radius = params.voxel_size * params.radius_factor
            result = overlap_matrix(clouds, radius)
            ov = result.overlap
            check = {}
            if verify_pairs > 0:
                seed = zlib.crc32(scene.encode())  # a fixed sample per scene, any process
                sc = verify_overlap(clouds, result, verify_pairs, params.min_overlap, radius,
                                    seed)
                check = sc.summary()
                if not sc.ok():
                    raise SelfCheckFailed(scene, check)
        with _stage(clock, "write"):
            names = [fragment_name(scene, f) for f in frames]
            iu, ju = np.triu_indices(len(names), k=1)
            with open(tmp / "overlap.txt", "w") as f:
                f.writelines(f"{names[i]} {names[j]} {ov[i, j]:.6f}\n" for i, j in zip(iu, ju))
            report = SceneReport(scene, "done", fragments=len(names), pairs=len(iu),
                                 pairs_kept=int((ov[iu, ju] >= params.min_overlap).sum()),
                                 skipped_frames=skipped,
                                 seconds=round(time.perf_counter() - t0, 3), self_check=check)
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())
                     if p.is_file() and p.name != MARKER}  # what "complete" means on a rerun
            with open(tmp / SCENE_FILE, "w") as f:
                json.dump({**_report_fields(report), "params": asdict(params), "files": files},
                          f, indent=1)
            return _publish(tmp, final, report, still_ours)
    except SelfCheckFailed as e:
        shutil.rmtree(tmp, ignore_errors=True)
        return SceneReport(scene, "failed", reason=str(e), skipped_frames=skipped,
                           seconds=round(time.perf_counter() - t0, 3), self_check=e.check)
    except BaseException as e:
        # only BadInput (the readers' verdict on the input) is a skipped scene, leaving nothing
        # behind; an output-side I/O error aborts the run, anything else is a bug that stops it
        # naming the scene (data_prep.runner.scene_error)
        shutil.rmtree(tmp, ignore_errors=True)
        bad = scene_error(e, scene, out, tmp)
        return SceneReport(scene, "skipped", reason=str(bad), skipped_frames=skipped,
                           seconds=round(time.perf_counter() - t0, 3),
                           input_error=bad.unreadable)


def _publish(tmp: Path, final: Path, report: SceneReport,
             still_ours: Callable[[], bool] | None) -> SceneReport:
    """Rename the finished ``tmp`` to ``final``, once: not if our claim was taken over, nor over
    a complete scene (another worker's); an incomplete ``final`` of an earlier run is replaced.
    The rename itself cannot replace a complete scene (a folder that is not empty)."""
    if still_ours is not None and not still_ours():
        shutil.rmtree(tmp, ignore_errors=True)
        return SceneReport(report.scene, "lost", reason="its claim was taken over by another "
                           "worker while it ran; that worker's result is kept")
    done = complete_scene(final)
    if done is None:
        remove_ours(final)  # an incomplete scene of an earlier run (checked: ours)
        try:
            os.rename(tmp, final)
            return report
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            done = complete_scene(final)  # published by another worker just now
            if done is None:
                raise
    shutil.rmtree(tmp, ignore_errors=True)
    return SceneReport(report.scene, "already done", **scene_counts(done))


def _report_fields(report: SceneReport) -> dict:
    """What ``scene.json`` records of a report (the layout of earlier versions)."""
    return {k: v for k, v in asdict(report).items() if k not in ("input_error", "recorded")}


def scene_counts(scene_json: dict) -> dict:
    return {**{k: scene_json[k] for k in ("fragments", "pairs", "pairs_kept", "skipped_frames")},
            "self_check": scene_json.get("self_check", {})}


def complete_scene(final: Path) -> dict | None:
    """``scene.json`` of a complete scene folder, or None: complete means every file it lists
    exists with the recorded size (:func:`mink_ssl.formats.scene_record.finished_record`; a
    scene of a killed or concurrent run, or of a version before sizes were recorded, is
    redone)."""
    if final.is_symlink():
        return None
    return finished_record(final / SCENE_FILE, final)  # the one definition, every prep's


def _ours(path: Path) -> bool:
    """True if ``path`` does not exist or is a real folder prep made (its marker, or the
    ``scene.json`` of an older version)."""
    if not os.path.lexists(path):
        return True
    if path.is_symlink() or not path.is_dir():
        return False
    if (path / MARKER).is_file():
        return True
    try:
        return "params" in json.loads((path / SCENE_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return False


def _not_ours(path: Path) -> OutputError:
    what = (f"a symlink to {os.readlink(path)}" if path.is_symlink()
            else "a file" if not path.is_dir() else "a folder prep did not create (no marker)")
    return OutputError(f"{path} is {what}; prep only replaces or removes what it created and "
                       "never follows symlinks in --out. Move it out of --out (or choose another "
                       "--out) and rerun.")


def remove_ours(path: Path) -> None:
    """Remove a folder prep created; OutputError for anything else at ``path``."""
    if not os.path.lexists(path):
        return
    if not _ours(path):
        raise _not_ours(path)
    try:
        shutil.rmtree(path)
    except OSError as e:
        raise output_error(e, path, f"cannot remove the incomplete {path}") from None
