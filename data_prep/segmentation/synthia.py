"""Synthia4D segmentation prep: the Minkowski release's per-frame PLY point clouds -> scenes.

Sources of the facts used here (looked up in the public code of the papers):

- file layout and PLY properties: the Synthia4D release of Choy et al. 2019 ("4D
  Spatio-Temporal ConvNets", repository chrischoy/SpatioTemporalSegmentation, README and
  ``lib/datasets/synthia.py``; split files ``splits/synthia4d/{train,val,test}_cvpr19.txt`` as
  shipped with facebookresearch/PointContrast ``downstream/semseg``). Frames are
  ``<raw>/<SEQUENCE>/point_clouds/<frame>.ply`` (the release also has ``<frame>_label.ply``
  next to each, which is not needed: the label is in the frame file). A frame's vertex has
  ``x y z`` in centimetres (the 8 depth cameras of the car back-projected into the front
  camera's frame, y and z negated: x right, y up, z backward), colours ``r g b`` and the
  Synthia class ``l``.
- classes: Synthia's 16 ids (0 void, 1 sky, 2 building, 3 road, 4 sidewalk, 5 fence,
  6 vegetation, 7 pole, 8 car, 9 traffic sign, 10 pedestrian, 11 bicycle, 12 lanemarking,
  13 and 14 reserved, 15 traffic light); the benchmark ignores 0, 1, 13 and 14
  (``IGNORE_LABELS = (0, 1, 13, 14)``), which leaves the 12 classes of the paper's table,
  labelled 0..11 in id order. Ids outside 0..15 are ignored too and reported.
- split ("CVPR'19", the clean setting PointContrast follows): train on sequences 1-4 without
  their SUNSET, SPRING and FOG versions (sequence 3 is not in the release: 21 sequences, about
  20k frames), validate on SYNTHIA-SEQS-05-FOG (815 frames), test on SYNTHIA-SEQS-06-SUNSET and
  -SPRING (1886 frames); sequences of no split are not prepared. Voxel size 15 cm.

Adaptation: coordinates are converted to metres and, unless ``keep_axes``, rotated from the
release's y-up frame to z-up, (x, y, z) -> (x, -z, y) (x right, y forward, z up), so that every
prepared benchmark has gravity along z; ``parameters.up_axis`` in the manifest says which.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from data_prep.ply import colors_uint8, ply_fields, read_ply_vertices
from data_prep.runner import as_json
from data_prep.scene_store import SceneJob
from data_prep.segmentation.writer import IGNORE_LABEL, SceneData, repair, run_prep
from mink_ssl.errors import BadInput

RAW_CLASSES = ("void", "sky", "building", "road", "sidewalk", "fence", "vegetation", "pole",
               "car", "traffic sign", "pedestrian", "bicycle", "lanemarking", "reserved",
               "reserved", "traffic light")
IGNORED_RAW = (0, 1, 13, 14)
CLASSES = tuple(n for i, n in enumerate(RAW_CLASSES) if i not in IGNORED_RAW)
RAW_TO_LABEL = np.full(len(RAW_CLASSES), IGNORE_LABEL, dtype=np.int16)
RAW_TO_LABEL[[i for i in range(len(RAW_CLASSES)) if i not in IGNORED_RAW]] = \
    np.arange(len(CLASSES))
VOXEL_SIZE = 0.15
_TRAIN = ([f"SYNTHIA-SEQS-01-{w}" for w in ("DAWN", "FALL", "NIGHT", "SUMMER", "WINTER",
                                             "WINTERNIGHT")]
          + [f"SYNTHIA-SEQS-02-{w}" for w in ("DAWN", "FALL", "NIGHT", "RAINNIGHT", "SOFTRAIN",
                                               "SUMMER", "WINTER")]
          + [f"SYNTHIA-SEQS-04-{w}" for w in ("DAWN", "FALL", "NIGHT", "RAINNIGHT", "SOFTRAIN",
                                               "SUMMER", "WINTER", "WINTERNIGHT")])
SPLIT_SEQUENCES = {"train": tuple(_TRAIN), "val": ("SYNTHIA-SEQS-05-FOG",),
                   "test": ("SYNTHIA-SEQS-06-SUNSET", "SYNTHIA-SEQS-06-SPRING")}


@dataclass(frozen=True)
class SynthiaParams:
    keep_axes: bool = False  # True: keep the release's y-up frame (no rotation to z-up)
    unit_scale: float = 0.01  # centimetres -> metres


def split_of(sequence: str) -> str | None:
    return next((s for s, seqs in SPLIT_SEQUENCES.items() if sequence in seqs), None)


def prepare_frame(path: Path, raw: Path, scene: str, params: SynthiaParams) -> SceneData:
    """One frame PLY as a scene (metres, z-up unless ``keep_axes``)."""
    rel = path.relative_to(raw).as_posix()
    v = read_ply_vertices(path)
    x, y, z, r, g, b, lab = ply_fields(v, path, ("x",), ("y",), ("z",), ("r", "red"),
                                       ("g", "green"), ("b", "blue"), ("l", "label"))
    if len(v) == 0:
        raise BadInput(f"{rel} has no points")
    xyz = np.stack([x, y, z], axis=1).astype(np.float64) * params.unit_scale  # (N, 3) metres
    if not params.keep_axes:
        xyz = np.stack([xyz[:, 0], -xyz[:, 2], xyz[:, 1]], axis=1)  # y-up -> z-up
    colors = colors_uint8(np.stack([r, g, b], axis=1), rel)
    lab = np.asarray(lab)
    if lab.dtype.kind == "f" and not (lab == np.round(lab)).all():
        raise BadInput(f"{rel}: labels are not integers (e.g. {lab[lab != np.round(lab)][0]})")
    lab = lab.astype(np.int64)
    inside = (lab >= 0) & (lab < len(RAW_CLASSES))
    labels = np.full(len(lab), IGNORE_LABEL, dtype=np.int16)
    labels[inside] = RAW_TO_LABEL[lab[inside]]
    repairs = []
    if not inside.all():
        odd = np.unique(lab[~inside])
        repairs.append(repair(scene, rel, 0, f"{int((~inside).sum())} points have Synthia ids "
                              f"outside 0..15 ({odd[:5].tolist()}): labelled ignore (-1)"))
    return SceneData(coords=xyz.astype(np.float32), colors=colors, labels=labels,
                     repairs=repairs)


def list_frames(raw: Path) -> tuple[dict[str, list[Path]], list[str]]:
    """{sequence: frame files (sorted)} of ``raw``, and the folders without point_clouds/."""
    raw = Path(raw)
    if not raw.is_dir():
        raise FileNotFoundError(f"--raw {raw} is not a directory; pass the folder that holds the "
                                "Synthia4D sequences (SYNTHIA-SEQS-01-DAWN/point_clouds/...)")
    frames, no_clouds = {}, []
    for seq in sorted(p for p in raw.iterdir() if p.is_dir() and not p.name.startswith(".")):
        pc = seq / "point_clouds"
        if pc.is_dir():
            frames[seq.name] = sorted(p for p in pc.glob("*.ply")
                                      if p.is_file() and not p.stem.endswith("_label"))
        else:
            no_clouds.append(seq.name)
    if not frames and not no_clouds:
        raise FileNotFoundError(f"no sequence folders in {raw}")
    return frames, no_clouds


def run(raw: Path, out: Path, params: SynthiaParams = SynthiaParams(), workers: int = 1,
        sequences: Sequence[str] | None = None, progress: bool = True,
        log: Callable[[str], None] = print) -> dict:
    """Prepare the frames of the split sequences of ``raw`` into ``out``; returns the manifest."""
    raw = Path(raw)
    frames, no_clouds = list_frames(raw)
    wanted = [s for split in SPLIT_SEQUENCES.values() for s in split]
    if sequences:
        unknown = [s for s in sequences if s not in wanted]
        if unknown:
            raise ValueError(f"sequences {unknown} are in no split of the CVPR'19 protocol; "
                             f"the split sequences are {wanted}")
        wanted = [s for s in wanted if s in set(sequences)]
    outside = sorted(set(frames) - set(wanted))
    if outside:
        log(f"synthia: {len(outside)} sequences outside the split(s) are not prepared: "
            f"{', '.join(outside)}")
    jobs, skipped = [], []
    for seq in wanted:
        if seq in frames:
            jobs += [SceneJob(f"{seq}/{f.stem}", split_of(seq), prepare_frame,
                              (f, raw, f"{seq}/{f.stem}", params)) for f in frames[seq]]
        elif seq in no_clouds:
            skipped.append({"scene": seq, "reason": f"{seq} has no point_clouds/ folder (the "
                            "image release of SYNTHIA?): prep reads the Synthia4D point clouds"})
        else:
            skipped.append({"scene": seq, "reason": f"sequence of the {split_of(seq)} split not "
                            f"found in {raw}"})
    return run_prep(out, benchmark="synthia", classes=CLASSES, voxel_size=VOXEL_SIZE, jobs=jobs,
                    params={**asdict(params), "up_axis": "y" if params.keep_axes else "z",
                            "axes": "release frame (x right, y up, z backward)"
                            if params.keep_axes else "(x, y, z) -> (x, -z, y): z up"},
                    inputs={"raw": as_json(raw.resolve()), "sequences": wanted},
                    skipped=skipped, workers=workers, progress=progress, log=log)
