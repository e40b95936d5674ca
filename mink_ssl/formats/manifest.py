"""A prep output's ``manifest.json``: the schemas, writing it, and reading it checked.

The schema must be one this version knows, and the fields training needs must be there (the
trainer reads only what the manifest describes). Each prep writes one schema:

- ``mink_ssl.scannet_pairs/1`` (:data:`PAIRS_SCHEMA`): pretraining pairs of ScanNet views;
- ``mink_ssl.seg_scenes/1`` (:data:`SEG_SCHEMA`): segmentation scenes (S3DIS, ScanNet,
  Synthia4D);
- ``mink_ssl.det_scenes/1`` (:data:`DET_SCHEMA`): detection scenes (ScanNet, SUN RGB-D).

Every schema records the scenes prep skipped the same way: ``skipped_scenes``, a map
``{scene: reason}`` (:data:`SKIPPED`), read by :func:`skipped_scenes`. Segmentation and
detection folders of earlier versions hold ``skipped``, a list of ``{"scene", "reason"}``;
:func:`read_manifest` reads them as ``skipped_scenes``, so folders prepared before still load.
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
SKIPPED = "skipped_scenes"  # {scene: reason} in every schema
_OLD_SKIPPED = "skipped"  # [{"scene", "reason"}] in seg / det manifests of earlier versions


def skipped_scenes(manifest: dict) -> dict[str, str]:
    """``{scene: reason}`` of the scenes prep skipped, from either shape: ``skipped_scenes``
    (a map, every prep now) or the ``skipped`` list of ``{"scene", "reason"}`` that earlier
    segmentation and detection prep wrote. ValueError for anything else."""
    if SKIPPED in manifest:
        got = manifest[SKIPPED]
        if isinstance(got, dict) and all(isinstance(k, str) and isinstance(v, str)
                                         for k, v in got.items()):
            return dict(got)
        raise ValueError(f"the manifest's {SKIPPED} must map scene names to reasons, got "
                         f"{type(got).__name__}")
    got = manifest.get(_OLD_SKIPPED, [])
    if isinstance(got, list) and all(isinstance(e, dict) and isinstance(e.get("scene"), str)
                                     and isinstance(e.get("reason"), str) for e in got):
        return {e["scene"]: e["reason"] for e in got}
    raise ValueError(f"the manifest's {_OLD_SKIPPED} must be a list of {{scene, reason}}, got "
                     f"{got!r:.80}")


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
    """``root/manifest.json``, checked, with its skipped scenes as ``skipped_scenes`` whichever
    version wrote it (:func:`skipped_scenes`). ``prep`` names the command that writes it (for
    the messages). With ``splits`` and ``scenes`` required, every split's scene must have an entry,
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
    try:  # one shape for every reader, whichever version wrote the folder
        skipped = skipped_scenes(manifest)
    except ValueError as e:
        raise ValueError(f"{path}: {e}; rerun {prep} into this folder to rewrite it") from None
    manifest.pop(_OLD_SKIPPED, None)
    manifest[SKIPPED] = skipped
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
