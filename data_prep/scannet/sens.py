"""ScanNet SensorData ``.sens`` (version 4): the format and a streaming reader (the writer is
:mod:`data_prep.scannet.sens_writer`).

Binary layout (little endian), as ScanNet's ``SensorData.h``::

    header  uint32 version (4); uint64 name length; name bytes (utf-8);
            4 x 16 float32: intrinsic_color, extrinsic_color, intrinsic_depth, extrinsic_depth
            (4x4 row-major); int32 color / depth compression type; uint32 color width, height;
            uint32 depth width, height; float32 depth_shift; uint64 num_frames
    frame   16 float32 camera_to_world; uint64 timestamp_color, timestamp_depth;
            uint64 color_size_bytes, depth_size_bytes; color bytes; depth bytes
    tail    IMU records (uint64 count, then records): ignored by the reader, written empty.

The reader never loads the whole file: frames are located by hopping over their payloads
(reading only the 96-byte frame headers) and read with positional reads, so one reader can be
shared by forked DataLoader workers. Any damage raises :class:`SensFormatError` naming the file,
the frame and the byte offset; a file that cannot be read (no permission, an I/O error) raises
:class:`mink_ssl.errors.BadInput` naming it. Both are bad input: prep skips the scene.
"""
from __future__ import annotations

import io
import operator
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from data_prep.reading import reading
from mink_ssl.errors import BadInput

VERSION = 4
MAX_SIDE = 20000  # largest plausible image side, in pixels
MAX_NAME = 4096  # largest plausible sensor-name length, in bytes
COLOR_COMPRESSION = {-1: "unknown", 0: "raw", 1: "png", 2: "jpeg"}
DEPTH_COMPRESSION = {-1: "unknown", 0: "raw_ushort", 1: "zlib_ushort", 2: "occi_ushort"}

HEAD_START = struct.Struct("<IQ")  # version, sensor-name length
HEAD_MATS = struct.Struct("<64f")  # 4 x (4x4) intrinsic/extrinsic matrices
HEAD_TAIL = struct.Struct("<iiIIIIfQ")  # compressions, sizes, depth_shift, num_frames
FRAME_HEAD = struct.Struct("<16fQQQQ")  # pose, timestamps, payload sizes: 96 bytes
IMU_FRAME_SIZE = 5 * 24 + 8  # rotation rate, acceleration, magnetic field, attitude, gravity
                             # (3 doubles each) and a uint64 timestamp
U64 = struct.Struct("<Q")


class SensFormatError(BadInput):
    """A ``.sens`` file (or exported frame) is damaged or not what the format allows."""


def _where(source, frame: int | None, offset: int | None) -> str:
    """'<file>: frame 3, byte offset 1234' ('header' when no frame is involved)."""
    loc = "header" if frame is None else f"frame {frame}"
    return f"{source}: {loc}" + ("" if offset is None else f", byte offset {offset}")


def _mat4(m, name: str) -> np.ndarray:
    """A (4, 4) float32 copy of ``m``; a 3x3 pinhole matrix is embedded in the identity."""
    m = np.asarray(m, dtype=np.float32)
    if m.shape == (3, 3):
        m4 = np.eye(4, dtype=np.float32)
        m4[:3, :3] = m
        m = m4
    if m.shape != (4, 4):
        raise ValueError(f"{name} must be a 4x4 (or 3x3) matrix, got shape {m.shape}")
    return m.copy()


@dataclass(eq=False)
class SensHeader:
    """The file header. Matrices are (4, 4) float32; compressions use ScanNet's names."""

    version: int
    sensor_name: str
    intrinsic_color: np.ndarray  # (4, 4)
    extrinsic_color: np.ndarray  # (4, 4)
    intrinsic_depth: np.ndarray  # (4, 4)
    extrinsic_depth: np.ndarray  # (4, 4)
    color_compression: str  # 'unknown' | 'raw' | 'png' | 'jpeg'
    # 'unknown' | 'raw_ushort' | 'zlib_ushort' | 'occi_ushort'; 'png' for exported folders
    depth_compression: str
    color_width: int
    color_height: int
    depth_width: int
    depth_height: int
    depth_shift: float  # depth units per metre (1000: millimetres)
    num_frames: int

    def __post_init__(self):
        for name in ("intrinsic_color", "extrinsic_color", "intrinsic_depth", "extrinsic_depth"):
            setattr(self, name, _mat4(getattr(self, name), name))


@dataclass(eq=False)
class SensFrame:
    """One RGB-D frame with its payloads still compressed as stored.

    ``source`` and ``offset`` (file and byte offset of the frame header) only serve error
    messages. ``color_bytes`` / ``depth_bytes`` are None when the frame was read without them.
    """

    index: int
    camera_to_world: np.ndarray  # (4, 4) float32; all -inf where ScanNet lost tracking
    timestamp_color: int
    timestamp_depth: int
    color_bytes: bytes | None
    depth_bytes: bytes | None
    source: str = field(default="", repr=False)
    offset: int | None = field(default=None, repr=False)

    def _error(self, what: str) -> SensFormatError:
        return SensFormatError(f"{_where(self.source, self.index, self.offset)}: {what}")

    def color(self, header: SensHeader) -> np.ndarray:
        """Decode the colour image: (H, W, 3) uint8 RGB."""
        if self.color_bytes is None:
            raise ValueError(f"frame {self.index} was read with color=False")
        H, W, comp = header.color_height, header.color_width, header.color_compression
        if comp == "raw":
            if len(self.color_bytes) != H * W * 3:
                raise self._error(f"raw colour has {len(self.color_bytes)} bytes, expected "
                                  f"{H}*{W}*3 = {H * W * 3}")
            return np.frombuffer(self.color_bytes, np.uint8).reshape(H, W, 3).copy()
        if comp not in ("jpeg", "png"):
            raise self._error(f"cannot decode colour compression {comp!r}")
        img = self._open_image(self.color_bytes, comp, "colour")
        if img.size != (W, H):
            raise self._error(f"colour image is {img.size[0]}x{img.size[1]}, header says {W}x{H}")
        return np.array(img if img.mode == "RGB" else img.convert("RGB"))  # (H, W, 3)

    def depth(self, header: SensHeader) -> np.ndarray:
        """Decode the depth image: (H, W) uint16, ``header.depth_shift`` units per metre."""
        if self.depth_bytes is None:
            raise ValueError(f"frame {self.index} was read with depth=False")
        H, W, comp = header.depth_height, header.depth_width, header.depth_compression
        want = H * W * 2
        if comp == "zlib_ushort":
            dec = zlib.decompressobj()
            try:
                raw = dec.decompress(self.depth_bytes, want + 1)  # bounded: no zip bomb
            except zlib.error as e:
                raise self._error(f"depth payload is not valid zlib data ({e})") from None
            if len(raw) != want or not dec.eof:
                got = (f"more than {want}" if len(raw) > want
                       else f"{len(raw)}" + ("" if dec.eof else " (stream cut short)"))
                raise self._error(f"zlib depth decompresses to {got} bytes, "
                                  f"expected {H}*{W}*2 = {want}")
        elif comp == "raw_ushort":
            raw = self.depth_bytes
            if len(raw) != want:
                raise self._error(f"raw depth has {len(raw)} bytes, expected {H}*{W}*2 = {want}")
        elif comp == "png":
            img = self._open_image(self.depth_bytes, "png", "depth")
            if img.mode not in ("I;16", "I;16L", "I;16B"):
                raise self._error(f"depth PNG has mode {img.mode!r}, not 16-bit; export depth as "
                                  "16-bit PNGs (uint16 millimetres)")
            if img.size != (W, H):
                raise self._error(f"depth image is {img.size[0]}x{img.size[1]}, "
                                  f"header says {W}x{H}")
            return np.asarray(img).astype(np.uint16)  # (H, W), native byte order
        elif comp == "occi_ushort":
            raise self._error("occi_ushort depth compression is proprietary and not supported; "
                              "convert the scan with ScanNet's tools to zlib_ushort")
        else:
            raise self._error(f"cannot decode depth compression {comp!r}")
        return np.frombuffer(raw, "<u2").astype(np.uint16).reshape(H, W)  # writable copy

    def _open_image(self, data: bytes, fmt: str, what: str):
        from PIL import Image

        try:
            img = Image.open(io.BytesIO(data), formats=[fmt.upper()])
            img.load()  # decode now, so damage surfaces here
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, bomb errors ...
            raise self._error(f"{what} payload does not decode as {fmt} "
                              f"({type(e).__name__}: {e})") from None
        return img


class SensReader:
    """Random-access, streaming reader of a ``.sens`` file. Example::

        with SensReader("scene0000_00.sens") as sens:
            for f in sens.frames(step=25):
                depth, pose = f.depth(sens.header), f.camera_to_world  # (H, W) uint16, (4, 4)
    """

    def __init__(self, path):
        self.path = Path(path)
        with reading(self.path):
            self._file = open(self.path, "rb", buffering=0)
        try:
            with reading(self.path):
                self.size = os.fstat(self._file.fileno()).st_size
            self.header, end = self._read_header()
            self._offsets = [end]  # _offsets[i]: byte offset of frame i's header (lazy)
            if self.header.num_frames * FRAME_HEAD.size > self.size - end:
                self.check()  # raises: a wrong frame count, or the first truncated frame
                raise self._error(None, end, "file too short for the frame count")  # unreachable
        except BaseException:
            self._file.close()
            raise

    # -- context manager, pickling (DataLoader workers reopen the file) -------------------
    def __enter__(self) -> "SensReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_file"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._file = open(self.path, "rb", buffering=0)

    def __len__(self) -> int:
        return self.header.num_frames

    def __repr__(self) -> str:
        return f"SensReader({str(self.path)!r}, {len(self)} frames)"

    # -- low level -------------------------------------------------------------------------
    def _error(self, frame: int | None, offset: int, what: str) -> SensFormatError:
        return SensFormatError(f"{_where(self.path, frame, offset)}: {what}")

    def _read(self, offset: int, n: int, what: str, frame: int | None = None) -> bytes:
        """Exactly ``n`` bytes at ``offset`` (positional read; no shared file position)."""
        if n > self.size - offset:
            raise self._error(frame, offset, f"truncated: expected {n} bytes of {what}, "
                                             f"the file ends {self.size - offset} bytes later")
        chunks, got = [], 0
        while got < n:
            with reading(self.path):  # an I/O error: bad input naming the file
                if hasattr(os, "pread"):
                    chunk = os.pread(self._file.fileno(), n - got, offset + got)
                else:  # pragma: no cover (Windows)
                    self._file.seek(offset + got)
                    chunk = self._file.read(n - got)
            if not chunk:
                raise self._error(frame, offset + got, f"unexpected end of file in {what}")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _read_header(self) -> tuple[SensHeader, int]:
        version, name_len = HEAD_START.unpack(self._read(0, HEAD_START.size, "header"))
        if version != VERSION:
            raise self._error(None, 0, f"version {version}, expected {VERSION} (not a ScanNet "
                                       "SensorData .sens file, or an unsupported version)")
        if name_len > MAX_NAME:
            raise self._error(None, 4, f"sensor name length {name_len} bytes, "
                                       f"expected at most {MAX_NAME}")
        off = HEAD_START.size
        name = self._read(off, name_len, "sensor name").decode("utf-8", errors="replace")
        off += name_len
        mats = np.array(HEAD_MATS.unpack(self._read(off, HEAD_MATS.size, "header matrices")),
                        np.float32).reshape(4, 4, 4)  # (matrix, row, col)
        off += HEAD_MATS.size
        tail = HEAD_TAIL.unpack(self._read(off, HEAD_TAIL.size, "header"))
        ccomp, dcomp, cw, ch, dw, dh, shift, num_frames = tail
        if ccomp not in COLOR_COMPRESSION:
            raise self._error(None, off, f"unknown color compression type {ccomp}, "
                                         f"expected one of {COLOR_COMPRESSION}")
        if dcomp not in DEPTH_COMPRESSION:
            raise self._error(None, off + 4, f"unknown depth compression type {dcomp}, "
                                             f"expected one of {DEPTH_COMPRESSION}")
        for k, (name_k, v) in enumerate([("color_width", cw), ("color_height", ch),
                                         ("depth_width", dw), ("depth_height", dh)]):
            if not 0 < v <= MAX_SIDE:
                raise self._error(None, off + 8 + 4 * k,
                                  f"{name_k} = {v}, expected 1..{MAX_SIDE} pixels")
        if not (np.isfinite(shift) and shift > 0):
            raise self._error(None, off + 24, f"depth_shift = {shift}, expected a positive "
                                              "number of depth units per metre (e.g. 1000)")
        header = SensHeader(version, name, *mats, COLOR_COMPRESSION[ccomp],
                            DEPTH_COMPRESSION[dcomp], cw, ch, dw, dh, float(shift), num_frames)
        return header, off + HEAD_TAIL.size

    def _frame_head(self, i: int) -> tuple[tuple, int]:
        """Parse and check frame ``i``'s 96-byte header; record where frame ``i + 1`` starts.

        Returns (pose 16 floats, ts_color, ts_depth, color_size, depth_size) and the offset.
        """
        off = self._offsets[i]
        *pose, tsc, tsd, csize, dsize = FRAME_HEAD.unpack(
            self._read(off, FRAME_HEAD.size, "frame header", i))
        left = self.size - off - FRAME_HEAD.size
        if csize + dsize > left:
            raise self._error(i, off, f"color_size_bytes {csize} + depth_size_bytes {dsize} "
                                      f"exceed the {left} bytes left in the file (truncated or "
                                      "corrupt frame header)")
        if len(self._offsets) == i + 1:
            self._offsets.append(off + FRAME_HEAD.size + csize + dsize)
        return (pose, tsc, tsd, csize, dsize), off

    def _locate(self, i: int) -> int:
        """Byte offset of frame ``i``, hopping over payloads from the last known frame."""
        while len(self._offsets) <= i:
            self._frame_head(len(self._offsets) - 1)
        return self._offsets[i]

    # -- public ----------------------------------------------------------------------------
    def frame(self, i: int, *, color: bool = True, depth: bool = True) -> SensFrame:
        """Frame ``i`` (0 <= i < len); payloads not asked for are skipped, not read."""
        i = operator.index(i)
        if not 0 <= i < len(self):
            raise IndexError(f"frame index {i} out of range: {self.path} has {len(self)} frames")
        self._locate(i)
        (pose, tsc, tsd, csize, dsize), off = self._frame_head(i)
        payload = off + FRAME_HEAD.size
        cbytes = self._read(payload, csize, "color payload", i) if color else None
        dbytes = self._read(payload + csize, dsize, "depth payload", i) if depth else None
        return SensFrame(i, np.array(pose, np.float32).reshape(4, 4), tsc, tsd, cbytes, dbytes,
                         source=str(self.path), offset=off)

    def frames(self, indices: Iterable[int] | None = None, *, step: int = 1,
               color: bool = True, depth: bool = True) -> Iterator[SensFrame]:
        """Stream frames ``indices[::step]`` (default: all), in the order given."""
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        indices = range(0, len(self), step) if indices is None else list(indices)[::step]
        for i in indices:
            yield self.frame(i, color=color, depth=depth)

    def check(self) -> None:
        """Walk all frame headers (payloads skipped): raises SensFormatError on the first damage.

        Cheap (one 96-byte read per frame); lets data prep reject a truncated scene up front.
        A header whose frame count disagrees with the frames the file holds is named as such:
        the file ends at a frame boundary before the count is reached, or complete frames
        follow the counted ones (an IMU section after the frames is the format's, not frames).
        """
        try:
            self._locate(len(self))
        except SensFormatError:
            held = len(self._offsets) - 1  # frames located completely
            if self._imu_section_or_end(self._offsets[-1]):  # no frame is cut: a wrong count
                raise self._error(None, 0, f"the header counts {len(self)} frames but the file "
                                  f"holds {held} complete frames and ends after them: the "
                                  "header's frame count is wrong, or the file was cut between "
                                  "frames (compare its size with the download's)") from None
            raise
        extra = self._frames_after(self._offsets[len(self)])
        if extra:
            raise self._error(None, self._offsets[len(self)], f"the header counts {len(self)} "
                              f"frames but {extra} more complete frame(s) follow them: the "
                              "header's frame count is wrong; rewrite the file (e.g. with "
                              "data_prep.scannet.sens_writer) or re-download it")

    def _imu_section_or_end(self, offset: int) -> bool:
        """Whether the file ends at ``offset`` or right after an IMU section starting there
        (``uint64 count`` then ``count`` records of 128 bytes, SensorData v4's tail)."""
        left = self.size - offset
        if left == 0:
            return True
        if left < 8:
            return False
        (count,) = struct.unpack("<Q", self._read(offset, 8, "IMU frame count"))
        return left == 8 + count * IMU_FRAME_SIZE

    def _frames_after(self, offset: int) -> int:
        """How many complete RGB-D frames (a header whose sizes fit and whose colour payload
        starts as the header's compression says) follow ``offset``; 0 for an IMU section."""
        magic = {"jpeg": b"\xff\xd8", "png": b"\x89PNG"}.get(self.header.color_compression)
        count = 0
        while magic is not None and self.size - offset >= FRAME_HEAD.size:
            *_, csize, dsize = FRAME_HEAD.unpack(self._read(offset, FRAME_HEAD.size, "frame"))
            start = offset + FRAME_HEAD.size
            if not 0 < csize + dsize <= self.size - start or csize < len(magic) or \
                    self._read(start, len(magic), "colour payload") != magic:
                break
            count, offset = count + 1, start + csize + dsize
        return count
