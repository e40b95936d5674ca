"""A prep output's ``manifest.json``: the schemas, writing it, and reading it checked.

The schema must be one this version knows, and the fields training needs must be there (the
trainer reads only what the manifest describes). Each prep writes one schema:

- ``mink_ssl.scannet_pairs/1`` (:data:`PAIRS_SCHEMA`): pretraining pairs of ScanNet views;
- ``mink_ssl.seg_scenes/1`` (:data:`SEG_SCHEMA`): segmentation scenes (S3DIS, ScanNet,
  Synthia4D);
- ``mink_ssl.det_scenes/1`` (:data:`DET_SCHEMA`): detection scenes (ScanNet, SUN RGB-D).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from mink_ssl.io import atomic_path
from mink_ssl.errors import output_error

PAIRS_SCHEMA = "mink_ssl.scannet_pairs/1"
SEG_SCHEMA = "mink_ssl.seg_scenes/1"
DET_SCHEMA = "mink_ssl.det_scenes/1"
MANIFEST_FILE = "manifest.json"


def write_manifest(out: str | Path, manifest: dict) -> None:
    """``out/manifest.json``, atomically; an I/O error is an :class:`OutputError` naming it."""
    path = Path(out) / MANIFEST_FILE
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1))
    except OSError as e:
        raise output_error(e, path, f"cannot write {path}") from None


def read_manifest(root: str | Path, schemas: Sequence[str], prep: str,
                  required: Sequence[str] = ()) -> dict:
    """``root/manifest.json``, checked. ``prep`` names the command that writes it (for the
    messages). With ``splits`` and ``scenes`` required, every split's scene must have an entry,
    and ``classes``, when required, must not be empty."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point data.root at the --out directory of "
                                f"{prep}")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the file is damaged or was edited; "
                         f"rerun {prep} into this folder to rewrite it (prepared scenes are "
                         "kept)") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} holds a JSON {type(manifest).__name__}, not a manifest "
                         f"object; rerun {prep} into this folder to rewrite it")
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
