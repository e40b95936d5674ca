"""ScanNet exported frame folders (the output of ScanNet's ``reader.py``), read like a ``.sens``.

Layout::

    root/color/<id>.jpg       colour frames
    root/depth/<id>.png       16-bit depth, millimetres, 0 = invalid
    root/pose/<id>.txt        4x4 camera-to-world (text; -inf where tracking was lost)
    root/intrinsic/intrinsic_color.txt, intrinsic_depth.txt     4x4 (text)
    root/intrinsic/extrinsic_color.txt, extrinsic_depth.txt     optional, identity if absent

Frame ids are integers, not necessarily contiguous (0, 5, 10, ...). Frames come back as
:class:`SensFrame` objects carrying the files' bytes, so ``frame.color(reader.header)`` and
``frame.depth(reader.header)`` decode them as for a ``.sens`` (the header says 'png' depth).
"""
from __future__ import annotations

import io
import operator
from pathlib import Path
from typing import Iterator

import numpy as np

from data_prep.reading import read_bytes, reading
from data_prep.scannet.sens import SensFormatError, SensFrame, SensHeader
from data_prep.scannet.sens_writer import write_sens
from mink_ssl.errors import BadInput

_FIX = ("re-export the scene with ScanNet's reader.py (--export_depth_images "
        "--export_color_images --export_poses --export_intrinsics)")


def _ids(folder: Path, suffix: str) -> set[int]:
    """Integer frame ids of ``folder/<id><suffix>`` (other names are ignored)."""
    return {int(p.stem) for p in folder.glob(f"*{suffix}")
            if p.stem.isdigit() and str(int(p.stem)) == p.stem}  # '7', not '007


def _matrix(path: Path) -> np.ndarray:
    """A 4x4 matrix from a text file, as float32."""
    try:
        with reading(path):
            m = np.loadtxt(path, dtype=np.float64)
    except BadInput:
        raise
    except ValueError as e:
        raise SensFormatError(f"{path}: not a 4x4 matrix of numbers ({e})") from None
    if m.shape != (4, 4):
        raise SensFormatError(f"{path}: expected a 4x4 matrix, got shape {m.shape}")
    return m.astype(np.float32)


def _image_info(path: Path, data: bytes | None = None) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) of an image file (or its ``data``), from its header only."""
    from PIL import Image

    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            return img.mode, img.size
    except Exception as e:
        raise SensFormatError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


class ExportedFrames:
    """Reader of an exported ScanNet frame folder, with the :class:`SensReader` interface.
    A missing or unreadable file is :class:`BadInput` naming it.

    ``frame(i)`` takes a frame *id* (``frame_ids`` lists them), and ``SensFrame.index`` is the id.
    """

    _SUFFIX = {"color": ".jpg", "depth": ".png", "pose": ".txt"}

    def __init__(self, root):
        self.root = Path(root)
        for sub in ("color", "depth", "pose", "intrinsic"):
            if not (self.root / sub).is_dir():
                raise BadInput(f"{self.root / sub}: folder missing; an exported ScanNet "
                               f"scene has color/, depth/, pose/ and intrinsic/ ({_FIX})")
        depth_ids = _ids(self.root / "depth", ".png")
        if not depth_ids:
            raise BadInput(f"{self.root / 'depth'}: no <int>.png depth frames ({_FIX})")
        for sub, suffix in (("pose", ".txt"), ("color", ".jpg")):
            missing = sorted(depth_ids - _ids(self.root / sub, suffix))
            if missing:
                raise BadInput(
                    f"{self.root / sub / f'{missing[0]}{suffix}'} missing ({len(missing)} frames "
                    f"with depth lack a {sub} file, ids {missing[:5]}...): {_FIX}, or delete "
                    f"depth/<id>.png of those frames")
        self.frame_ids: list[int] = sorted(depth_ids)

        first = self.frame_ids[0]
        dmode, (dw, dh) = _image_info(self._path("depth", first))
        self._check_depth_mode(self._path("depth", first), dmode)
        _, (cw, ch) = _image_info(self._path("color", first))
        intr = self.root / "intrinsic"
        ext = {n: _matrix(intr / f"{n}.txt") if (intr / f"{n}.txt").is_file() else np.eye(4)
               for n in ("extrinsic_color", "extrinsic_depth")}
        for n in ("intrinsic_color", "intrinsic_depth"):
            if not (intr / f"{n}.txt").is_file():
                raise BadInput(f"{intr / f'{n}.txt'} missing ({_FIX})")
        self.header = SensHeader(
            version=4, sensor_name=f"exported:{self.root.name}",
            intrinsic_color=_matrix(intr / "intrinsic_color.txt"),
            extrinsic_color=ext["extrinsic_color"],
            intrinsic_depth=_matrix(intr / "intrinsic_depth.txt"),
            extrinsic_depth=ext["extrinsic_depth"],
            color_compression="jpeg", depth_compression="png",
            color_width=cw, color_height=ch, depth_width=dw, depth_height=dh,
            depth_shift=1000.0, num_frames=len(self.frame_ids))
        self._id_set = set(self.frame_ids)

    def _path(self, kind: str, i: int) -> Path:
        return self.root / kind / f"{i}{self._SUFFIX[kind]}"

    @staticmethod
    def _check_depth_mode(path: Path, mode: str) -> None:
        if mode not in ("I;16", "I;16L", "I;16B"):
            raise SensFormatError(f"{path}: depth PNG has mode {mode!r}, expected 16-bit "
                                  f"(uint16 millimetres); {_FIX}")

    def __len__(self) -> int:
        return len(self.frame_ids)

    def __repr__(self) -> str:
        return f"ExportedFrames({str(self.root)!r}, {len(self)} frames)"

    def frame(self, i: int, *, color: bool = True, depth: bool = True) -> SensFrame:
        """Frame with id ``i``: pose parsed, colour/depth file bytes read (not decoded)."""
        i = operator.index(i)
        if i not in self._id_set:
            raise IndexError(f"frame id {i} not in {self.root} ({len(self)} frames, ids "
                             f"{self.frame_ids[0]}..{self.frame_ids[-1]})")
        dbytes = None
        if depth:
            dpath = self._path("depth", i)
            dbytes = read_bytes(dpath)
            self._check_depth_mode(dpath, _image_info(dpath, dbytes)[0])
        cbytes = read_bytes(self._path("color", i)) if color else None
        return SensFrame(i, _matrix(self._path("pose", i)), 0, 0, cbytes, dbytes,
                         source=str(self.root))

    def frames(self, indices=None, *, step: int = 1, color: bool = True,
               depth: bool = True) -> Iterator[SensFrame]:
        """Frames with ids ``indices[::step]`` (default: all ids, ascending)."""
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        ids = self.frame_ids if indices is None else list(indices)
        for i in ids[::step]:
            yield self.frame(i, color=color, depth=depth)


def export_to_sens(root, out_path, *, color_compression: str = "jpeg",
                   depth_compression: str = "zlib_ushort", jpeg_quality: int = 95) -> Path:
    """Convert an exported frame folder into a ``.sens`` file (written atomically).

    With 'jpeg' colour the JPEG files are copied byte for byte (no second lossy encoding);
    'png' and 'raw' decode them. Depth PNGs become zlib (or raw) uint16; poses and intrinsics
    are stored as float32. Timestamps are 0 (exports do not keep them).
    """
    src = ExportedFrames(root)
    h = src.header

    def items():
        for f in src.frames():
            color = f.color_bytes if color_compression == "jpeg" else f.color(h)
            yield f.camera_to_world, color, f.depth(h), 0, 0

    return write_sens(out_path, h, items(), color_compression=color_compression,
                      depth_compression=depth_compression, jpeg_quality=jpeg_quality)
