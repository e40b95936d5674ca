"""Writing ScanNet SensorData ``.sens`` files (version 4; the layout is in
:mod:`data_prep.scannet.sens`): atomically, frames streamed from any iterable."""
from __future__ import annotations

import io
import os
import uuid
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from data_prep.scannet.sens import (COLOR_COMPRESSION, DEPTH_COMPRESSION, HEAD_START, HEAD_TAIL,
                                    MAX_SIDE, U64, VERSION, SensHeader)

_COLOR_CODES = {v: k for k, v in COLOR_COMPRESSION.items()}
_DEPTH_CODES = {v: k for k, v in DEPTH_COMPRESSION.items()}
WRITABLE_COLOR = ("jpeg", "png", "raw")
WRITABLE_DEPTH = ("zlib_ushort", "raw_ushort")


def _pack_header(h: SensHeader, color_compression: str, depth_compression: str) -> bytes:
    for name in ("color_width", "color_height", "depth_width", "depth_height"):
        if not 0 < getattr(h, name) <= MAX_SIDE:
            raise ValueError(f"header {name} = {getattr(h, name)}, expected 1..{MAX_SIDE}")
    if not (np.isfinite(h.depth_shift) and h.depth_shift > 0):
        raise ValueError(f"header depth_shift = {h.depth_shift}, expected > 0")
    name = h.sensor_name.encode("utf-8")
    mats = np.stack([h.intrinsic_color, h.extrinsic_color, h.intrinsic_depth,
                     h.extrinsic_depth]).astype("<f4")  # (4, 4, 4)
    return (HEAD_START.pack(VERSION, len(name)) + name + mats.tobytes()
            + HEAD_TAIL.pack(_COLOR_CODES[color_compression], _DEPTH_CODES[depth_compression],
                              h.color_width, h.color_height, h.depth_width, h.depth_height,
                              h.depth_shift, 0))


def _encode_color(color, h: SensHeader, comp: str, quality: int, i: int) -> bytes:
    """Colour payload; ``bytes`` are taken as already encoded in ``comp`` (checked, not decoded)."""
    H, W = h.color_height, h.color_width
    if isinstance(color, (bytes, bytearray, memoryview)):
        color = bytes(color)
        if comp == "raw":
            if len(color) != H * W * 3:
                raise ValueError(f"frame {i}: raw colour bytes {len(color)} != {H}*{W}*3")
            return color
        from PIL import Image

        try:
            img = Image.open(io.BytesIO(color), formats=[comp.upper()])  # reads the header only
        except Exception as e:
            raise ValueError(f"frame {i}: colour bytes are not a {comp} image ({e})") from None
        if img.size != (W, H):
            raise ValueError(f"frame {i}: colour image is {img.size[0]}x{img.size[1]}, header "
                             f"says {W}x{H}")
        return color
    color = np.asarray(color)
    if color.shape != (H, W, 3) or color.dtype != np.uint8:
        raise ValueError(f"frame {i}: colour must be ({H}, {W}, 3) uint8 as the header says, "
                         f"got {color.shape} {color.dtype}")
    if comp == "raw":
        return np.ascontiguousarray(color).tobytes()
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(color))
    img.save(buf, format="JPEG", quality=quality) if comp == "jpeg" else img.save(buf, "PNG")
    return buf.getvalue()


def _encode_depth(depth, h: SensHeader, comp: str, level: int, i: int) -> bytes:
    """Depth payload; ``bytes`` are taken as already encoded in ``comp`` (a zlib stream's
    header or a raw payload's length is checked, nothing is decompressed)."""
    H, W = h.depth_height, h.depth_width
    if isinstance(depth, (bytes, bytearray, memoryview)):
        depth = bytes(depth)
        if comp == "raw_ushort" and len(depth) != H * W * 2:
            raise ValueError(f"frame {i}: raw depth bytes {len(depth)} != {H}*{W}*2")
        if comp == "zlib_ushort" and (len(depth) < 2 or depth[0] & 0x0F != 8
                                      or (depth[0] << 8 | depth[1]) % 31):
            raise ValueError(f"frame {i}: depth bytes are not a zlib stream (header "
                             f"{depth[:2].hex()}); pass the (H, W) uint16 image instead")
        return depth
    depth = np.asarray(depth)
    if depth.shape != (H, W) or depth.dtype != np.uint16:
        raise ValueError(f"frame {i}: depth must be ({H}, {W}) uint16 as the header says, "
                         f"got {depth.shape} {depth.dtype} (convert with .astype(np.uint16))")
    raw = np.ascontiguousarray(depth, dtype="<u2").tobytes()
    return zlib.compress(raw, level) if comp == "zlib_ushort" else raw


def write_sens(path, header: SensHeader,
               frames: Iterable[Sequence], *, color_compression: str = "jpeg",
               depth_compression: str = "zlib_ushort", jpeg_quality: int = 95,
               zlib_level: int = 6) -> Path:
    """Write a ``.sens`` file atomically, streaming ``frames``.

    Args:
        path: output file; its parent is created. Written to a temp file beside it, then
            renamed: an exception leaves neither a partial file nor the temp file.
        header: sizes, intrinsics/extrinsics, sensor name and depth_shift are written from it;
            its compressions and num_frames are ignored (the counted frames are written).
        frames: iterable of ``(camera_to_world (4, 4), color (H, W, 3) uint8, depth (h, w)
            uint16[, timestamp_color, timestamp_depth])``; timestamps default to 0. ``color``
            may also be ``bytes`` already encoded as ``color_compression`` (passed through,
            e.g. the JPEGs of an exported folder), and ``depth`` bytes already encoded as
            ``depth_compression`` (e.g. the payloads of another ``.sens``).
        color_compression: 'jpeg' (lossy), 'png' or 'raw'.
        depth_compression: 'zlib_ushort' or 'raw_ushort'.

    Returns:
        ``path`` as a Path.
    """
    if color_compression not in WRITABLE_COLOR:
        raise ValueError(f"color_compression {color_compression!r}, expected one of "
                         f"{WRITABLE_COLOR}")
    if depth_compression not in WRITABLE_DEPTH:
        raise ValueError(f"depth_compression {depth_compression!r}, expected one of "
                         f"{WRITABLE_DEPTH}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = _pack_header(header, color_compression, depth_compression)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(head)
            count = 0
            for i, item in enumerate(frames):
                if len(item) not in (3, 5):
                    raise ValueError(f"frame {i}: expected (pose, color, depth[, ts_color, "
                                     f"ts_depth]), got {len(item)} items")
                pose, color, depth, *ts = item
                tsc, tsd = ts or (0, 0)
                pose = np.asarray(pose, dtype="<f4")
                if pose.shape != (4, 4):
                    raise ValueError(f"frame {i}: pose must be 4x4, got shape {pose.shape}")
                cbytes = _encode_color(color, header, color_compression, jpeg_quality, i)
                dbytes = _encode_depth(depth, header, depth_compression, zlib_level, i)
                f.write(pose.tobytes()
                        + U64.pack(int(tsc)) + U64.pack(int(tsd))
                        + U64.pack(len(cbytes)) + U64.pack(len(dbytes)))
                f.write(cbytes)
                f.write(dbytes)
                count += 1
            f.write(U64.pack(0))  # no IMU records
            f.seek(len(head) - U64.size)  # patch num_frames, the header's last field
            f.write(U64.pack(count))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
