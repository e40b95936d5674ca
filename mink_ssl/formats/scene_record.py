"""A prepared scene's record, and the one definition of a finished scene for every prep.

Every prep writes, per scene, a JSON record last, after the scene's data files (each of them
written atomically):

- pair prep: ``<scene>/scene.json``, whose ``files`` are named relative to ``<scene>/``;
- segmentation and detection prep: ``reports/<file>.json``, whose ``files`` are named relative
  to the output folder (``scenes/<file>.npz``).

``files`` maps each data file the scene wrote to its size in bytes. A scene is **finished**
when its record reads as a JSON object whose ``files`` is a non-empty map and every file it
lists exists, as a regular file, with that size (:func:`finished_record`). Anything else (no
record, a damaged one, a record of an older version without ``files``, a file missing or of
another size: a killed or concurrent run) means the scene is prepared again. Standard library
only: data prep and the datasets both read it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Iterable

FILES = "files"  # the record's key: {relative posix name: size in bytes}


def file_sizes(root: str | os.PathLike, names: Iterable[str]) -> dict[str, int]:
    """``{name: size}`` of the files ``names`` (relative to ``root``): what a record lists."""
    root = Path(root)
    return {name: (root / name).stat().st_size for name in names}


def _safe(name) -> bool:
    """A relative path inside its root (no absolute path, no ``..``)."""
    if not isinstance(name, str) or not name:
        return False
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts and "\\" not in name


def finished_record(record: str | os.PathLike, root: str | os.PathLike) -> dict | None:
    """The record of a finished scene, or None if the scene must be prepared (again).

    ``record`` is the scene's JSON record, ``root`` the folder its ``files`` are named
    relative to."""
    record, root = Path(record), Path(root)
    try:
        if not record.is_file():
            return None
        d = json.loads(record.read_text(encoding="utf-8"))
        files = d.get(FILES) if isinstance(d, dict) else None
        if not isinstance(files, dict) or not files:
            return None  # damaged, or of an older version: redone
        for name, size in files.items():
            path = root / name
            if (not _safe(name) or isinstance(size, bool) or not isinstance(size, int)
                    or not path.is_file() or path.stat().st_size != size):
                return None
    except (OSError, ValueError):  # unreadable, not JSON / not UTF-8: not finished
        return None
    return d
