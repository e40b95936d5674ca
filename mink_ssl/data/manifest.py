"""Reading a prep output's ``manifest.json``: the schema must be one this version knows, and
the fields training needs must be there (the trainer reads only what the manifest describes)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


def read_manifest(root: str | Path, schemas: Sequence[str], prep: str,
                  required: Sequence[str] = ()) -> dict:
    """``root/manifest.json``, checked. ``prep`` names the command that writes it (for the
    messages). With ``splits`` and ``scenes`` required, every split's scene must have an entry,
    and ``classes``, when required, must not be empty."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point data.root at the --out directory of "
                                f"{prep}")
    manifest = json.loads(path.read_text())
    if manifest.get("schema") not in schemas:
        raise ValueError(f"{path} has schema {manifest.get('schema')!r}; this mink-ssl reads "
                         f"{tuple(schemas)}: rerun {prep} with this version")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {missing}; rerun {prep}")
    if "classes" in required and not manifest["classes"]:
        raise ValueError(f"{path} lists no classes")
    if "splits" in required and "scenes" in required:
        for split, names in manifest["splits"].items():
            unknown = [n for n in names if n not in manifest["scenes"]]
            if unknown:
                raise ValueError(f"{path}: split {split!r} names scenes without a file entry: "
                                 f"{unknown[:5]}")
    return manifest
