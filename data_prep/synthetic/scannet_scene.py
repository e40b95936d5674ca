"""Synthetic ScanNet-format scenes: a procedural room scanned by a ray-cast RGB-D camera.

``generate_scene(out_dir, scene_id, seed)`` writes ``out_dir/<scene_id>/`` as ScanNet lays out a
scan, so the real data-prep path runs on it unchanged:

- ``<scene_id>.sens``: SensorData v4; colour (JPEG) and depth (zlib uint16) frames ray-cast with
  Open3D's ``RaycastingScene`` from the room's box mesh, camera-to-world poses (camera x right,
  y down, z forward; -inf for the frames in ``invalid_pose_frames``, as ScanNet marks lost
  tracking), 30 fps timestamps in microseconds.
- ``<scene_id>_vh_clean_2.ply``: the scene mesh (binary little-endian; vertex x, y, z float,
  red, green, blue, alpha uchar; face vertex_indices list uchar int), faces subdivided to
  ``mesh_resolution``; vertex colours are the rendered surface colours without sensor noise.
- ``<scene_id>_vh_clean_2.labels.ply``: same vertices and faces, coloured with ScanNet's NYU40
  palette, plus a ``label`` ushort (NYU40 id: wall 1, floor 2, furniture 3..14).
- ``<scene_id>_vh_clean_2.0.010000.segs.json`` (one segment per box face) and
  ``<scene_id>.aggregation.json`` (one group per object instance, ``label`` the NYU40 class name,
  ``objectId`` = instance id - 1), so instance / detection prep has its inputs.
- ``<scene_id>.txt``: ScanNet's meta text (axisAlignment, colour/depth sizes and intrinsics,
  frame counts). Written last: its presence marks a complete scene.

:func:`generate_scenes` also writes ``out_dir/scannetv2-labels.combined.tsv`` (see
:func:`write_label_map`), the label map that turns aggregation labels into NYU40 ids, so
detection / segmentation prep runs on the generated scenes as on a ScanNet download.

Every file is written atomically (temp file + rename) and is a pure function of the arguments:
the same seed gives byte-identical depth payloads, poses and meshes.

Cameras. Depth and colour share one pinhole model: ScanNet's depth intrinsics (fx = fy = 577.87
at 640x480) scaled to ``image_size``, principal point at the image centre. Pixel (u, v) with
integer coordinates looks along ((u - cx) / fx, (v - cy) / fy, 1), the convention
:func:`mink_ssl.geometry.backproject` uses. ``color_size`` may differ from ``image_size``: the
colour camera then has the same centre, orientation and field of view (intrinsics scaled to its
size; header extrinsics identity) and is ray-cast separately.

Depth is the z coordinate in the camera frame (not the ray length), ``round(z * depth_shift)``
as uint16, 0 where a ray hits nothing or the :class:`SensorModel` rejects the reading.
"""
from __future__ import annotations

import io
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from data_prep.scannet.sens import SensHeader
from data_prep.scannet.sens_writer import write_sens
from data_prep.synthetic.camera_path import camera_trajectory
from data_prep.synthetic.mesh import (NYU40_NAMES, NYU40_PALETTE, BoxMesh, box_mesh,
                                      surface_colors, write_scannet_ply)
from data_prep.synthetic.room import Room, make_room
from mink_ssl.io import atomic_path

SCANNET_DEPTH_FOCAL = 577.870605  # ScanNet's typical depth fx = fy at 640x480
FPS = 30


@dataclass(frozen=True)
class SensorModel:
    """Kinect / Structure-sensor-like corruption of the ideal rendered frames.

    The default is a mild, realistic level; :meth:`ideal` turns everything off.
    """

    depth_noise: float = 1.0  # scale of sigma(z) = 0.0012 + 0.0019 (z - 0.4)^2 metres
    min_depth: float = 0.3  # metres; closer readings are missing
    max_depth: float = 4.5  # metres; farther readings are missing
    grazing_deg: float = 80.0  # no depth where ray and surface normal are further apart; >= 90: off
    edge_dropout: float = 0.5  # probability of losing a pixel at a depth discontinuity
    holes_per_frame: float = 1.5  # mean number of elliptic missing-depth patches per frame
    speckle_dropout: float = 0.001  # fraction of isolated missing depth pixels
    color_noise: float = 3.0  # sigma of per-pixel colour noise, 0..255 units
    exposure_jitter: float = 0.03  # sigma of the per-frame colour gain
    # structured-light depth (PrimeSense / Structure sensor, Kinect v1) is measured as a
    # disparity in steps of a fraction of a pixel: depth takes the values f b / (k step).
    # 0 turns it off (continuous depth, the default); about 1/8 px with baseline 0.075 m is
    # such a sensor, whose depth then compresses like real frames do
    disparity_step: float = 0.0  # pixels
    baseline: float = 0.075  # metres, projector to camera

    def __post_init__(self):
        if not 0 <= self.min_depth < self.max_depth:
            raise ValueError(f"need 0 <= min_depth < max_depth, got {self.min_depth}, "
                             f"{self.max_depth}")
        if self.baseline <= 0:
            raise ValueError(f"SensorModel.baseline must be positive (metres), got {self.baseline}")
        for name in ("depth_noise", "holes_per_frame", "color_noise", "exposure_jitter",
                     "disparity_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"SensorModel.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("edge_dropout", "speckle_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"SensorModel.{name} is a probability, got {getattr(self, name)}")

    @classmethod
    def ideal(cls, max_depth: float = 10.0) -> "SensorModel":
        """A perfect sensor: exact depth (up to uint16 quantisation) wherever a ray hits."""
        return cls(depth_noise=0.0, min_depth=0.0, max_depth=max_depth, grazing_deg=90.0,
                   edge_dropout=0.0, holes_per_frame=0.0, speckle_dropout=0.0, color_noise=0.0,
                   exposure_jitter=0.0)


def scannet_intrinsics(width: int, height: int) -> np.ndarray:
    """(4, 4) float32 pinhole matrix: ScanNet's depth focal length scaled to ``width``."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    f = SCANNET_DEPTH_FOCAL * width / 640.0
    K = np.eye(4, dtype=np.float32)
    K[0, 0], K[1, 1], K[0, 2], K[1, 2] = f, f, (width - 1) / 2, (height - 1) / 2
    return K


# -- rendering ------------------------------------------------------------------------------
@dataclass
class _Hits:
    z: np.ndarray  # (H, W) float64 depth along the optical axis, inf where nothing is hit
    box: np.ndarray  # (H, W) int64 box index, -1 where nothing is hit
    points: np.ndarray  # (H, W, 3) float32 world hit points (room frame), 0 where no hit
    normal: np.ndarray  # (H, W, 3) float32 outward surface normal (world)
    cos: np.ndarray  # (H, W) float32 |cos| between the viewing ray and the normal


class _Raycaster:
    """Open3D tensor ray casting of a room's 12-triangles-per-box mesh."""

    def __init__(self, mesh: BoxMesh):
        try:
            import open3d as o3d
        except ImportError as e:  # pragma: no cover - open3d is a declared dependency
            raise ImportError("synthetic ScanNet scenes need open3d: pip install "
                              "'open3d>=0.18,<0.21' (or run `make setup`)") from e
        self.o3d = o3d
        self.scene = o3d.t.geometry.RaycastingScene()
        self.scene.add_triangles(o3d.core.Tensor(mesh.vertices.astype(np.float32)),
                                 o3d.core.Tensor(mesh.triangles.astype(np.uint32)))
        self.triangle_box = mesh.triangle_box
        # the first query builds the BVH; do it now so concurrent casts only read the scene
        self.scene.cast_rays(o3d.core.Tensor(np.array([[0, 0, 0, 0, 0, 1]], np.float32)))

    def cast(self, pose: np.ndarray, K: np.ndarray, width: int, height: int) -> _Hits:
        o3c = self.o3d.core
        # create_rays_pinhole samples pixel centres (u + 0.5); shifting the principal point by
        # half a pixel gives ScanNet's integer-pixel convention. Directions have unit camera z,
        # so t_hit is the depth along the optical axis.
        Kc = np.array(K[:3, :3], dtype=np.float64)
        Kc[0, 2] += 0.5
        Kc[1, 2] += 0.5
        rays = self.scene.create_rays_pinhole(o3c.Tensor(Kc), o3c.Tensor(np.linalg.inv(pose)),
                                              width, height)  # (H, W, 6) origin, direction
        ans = self.scene.cast_rays(rays)
        t = ans["t_hit"].numpy()  # (H, W) float32, inf on a miss
        hit = np.isfinite(t)
        prim = np.where(hit, ans["primitive_ids"].numpy(), 0).astype(np.int64)  # (H, W)
        rays = rays.numpy()
        d = rays[..., 3:]  # (H, W, 3) unnormalised ray directions
        t0 = np.where(hit, t, 0)
        points = np.where(hit[..., None], rays[..., :3] + t0[..., None] * d, 0)  # (H, W, 3)
        normal = ans["primitive_normals"].numpy()  # (H, W, 3)
        cos = np.abs((normal * d).sum(-1)) / np.linalg.norm(d, axis=-1)
        return _Hits(z=np.where(hit, t.astype(np.float64), np.inf),
                     box=np.where(hit, self.triangle_box[prim], -1), points=points,
                     normal=normal, cos=cos)


def _hit_colors(room: Room, hits: _Hits, seed: int) -> np.ndarray:
    """(H, W, 3) float noise-free colour of the ray-cast surface; black where nothing is hit."""
    H, W = hits.z.shape
    box = hits.box.reshape(-1)
    rgb = surface_colors(room, hits.points.reshape(-1, 3), np.maximum(box, 0),
                         hits.normal.reshape(-1, 3), seed)  # (H*W, 3)
    return np.where((box >= 0)[:, None], rgb, 0).reshape(H, W, 3)


def _sensor_depth(hits: _Hits, sensor: SensorModel, rng: np.random.Generator,
                  focal: float) -> np.ndarray:
    """(H, W) float64 metres after the sensor model; 0 where missing. ``focal``: the depth
    camera's focal length in pixels (for the disparity steps)."""
    z = hits.z.copy()
    H, W = z.shape
    valid = np.isfinite(z) & (z >= sensor.min_depth) & (z <= sensor.max_depth)
    if sensor.grazing_deg < 90:
        valid &= hits.cos >= np.cos(np.deg2rad(sensor.grazing_deg))
    if sensor.edge_dropout > 0:  # flying pixels / shadows at depth discontinuities
        zf = np.where(np.isfinite(z), z, 1e3)
        jump = np.zeros((H, W), bool)
        dx = np.abs(np.diff(zf, axis=1)) > 0.05 + 0.03 * np.minimum(zf[:, 1:], zf[:, :-1])
        dy = np.abs(np.diff(zf, axis=0)) > 0.05 + 0.03 * np.minimum(zf[1:], zf[:-1])
        jump[:, 1:] |= dx
        jump[:, :-1] |= dx
        jump[1:] |= dy
        jump[:-1] |= dy
        valid &= ~(jump & (rng.random((H, W)) < sensor.edge_dropout))
    if sensor.holes_per_frame > 0:  # elliptic patches (specular / dark / absorbing surfaces)
        v, u = np.mgrid[0:H, 0:W]
        for _ in range(int(rng.poisson(sensor.holes_per_frame))):  # a few holes, not pixels
            cu, cv = rng.uniform(0, W), rng.uniform(0, H)
            a, b = rng.uniform(0.015, 0.07, 2) * W
            valid &= ((u - cu) / a) ** 2 + ((v - cv) / b) ** 2 > 1
    if sensor.speckle_dropout > 0:
        valid &= rng.random((H, W)) >= sensor.speckle_dropout
    if sensor.depth_noise > 0:
        zv = z[valid]
        sigma = sensor.depth_noise * (0.0012 + 0.0019 * (zv - 0.4) ** 2)
        z[valid] = zv + rng.normal(0.0, 1.0, zv.shape) * sigma
        valid &= (z >= sensor.min_depth) & (z <= sensor.max_depth)  # readings stay in range
    if sensor.disparity_step > 0:  # depth of the nearest disparity step
        fb = focal * sensor.baseline  # pixel metres
        steps = np.maximum(np.round(fb / np.where(valid, z, 1.0) / sensor.disparity_step), 1)
        z = np.where(valid, fb / (steps * sensor.disparity_step), z)
        valid &= (z >= sensor.min_depth) & (z <= sensor.max_depth)
    return np.where(valid, z, 0.0)


def _to_uint16(z: np.ndarray, depth_shift: float) -> np.ndarray:
    return np.clip(np.round(z * depth_shift), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def _sensor_color(color: np.ndarray, sensor: SensorModel, rng: np.random.Generator
                  ) -> np.ndarray:
    gain = 1.0 + sensor.exposure_jitter * rng.normal()
    color = color * np.float32(gain)
    if sensor.color_noise:
        color += rng.standard_normal(color.shape, dtype=np.float32) * np.float32(sensor.color_noise)
    return np.clip(np.round(color), 0, 255).astype(np.uint8)


# -- writing --------------------------------------------------------------------------------
def _fmt(values) -> str:
    return " ".join(f"{float(x):.6f}" for x in np.ravel(values))


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _alignment(seed: int, room: Room) -> np.ndarray:
    """A random rigid transform (yaw about z, shift) from the room frame to the 'raw scan'
    frame; ScanNet's axisAlignment is its inverse."""
    rng = np.random.default_rng([seed, 3])
    a = rng.uniform(-np.pi, np.pi)
    T = np.eye(4)
    T[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    T[:3, 3] = np.concatenate([rng.uniform(-1, 1, 2) * room.size[:2], [0.0]])
    return T


def generate_scene(out_dir: str | os.PathLike, scene_id: str, seed: int, *,
                   n_frames: int = 150, image_size: tuple[int, int] = (320, 240),
                   color_size: tuple[int, int] | None = None, depth_shift: float = 1000.0,
                   sensor: SensorModel = SensorModel(), deg_per_frame: float = 1.0,
                   invalid_pose_frames: Sequence[int] = (), mesh_resolution: float = 0.1,
                   random_alignment: bool = False, n_objects: int | None = None,
                   color_compression: str = "jpeg", jpeg_quality: int = 90,
                   workers: int | None = None) -> Path:
    """Write a synthetic ScanNet scan of ``make_room(seed)`` to ``out_dir/<scene_id>/``.

    Args:
        out_dir: parent folder (created); the scene goes to ``out_dir/<scene_id>``.
        scene_id: folder and file stem, e.g. ``scene0000_00``.
        seed: picks the room, the camera path, textures and the sensor noise.
        n_frames: frames in the ``.sens`` (150: 5 s of scanning, 150 degrees of the loop;
            360 at the default speed makes a full loop of the room).
        image_size: (width, height) of depth (and colour, unless ``color_size``).
        color_size: optional (width, height) of colour frames (same field of view).
        depth_shift: depth units per metre stored in the header (1000: millimetres).
        sensor: corruption model (:class:`SensorModel`; ``SensorModel.ideal()`` for exact depth).
        deg_per_frame: camera speed around the loop (see :func:`camera_trajectory`).
        invalid_pose_frames: frames whose pose is written as all -inf (lost tracking); their
            images are still rendered from the true pose.
        mesh_resolution: edge length (m) of the cells the mesh faces are subdivided into.
        random_alignment: put the scene in a random yaw-rotated, shifted frame (mesh and poses)
            and write the aligning transform as ``axisAlignment`` (identity otherwise).
        n_objects: furniture count (None: the room's random count).
        color_compression, jpeg_quality: colour payload encoding ('jpeg', 'png' or 'raw').
        workers: threads rendering frames (None: the CPU count, at most 8); the output does
            not depend on it.

    Returns:
        the scene folder.
    """
    W, H = (int(s) for s in image_size)
    CW, CH = (W, H) if color_size is None else (int(s) for s in color_size)
    if not depth_shift or depth_shift <= 0:
        raise ValueError(f"depth_shift must be positive (units per metre), got {depth_shift!r}")
    if sensor.max_depth * depth_shift > np.iinfo(np.uint16).max:
        raise ValueError(f"max_depth {sensor.max_depth} m x depth_shift {depth_shift} overflows "
                         "uint16 depth")
    if color_compression not in ("jpeg", "png", "raw"):
        raise ValueError(f"color_compression {color_compression!r}, expected 'jpeg', 'png' "
                         "or 'raw'")
    bad = [i for i in invalid_pose_frames if not 0 <= i < n_frames]
    if bad:
        raise ValueError(f"invalid_pose_frames {bad} outside 0..{n_frames - 1}")
    scene_dir = Path(out_dir) / scene_id
    scene_dir.mkdir(parents=True, exist_ok=True)
    (scene_dir / f"{scene_id}.txt").unlink(missing_ok=True)  # not complete until rewritten

    room = make_room(seed, n_objects)
    poses = camera_trajectory(room, n_frames, seed, deg_per_frame=deg_per_frame)  # (n, 4, 4)
    align = _alignment(seed, room) if random_alignment else np.eye(4)  # room -> written frame
    K_depth = scannet_intrinsics(W, H)
    K_color = scannet_intrinsics(CW, CH)

    # meshes: the written (subdivided) one and the 12-triangles-per-box one we ray-cast
    mesh = box_mesh(room.boxes, mesh_resolution)
    colors = surface_colors(room, mesh.vertices, mesh.vertex_box, mesh.normals, seed)
    labels = room.labels[mesh.vertex_box]
    palette = np.array([NYU40_PALETTE.get(int(c), (128, 128, 128)) for c in labels])
    written = BoxMesh(**{**mesh.__dict__,
                         "vertices": mesh.vertices @ align[:3, :3].T + align[:3, 3]})
    write_scannet_ply(scene_dir / f"{scene_id}_vh_clean_2.ply", written, colors)
    write_scannet_ply(scene_dir / f"{scene_id}_vh_clean_2.labels.ply", written, palette,
                      labels.astype(np.uint16))
    _write_segments(scene_dir, scene_id, room, mesh)

    caster = _Raycaster(box_mesh(room.boxes))
    invalid = set(int(i) for i in invalid_pose_frames)

    def render(i: int) -> tuple:
        """Frame ``i`` as write_sens takes it; a pure function of (seed, i), run in threads."""
        pose = poses[i]
        rng = np.random.default_rng([seed, 2, i])
        hits = caster.cast(pose, K_depth, W, H)
        depth = _to_uint16(_sensor_depth(hits, sensor, rng, float(K_depth[0, 0])), depth_shift)
        chits = hits if (CW, CH) == (W, H) else caster.cast(pose, K_color, CW, CH)
        color = _sensor_color(_hit_colors(room, chits, seed), sensor, rng)
        if color_compression == "jpeg":  # encode here, in parallel; write_sens passes bytes on
            color = _jpeg(color, jpeg_quality)
        out_pose = np.full((4, 4), -np.inf) if i in invalid else align @ pose
        ts = i * 1_000_000 // FPS  # microseconds
        return out_pose, color, depth, ts, ts

    header = SensHeader(version=4, sensor_name="SyntheticStructureSensor",
                        intrinsic_color=K_color, extrinsic_color=np.eye(4),
                        intrinsic_depth=K_depth, extrinsic_depth=np.eye(4),
                        color_compression=color_compression, depth_compression="zlib_ushort",
                        color_width=CW, color_height=CH, depth_width=W, depth_height=H,
                        depth_shift=float(depth_shift), num_frames=n_frames)
    write_sens(scene_dir / f"{scene_id}.sens", header, _ordered_map(render, n_frames, workers),
               color_compression=color_compression, depth_compression="zlib_ushort",
               jpeg_quality=jpeg_quality, zlib_level=1)

    meta = {"axisAlignment": _fmt(np.linalg.inv(align)), "colorHeight": CH,
            "colorToDepthExtrinsics": _fmt(np.eye(4)), "colorWidth": CW, "depthHeight": H,
            "depthWidth": W, "fx_color": f"{K_color[0, 0]:.6f}", "fx_depth": f"{K_depth[0, 0]:.6f}",
            "fy_color": f"{K_color[1, 1]:.6f}", "fy_depth": f"{K_depth[1, 1]:.6f}",
            "mx_color": f"{K_color[0, 2]:.6f}", "mx_depth": f"{K_depth[0, 2]:.6f}",
            "my_color": f"{K_color[1, 2]:.6f}", "my_depth": f"{K_depth[1, 2]:.6f}",
            "numColorFrames": n_frames, "numDepthFrames": n_frames, "numIMUmeasurements": 0,
            "sceneType": "Synthetic", "depthShift": f"{depth_shift:.6f}", "seed": seed}
    _write_text(scene_dir / f"{scene_id}.txt", "".join(f"{k} = {v}\n" for k, v in meta.items()))
    return scene_dir


def _ordered_map(fn, n: int, workers: int | None) -> Iterator:
    """``fn(0), ..., fn(n - 1)`` in order, computed by a thread pool (numpy, Open3D and Pillow
    release the GIL) with at most ``2 * workers`` results in memory."""
    workers = min(os.cpu_count() or 1, 8) if workers is None else int(workers)
    if workers <= 1:
        yield from (fn(i) for i in range(n))
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for i in range(n):
            pending.append(pool.submit(fn, i))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _jpeg(color: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(color).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_segments(scene_dir: Path, scene_id: str, room: Room, mesh: BoxMesh) -> None:
    """ScanNet's over-segmentation (one segment per box face) and instance aggregation."""
    segs = {"params": {"kThresh": "0.0001", "segMinVerts": "20", "minPoints": "750",
                       "maxPoints": "5000", "thinThresh": "0.05", "flatThresh": "0.001",
                       "minLength": "0.02", "maxLength": "1"},
            "sceneId": scene_id, "segIndices": mesh.vertex_face.tolist()}
    segs_name = f"{scene_id}_vh_clean_2.0.010000.segs.json"
    _write_text(scene_dir / segs_name, json.dumps(segs))
    groups = []
    for inst in np.unique(room.instances):  # one group per object (a handful), not per point
        boxes = np.flatnonzero(room.instances == inst)
        faces = (boxes[:, None] * 6 + np.arange(6)).ravel()
        groups.append({"id": int(inst) - 1, "objectId": int(inst) - 1,
                       "segments": faces.tolist(),
                       "label": NYU40_NAMES[int(room.labels[boxes[0]])]})
    agg = {"sceneId": f"scannet.{scene_id}", "appId": "mink-ssl.synthetic.v1",
           "segGroups": groups, "segmentsFile": f"scannet.{segs_name}"}
    _write_text(scene_dir / f"{scene_id}.aggregation.json", json.dumps(agg, indent=1))


LABEL_MAP_COLUMNS = ("id", "raw_category", "category", "count", "nyu40id", "eigen13id",
                     "nyuClass", "nyu40class", "eigen13class", "ModelNet40", "ModelNet10",
                     "ShapeNetCore55", "synsetoffset", "wnsynsetid", "wnsynsetkey", "mpcat40",
                     "mpcat40index")


def write_label_map(path: str | os.PathLike) -> Path:
    """Write a ``scannetv2-labels.combined.tsv`` for the categories synthetic rooms use.

    Same columns as ScanNet's file (tab-separated, header first); each aggregation label of a
    synthetic scene is a ``raw_category`` row with its ``nyu40id`` and ``nyu40class``; the
    columns synthetic scenes do not need (eigen13, ModelNet, ShapeNet, WordNet, mpcat40) are
    empty.
    """
    rows = ["\t".join(LABEL_MAP_COLUMNS)]
    for i, (nyu, name) in enumerate(sorted(NYU40_NAMES.items()), 1):
        fields = dict.fromkeys(LABEL_MAP_COLUMNS, "")
        fields.update(id=str(i), raw_category=name, category=name, count="1", nyu40id=str(nyu),
                      nyu40class=name)
        rows.append("\t".join(fields[c] for c in LABEL_MAP_COLUMNS))
    _write_text(Path(path), "\n".join(rows) + "\n")
    return Path(path)


def generate_scenes(out_dir: str | os.PathLike, n_scenes: int, seed: int = 0, **kw
                    ) -> list[Path]:
    """``n_scenes`` scenes ``scene%04d_00`` (scene k from seed ``seed + k``) under ``out_dir``,
    and the label map ``out_dir/scannetv2-labels.combined.tsv`` (:func:`write_label_map`);
    keyword arguments go to :func:`generate_scene`."""
    if n_scenes <= 0:
        raise ValueError(f"n_scenes must be positive, got {n_scenes}")
    paths = [generate_scene(out_dir, f"scene{k:04d}_00", seed + k, **kw) for k in range(n_scenes)]
    write_label_map(Path(out_dir) / "scannetv2-labels.combined.tsv")
    return paths
