"""A ScanNet ``scans/`` folder: its scene folders, and a frame reader for each (``.sens`` or the
exported-frames layout of ScanNet's reader.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from data_prep.scannet.exported import ExportedFrames
from data_prep.scannet.sens import SensReader
from mink_ssl.errors import BadInput


def list_scenes(raw: Path, scenes: Sequence[str] | None = None) -> list[Path]:
    """The scene folders of ``raw`` (sorted, hidden ones left out), or only ``scenes``;
    FileNotFoundError if ``raw`` is not a folder, a listed scene is missing or none is found."""
    if not raw.is_dir():
        raise FileNotFoundError(f"--raw {raw} is not a directory; pass ScanNet's scans/ folder "
                                "(one sub-folder per scene)")
    found = sorted(p for p in raw.iterdir() if p.is_dir() and not p.name.startswith("."))
    if scenes:
        names = {p.name for p in found}
        missing = [s for s in scenes if s not in names]
        if missing:
            raise FileNotFoundError(f"scenes {missing} not found in {raw} "
                                    f"(it has {len(found)} scene folders)")
        found = [p for p in found if p.name in set(scenes)]
    if not found:
        raise FileNotFoundError(f"no scene folders in {raw}")
    return found


def open_scene(scene_dir: Path):
    """A frame reader for a scene folder: ``<scene>.sens`` or an exported-frames layout."""
    sens = scene_dir / f"{scene_dir.name}.sens"
    if sens.is_file():
        reader = SensReader(sens)
        reader.check()  # walk the frame headers: a truncated file fails here, before any work
        return reader
    if (scene_dir / "depth").is_dir():
        return ExportedFrames(scene_dir)
    raise BadInput(f"{scene_dir} has neither {sens.name} nor an exported-frames layout "
                   "(color/, depth/, pose/, intrinsic/)")
