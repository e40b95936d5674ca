"""ScanNet v2 semantic segmentation prep: the vertices of each scan's ``_vh_clean_2`` mesh with
the 20 benchmark classes -> scenes.

Input: ScanNet's ``scans/`` (``scans_test/`` too, if given): per scene ``<scene>/`` with

- ``<scene>_vh_clean_2.ply``: mesh vertices x y z (metres) and red green blue;
- labels, either ``<scene>_vh_clean_2.labels.ply`` (a ``label`` per vertex: the NYU40 id) or
  the instance annotation ``<scene>.aggregation.json`` (``segGroups``: ``segments`` and a raw
  category ``label``) with the over-segmentation ``<scene>_vh_clean_2.0.010000.segs.json``
  (``segIndices``: the segment of each vertex). Raw categories map to NYU40 ids through
  ``scannetv2-labels.combined.tsv`` (``--label-map``; columns raw_category, nyu40id) or, without
  it, by NYU40 class name. As in ScanNet's own export code, later groups overwrite earlier
  ones and vertices in no group are unannotated.

Labels: the benchmark's 20 classes, NYU40 ids 1 2 3 4 5 6 7 8 9 10 11 12 14 16 24 28 33 34 36
39 -> 0..19 (the ScanNet benchmark's ``VALID_CLASS_IDS``, also used by the Minkowski /
PointContrast ScanNet experiments); every other id, and unannotated vertices, -> -1.

Splits come from the official lists the user gives (``--splits-dir`` with
``scannetv2_train.txt`` and ``scannetv2_val.txt``, and ``scannetv2_test.txt`` if present).
Scenes listed but not found are reported as skipped; scenes of no list are not prepared. Test
scenes have no labels: they are written with every label -1. Voxel size 2 cm.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from data_prep.ply import colors_uint8, ply_fields, read_ply_vertices
from data_prep.reading import read_text
from data_prep.runner import as_json
from data_prep.scannet.labels import read_label_map
from data_prep.scene_store import SceneJob
from data_prep.segmentation.writer import IGNORE_LABEL, SceneData, repair, run_prep
from mink_ssl.errors import BadInput

VALID_CLASS_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
CLASSES = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
           "bookshelf", "picture", "counter", "desk", "curtain", "refrigerator",
           "shower curtain", "toilet", "sink", "bathtub", "otherfurniture")
NYU40_NAMES = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
               "bookshelf", "picture", "counter", "blinds", "desk", "shelves", "curtain",
               "dresser", "pillow", "mirror", "floor mat", "clothes", "ceiling", "books",
               "refridgerator", "television", "paper", "towel", "shower curtain", "box",
               "whiteboard", "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag",
               "otherstructure", "otherfurniture", "otherprop")  # ids 1..40, ScanNet's spelling
NYU40_TO_LABEL = np.full(41, IGNORE_LABEL, dtype=np.int16)
NYU40_TO_LABEL[list(VALID_CLASS_IDS)] = np.arange(len(VALID_CLASS_IDS))
VOXEL_SIZE = 0.02
SPLIT_FILES = {"train": "scannetv2_train.txt", "val": "scannetv2_val.txt",
               "test": "scannetv2_test.txt"}


@dataclass(frozen=True)
class ScanNetSegParams:
    labels: str = "auto"  # "ply" (.labels.ply), "aggregation" (json), "auto" (ply, else json)

    def __post_init__(self):
        if self.labels not in ("auto", "ply", "aggregation"):
            raise ValueError(f"labels must be 'auto', 'ply' or 'aggregation', got "
                             f"{self.labels!r}")


def _name_map() -> dict[str, int]:
    names = {n: i + 1 for i, n in enumerate(NYU40_NAMES)}
    names["refrigerator"] = names["refridgerator"]
    return names


def _nyu40_from_ply(path: Path, n: int) -> np.ndarray:
    (lab,) = ply_fields(read_ply_vertices(path), path, ("label",))
    if len(lab) != n:
        raise BadInput(f"{path.name} has {len(lab)} vertices, the mesh {n}")
    return lab.astype(np.int64)


def _nyu40_from_aggregation(scene_dir: Path, scene: str, n: int, label_map: dict | None,
                            raw: Path) -> tuple[np.ndarray, list[dict]]:
    agg_path = scene_dir / f"{scene}.aggregation.json"
    segs_path = scene_dir / f"{scene}_vh_clean_2.0.010000.segs.json"
    for p in (agg_path, segs_path):
        if not p.is_file():
            raise BadInput(f"{scene}: no {scene}_vh_clean_2.labels.ply and no {p.name}")
    try:
        seg = np.asarray(json.loads(read_text(segs_path))["segIndices"], dtype=np.int64)
        groups = json.loads(read_text(agg_path))["segGroups"]
    except BadInput:
        raise
    except (ValueError, KeyError, TypeError) as e:  # not JSON, or not ScanNet's fields
        raise BadInput(f"{scene}: cannot read the aggregation / segments JSON "
                       f"({type(e).__name__}: {e})") from None
    if len(seg) != n:
        raise BadInput(f"{segs_path.name} has {len(seg)} segIndices, the mesh {n} vertices")
    names = label_map if label_map is not None else _name_map()
    lut = np.zeros(int(seg.max()) + 1 if len(seg) else 1, dtype=np.int64)  # segment -> NYU40
    unknown: dict[str, int] = {}
    for i, g in enumerate(groups):  # one per object instance (tens per scene)
        try:
            nyu = names.get(g["label"], 0)
            ids = np.asarray(g["segments"], dtype=np.int64).reshape(-1)
        except (KeyError, TypeError, ValueError) as e:
            raise BadInput(f"{agg_path.name}: segGroups[{i}] needs a label and integer segments "
                           f"({type(e).__name__}: {e}); restore the file from the dataset's "
                           "download") from None
        ids = ids[(ids >= 0) & (ids < len(lut))]
        if nyu == 0:
            unknown[g["label"]] = unknown.get(g["label"], 0) + 1
        lut[ids] = nyu
    repairs = []
    if unknown:
        how = "in the label map" if label_map is not None else \
            "NYU40 class names (pass --label-map scannetv2-labels.combined.tsv)"
        repairs.append(repair(scene, agg_path.relative_to(raw).as_posix(), 0,
                              f"labels not {how}: {sorted(unknown)}: labelled ignore (-1)"))
    return lut[seg], repairs


def prepare_scan(scene_dir: Path, raw: Path, scene: str, labelled: bool,
                 params: ScanNetSegParams, label_map: dict | None) -> SceneData:
    """One scan as a scene: mesh vertices, colours and benchmark labels."""
    mesh = scene_dir / f"{scene}_vh_clean_2.ply"
    if not mesh.is_file():
        raise BadInput(f"{scene}: no {mesh.name}")
    v = read_ply_vertices(mesh)
    x, y, z, r, g, b = ply_fields(v, mesh, ("x",), ("y",), ("z",), ("red", "r"),
                                  ("green", "g"), ("blue", "b"))
    if len(v) == 0:
        raise BadInput(f"{scene}: {mesh.name} has no vertices")
    coords = np.stack([x, y, z], axis=1).astype(np.float32)
    colors = colors_uint8(np.stack([r, g, b], axis=1), mesh.name)
    repairs: list[dict] = []
    labels_ply = scene_dir / f"{scene}_vh_clean_2.labels.ply"
    if not labelled:
        nyu = np.zeros(len(v), dtype=np.int64)
    elif params.labels == "ply" or (params.labels == "auto" and labels_ply.is_file()):
        if not labels_ply.is_file():
            raise BadInput(f"{scene}: no {labels_ply.name}")
        nyu = _nyu40_from_ply(labels_ply, len(v))
    else:
        nyu, repairs = _nyu40_from_aggregation(scene_dir, scene, len(v), label_map, raw)
    inside = (nyu >= 0) & (nyu <= 40)
    labels = np.full(len(v), IGNORE_LABEL, dtype=np.int16)
    labels[inside] = NYU40_TO_LABEL[nyu[inside]]
    if not inside.all():
        repairs.append(repair(scene, labels_ply.relative_to(raw).as_posix(), 0,
                              f"{int((~inside).sum())} vertices have ids outside the NYU40 "
                              f"range 0..40 ({np.unique(nyu[~inside])[:5].tolist()}): "
                              "labelled ignore (-1)"))
    return SceneData(coords=coords, colors=colors, labels=labels, repairs=repairs)


def read_splits(splits_dir: Path) -> dict[str, list[str]]:
    """Scene names per split from the official lists (train and val required)."""
    splits_dir = Path(splits_dir)
    if not splits_dir.is_dir():
        raise FileNotFoundError(f"--splits-dir {splits_dir} is not a directory; pass the folder "
                                "with scannetv2_train.txt and scannetv2_val.txt (ScanNet's "
                                "Tasks/Benchmark)")
    out = {}
    for split, fname in SPLIT_FILES.items():
        path = splits_dir / fname
        if not path.is_file():
            if split == "test":
                continue
            raise FileNotFoundError(f"{path} not found: --splits-dir needs {SPLIT_FILES['train']}"
                                    f" and {SPLIT_FILES['val']}")
        out[split] = [s.strip() for s in read_text(path).split() if s.strip()]
    seen: dict[str, str] = {}
    for split, names in out.items():
        for n in names:
            if n in seen:
                raise BadInput(f"scene {n} is in both {SPLIT_FILES[seen[n]]} and "
                               f"{SPLIT_FILES[split]}")
            seen[n] = split
    return out


def run(raw: Path | Sequence[Path], splits_dir: Path, out: Path,
        params: ScanNetSegParams = ScanNetSegParams(), label_map: Path | None = None,
        workers: int = 1, scenes: Sequence[str] | None = None, progress: bool = True,
        log: Callable[[str], None] = print) -> dict:
    """Prepare the split scenes found in ``raw`` (one or more folders of scene folders)."""
    raws = [Path(raw)] if isinstance(raw, (str, Path)) else [Path(r) for r in raw]
    for r in raws:
        if not r.is_dir():
            raise FileNotFoundError(f"--raw {r} is not a directory; pass ScanNet's scans/ (and "
                                    "scans_test/) folder")
    splits = read_splits(splits_dir)
    lmap = read_label_map(label_map) if label_map is not None else None
    where: dict[str, Path] = {}
    for r in raws:
        for d in r.iterdir():
            if d.is_dir() and not d.name.startswith("."):
                where.setdefault(d.name, r)
    if scenes:
        listed = {n for names in splits.values() for n in names}
        unknown = [s for s in scenes if s not in listed]
        if unknown:
            raise ValueError(f"scenes {unknown} are in none of the split lists of {splits_dir}")
    jobs, skipped = [], []
    for split, names in splits.items():
        for n in names:
            if scenes and n not in scenes:
                continue
            if n not in where:
                skipped.append({"scene": n, "reason": f"listed in {SPLIT_FILES[split]} but not "
                                f"found in {', '.join(map(str, raws))}"})
                continue
            jobs.append(SceneJob(n, split, prepare_scan, (where[n] / n, where[n], n,
                                                          split != "test", params, lmap)))
    unlisted = len(set(where) - {n for names in splits.values() for n in names})
    if unlisted:
        log(f"scannet-seg: {unlisted} scene folders are in no split list and are not prepared")
    return run_prep(out, benchmark="scannet", classes=CLASSES, voxel_size=VOXEL_SIZE, jobs=jobs,
                    params={**asdict(params), "label_map": None if label_map is None
                            else Path(label_map).name, "up_axis": "z"},
                    inputs={"raw": [as_json(r.resolve()) for r in raws],
                            "splits_dir": as_json(Path(splits_dir).resolve()),
                            "label_map_path": as_json(label_map)},
                    skipped=skipped, workers=workers, progress=progress, log=log)
