"""3D non-maximum suppression for axis-aligned and oriented boxes, in plain torch.

VoteNet's evaluation suppresses proposals with axis-aligned 3D NMS (``nms_3d_faster``, per class
with ``nms_3d_faster_samecls``): boxes are visited by decreasing score, each kept box removes the
later boxes whose IoU with it is strictly above the threshold. For oriented boxes (SUN RGB-D)
VoteNet's ``parse_predictions`` feeds that NMS the axis-aligned hull of each box's 8 corners
(min / max per axis), so two boxes are compared by their hulls, not by their oriented volumes.
``mode`` chooses:

- ``aligned_hull`` (the reference, default): IoU of the axis-aligned hulls
  (:func:`mink_ssl.ops.boxes.aligned_hull`); for (K, 6) boxes this is their own IoU;
- ``oriented``: the oriented 3D IoU of (K, 7) boxes, an option: it suppresses by the boxes' true
  overlap (a diagonal box's hull is up to twice its volume and overlaps neighbours it does not
  touch), but its kept sets differ from the reference's and so do the published APs.

Same greedy pass as VoteNet, with two changes of form: IoUs are computed vectorised (``mink_ssl.ops.boxes.paired_iou``: axis-aligned for
``(K, 6)`` boxes, oriented bird's-eye-view clipping for ``(K, 7)``) for all pairs that can
suppress each other (same class and scene, when given), in blocks of rows so memory stays bounded,
and only the over-threshold pairs are kept; the greedy pass then loops over the kept boxes only.
Equal scores keep their input order (VoteNet's ``np.argsort`` leaves them unspecified).
"""
from __future__ import annotations

import numpy as np
import torch

from mink_ssl.ops.boxes import aligned_hull, check_boxes, group_pairs, paired_iou

_ROW_BLOCK = 1024  # rows of the (K, K) IoU relation computed at once
NMS_MODES = ("aligned_hull", "oriented")


def _group_key(n: int, device, labels, batch_index) -> torch.Tensor:
    key = torch.zeros(n, dtype=torch.long, device=device)
    for name, values in (("batch_index", batch_index), ("labels", labels)):
        if values is None:
            continue
        if not isinstance(values, torch.Tensor) or values.is_floating_point() \
                or values.dtype == torch.bool or values.shape != (n,):
            raise ValueError(f"{name} must be an integer tensor of shape ({n},), got "
                             f"{getattr(values, 'dtype', type(values).__name__)} "
                             f"{tuple(getattr(values, 'shape', ()))}")
        values = values.to(device=device, dtype=torch.long)
        if n and int(values.min()) < 0:
            raise ValueError(f"{name} must be >= 0, got minimum {int(values.min())}")
        key = key * (int(values.max()) + 1 if n else 1) + values
    return key


def nms_3d(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, *,
           labels: torch.Tensor | None = None,
           batch_index: torch.Tensor | None = None,
           mode: str = "aligned_hull") -> torch.Tensor:
    """Greedy 3D NMS.

    Args:
        boxes: (K, 6) axis-aligned ``[cx, cy, cz, dx, dy, dz]`` or (K, 7) oriented, with a
            heading about +z (conventions of ``mink_ssl.ops.boxes``).
        scores: (K,) confidences; higher is kept first.
        iou_threshold: a box is suppressed by a kept one when their IoU is strictly above it.
        labels: (K,) int classes: boxes of different classes never suppress each other
            (per-class NMS); ``None`` suppresses across classes.
        batch_index: (K,) int scene of each box: scenes never suppress each other.
        mode: ``aligned_hull`` (VoteNet: IoU of the boxes' axis-aligned hulls) or ``oriented``
            (oriented 3D IoU), see the module docstring; the same for (K, 6) boxes.

    Returns:
        (K',) int64 indices of the kept boxes, by decreasing score.
    """
    if mode not in NMS_MODES:
        raise ValueError(f"nms mode must be one of {NMS_MODES}, got {mode!r}")
    boxes = check_boxes(boxes, "boxes")
    if mode == "aligned_hull":
        boxes = aligned_hull(boxes)
    k = len(boxes)
    if not isinstance(scores, torch.Tensor) or scores.shape != (k,):
        raise ValueError(f"scores must be a tensor of shape ({k},), got "
                         f"{tuple(getattr(scores, 'shape', ()))}")
    if not 0 <= float(iou_threshold) <= 1:
        raise ValueError(f"iou_threshold must lie in [0, 1], got {iou_threshold}")
    dev = boxes.device
    key = _group_key(k, dev, labels, batch_index)
    order = torch.sort(scores.to(dev), descending=True, stable=True).indices  # (K,)
    boxes, key = boxes[order], key[order]  # from here on, positions in score order
    rows, cols = [], []
    for lo in range(0, k, _ROW_BLOCK):
        i, j = group_pairs(key[lo:lo + _ROW_BLOCK], key)  # same-group pairs of this row block
        i = i + lo
        later = j > i  # only a higher-scored box can suppress
        i, j = i[later], j[later]
        over = paired_iou(boxes[i], boxes[j]) > iou_threshold
        rows.append(i[over])
        cols.append(j[over])
    if k == 0:
        return order
    rows = torch.cat(rows).cpu().numpy()  # over-threshold pairs, sorted by row
    cols = torch.cat(cols).cpu().numpy()
    start = np.searchsorted(rows, np.arange(k + 1))  # (K + 1,) CSR row pointers
    alive = np.ones(k, dtype=bool)
    keep = []
    i = 0
    while True:  # loop over kept boxes only
        keep.append(i)
        alive[cols[start[i]:start[i + 1]]] = False
        alive[i] = False
        if not alive.any():
            break
        i = int(alive.argmax())  # next surviving box in score order
    return order[torch.as_tensor(keep, dtype=torch.long, device=dev)]
