"""Semantic segmentation metrics and reports: confusion matrix and metrics, and the run's
products: a results table (Markdown + JSON), a per-class IoU bar plot (PNG) and PLY files of
predictions. The inference that produces the predictions (voxels or original points, rotations
about gravity): :mod:`mink_ssl.tasks.segmentation.inference`.

Metrics follow the ScanNet / S3DIS benchmark conventions. The confusion matrix ``cm`` has ground
truth in rows and predictions in columns; points whose ground truth is the ignore label (-1)
are left out before counting. With TP_c = cm[c, c], FP_c = column sum - TP_c, FN_c = row sum -
TP_c:

    IoU_c = TP_c / (TP_c + FP_c + FN_c)   defined where the union TP+FP+FN > 0
    Acc_c = TP_c / (TP_c + FN_c)          defined where class c occurs in the ground truth
    mIoU  = mean of the defined IoU_c     (a class absent from the ground truth but predicted
                                           somewhere counts with IoU 0; a class absent from both
                                           is left out: it has no union)
    mAcc  = mean of the defined Acc_c     (classes present in the ground truth)
    oAcc  = sum_c TP_c / evaluated points

Undefined per-class values are NaN in tensors and ``null`` in JSON ("n/a" in the table).

Two protocols (``mink_ssl.tasks.segmentation.inference.evaluate_scenes(protocol=...)``):

- ``voxels`` (the reference, CSC / PointContrast ``lib/test.py``): every voxel of the evaluation
  voxelisation counts once. The voxels are CSC's test-time ``Voxelizer`` grid, ``floor(p x
  (1 / voxel_size))`` in float64 on the unmoved points; a voxel's label follows the dataset's
  rule (the reference: the label its points share, ignored where they differ, see
  :func:`mink_ssl.data.segmentation.voxel_labels`); its prediction is the network's output
  there. The scenes come thinned and cropped as the reference's test split
  (``SegmentationDataset.eval_scene``: Synthia's 7.5 cm prevoxelisation and 25 m crop).
- ``points`` (an option): every original point counts once, with its voxel's prediction (all
  points of a scene, none cropped): closer to the benchmarks' point-level scoring, and it
  weighs dense regions as the annotation does rather than one vote per voxel.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mink_ssl.io import output_file
from mink_ssl.errors import RERUN, OutputError, written_before


def _tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x


def confusion_matrix(pred, target, num_classes: int, ignore_label: int = -1) -> torch.Tensor:
    """(C, C) int64 counts, rows = ground truth, columns = prediction, on ``pred``'s device.

    ``pred`` (N,) integer classes in [0, C); ``target`` (N,) in [0, C) or ``ignore_label``
    (those points are not counted).
    """
    p, t = _tensor(pred, "pred"), _tensor(target, "target")
    if not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if p.ndim != 1 or t.ndim != 1 or len(p) != len(t):
        raise ValueError(f"pred and target must be 1-D of equal length, got shapes "
                         f"{tuple(p.shape)} and {tuple(t.shape)}")
    if p.is_floating_point() or t.is_floating_point():
        raise ValueError(f"pred and target must be integer class indices, got {p.dtype} and "
                         f"{t.dtype}; take logits.argmax(1) first")
    p, t = p.long(), t.long().to(p.device)
    keep = t != ignore_label
    bad_t = keep & ((t < 0) | (t >= num_classes))
    if bad_t.any():
        raise ValueError(f"target has labels {sorted(set(t[bad_t].unique()[:5].tolist()))} "
                         f"outside [0, {num_classes}) and not the ignore label {ignore_label}; "
                         "map them to the ignore label in data prep")
    bad_p = (p < 0) | (p >= num_classes)
    if bad_p.any():
        raise ValueError(f"pred has classes {sorted(set(p[bad_p].unique()[:5].tolist()))} "
                         f"outside [0, {num_classes})")
    flat = t[keep] * num_classes + p[keep]  # (K,) one bin per (gt, pred) pair
    return torch.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes)


@dataclass
class SegMetrics:
    """Metrics of one confusion matrix (see the module docstring for the definitions).

    iou, acc: (C,) float64, NaN where undefined; miou, macc, oacc: floats (NaN if nothing
    was evaluated); gt_points, pred_points: (C,) int64 row and column sums.
    """

    classes: list[str]
    confusion: torch.Tensor
    iou: torch.Tensor
    acc: torch.Tensor
    miou: float
    macc: float
    oacc: float
    gt_points: torch.Tensor
    pred_points: torch.Tensor

    def to_dict(self) -> dict:
        """Plain data for JSON (NaN -> None)."""
        def num(x) -> float | None:
            x = float(x)
            return None if math.isnan(x) else x

        return {
            "miou": num(self.miou), "macc": num(self.macc), "oacc": num(self.oacc),
            "points": int(self.confusion.sum()),
            "per_class": {name: {"iou": num(self.iou[c]), "acc": num(self.acc[c]),
                                 "gt_points": int(self.gt_points[c]),
                                 "pred_points": int(self.pred_points[c])}
                          for c, name in enumerate(self.classes)},
            "confusion": self.confusion.tolist(),
        }


def segmentation_metrics(cm: torch.Tensor, classes: Sequence[str] | None = None) -> SegMetrics:
    """Per-class IoU / accuracy, mIoU, mAcc and overall accuracy of a (C, C) confusion matrix."""
    cm = _tensor(cm, "cm")
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got {tuple(cm.shape)}")
    C = cm.shape[0]
    classes = list(classes) if classes is not None else [f"class_{c}" for c in range(C)]
    if len(classes) != C:
        raise ValueError(f"{len(classes)} class names for a {C}x{C} confusion matrix")
    cm = cm.to(torch.float64)
    tp = cm.diagonal()
    gt, pr = cm.sum(1), cm.sum(0)  # (C,) rows: ground truth, columns: predictions
    union = gt + pr - tp
    nan = torch.full_like(tp, float("nan"))
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    total = float(cm.sum())
    return SegMetrics(classes=classes, confusion=cm.to(torch.int64), iou=iou, acc=acc,
                      miou=float(iou.nanmean()), macc=float(acc.nanmean()),
                      oacc=float(tp.sum() / total) if total else float("nan"),
                      gt_points=gt.to(torch.int64), pred_points=pr.to(torch.int64))


# ------------------------------------------------------------------ predictions on points


# ------------------------------------------------------------------------------ products

def class_palette(num_classes: int) -> np.ndarray:
    """(C, 3) uint8 distinct colours (hues spaced by the golden ratio), fixed per class index."""
    h = (np.arange(num_classes) * 0.618033988749895) % 1.0
    s = np.where(np.arange(num_classes) % 2 == 0, 0.75, 0.55)
    v = np.where(np.arange(num_classes) % 3 == 0, 0.95, 0.8)
    k = (np.array([5.0, 3.0, 1.0])[None, :] + h[:, None] * 6) % 6  # HSV -> RGB, vectorised
    rgb = v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)
    return np.round(rgb * 255).astype(np.uint8)


def write_prediction_ply(path: str | os.PathLike, points: np.ndarray, pred: np.ndarray,
                         labels: np.ndarray | None, num_classes: int, then: str = RERUN) -> Path:
    """Binary PLY of points (N, 3) coloured by predicted class, with int properties ``pred``
    (predicted class) and ``label`` (ground truth, -1 ignored), written atomically; an I/O
    error is an ``OutputError`` naming the file (``then``: what to run when fixed)."""
    from plyfile import PlyData, PlyElement

    points = np.asarray(points, np.float32).reshape(-1, 3)
    pred = np.asarray(pred).reshape(-1)
    if len(pred) != len(points):
        raise ValueError(f"{len(points)} points but {len(pred)} predictions")
    if len(pred) and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predictions must be in [0, {num_classes}), got [{pred.min()}, "
                         f"{pred.max()}]")
    labels = np.full(len(points), -1) if labels is None else np.asarray(labels).reshape(-1)
    if len(labels) != len(points):
        raise ValueError(f"{len(points)} points but {len(labels)} labels")
    colors = class_palette(num_classes)[pred]  # (N, 3)
    vertex = np.empty(len(points), [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"),
                                    ("green", "u1"), ("blue", "u1"), ("pred", "<i2"),
                                    ("label", "<i2")])
    vertex["x"], vertex["y"], vertex["z"] = points.T
    vertex["red"], vertex["green"], vertex["blue"] = colors.T
    vertex["pred"], vertex["label"] = pred, labels
    with output_file(path, then=then) as tmp:
        PlyData([PlyElement.describe(vertex, "vertex")], text=False,
                comments=["written by mink_ssl.eval.segmentation: colour = predicted class"]
                ).write(str(tmp))
    return Path(path)


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(float(x)) else f"{100 * float(x):.1f}"


def results_markdown(metrics: SegMetrics, title: str = "Segmentation results") -> str:
    """A Markdown table: summary line and one row per class (values in percent)."""
    lines = [f"# {title}", "",
             f"mIoU {_fmt(metrics.miou)} | mAcc {_fmt(metrics.macc)} | oAcc "
             f"{_fmt(metrics.oacc)} | {int(metrics.confusion.sum()):,} points", "",
             "| class | IoU | Acc | GT points | predicted points |",
             "|---|---:|---:|---:|---:|"]
    for c, name in enumerate(metrics.classes):
        lines.append(f"| {name} | {_fmt(metrics.iou[c])} | {_fmt(metrics.acc[c])} | "
                     f"{int(metrics.gt_points[c]):,} | {int(metrics.pred_points[c]):,} |")
    lines += ["", "IoU n/a: the class is neither in the ground truth nor predicted (left out of "
              "mIoU); Acc n/a: the class is not in the ground truth (left out of mAcc)."]
    return "\n".join(lines) + "\n"


def plot_class_iou(metrics: SegMetrics, path: str | os.PathLike, title: str = "",
                   then: str = RERUN) -> Path:
    """Horizontal bar chart of per-class IoU with the mIoU as a line (PNG, headless Agg); an
    I/O error is an ``OutputError`` naming the file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    C = len(metrics.classes)
    iou = np.nan_to_num(metrics.iou.numpy() * 100, nan=0.0)
    fig = Figure(figsize=(6.5, 0.9 + 0.32 * C))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(C)
    ax.barh(y, iou, color=class_palette(C) / 255.0, edgecolor="black", linewidth=0.5)
    for c in range(C):
        ax.text(iou[c] + 1, c, _fmt(metrics.iou[c]), va="center", fontsize=8)
    if not math.isnan(metrics.miou):
        ax.axvline(metrics.miou * 100, color="black", linestyle="--", linewidth=1,
                   label=f"mIoU {metrics.miou * 100:.1f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(y, metrics.classes, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("IoU (%)")
    ax.set_title(title or "Per-class IoU", fontsize=10)
    fig.tight_layout()
    with output_file(path, then=then) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)


def write_results(out_dir: str | os.PathLike, metrics: SegMetrics, *, title: str,
                  extra: dict | None = None, stem: str = "results",
                  then: str = RERUN) -> dict[str, Path]:
    """``<stem>.md`` and ``<stem>.json`` (metrics plus ``extra``), then the plot
    ``<stem>_iou.png``, in ``out_dir``, each written atomically; returns their paths. An I/O
    error is an ``OutputError`` naming the file (``then``: what to run when fixed); one met
    writing the plot says that the results were written before it."""
    out_dir = Path(out_dir)
    paths = {"markdown": out_dir / f"{stem}.md", "json": out_dir / f"{stem}.json",
             "plot": out_dir / f"{stem}_iou.png"}
    with output_file(paths["markdown"], then=then) as tmp:
        tmp.write_text(results_markdown(metrics, title))
    with output_file(paths["json"], then=then) as tmp:
        tmp.write_text(json.dumps({"title": title, **(extra or {}), **metrics.to_dict()},
                                  indent=1))
    try:
        plot_class_iou(metrics, paths["plot"], title, then)
    except OutputError as e:
        raise written_before(e, [paths["markdown"], paths["json"]]) from None
    return paths
