"""PLY input of prep: a fast reader of the ``vertex`` element and helpers for its fields."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from data_prep.reading import reading
from mink_ssl.errors import BadInput

_FIX = "restore the file from the dataset's download"
_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2",
              "int16": "i2", "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4",
              "uint": "u4", "uint32": "u4", "float": "f4", "float32": "f4", "double": "f8",
              "float64": "f8"}


def read_ply_vertices(path: Path) -> np.ndarray:
    """The ``vertex`` element of a PLY file as a structured array (one field per property).

    Binary files whose vertex element comes first (ScanNet meshes, point clouds) are read with
    one ``np.frombuffer``, without touching the faces; anything else goes through plyfile.
    Raises :class:`BadInput` naming the file for one that cannot be read, is not PLY, has no
    vertex element or is truncated.
    """
    path = Path(path)
    with reading(path), open(path, "rb") as f:
        head = f.read(65536)
    if not head.startswith(b"ply"):
        raise BadInput(f"{path} is not a PLY file (it does not start with 'ply'): {_FIX}", path)
    end = head.find(b"end_header")
    if end < 0:
        raise BadInput(f"{path}: no end_header in the first 64 KiB (not a PLY header): {_FIX}",
                       path)
    body = head.index(b"\n", end) + 1 if b"\n" in head[end:] else len(head)
    lines = head[:end].decode("ascii", "replace").splitlines()
    fmt, elements = None, []  # [(name, count, [(prop, type) | None for lists])]
    for line in lines:
        tok = line.split()
        if not tok:
            continue
        if (tok[0] in ("format", "element", "property") and len(tok) < 3) or \
                (tok[0] == "element" and (len(tok) != 3 or not tok[2].isdigit())):
            raise BadInput(f"{path}: PLY header line {line.strip()!r} is malformed (expected "
                           "'format <kind> <version>', 'element <name> <count>' or 'property "
                           f"<type> <name>'): {_FIX}", path)
        if tok[0] == "format":
            fmt = tok[1]
        elif tok[0] == "element":
            elements.append((tok[1], int(tok[2]), []))
        elif tok[0] == "property" and elements:
            elements[-1][2].append(None if tok[1] == "list" else (tok[-1], tok[1]))
    if not elements or elements[0][0] != "vertex" or fmt == "ascii" \
            or any(p is None or p[1] not in _PLY_TYPES for p in elements[0][2]):
        return _read_ply_vertices_plyfile(path)
    order = "<" if fmt == "binary_little_endian" else ">"
    dtype = np.dtype([(name, order + _PLY_TYPES[t]) for name, t in elements[0][2]])
    count = elements[0][1]
    with reading(path), open(path, "rb") as f:
        f.seek(body)
        data = f.read(count * dtype.itemsize)
    if len(data) < count * dtype.itemsize:
        raise BadInput(f"{path} is truncated: the header declares {count} vertices "
                       f"({count * dtype.itemsize} bytes), the file holds {len(data)} bytes "
                       f"of them: {_FIX}", path)
    return np.frombuffer(data, dtype=dtype, count=count)


def _read_ply_vertices_plyfile(path: Path) -> np.ndarray:
    from plyfile import PlyData

    try:
        with reading(path):
            ply = PlyData.read(str(path))
    except BadInput:
        raise
    except Exception as e:  # plyfile raises several types for malformed files
        raise BadInput(f"{path}: cannot read PLY ({type(e).__name__}: {e}): {_FIX}", path) from e
    if "vertex" not in ply:
        raise BadInput(f"{path} has no vertex element (elements: "
                       f"{[el.name for el in ply.elements]}): {_FIX}", path)
    return ply["vertex"].data


def ply_fields(vertices: np.ndarray, path: Path, *names: Sequence[str]) -> list[np.ndarray]:
    """For each group of alternative property names, the first one present (as an array);
    :class:`BadInput` listing the properties the file has if a group has none."""
    have = vertices.dtype.names or ()
    out = []
    for alternatives in names:
        hit = next((a for a in alternatives if a in have), None)
        if hit is None:
            raise BadInput(f"{path}: vertex has no property {' / '.join(alternatives)} "
                           f"(it has {list(have)}): the file is not the one expected; {_FIX}",
                           path)
        out.append(np.asarray(vertices[hit]))
    return out


def colors_uint8(rgb: np.ndarray, where: str) -> np.ndarray:
    """(N, 3) colours as uint8; :class:`BadInput` if they are not integers in 0..255."""
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        return rgb
    bad = ~((rgb >= 0) & (rgb <= 255) & (rgb == np.round(rgb))).all(1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise BadInput(f"{where}: colours must be integers in 0..255; {int(bad.sum())} points "
                       f"are not (first: point {i}, {rgb[i].tolist()}): {_FIX}")
    return rgb.astype(np.uint8)
