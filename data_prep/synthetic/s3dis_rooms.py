"""Synthetic S3DIS-format rooms, with the known defects of the real release, and their truth.

``generate_s3dis_rooms(out_dir, ...)`` writes what ``Stanford3dDataset_v1.2_Aligned_Version``
holds, so ``mink-ssl-prep s3dis`` runs on it unchanged::

    out_dir/Area_<n>/Area_<n>_alignmentAngle.txt       (a file beside the rooms, as released)
    out_dir/Area_<n>/<room>/<room>.txt                  every point of the room
    out_dir/Area_<n>/<room>/Annotations/<class>_<k>.txt the points of one object

Lines are ``x y z r g b``: coordinates in metres with 3 decimals (``%.3f``), colours as
integers, as in the release. A room is a box (floor, ceiling, four walls) with S3DIS objects:
beams and columns, windows, doors and boards on the walls, tables, chairs, sofas, bookcases,
clutter, and stairs in hallways (``stairs`` is the release's 14th class). Points are sampled
uniformly on the visible faces of each object's boxes (``points_per_m2``) with 3 mm of normal
noise (``noise``), coloured by class with a per-object tint and per-point noise, or, with
``random_colors=True`` (the transfer benchmark's setting), every object in a random colour so
that colour says nothing about the class. The room file is the
concatenation of the annotation files in the order the objects were made (not file-name order).

With ``defects=True`` these rooms are added to the areas that are generated, each with one
defect of the real release:

- ``Area_5/hallway_6``: in ``Annotations/ceiling_1.txt`` a 0x10 byte replaces the space between
  red and green (``185\\x10187``);
- ``Area_2/auditorium_1``: its room file writes colours as ``%.6f`` (``167.000000``, as that
  file of the release does) and on one line the first decimal '0' of red is 0x10
  (``167.\\x1000000``: the digit lost bit 5);
- ``Area_3/hallway_2`` (placed at negative y): in the room file the second decimal of y lost
  bit 5 (``-9.1\\x160`` for ``-9.160``);
- ``Area_6/copyRoom_1``: the room file is named ``copy_Room_1.txt``.

Everything is a pure function of the arguments; files are written atomically.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from mink_ssl.io import atomic_path

CLASS_COLORS = {"ceiling": (222, 222, 214), "floor": (120, 105, 90), "wall": (200, 196, 180),
                "beam": (170, 165, 150), "column": (185, 180, 170), "window": (110, 150, 190),
                "door": (140, 95, 60), "table": (160, 120, 75), "chair": (60, 70, 130),
                "sofa": (90, 130, 90), "bookcase": (105, 75, 50), "board": (235, 235, 240),
                "clutter": (150, 80, 150), "stairs": (128, 128, 120)}
ROOM_TYPES = ("office", "conferenceRoom", "hallway", "storage", "WC", "lounge", "pantry")
DEFECT_ROOMS = {  # (area, room) -> defect, as in the real release
    (5, "hallway_6"): "separator", (2, "auditorium_1"): "digit",
    (3, "hallway_2"): "digit_negative", (6, "copyRoom_1"): "misnamed"}


@dataclass
class RoomTruth:
    """What a room holds. Arrays list the points of the annotation files in file-name order
    (the order prep concatenates them), with the values exactly as written."""

    name: str  # "Area_<n>/<room>"
    area: int
    room_file: str  # file name of the room file as written
    files: list[str]  # annotation file names, sorted
    counts: list[int]  # points per annotation file (same order)
    coords: np.ndarray  # (N, 3) float32 metres
    colors: np.ndarray  # (N, 3) uint8
    classes: np.ndarray  # (N,) str class name of each point (one of CLASS_COLORS)


@dataclass
class S3DISTruth:
    root: Path
    rooms: dict[str, RoomTruth]
    defects: list[dict] = field(default_factory=list)  # scene, file (relative), line, kind


# -- geometry: objects as axis-aligned rectangles ---------------------------------------------
# a rectangle is (axis, offset, u0, u1, v0, v1): the plane coordinate[axis] = offset spanning
# u = (axis + 1) % 3 in [u0, u1] and v = (axis + 2) % 3 in [v0, v1]
def _faces(lo, hi, skip: Sequence[str] = ()) -> list[tuple]:
    """The faces of box [lo, hi] (names "-x", "+x", ...) except ``skip``."""
    out = []
    for axis, ax in enumerate("xyz"):
        u, v = (axis + 1) % 3, (axis + 2) % 3
        for side, off in (("-", lo[axis]), ("+", hi[axis])):
            if side + ax not in skip:
                out.append((axis, off, lo[u], hi[u], lo[v], hi[v]))
    return out


def _wall_patch(wall: int, size, a: float, b: float, z0: float, z1: float) -> tuple:
    """A rectangle 1 cm in front of wall ``wall`` (0: x=0, 1: x=L, 2: y=0, 3: y=W), spanning
    [a, b] along the wall and [z0, z1] in height."""
    L, W, _ = size
    if wall in (0, 1):  # axis 0: u = y, v = z
        return (0, 0.01 if wall == 0 else L - 0.01, a, b, z0, z1)
    return (1, 0.01 if wall == 2 else W - 0.01, z0, z1, a, b)  # axis 1: u = z, v = x


def _objects(kind: str, size: np.ndarray, rng: np.random.Generator) -> list[tuple[str, list]]:
    """(class, rectangles) of every object of a room of ``size`` (L, W, H), room frame."""
    L, W, H = size
    objs = [("floor", [(2, 0.0, 0, L, 0, W)]), ("ceiling", [(2, H, 0, L, 0, W)]),
            ("wall", [(0, 0.0, 0, W, 0, H)]), ("wall", [(0, L, 0, W, 0, H)]),
            ("wall", [(1, 0.0, 0, H, 0, L)]), ("wall", [(1, W, 0, H, 0, L)])]
    if rng.random() < 0.6:
        y = rng.uniform(0.5, W - 0.8)
        objs.append(("beam", _faces((0, y, H - 0.4), (L, y + 0.3, H), ("+z", "-x", "+x"))))
    if rng.random() < 0.5:
        objs.append(("column", _faces((0, 0, 0), (0.4, 0.4, H), ("-x", "-y", "-z", "+z"))))
    a = rng.uniform(0.2, max(0.3, L - 1.5))
    objs.append(("window", [_wall_patch(3, size, a, a + 1.2, 0.9, 2.1)]))
    a = rng.uniform(0.2, max(0.3, W - 1.1))
    objs.append(("door", [_wall_patch(1, size, a, a + 0.9, 0.0, 2.1)]))
    if kind == "hallway":
        for _ in range(int(rng.integers(1, 3))):
            x0 = rng.uniform(0.5, max(0.6, L - 2.0))
            steps = []
            for i in range(4):  # steps rising along +x
                steps += _faces((x0 + 0.3 * i, 0.2, 0.0), (x0 + 0.3 * (i + 1), 1.2, 0.17 * (i + 1)),
                                ("-z", "+x", "-y", "+y"))
            objs.append(("stairs", steps))
        return objs
    objs.append(("board", [_wall_patch(0, size, 0.5, min(W - 0.3, 2.5), 1.0, 2.0)]))
    for _ in range(int(rng.integers(1, 3))):
        tx, ty = rng.uniform(0.5, L - 2.0), rng.uniform(0.6, W - 1.4)
        tw, td, th = rng.uniform(1.0, 1.6), rng.uniform(0.6, 0.9), rng.uniform(0.7, 0.76)
        parts = _faces((tx, ty, th - 0.04), (tx + tw, ty + td, th))
        for x in (tx, tx + tw - 0.05):
            for y in (ty, ty + td - 0.05):
                parts += _faces((x, y, 0), (x + 0.05, y + 0.05, th - 0.04), ("-z", "+z"))
        objs.append(("table", parts))
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = tx + rng.uniform(0, tw - 0.45), ty - rng.uniform(0.5, 0.6)
            parts = _faces((cx, cy, 0.42), (cx + 0.45, cy + 0.45, 0.47), ("-z",))
            parts += _faces((cx, cy - 0.05, 0.47), (cx + 0.45, cy, 0.95), ("-z",))
            objs.append(("chair", parts))
        for _ in range(int(rng.integers(0, 3))):
            cx, cy = tx + rng.uniform(0, tw - 0.3), ty + rng.uniform(0, td - 0.3)
            objs.append(("clutter", _faces((cx, cy, th), (cx + 0.3, cy + 0.25,
                                                          th + rng.uniform(0.05, 0.3)), ("-z",))))
    if rng.random() < 0.7:
        bx = rng.uniform(0.3, L - 1.3)
        objs.append(("bookcase", _faces((bx, 0.0, 0), (bx + 0.9, 0.35, rng.uniform(1.6, 2.1)),
                                        ("-z", "-y"))))
    if rng.random() < 0.5:
        sx, sy = rng.uniform(0.3, L - 2.2), rng.uniform(0.8, W - 1.2)
        objs.append(("sofa", _faces((sx, sy, 0), (sx + 1.8, sy + 0.8, 0.42), ("-z",))
                     + _faces((sx, sy + 0.6, 0.42), (sx + 1.8, sy + 0.8, 0.8), ("-z",))))
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0.2, L - 0.6), rng.uniform(0.2, W - 0.6)
        objs.append(("clutter", _faces((cx, cy, 0), (cx + 0.4, cy + 0.3, rng.uniform(0.2, 0.6)),
                                       ("-z",))))
    return objs


def _sample(objs: list[tuple[str, list]], density: float, rng: np.random.Generator,
            noise: float = 0.003) -> tuple[np.ndarray, np.ndarray]:
    """Points (N, 3) on the rectangles of ``objs`` (uniform by area) and the object of each."""
    rects = np.array([r for _, rs in objs for r in rs], dtype=np.float64)  # (R, 6)
    owner = np.repeat(np.arange(len(objs)), [len(rs) for _, rs in objs])  # (R,)
    area = (rects[:, 3] - rects[:, 2]) * (rects[:, 5] - rects[:, 4])
    n = rng.poisson(np.maximum(area, 0) * density)  # (R,)
    first = np.unique(owner, return_index=True)[1]
    n[first] = np.maximum(n[first], 3)  # every object gets a few points
    r = np.repeat(np.arange(len(rects)), n)  # (N,) rectangle of each point
    axis = rects[r, 0].astype(np.int64)
    pts = np.empty((len(r), 3))
    rows = np.arange(len(r))
    pts[rows, axis] = rects[r, 1] + rng.normal(0, noise, len(r))
    pts[rows, (axis + 1) % 3] = rng.uniform(rects[r, 2], rects[r, 3])
    pts[rows, (axis + 2) % 3] = rng.uniform(rects[r, 4], rects[r, 5])
    return pts, owner[r]


# -- text -------------------------------------------------------------------------------------
def _fixed(m: np.ndarray, decimals: int) -> np.ndarray:
    """(N, W) uint8 ASCII of integers ``m`` (N,) read as m / 10**decimals with ``decimals``
    digits after the point (``%.{decimals}f``), padded with 0 bytes (removed later)."""
    neg, a = m < 0, np.abs(m)
    ip, fp = np.divmod(a, 10 ** decimals)
    nd = len(str(int(ip.max()))) if len(ip) else 1
    pw = 10 ** np.arange(nd - 1, -1, -1, dtype=np.int64)  # (nd,)
    digits = np.where((ip[:, None] < pw) & (pw > 1), 0, ip[:, None] // pw % 10 + 48)  # (N, nd)
    parts = [np.where(neg, 45, 0)[:, None], digits]
    if decimals:
        fpw = 10 ** np.arange(decimals - 1, -1, -1, dtype=np.int64)
        parts += [np.full((len(m), 1), 46), fp[:, None] // fpw % 10 + 48]
    return np.concatenate(parts, axis=1).astype(np.uint8)


def format_xyzrgb(mm: np.ndarray, rgb: np.ndarray, rgb_decimals: int = 0) -> bytes:
    """S3DIS text of points with integer millimetre coordinates ``mm`` (N, 3) and colours
    ``rgb`` (N, 3): "x y z r g b" lines, coordinates as %.3f metres, colours as integers or
    with ``rgb_decimals`` zero decimals (vectorised)."""
    n = len(mm)
    if n == 0:
        return b""
    sep = np.full((n, 1), 32, dtype=np.uint8)
    c = rgb.astype(np.int64) * 10 ** rgb_decimals
    cols = [_fixed(mm[:, 0], 3), sep, _fixed(mm[:, 1], 3), sep, _fixed(mm[:, 2], 3), sep,
            _fixed(c[:, 0], rgb_decimals), sep, _fixed(c[:, 1], rgb_decimals), sep,
            _fixed(c[:, 2], rgb_decimals), np.full((n, 1), 10, dtype=np.uint8)]
    text = np.concatenate(cols, axis=1).ravel()  # (N * width,)
    return text[text != 0].tobytes()


def _line_span(data: bytes, line: int) -> tuple[int, int]:
    """Byte range [start, end) of 0-based ``line`` (without its newline)."""
    nl = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    start = 0 if line == 0 else int(nl[line - 1]) + 1
    return start, int(nl[line])


def _inject(data: bytes, line: int, kind: str) -> bytes:
    """``data`` with the defect ``kind`` on 0-based ``line``."""
    s, e = _line_span(data, line)
    text = data[s:e]
    if kind == "separator":  # the space between red and green becomes 0x10
        i = s + [k for k, c in enumerate(text) if c == 32][3]
        return data[:i] + b"\x10" + data[i + 1:]
    if kind == "digit":  # the first decimal of red loses bit 5 ('0' -> 0x10)
        red = [k for k, c in enumerate(text) if c == 32][2] + 1
        i = s + text.index(b".", red) + 1
    elif kind == "digit_negative":  # the second decimal of (negative) y loses bit 5
        y0 = text.index(b" ") + 1
        if text[y0:y0 + 1] != b"-":
            raise ValueError(f"line {line + 1} has a non-negative y: {text!r}")
        i = s + text.index(b".", y0) + 2
    else:
        raise ValueError(f"unknown defect kind {kind!r}")
    return data[:i] + bytes([data[i] & ~0x20]) + data[i + 1:]


def _write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# -- rooms ------------------------------------------------------------------------------------
def _room_size(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "hallway":
        return np.array([rng.uniform(8.0, 14.0), rng.uniform(1.6, 2.4), rng.uniform(2.6, 3.2)])
    if kind == "auditorium":
        return np.array([rng.uniform(10.0, 14.0), rng.uniform(8.0, 11.0), rng.uniform(4.0, 5.0)])
    return np.array([rng.uniform(3.5, 8.0), rng.uniform(3.0, 7.0), rng.uniform(2.6, 3.2)])


def generate_room(out_dir: Path, area: int, room: str, seed: int, *, defect: str | None = None,
                  points_per_m2: float = 60.0, random_colors: bool = False,
                  noise: float = 0.003) -> tuple[RoomTruth, dict | None]:
    """Write ``out_dir/Area_<area>/<room>/`` (room file and annotations); returns its truth
    and, with ``defect``, the defect entry (scene, file, line 1-based / 0, kind).

    ``random_colors``: every object gets a uniformly random colour instead of its class colour
    (colour then says nothing about the class); ``noise``: std (m) of the points' offset along
    the surface normal."""
    kind = room.rsplit("_", 1)[0]
    rng = np.random.default_rng([seed, area, zlib.crc32(room.encode())])
    size = _room_size(kind, rng)
    origin = np.array([rng.uniform(0, 30), rng.uniform(0, 30), 0.0])
    if defect == "digit_negative":
        origin[1] = -15.0  # every y negative, like Area_3/hallway_2
    objs = _objects(kind, size, rng)
    pts, owner = _sample(objs, points_per_m2, rng, noise)
    mm = np.round((pts + origin) * 1000).astype(np.int64)  # (N, 3) what the text holds
    cls = np.array([c for c, _ in objs])
    tint = rng.uniform(0.85, 1.15, (len(objs), 3))
    base = np.array([CLASS_COLORS[c] for c in cls], dtype=np.float64) * tint  # (O, 3)
    if random_colors:
        base = rng.uniform(30, 225, (len(objs), 3))  # (O, 3) independent of the class
    rgb = np.clip(np.round(base[owner] + rng.normal(0, 8, (len(owner), 3))), 0, 255
                  ).astype(np.uint8)
    counter: dict[str, int] = {}
    names = []
    for c in cls:  # one file name per object (tens), in creation order
        counter[c] = counter.get(c, 0) + 1
        names.append(f"{c}_{counter[c]}.txt")
    bounds = np.searchsorted(owner, np.arange(len(objs) + 1))  # owner is sorted (_sample)
    texts = [format_xyzrgb(mm[a:b], rgb[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    name = f"Area_{area}/{room}"
    room_dir = Path(out_dir) / f"Area_{area}" / room
    room_file = "copy_Room_1.txt" if defect == "misnamed" else f"{room}.txt"
    entry = None
    room_text = b"".join(texts) if defect != "digit" else b"".join(
        format_xyzrgb(mm[a:b], rgb[a:b], rgb_decimals=6) for a, b in zip(bounds[:-1], bounds[1:]))
    if defect == "separator":
        k = names.index("ceiling_1.txt")
        line = int(rng.integers(0, bounds[k + 1] - bounds[k]))
        texts[k] = _inject(texts[k], line, "separator")
        entry = {"scene": name, "file": f"{name}/Annotations/ceiling_1.txt", "line": line + 1,
                 "kind": defect}
    elif defect in ("digit", "digit_negative"):
        line = int(rng.integers(0, len(mm)))
        room_text = _inject(room_text, line, defect)
        entry = {"scene": name, "file": f"{name}/{room_file}", "line": line + 1, "kind": defect}
    elif defect == "misnamed":
        entry = {"scene": name, "file": f"{name}/{room_file}", "line": 0, "kind": defect}
    elif defect is not None:
        raise ValueError(f"unknown defect {defect!r}; choose from {sorted(DEFECT_ROOMS.values())}")
    for fname, text in zip(names, texts):
        _write(room_dir / "Annotations" / fname, text)
    _write(room_dir / room_file, room_text)

    sorted_files = sorted(names)
    pick = np.concatenate([np.arange(bounds[names.index(f)], bounds[names.index(f) + 1])
                           for f in sorted_files])  # points in file-name order
    truth = RoomTruth(name=name, area=area, room_file=room_file, files=sorted_files,
                      counts=[int(bounds[names.index(f) + 1] - bounds[names.index(f)])
                              for f in sorted_files],
                      coords=(mm[pick] / 1000.0).astype(np.float32), colors=rgb[pick],
                      classes=cls[owner[pick]])
    return truth, entry


def generate_s3dis_rooms(out_dir: str | os.PathLike, areas: Sequence[int] = (1, 2, 3, 4, 5, 6),
                         rooms_per_area: int = 1, seed: int = 0, defects: bool = True,
                         points_per_m2: float = 60.0, random_colors: bool = False,
                         noise: float = 0.003) -> S3DISTruth:
    """Write S3DIS-format areas under ``out_dir`` (the ``--raw`` folder of ``mink-ssl-prep
    s3dis``) and return the truth.

    Args:
        areas: area numbers to write.
        rooms_per_area: random rooms per area (office, conferenceRoom, hallway, ...).
        seed: picks the rooms, their objects, points and colours.
        defects: also write the defect rooms of the areas asked for (module docstring).
        points_per_m2: surface sampling density (the release has a few thousand; 60 keeps a
            room at a few thousand points).
        random_colors: colour every object uniformly at random instead of by class, so that
            a segmentation network must use geometry (the transfer benchmark's setting).
        noise: std in metres of the points' offset along the surface normal (scanner noise).
    """
    if rooms_per_area < 0:
        raise ValueError(f"rooms_per_area must be >= 0, got {rooms_per_area}")
    if points_per_m2 <= 0:
        raise ValueError(f"points_per_m2 must be positive, got {points_per_m2}")
    if not 0 <= noise < 0.1:
        raise ValueError(f"noise is a std in metres in [0, 0.1), got {noise}")
    bad = [a for a in areas if not isinstance(a, (int, np.integer)) or a < 1]
    if bad:
        raise ValueError(f"areas must be positive integers, got {bad}")
    root = Path(out_dir)
    rng = np.random.default_rng([seed, 0])
    truth = S3DISTruth(root=root, rooms={})
    for area in areas:
        rooms: dict[str, str | None] = {}
        if defects:
            rooms.update({r: d for (a, r), d in DEFECT_ROOMS.items() if a == area})
        counter: dict[str, int] = {}
        for _ in range(rooms_per_area):
            kind = ROOM_TYPES[int(rng.integers(len(ROOM_TYPES)))]
            while True:  # next free number of this kind (the defect rooms keep their names)
                counter[kind] = counter.get(kind, 0) + 1
                room = f"{kind}_{counter[kind]}"
                if room not in rooms:
                    break
            rooms[room] = None
        for room, defect in rooms.items():
            t, entry = generate_room(root, int(area), room, seed, defect=defect,
                                     points_per_m2=points_per_m2, random_colors=random_colors,
                                     noise=noise)
            truth.rooms[t.name] = t
            if entry:
                truth.defects.append(entry)
        angles = "".join(f"{r} 0\n" for r in rooms)
        _write(root / f"Area_{area}" / f"Area_{area}_alignmentAngle.txt",
               f"## Global alignment angle per disjoint space ##\n{angles}".encode())
    return truth
