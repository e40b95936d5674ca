"""SUN RGB-D detection prep: VoteNet's ``sunrgbd_trainval`` export -> per-image points and boxes.

Input (``--raw``: the folder VoteNet's ``sunrgbd/matlab/extract_rgbd_data_v2.m``,
``extract_rgbd_data_v1.m`` (``label_v1/``) and ``extract_split.m`` write)::

    depth/<id>.mat        MATLAB file, variable ``instance``: (N, 6) double, x y z r g b; the
                          points in *upright depth* coordinates (x right, y forward, z up,
                          metres), colours in 0..1
    label_v1/<id>.txt     one object per line, the v1 boxes (``extract_rgbd_data_v1.m``; the
                          default, as the papers' runs: VoteNet ``use_v1``, PointContrast
                          ``use_sunrgbd_v2: False``); ``label/`` holds the v2 boxes, same format:
                          ``classname x y w h cx cy cz c1 c2 c3 o1 o2`` = the 2D box (image
                          pixels: corner and size), the 3D centroid, the half extents
                          (|coeffs| of SUN RGB-D's basis) and the orientation vector (x, y)
    calib/<id>.txt        two lines of 9 numbers: Rtilt then K, each a 3x3 in column-major order
    image/<id>.jpg        the colour image (not read here)
    train_data_idx.txt    image ids (integers, one a line) of the train split
    val_data_idx.txt      image ids of the val split

``<id>`` is the image id as 6 digits (``000001``), which is also the scene name here.

Box convention, from VoteNet's ``sunrgbd/sunrgbd_utils.py`` (``SUNObject3d``,
``my_compute_box_3d``) and ``sunrgbd/sunrgbd_data.py`` (facebookresearch/votenet; read for the
facts, not copied): ``w = c1``, ``l = c2``, ``h = c3`` are half extents, ``l`` along the
orientation vector; VoteNet stores ``heading_angle = -atan2(o2, o1)`` and rotates the box's
corners by ``rotz(-heading_angle)``, so the box is rotated by ``atan2(o2, o1)`` counter-clockwise
about +z. Here, in mink-ssl's convention (centre, full extents, heading counter-clockwise about
+z, dx along the heading): ``box = (cx, cy, cz, 2 l, 2 w, 2 h, atan2(o2, o1))``. The 10 classes
and their ids are VoteNet's ``type2class`` (objects of other classes are left out, as VoteNet
does). A point's ``instance`` is the first box (in label-file order among the kept boxes) whose
oriented box contains it, VoteNet's vote-target rule, computed for all points x boxes at once.

Adapted: all points are kept (VoteNet samples 20k-50k; the dataset samples at load time); images
without objects are kept (VoteNet's released v1 / v2 data does the same,
``skip_empty_scene=False``); colours are stored as ``round(255 c)`` uint8; points with
non-finite coordinates are dropped (the export already removes NaN depth) and boxes with a zero
size are left out, both listed in the notes; the calibration is kept in each scene file as
``calib_rtilt`` (3, 3) and ``calib_k`` (3, 3) float32. A missing or malformed depth, label or
calibration file skips the image with the reason.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from data_prep.detection.writer import DetScene, first_box, run_prep
from data_prep.reading import read_text
from data_prep.runner import as_json
from data_prep.scene_store import SceneJob
from mink_ssl.errors import BadInput

CLASSES = ("bed", "table", "sofa", "chair", "toilet", "desk", "dresser", "night_stand",
           "bookshelf", "bathtub")
SPLIT_FILES = {"train": "train_data_idx.txt", "val": "val_data_idx.txt"}
LABEL_DIRS = ("label_v1", "label")  # v1 (the reference) | v2


def image_name(idx: int) -> str:
    return f"{int(idx):06d}"


def read_depth_mat(path: Path) -> np.ndarray:
    """(N, 6) float64 x y z r g b of a VoteNet ``depth/<id>.mat``."""
    from scipy.io import loadmat

    if not path.is_file():
        raise BadInput(f"missing depth/{path.name}")
    try:
        mat = loadmat(str(path))
    except Exception as e:  # scipy raises many types (ValueError, MatReadError, ...) for bad files
        raise BadInput(f"depth/{path.name} is not a readable MATLAB file "
                       f"({type(e).__name__}: {e})", path,
                       unreadable=isinstance(e, OSError)) from None
    if "instance" not in mat:
        raise BadInput(f"depth/{path.name} has no variable 'instance' (it has "
                       f"{sorted(k for k in mat if not k.startswith('__'))})")
    pc = np.asarray(mat["instance"])
    if pc.ndim != 2 or pc.shape[1] != 6 or pc.dtype.kind not in "fiu":
        raise BadInput(f"depth/{path.name}: 'instance' must be an (N, 6) numeric array "
                       f"x y z r g b, got {pc.shape} {pc.dtype}")
    return pc.astype(np.float64)


def read_labels(path: Path) -> list[tuple[str, np.ndarray]]:
    """[(classname, (12,) float64 numbers)] of a label file, one per non-empty line."""
    if not path.is_file():
        raise BadInput(f"missing {path.parent.name}/{path.name}")
    objects = []
    for i, line in enumerate(read_text(path, errors="replace").splitlines(), 1):  # objects
        tok = line.split()
        if not tok:
            continue
        if len(tok) != 13:
            raise BadInput(f"{path.parent.name}/{path.name} line {i}: expected a class name "
                           f"and 12 numbers, got {len(tok)} fields")
        try:
            values = np.array(tok[1:], dtype=np.float64)
        except ValueError:
            raise BadInput(f"{path.parent.name}/{path.name} line {i}: {tok[1:]} are not all "
                           "numbers") from None
        if not np.isfinite(values).all():
            raise BadInput(f"{path.parent.name}/{path.name} line {i}: non-finite numbers")
        objects.append((tok[0], values))
    return objects


def read_calib(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(Rtilt (3, 3), K (3, 3)) float64 of a ``calib/<id>.txt`` (column-major lines)."""
    if not path.is_file():
        raise BadInput(f"missing calib/{path.name}")
    lines = [ln for ln in read_text(path, errors="replace").splitlines() if ln.strip()]
    try:
        mats = [np.array(ln.split(), dtype=np.float64) for ln in lines[:2]]
    except ValueError:
        raise BadInput(f"calib/{path.name}: its lines are not numbers") from None
    if len(mats) != 2 or any(m.shape != (9,) or not np.isfinite(m).all() for m in mats):
        raise BadInput(f"calib/{path.name} must hold two lines of 9 finite numbers (Rtilt "
                       f"and K, column-major), got {[m.size for m in mats]}")
    rtilt, K = (m.reshape(3, 3, order="F") for m in mats)
    if not np.allclose(rtilt.T @ rtilt, np.eye(3), atol=1e-2):
        raise BadInput(f"calib/{path.name}: Rtilt {rtilt.round(4).tolist()} is not a rotation")
    return rtilt, K


def label_boxes(objects: Sequence[tuple[str, np.ndarray]]
                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Boxes (K, 7) float64 and class ids (K,) of the objects of the 10 classes, and notes.

    numbers: x y w h (2D), cx cy cz, c1 c2 c3 (half extents w, l, h), o1 o2 (orientation).
    """
    idx = {c: i for i, c in enumerate(CLASSES)}
    notes = []
    other = sorted({name for name, _ in objects if name not in idx})
    if other:
        n = sum(name not in idx for name, _ in objects)
        notes.append(f"{n} objects of other classes left out: {other[:10]}")
    kept = [(name, v) for name, v in objects if name in idx]
    if not kept:
        return np.zeros((0, 7)), np.zeros(0, np.int64), notes
    v = np.stack([v for _, v in kept])  # (K, 12)
    boxes = np.stack([v[:, 4], v[:, 5], v[:, 6], 2 * v[:, 8], 2 * v[:, 7], 2 * v[:, 9],
                      np.arctan2(v[:, 11], v[:, 10])], 1)  # (K, 7): 2l along the heading, 2w, 2h
    labels = np.array([idx[name] for name, _ in kept], np.int64)
    ok = (boxes[:, 3:6] > 0).all(1)
    for i in np.flatnonzero(~ok):
        notes.append(f"{kept[i][0]} box with size {boxes[i, 3:6].round(6).tolist()} left out")
    return boxes[ok], labels[ok], notes


def prepare_image(root: Path, name: str, label_dir: str = "label_v1") -> DetScene:
    """One SUN RGB-D image of a ``sunrgbd_trainval`` folder as a :class:`DetScene`."""
    root = Path(root)
    pc = read_depth_mat(root / "depth" / f"{name}.mat")  # (N, 6)
    objects = read_labels(root / label_dir / f"{name}.txt")
    rtilt, K = read_calib(root / "calib" / f"{name}.txt")
    notes = []
    finite = np.isfinite(pc[:, :3]).all(1)
    if not finite.all():
        notes.append(f"{int((~finite).sum())} points with non-finite coordinates dropped")
        pc = pc[finite]
    if len(pc) == 0:
        raise BadInput(f"depth/{name}.mat has no points")
    rgb = pc[:, 3:]
    if not ((rgb >= 0) & (rgb <= 1)).all():
        raise BadInput(f"depth/{name}.mat: colours must be in 0..1 (VoteNet's export), got "
                       f"[{np.nanmin(rgb):g}, {np.nanmax(rgb):g}]")
    boxes, labels, box_notes = label_boxes(objects)
    coords = pc[:, :3].astype(np.float32)
    boxes = boxes.astype(np.float32)
    return DetScene(coords=coords, colors=np.round(rgb * 255).astype(np.uint8), boxes=boxes,
                    box_labels=labels.astype(np.int16), instance=first_box(coords, boxes),
                    extra={"calib_rtilt": rtilt.astype(np.float32),
                           "calib_k": K.astype(np.float32)},
                    notes=notes + box_notes)


def read_splits(root: Path) -> dict[str, list[int]]:
    """Image ids per split from ``train_data_idx.txt`` / ``val_data_idx.txt``."""
    splits = {}
    for split, fname in SPLIT_FILES.items():
        path = Path(root) / fname
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; --raw must be VoteNet's sunrgbd_trainval "
                                    "folder with its split files (sunrgbd/matlab/extract_split.m)")
        tok = read_text(path).split()
        bad = [t for t in tok if not t.isdigit() or int(t) < 1]
        if bad:
            raise ValueError(f"{path}: {bad[:5]} are not image ids (positive integers)")
        splits[split] = [int(t) for t in tok]
    both = sorted(set(splits["train"]) & set(splits["val"]))
    if both:
        raise ValueError(f"image ids {both[:5]} are in both {SPLIT_FILES['train']} and "
                         f"{SPLIT_FILES['val']} of {root}")
    return splits


def run(raw: Path, out: Path, label_dir: str = "label_v1", ids: Sequence[int] | None = None,
        workers: int = 1, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Prepare the images listed in the split files of ``raw`` (or only ``ids``) into ``out``;
    returns the manifest (also written)."""
    raw, out = Path(raw), Path(out)
    if not raw.is_dir():
        raise FileNotFoundError(f"--raw {raw} is not a directory; pass VoteNet's "
                                "sunrgbd_trainval folder")
    if label_dir not in LABEL_DIRS:
        raise ValueError(f"--labels must be one of {LABEL_DIRS}, got {label_dir!r}")
    splits = read_splits(raw)
    if not (raw / label_dir).is_dir():
        raise FileNotFoundError(f"{raw} has no {label_dir}/ folder (the 3D box labels)")
    pairs = [(i, s) for s in ("train", "val") for i in splits[s]]
    if ids is not None:
        listed = {i for i, _ in pairs}
        unknown = sorted(set(ids) - listed)
        if unknown:
            raise ValueError(f"--ids {unknown[:5]} are not in {SPLIT_FILES['train']} or "
                             f"{SPLIT_FILES['val']}")
        wanted = set(ids)
        pairs = [(i, s) for i, s in pairs if i in wanted]
    pairs.sort()
    jobs = [SceneJob(image_name(i), s, prepare_image, (raw, image_name(i), label_dir))
            for i, s in pairs]
    params = {"classes": list(CLASSES), "label_dir": label_dir}
    return run_prep(out, benchmark="sunrgbd", classes=CLASSES, jobs=jobs, params=params,
                    inputs=as_json({"raw": raw.resolve()}), workers=workers, progress=progress,
                    log=log)
