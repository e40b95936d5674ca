"""Triangle meshes, surface colours and ScanNet-format PLY files for a procedural :class:`Room`.

Every box becomes 6 faces with outward normals, each face a grid of quads (2 triangles each);
at ``resolution=None`` a face is a single quad, so a box is exactly 12 triangles (the mesh we
ray-cast). Per triangle and per vertex we keep the index of the box it came from, which gives
its NYU40 class, instance and colour.

Colours are a pure function of the world position and the box (class colour, a per-instance
tint, value-noise texture, floor planks, bookshelf shelves) times a view-independent Lambert
shading by the face normal, so the same surface point has the same colour in every view and
on the mesh, and colour carries information beyond the class.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from data_prep.synthetic.room import CLASS_COLORS, NYU40, Room
from mink_ssl.io import atomic_path

# ScanNet's NYU40 visualisation palette (util.create_color_palette) for the ids our rooms use;
# the labels ply colours its vertices with it, as ScanNet does.
NYU40_PALETTE = {0: (0, 0, 0), 1: (174, 199, 232), 2: (152, 223, 138), 3: (31, 119, 180),
                 4: (255, 187, 120), 5: (188, 189, 34), 6: (140, 86, 75), 7: (255, 152, 150),
                 10: (148, 103, 189), 14: (247, 182, 210)}
NYU40_NAMES = {v: k for k, v in NYU40.items()}
LIGHT_DIR = np.array([0.3, 0.5, 0.8]) / np.linalg.norm([0.3, 0.5, 0.8])


@dataclass
class BoxMesh:
    """A triangle mesh of a room's boxes with provenance per vertex and per triangle."""

    vertices: np.ndarray  # (V, 3) float64 world coordinates
    triangles: np.ndarray  # (F, 3) int64 vertex indices, counter-clockwise seen from outside
    normals: np.ndarray  # (V, 3) float64 outward normal of the face each vertex belongs to
    vertex_box: np.ndarray  # (V,) int64 box index
    triangle_box: np.ndarray  # (F,) int64 box index
    vertex_face: np.ndarray  # (V,) int64 face id box * 6 + face (a ScanNet-like segment)


def box_mesh(boxes: np.ndarray, resolution: float | None = None) -> BoxMesh:
    """Mesh of axis-aligned ``boxes`` (K, 2, 3); faces subdivided into cells of about
    ``resolution`` metres (None: one quad per face, 12 triangles per box)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 3 or boxes.shape[1:] != (2, 3):
        raise ValueError(f"boxes must have shape (K, 2, 3), got {boxes.shape}")
    if resolution is not None and resolution <= 0:
        raise ValueError(f"resolution must be positive metres or None, got {resolution}")
    verts, tris, norms, vbox, tbox, vface = [], [], [], [], [], []
    n_verts = 0
    for k, (lo, hi) in enumerate(boxes):  # K boxes x 6 faces: a short loop over faces, not points
        ext = hi - lo
        for axis in range(3):
            u, v = (axis + 1) % 3, (axis + 2) % 3  # e_u x e_v = +e_axis
            nu = 1 if resolution is None else max(1, int(np.ceil(ext[u] / resolution - 1e-9)))
            nv = 1 if resolution is None else max(1, int(np.ceil(ext[v] / resolution - 1e-9)))
            gu, gv = np.meshgrid(np.linspace(lo[u], hi[u], nu + 1),
                                 np.linspace(lo[v], hi[v], nv + 1), indexing="ij")  # (nu+1, nv+1)
            idx = np.arange((nu + 1) * (nv + 1)).reshape(nu + 1, nv + 1)
            p00, p10 = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel()  # (nu*nv,) cell corners
            p11, p01 = idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
            quad_tris = np.concatenate([np.stack([p00, p10, p11], 1),
                                        np.stack([p00, p11, p01], 1)])  # (2*nu*nv, 3)
            for side in (0, 1):
                face = k * 6 + axis * 2 + side
                pts = np.empty((gu.size, 3))
                pts[:, axis] = hi[axis] if side else lo[axis]
                pts[:, u], pts[:, v] = gu.ravel(), gv.ravel()
                t = quad_tris if side else quad_tris[:, ::-1]  # flip winding on the min side
                normal = np.zeros(3)
                normal[axis] = 1.0 if side else -1.0
                verts.append(pts)
                tris.append(t + n_verts)
                norms.append(np.broadcast_to(normal, pts.shape))
                vbox.append(np.full(len(pts), k))
                tbox.append(np.full(len(t), k))
                vface.append(np.full(len(pts), face))
                n_verts += len(pts)
    return BoxMesh(vertices=np.concatenate(verts), triangles=np.concatenate(tris).astype(np.int64),
                   normals=np.concatenate(norms), vertex_box=np.concatenate(vbox).astype(np.int64),
                   triangle_box=np.concatenate(tbox).astype(np.int64),
                   vertex_face=np.concatenate(vface).astype(np.int64))


_TABLE_SIZE = 1 << 18


@lru_cache(maxsize=8)
def _noise_table(seed: int) -> np.ndarray:
    """(2^18,) float32 uniform lattice values for ``seed`` (read-only, cached)."""
    table = np.random.default_rng([seed, 11]).random(_TABLE_SIZE, dtype=np.float32)
    table.flags.writeable = False
    return table


_P1, _P2, _P3 = np.int32(73856093), np.int32(19349663), np.int32(83492791)  # spatial hash


def _lattice(table: np.ndarray, a, b, c) -> np.ndarray:
    """Table value at integer lattice keys ``a, b, c`` (N,) (spatial hash, int32 wrap-around)."""
    with np.errstate(over="ignore"):
        h = (np.asarray(a, np.int32) * _P1) ^ (np.asarray(b, np.int32) * _P2) \
            ^ (np.asarray(c, np.int32) * _P3)
    return table[h & (_TABLE_SIZE - 1)]


def value_noise(points: np.ndarray, axis: np.ndarray, cell: float, seed: int, salt: int
                ) -> np.ndarray:
    """Smooth value noise in [0, 1) on axis-aligned faces: 2-D noise with lattice spacing
    ``cell`` in the face plane of ``points`` (N, 3), whose normal is along ``axis`` (N,) int;
    faces at different offsets (1 cm bins) or orientations get independent patterns."""
    table = _noise_table(seed)
    rows = np.arange(len(points))
    q_u = points[rows, (axis + 1) % 3] / np.float32(cell)  # (N,) in-plane coords in cells
    q_v = points[rows, (axis + 2) % 3] / np.float32(cell)
    plane = np.round(points[rows, axis] * 100).astype(np.int32) * 3 + axis.astype(np.int32) \
        + np.int32(salt * 7919)  # (N,) which face plane
    iu, iv = np.floor(q_u), np.floor(q_v)
    fu, fv = q_u - iu, q_v - iv
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)  # smoothstep weights
    mask = np.int32(_TABLE_SIZE - 1)
    with np.errstate(over="ignore"):  # int32 wrap-around is intended
        a0 = iu.astype(np.int32) * _P1  # (N,) hashes of the 2 x 2 lattice corners
        a1 = a0 + _P1
        c = plane * _P3
        bv = iv.astype(np.int32) * _P2
        b0, b1 = bv ^ c, (bv + _P2) ^ c
    v00, v10 = table[(a0 ^ b0) & mask], table[(a1 ^ b0) & mask]
    v01, v11 = table[(a0 ^ b1) & mask], table[(a1 ^ b1) & mask]
    return (v00 * (1 - fu) + v10 * fu) * (1 - fv) + (v01 * (1 - fu) + v11 * fu) * fv


def instance_tints(room: Room, seed: int) -> np.ndarray:
    """(K, 3) multiplicative colour tint per box, shared by the boxes of one instance."""
    n_inst = int(room.instances.max()) + 1
    tint = 1 + np.random.default_rng([seed, 7]).uniform(-0.15, 0.15, (n_inst, 3))
    return tint[room.instances]


def surface_colors(room: Room, points: np.ndarray, box: np.ndarray, normals: np.ndarray,
                   seed: int) -> np.ndarray:
    """Shaded colour (N, 3) float32 in [0, 255] of surface ``points`` (N, 3) on boxes ``box``
    (N,) with outward ``normals`` (N, 3); a pure function of position, box and ``seed``."""
    points = np.asarray(points, dtype=np.float32)
    normals = np.asarray(normals, dtype=np.float32)
    base = np.array([CLASS_COLORS.get(int(c), (128, 128, 128)) for c in room.labels])  # (K, 3)
    albedo = (base * instance_tints(room, seed)).astype(np.float32)[box]  # (N, 3)
    axis = np.argmax(np.abs(normals), axis=1)  # (N,) faces are axis-aligned
    tex = (0.85 + 0.2 * value_noise(points, axis, 0.3, seed, 1)
           + 0.12 * value_noise(points, axis, 0.04, seed, 2))  # (N,) float32
    label = room.labels[box]  # (N,)
    # floor planks: 18 cm wide along x, each plank its own brightness, dark seams
    floor = np.flatnonzero(label == NYU40["floor"])
    x = points[floor, 0] / np.float32(0.18)
    plank = np.floor(x).astype(np.int64)
    tone = 0.85 + 0.3 * _lattice(_noise_table(seed), plank, 5, 3)
    tex[floor] *= tone * np.where(x - plank < 0.05, np.float32(0.6), np.float32(1.0))
    # bookshelf: dark shelf boards every 35 cm
    shelf = np.flatnonzero(label == NYU40["bookshelf"])
    tex[shelf[points[shelf, 2] % np.float32(0.35) < 0.03]] *= np.float32(0.55)
    shade = 0.7 + 0.3 * np.clip(normals @ LIGHT_DIR.astype(np.float32), 0, None)  # Lambert
    return np.clip(albedo * (tex * shade)[:, None], 0, 255)


def _vertex_table(mesh: BoxMesh, colors: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"),
              ("blue", "u1"), ("alpha", "u1")]
    if labels is not None:
        fields.append(("label", "<u2"))
    table = np.empty(len(mesh.vertices), dtype=fields)
    for i, name in enumerate("xyz"):
        table[name] = mesh.vertices[:, i]
    for i, name in enumerate(("red", "green", "blue")):
        table[name] = colors[:, i]
    table["alpha"] = 255
    if labels is not None:
        table["label"] = labels
    return table


def write_scannet_ply(path: str | os.PathLike, mesh: BoxMesh, colors: np.ndarray,
                      labels: np.ndarray | None = None) -> Path:
    """Write ``mesh`` as ScanNet writes ``_vh_clean_2.ply``: binary little-endian, vertex
    x, y, z float, red, green, blue, alpha uchar (+ ``label`` ushort for ``.labels.ply``),
    face ``vertex_indices`` list uchar int. Atomic (temp file + rename).

    plyfile describes the elements and writes the header; the body is written with numpy
    (plyfile writes list properties row by row, far too slowly for 100k faces), and is
    byte-for-byte what plyfile would write.
    """
    from plyfile import PlyData, PlyElement

    colors = np.asarray(colors)
    if colors.shape != (len(mesh.vertices), 3):
        raise ValueError(f"colors must be (V, 3) = ({len(mesh.vertices)}, 3), got {colors.shape}")
    vertices = _vertex_table(mesh, np.round(colors).astype(np.uint8), labels)
    faces = np.empty(len(mesh.triangles), dtype=[("n", "u1"), ("vertex_indices", "<i4", (3,))])
    faces["n"] = 3
    faces["vertex_indices"] = mesh.triangles
    face_el = PlyElement.describe(np.empty(len(faces), dtype=[("vertex_indices", "O")]), "face",
                                  len_types={"vertex_indices": "u1"},
                                  val_types={"vertex_indices": "i4"})  # header only
    ply = PlyData([PlyElement.describe(vertices, "vertex"), face_el], text=False,
                  byte_order="<")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(ply.header.encode("ascii") + b"\n")
            f.write(vertices.tobytes())
            f.write(faces.tobytes())  # packed: uchar count, then 3 int32 per face
    return Path(path)
