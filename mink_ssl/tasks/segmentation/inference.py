"""Segmentation inference: predictions on the evaluation voxels or on the original points (voxel
logits mapped back through the quantisation's inverse map, optionally averaged over rotations
about gravity), and the evaluation of a model over scenes (metrics:
:mod:`mink_ssl.eval.segmentation`, which also describes the two protocols)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from mink_ssl.data.features import input_features, make_features
from mink_ssl.data.segmentation import EVAL_PROTOCOLS, rotation_matrix, voxel_labels
from mink_ssl.eval.segmentation import (SegMetrics, confusion_matrix, segmentation_metrics,
                                        write_prediction_ply)
from mink_ssl.errors import RERUN
from mink_ssl.sparse import batched_coordinates, quantize, sparse_tensor, unique_voxels


def tta_angles(rotations: int) -> list[float]:
    """``rotations`` angles evenly spaced over a full turn, starting at 0."""
    if not isinstance(rotations, int) or rotations < 1:
        raise ValueError(f"rotations must be an int >= 1, got {rotations!r}")
    return [2 * math.pi * k / rotations for k in range(rotations)]


@torch.no_grad()
def predict_points(model: torch.nn.Module, points: np.ndarray, colors: np.ndarray | None,
                   voxel_size: float, in_channels: int | str, *,
                   angles: Sequence[float] = (0.0,),
                   up_axis: int = 2, device: torch.device | str = "cpu") -> torch.Tensor:
    """Class logits (N, C) for every original point, averaged over rotations about gravity.

    For each angle the points (N, 3) are rotated about the ``up_axis`` through their centroid,
    voxelised (``mink_ssl.sparse.quantize``; a voxel's input feature is its first point's
    colour, as in training), the network predicts (M, C) voxel logits, and each point takes
    its voxel's logits through the inverse map. ``model`` maps a sparse tensor to a sparse
    tensor of logits on the same coordinates; call ``model.eval()`` first. ``in_channels``: a
    feature mode of :mod:`mink_ssl.data.features` (e.g. ``"rgb"``, ``"ones"``), or a width
    (1: ones1, 3: rgb).
    """
    points = np.asarray(points, np.float32)
    centred = points - points.mean(axis=0, dtype=np.float64).astype(np.float32)
    total = None
    for angle in angles:
        R = rotation_matrix(angle, up_axis).astype(np.float32)
        q = quantize(centred @ R.T, voxel_size)
        index = q.index.numpy()  # (M,) first point of each voxel
        picked = None if colors is None else colors[index]
        feats = (make_features(in_channels, picked, len(index)) if isinstance(in_channels, str)
                 else input_features(picked, in_channels, len(index)))
        x = sparse_tensor(batched_coordinates([q.coords]), feats, device=device)
        logits = model(x).F  # (M, C) on device, rows in the input order
        per_point = logits[q.inverse.to(logits.device)].float()  # (N, C)
        total = per_point if total is None else total + per_point
    return total / len(angles)


def reference_voxels(points: np.ndarray, voxel_size: float):
    """The reference's evaluation voxels of points (N, 3): unique cells of
    ``floor(p x (1 / voxel_size))`` computed in float64 (CSC's ``Voxelizer`` without
    augmentation), as a :class:`mink_ssl.sparse.Quantization` (first point, inverse map)."""
    cells = np.floor(np.asarray(points, np.float64) * (1.0 / voxel_size))  # (N, 3)
    return unique_voxels(torch.from_numpy(cells.astype(np.int64)))


@torch.no_grad()
def predict_voxels(model: torch.nn.Module, points: np.ndarray, colors: np.ndarray | None,
                   voxel_size: float, in_channels, *, angles: Sequence[float] = (0.0,),
                   up_axis: int = 2, device: torch.device | str = "cpu"):
    """(voxels, logits (M, C)) on the :func:`reference_voxels` of ``points``: at angle 0 the
    network's output on those voxels (input feature: the first point's colour), at any other
    angle that of their first point in :func:`predict_points`' rotated voxelisation; averaged
    over ``angles``."""
    q = reference_voxels(points, voxel_size)
    index = q.index.numpy()  # (M,) first point of each voxel
    total = None
    for angle in angles:
        if angle == 0:
            picked = None if colors is None else colors[index]
            if isinstance(in_channels, str):  # a feature mode of mink_ssl.data.features

                feats = make_features(in_channels, picked, len(index))
            else:
                feats = input_features(picked, in_channels, len(index))
            coords = q.coords - q.coords.amin(0)  # as CSC: shifted to the origin (integers)
            x = sparse_tensor(batched_coordinates([coords]), feats, device=device)
            logits = model(x).F.float()  # (M, C)
        else:
            logits = predict_points(model, points, colors, voxel_size, in_channels,
                                    angles=[angle], up_axis=up_axis, device=device)[
                q.index.to(device)]
        total = logits if total is None else total + logits.to(total.device)
    return q, total / len(angles)


def evaluate_scenes(model: torch.nn.Module, scenes: Iterable, classes: Sequence[str],
                    voxel_size: float, in_channels: int | str, *, rotations: int = 1,
                    up_axis: int = 2, device: torch.device | str = "cpu",
                    ply_scenes: int = 0, predictions: list | None = None,
                    protocol: str = "points", label_rule: str = "uniform") -> SegMetrics:
    """Evaluate on ``scenes``: (name, points (N, 3), colors (N, 3) uint8, labels (N,) int in
    [0, C) or -1) tuples, per original point (``protocol="points"``) or per voxel
    (``"voxels"``, the reference; voxel labels by ``label_rule``), see the module docstring.
    The predictions of the first ``ply_scenes`` scenes (points, or each voxel's first point)
    are appended to ``predictions`` as (name, points float32 (N, 3), predicted class int16,
    label int16) for :func:`write_prediction_plys`, which the caller runs after writing the
    results (16 bytes a point are kept meanwhile)."""
    if protocol not in EVAL_PROTOCOLS:
        raise ValueError(f"eval protocol must be one of {EVAL_PROTOCOLS}, got {protocol!r}")
    C = len(classes)
    cm = torch.zeros(C, C, dtype=torch.int64)
    angles = tta_angles(rotations)
    was_training = model.training
    model.eval()
    try:
        for k, (name, points, colors, labels) in enumerate(scenes):
            if protocol == "voxels":
                q, logits = predict_voxels(model, points, colors, voxel_size, in_channels,
                                           angles=angles, up_axis=up_axis, device=device)
                labels = voxel_labels(q.inverse, torch.as_tensor(labels), len(q.index), C,
                                      label_rule).numpy()
                points = np.asarray(points)[q.index.numpy()]
            else:
                logits = predict_points(model, points, colors, voxel_size, in_channels,
                                        angles=angles, up_axis=up_axis, device=device)
            if logits.shape[1] != C:
                raise ValueError(f"the model predicts {logits.shape[1]} classes but the data "
                                 f"has {C} ({list(classes)})")
            pred = logits.argmax(1).cpu()  # (N,)
            cm += confusion_matrix(pred, torch.as_tensor(labels), C)
            if predictions is not None and k < ply_scenes:
                predictions.append((name, np.asarray(points, np.float32).reshape(-1, 3),
                                    pred.numpy().astype(np.int16),
                                    np.asarray(labels).reshape(-1).astype(np.int16)))
    finally:
        model.train(was_training)
    return segmentation_metrics(cm, classes)


def write_prediction_plys(ply_dir: Path, predictions: list, num_classes: int,
                          then: str = RERUN) -> list[Path]:
    """``<ply_dir>/<name with / -> __>.ply`` for each (name, points, predicted class, label)
    that :func:`evaluate_scenes` kept; an I/O error is an ``OutputError`` naming the file."""
    return [write_prediction_ply(Path(ply_dir) / f"{name.replace('/', '__')}.ply", points, pred,
                                 labels, num_classes, then)
            for name, points, pred, labels in predictions]
