"""Shared inputs of the data-prep benchmarks: the real 7-Scenes frames and fragment stores."""
from __future__ import annotations

import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KITCHEN = REPO.parent / "shared" / "realdata" / "7scenes-redkitchen-a"


def require_kitchen() -> Path:
    if not (KITCHEN / "depth").is_dir():
        raise SystemExit(f"this benchmark needs the real frames at {KITCHEN} (../shared/realdata)")
    return KITCHEN


def prepare(scene_dir: Path, work: Path, frame_skip: int = 1) -> Path:
    """Run our prep on one scene folder; returns the scene's fragment directory."""
    from data_prep.pairs.scene import PrepParams, prepare_scene

    work.mkdir(parents=True, exist_ok=True)
    report = prepare_scene(scene_dir, work, PrepParams(frame_skip=frame_skip))
    if report.status not in ("done", "already done"):
        raise SystemExit(f"prep failed on {scene_dir}: {report.reason}")
    return work / scene_dir.name


def workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="mink-ssl-bench-")
