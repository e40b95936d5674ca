"""3D boxes: validation, corners, and IoU (axis-aligned and oriented).

Box parameterisation (everywhere in mink-ssl), one row per box:

- *axis-aligned*: ``(K, 6)`` ``[cx, cy, cz, dx, dy, dz]``, the centre and the full extents along
  x, y, z (not half sizes), as VoteNet's ScanNet boxes;
- *oriented*: ``(K, 7)`` ``[cx, cy, cz, dx, dy, dz, heading]``, the same plus a rotation of the
  box about +z by ``heading`` radians (counter-clockwise seen from above): the box's own x axis
  (extent ``dx``) points along ``(cos heading, sin heading, 0)``. Boxes stand upright.
- *corners*: ``box_corners`` gives ``(K, 8, 3)``: the bottom face (``cz - dz/2``) first, its
  corners counter-clockwise seen from above starting at local ``(+dx/2, +dy/2)``, then the top
  face in the same order.

IoU is volume of intersection over volume of union. Axis-aligned: the product of the three
interval overlaps. Oriented: the bird's-eye-view (x, y) intersection of the two rotated
rectangles, computed by Sutherland-Hodgman clipping of one rectangle by the four edges of the
other (vectorised over pairs: every polygon is a fixed-size vertex array with a vertex count,
and each clip step emits, per edge, the start vertex if inside and the crossing point if the
edge crosses the clip line), its shoelace area times the overlap of the z intervals. When boxes
"""
from __future__ import annotations

import numpy as np
import torch

_PAIR_CHUNK = 1 << 16  # box pairs per oriented-IoU chunk (about 10 MB of clipping buffers)
_MAX_VERTICES = 16  # polygon buffer; two convex quadrilaterals intersect in at most 8 vertices


def check_boxes(boxes, name: str = "boxes") -> torch.Tensor:
    """``boxes`` as a float ``(K, 6)`` or ``(K, 7)`` tensor with positive finite sizes."""
    if isinstance(boxes, np.ndarray):
        boxes = torch.from_numpy(np.ascontiguousarray(boxes))
    if not isinstance(boxes, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got "
                         f"{type(boxes).__name__}")
    if boxes.ndim != 2 or boxes.shape[1] not in (6, 7):
        raise ValueError(f"{name} must have shape (K, 6) [cx, cy, cz, dx, dy, dz] or (K, 7) with "
                         f"a heading about +z, got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        boxes = boxes.double() if boxes.dtype == torch.int64 else boxes.float()
    if len(boxes):
        bad = (~torch.isfinite(boxes).all(dim=1)) | (boxes[:, 3:6] <= 0).any(dim=1)
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name} row {row} = {boxes[row].tolist()} has a non-finite value or "
                             "a size <= 0 (columns 3:6 are full extents dx, dy, dz > 0)")
    return boxes


def as_oriented(boxes: torch.Tensor) -> torch.Tensor:
    return boxes if boxes.shape[1] == 7 else torch.cat([boxes, boxes.new_zeros(len(boxes), 1)], 1)


def boxes_from_minmax(mins: torch.Tensor, maxs: torch.Tensor) -> torch.Tensor:
    """Axis-aligned boxes (K, 6) from their min and max corners (K, 3) each."""
    return torch.cat([(mins + maxs) / 2, maxs - mins], dim=1)


def aligned_hull(boxes) -> torch.Tensor:
    """The axis-aligned boxes (K, 6) around boxes (K, 6|7): min and max of their 8 corners (an
    axis-aligned box is its own hull). VoteNet's 3D NMS compares proposals by these hulls."""
    boxes = check_boxes(boxes)
    if boxes.shape[1] == 6:
        return boxes
    corners = box_corners(boxes)  # (K, 8, 3)
    return boxes_from_minmax(corners.amin(1), corners.amax(1))


def box_corners(boxes: torch.Tensor) -> torch.Tensor:
    """The 8 corners (K, 8, 3) of boxes (K, 6) or (K, 7), in the order of the module docstring."""
    boxes = as_oriented(check_boxes(boxes))
    sign = boxes.new_tensor([[1, 1], [-1, 1], [-1, -1], [1, -1]])  # (4, 2) CCW from (+, +)
    local = sign[None] * boxes[:, None, 3:5] / 2  # (K, 4, 2)
    cos, sin = boxes[:, 6].cos()[:, None], boxes[:, 6].sin()[:, None]  # (K, 1)
    x = boxes[:, None, 0] + cos * local[..., 0] - sin * local[..., 1]  # (K, 4)
    y = boxes[:, None, 1] + sin * local[..., 0] + cos * local[..., 1]
    z = boxes[:, 2:3] + boxes[:, 5:6] * torch.tensor([-0.5, 0.5], dtype=boxes.dtype,
                                                      device=boxes.device)  # (K, 2) bottom, top
    xy = torch.stack([x, y], dim=2).repeat(1, 2, 1)  # (K, 8, 2)
    return torch.cat([xy, z.repeat_interleave(4, dim=1)[..., None]], dim=2)


def _volumes(boxes: torch.Tensor) -> torch.Tensor:
    return boxes[:, 3] * boxes[:, 4] * boxes[:, 5]


def _z_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lo = torch.maximum(a[:, 2] - a[:, 5] / 2, b[:, 2] - b[:, 5] / 2)
    hi = torch.minimum(a[:, 2] + a[:, 5] / 2, b[:, 2] + b[:, 5] / 2)
    return (hi - lo).clamp_min(0)


def _aligned_iou_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of axis-aligned pairs: a, b (P, >=6) -> (P,). Headings, if any, are ignored."""
    lo = torch.maximum(a[:, :3] - a[:, 3:6] / 2, b[:, :3] - b[:, 3:6] / 2)  # (P, 3)
    hi = torch.minimum(a[:, :3] + a[:, 3:6] / 2, b[:, :3] + b[:, 3:6] / 2)
    inter = (hi - lo).clamp_min(0).prod(dim=1)
    return inter / (_volumes(a) + _volumes(b) - inter)


def _bev_rectangles(boxes: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """Bird's-eye-view corners (P, 4, 2), counter-clockwise, relative to origin (P, 2)."""
    sign = boxes.new_tensor([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    local = sign[None] * boxes[:, None, 3:5] / 2  # (P, 4, 2)
    cos, sin = boxes[:, 6].cos()[:, None], boxes[:, 6].sin()[:, None]
    centre = boxes[:, None, :2] - origin[:, None, :]  # (P, 1, 2)
    return torch.stack([cos * local[..., 0] - sin * local[..., 1],
                        sin * local[..., 0] + cos * local[..., 1]], dim=2) + centre


def _clip_by_line(poly: torch.Tensor, count: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  tol: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One Sutherland-Hodgman step: keep the part of each polygon left of the line a -> b.

    Args:
        poly: (P, V, 2) vertices in order, the first ``count`` (P,) of each row valid.
        a, b: (P, 2) points of the directed clip line; tol (P,) distance counted as on the line.
        width: vertex slots of the result.

    Returns:
        (P, width, 2) clipped polygons and their (P,) vertex counts.
    """
    p, v, _ = poly.shape
    slot = torch.arange(v, device=poly.device)[None, :]  # (1, V)
    valid = slot < count[:, None]  # (P, V)
    nxt = torch.where(slot + 1 < count[:, None], slot + 1, 0)  # (P, V) cyclic successor
    e = b - a
    e = e / e.norm(dim=1, keepdim=True)  # (P, 2) unit direction: dist below is in length units
    rel = poly - a[:, None, :]
    dist = e[:, None, 0] * rel[..., 1] - e[:, None, 1] * rel[..., 0]  # (P, V) > 0: left
    inside = dist >= -tol[:, None]
    dist_n, inside_n = dist.gather(1, nxt), inside.gather(1, nxt)
    crosses = valid & (inside != inside_n)
    t = (dist / torch.where(crosses, dist - dist_n, torch.ones_like(dist))).clamp(0, 1)  # (P, V)
    poly_n = poly.gather(1, nxt[..., None].expand(-1, -1, 2))
    crossing = poly + t[..., None] * (poly_n - poly)  # (P, V, 2)
    emit = torch.stack([valid & inside, crosses], dim=2).reshape(p, 2 * v)  # vertex, crossing
    cand = torch.stack([poly, crossing], dim=2).reshape(p, 2 * v, 2)
    pos = emit.cumsum(dim=1) - 1
    target = torch.where(emit & (pos < width), pos, width)  # slot ``width`` collects the rest
    out = poly.new_zeros(p, width + 1, 2).scatter_(1, target[..., None].expand(-1, -1, 2), cand)
    return out[:, :width], emit.sum(dim=1).clamp_max(width)


def _shoelace(poly: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Area (P,) of polygons (P, V, 2) with ``count`` valid vertices (fewer than 3: 0)."""
    slot = torch.arange(poly.shape[1], device=poly.device)[None, :, None]
    poly = torch.where(slot < count[:, None, None], poly, poly[:, :1])  # pad with vertex 0
    nxt = poly.roll(-1, dims=1)
    area = (poly[..., 0] * nxt[..., 1] - nxt[..., 0] * poly[..., 1]).sum(dim=1) / 2
    return torch.where(count >= 3, area, torch.zeros_like(area)).clamp_min(0)


def bev_intersection_polygon(a: torch.Tensor, b: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bird's-eye-view intersection polygons of oriented box pairs a, b (P, 7).

    Returns:
        vertices (P, 16, 2), counter-clockwise, relative to a's centre (x, y), and their (P,)
        counts (the first ``count`` rows are valid; < 3 means no area). A vertex within a
        rounding tolerance of a clip line counts as on it, so touching or identical rectangles
        give no near-duplicate vertices.
    """
    origin = a[:, :2]  # clip in coordinates centred on box a: better conditioned in float32
    poly, rect = _bev_rectangles(a, origin), _bev_rectangles(b, origin)  # (P, 4, 2) each
    scale = a[:, 3:5].amax(dim=1) + b[:, 3:5].amax(dim=1) + (b[:, :2] - origin).abs().amax(dim=1)
    tol = 64 * torch.finfo(a.dtype).eps * scale  # (P,)
    count = torch.full((len(a),), 4, dtype=torch.long, device=a.device)
    width = 4
    for i in range(4):  # clip a's rectangle by each edge of b's (b is CCW: inside is left)
        width = min(2 * width, _MAX_VERTICES)
        poly, count = _clip_by_line(poly, count, rect[:, i], rect[:, (i + 1) % 4], tol, width)
    return poly, count


def bev_intersection_area(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bird's-eye-view intersection area (P,) of oriented box pairs a, b (P, 7)."""
    return _shoelace(*bev_intersection_polygon(a, b))


def _oriented_iou_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of oriented pairs a, b (P, 7) -> (P,), in chunks of pairs."""
    out = []
    for lo in range(0, len(a), _PAIR_CHUNK):
        ca, cb = a[lo:lo + _PAIR_CHUNK], b[lo:lo + _PAIR_CHUNK]
        inter = bev_intersection_area(ca, cb) * _z_overlap(ca, cb)
        out.append(inter / (_volumes(ca) + _volumes(cb) - inter))
    return torch.cat(out) if out else a.new_zeros(0)


def paired_iou(a, b) -> torch.Tensor:
    """IoU of box i of ``a`` with box i of ``b``: (P, 6|7), (P, 6|7) -> (P,).

    Oriented IoU when either side has a heading column, axis-aligned otherwise.
    """
    a, b = check_boxes(a, "a"), check_boxes(b, "b")
    if len(a) != len(b):
        raise ValueError(f"paired_iou needs as many boxes in a as in b, got {len(a)} and {len(b)}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(device=a.device, dtype=dtype)
    if a.shape[1] == 6 and b.shape[1] == 6:
        return _aligned_iou_pairs(a, b)
    return _oriented_iou_pairs(as_oriented(a), as_oriented(b))


def box_iou(a, b) -> torch.Tensor:
    """Pairwise IoU (K, L) of boxes a (K, 6|7) and b (L, 6|7) (see ``paired_iou``)."""
    a, b = check_boxes(a, "a"), check_boxes(b, "b")
    ia = torch.arange(len(a), device=a.device).repeat_interleave(len(b))  # (K*L,)
    ib = torch.arange(len(b), device=a.device).repeat(len(a))
    return paired_iou(a[ia], b.to(a.device)[ib]).view(len(a), len(b))


def iou_aligned(a, b) -> torch.Tensor:
    """Pairwise axis-aligned IoU (K, L) of boxes (K, 6) and (L, 6)."""
    a, b = check_boxes(a, "a"), check_boxes(b, "b")
    if a.shape[1] != 6 or b.shape[1] != 6:
        raise ValueError(f"iou_aligned takes (K, 6) boxes, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}; use iou_oriented for boxes with a heading")
    return box_iou(a, b)


def iou_oriented(a, b) -> torch.Tensor:
    """Pairwise oriented IoU (K, L); (K, 6) boxes are taken with heading 0."""
    a, b = check_boxes(a, "a"), check_boxes(b, "b")
    return box_iou(as_oriented(a), as_oriented(b))


def group_pairs(key_a: torch.Tensor, key_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs (i, j) with ``key_a[i] == key_b[j]``: (A,), (B,) int64 -> (P,), (P,) int64.

    Pairs come ordered by i, then by j; only equal-key pairs are built (no A x B matrix).
    """
    order = torch.sort(key_b, stable=True).indices
    sorted_b = key_b[order]
    start = torch.searchsorted(sorted_b, key_a, right=False)  # (A,)
    n = torch.searchsorted(sorted_b, key_a, right=True) - start  # (A,) matches of each i
    ia = torch.repeat_interleave(torch.arange(len(key_a), device=key_a.device), n)  # (P,)
    offset = torch.repeat_interleave(n.cumsum(0) - n, n)  # (P,) first pair of each i
    within = torch.arange(len(ia), device=key_a.device) - offset
    return ia, order[start[ia] + within]
