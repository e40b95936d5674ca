"""3D detection evaluation: per-class average precision at IoU thresholds (0.25 and 0.5 by
default), mAP, and a results table and precision/recall plot. Boxes and their IoU (both kinds,
parameterised as everywhere in mink-ssl): :mod:`mink_ssl.ops.boxes`.


Average precision follows VoteNet's ``eval_det_cls`` (the ScanNet / SUN RGB-D protocol, itself
PASCAL VOC's): per class, predictions of all scenes are ranked by score (ties keep input order);
each prediction takes the ground-truth box of its scene and class with the highest IoU (ties:
the first); it is a true positive if that IoU is strictly above the threshold and that box was
not taken by a higher-ranked prediction, otherwise a false positive (so duplicates are false
positives, and a prediction whose best box is taken does not fall back to another box). With
``npos`` ground-truth boxes, recall = cumTP / npos, precision = cumTP / (cumTP + cumFP), and AP
is the area under the precision envelope (precision made monotonically non-increasing from the
right) summed over every recall change: VOC's ``use_07_metric=False`` variant, not the 11-point
one. A class without ground truth has no AP (NaN) and is left out of the mean (mAP); a class
with ground truth but no prediction has AP 0. Recall (VoteNet's "AR") is the final recall.

Matching is vectorised: a prediction's best box does not depend on which boxes are taken, so
the true positives are, among predictions above the threshold, the highest ranked for each
ground-truth box; IoUs are computed only for (prediction, box) pairs of the same scene and class.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mink_ssl.io import output_file
from mink_ssl.ops.boxes import as_oriented, check_boxes, group_pairs, paired_iou
from mink_ssl.errors import RERUN, OutputError, written_before

DEFAULT_IOU_THRESHOLDS = (0.25, 0.5)

def average_precision(recall: torch.Tensor, precision: torch.Tensor) -> float:
    """VOC all-point AP (``use_07_metric=False``): area under the precision envelope.

    Args:
        recall, precision: (P,) the curve in rank order (recall non-decreasing).
    """
    zero, one = recall.new_zeros(1), recall.new_ones(1)
    mrec = torch.cat([zero, recall, one])  # (P + 2,)
    mpre = torch.cat([zero, precision, zero])
    envelope = mpre.flip(0).cummax(dim=0).values.flip(0)  # max precision at recall >= r
    step = mrec[1:] != mrec[:-1]
    return float(((mrec[1:] - mrec[:-1]) * envelope[1:])[step].sum())


def _check_labels(labels, n: int, name: str, num_classes: int | None, device) -> torch.Tensor:
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() \
            or labels.dtype == torch.bool or labels.shape != (n,):
        raise ValueError(f"{name} must be an integer tensor of shape ({n},), got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    labels = labels.to(device=device, dtype=torch.long)
    if n and (int(labels.min()) < 0 or (num_classes is not None
                                        and int(labels.max()) >= num_classes)):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels


def match_detections(pred_boxes, pred_scores, pred_labels, pred_scene, gt_boxes, gt_labels,
                     gt_scene) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best ground-truth box of each prediction (same scene and class) and the ranking.

    Returns:
        best_iou (P,) float (-1 where the scene has no box of that class), best_gt (P,) int64
        index into the ground truth (``G`` where none), rank (P,) int64 position of each
        prediction in the descending-score order (ties: input order).
    """
    n_classes = int(max(int(pred_labels.max()) if len(pred_labels) else 0,
                        int(gt_labels.max()) if len(gt_labels) else 0)) + 1
    pi, gi = group_pairs(pred_scene * n_classes + pred_labels, gt_scene * n_classes + gt_labels)
    iou = paired_iou(pred_boxes[pi], gt_boxes[gi]) if len(pi) else pred_boxes.new_zeros(0)
    p, g = len(pred_boxes), len(gt_boxes)
    best_iou = iou.new_full((p,), -1.0).scatter_reduce(0, pi, iou, "amax")
    first = iou == best_iou[pi]  # ties: the lowest ground-truth index
    best_gt = torch.full((p,), g, dtype=torch.long, device=iou.device).scatter_reduce(
        0, pi[first], gi[first], "amin")
    rank = torch.empty(p, dtype=torch.long, device=iou.device)
    rank[torch.sort(pred_scores, descending=True, stable=True).indices] = torch.arange(
        p, device=iou.device)
    return best_iou, best_gt, rank


def true_positives(best_iou: torch.Tensor, best_gt: torch.Tensor, rank: torch.Tensor,
                   num_gt: int, threshold: float) -> torch.Tensor:
    """(P,) bool: above ``threshold`` (strictly) and the highest-ranked claim on its box."""
    hit = best_iou > threshold
    first = torch.full((num_gt + 1,), len(rank), dtype=torch.long, device=rank.device)
    first = first.scatter_reduce(0, best_gt[hit], rank[hit], "amin")  # (G + 1,)
    return hit & (rank == first[best_gt])


@dataclass
class ClassCurve:
    """Precision/recall of one class at one IoU threshold, in rank order (numpy (P_c,))."""

    recall: np.ndarray
    precision: np.ndarray
    ap: float  # NaN when the class has no ground truth
    final_recall: float


@dataclass
class DetectionResult:
    """Per-class AP and recall at each IoU threshold, plus counts and curves."""

    class_names: list[str]
    iou_thresholds: tuple[float, ...]
    num_gt: np.ndarray  # (C,) int
    num_pred: np.ndarray  # (C,) int
    curves: dict[float, list[ClassCurve]] = field(default_factory=dict)

    def ap(self, threshold: float) -> np.ndarray:
        """(C,) AP per class at ``threshold`` (NaN without ground truth)."""
        return np.array([c.ap for c in self.curves[self._key(threshold)]])

    def recall(self, threshold: float) -> np.ndarray:
        """(C,) final recall per class at ``threshold`` (NaN without ground truth)."""
        return np.array([c.final_recall for c in self.curves[self._key(threshold)]])

    def mean_ap(self, threshold: float) -> float:
        """mAP over classes with ground truth (NaN if none has)."""
        return _nanmean(self.ap(threshold))

    def mean_recall(self, threshold: float) -> float:
        return _nanmean(self.recall(threshold))

    def _key(self, threshold: float) -> float:
        for t in self.curves:
            if math.isclose(t, threshold):
                return t
        raise KeyError(f"IoU threshold {threshold} not evaluated; evaluated: "
                       f"{list(self.curves)}")

    def to_dict(self, curves: bool = True) -> dict:
        """Plain data (JSON-ready; NaN becomes None)."""
        out = {"classes": list(self.class_names), "num_gt": self.num_gt.tolist(),
               "num_pred": self.num_pred.tolist(), "iou_thresholds": list(self.iou_thresholds),
               "results": {}}
        for t in self.iou_thresholds:
            entry = {"mAP": _plain(self.mean_ap(t)), "mAR": _plain(self.mean_recall(t)),
                     "ap": {n: _plain(v) for n, v in zip(self.class_names, self.ap(t))},
                     "recall": {n: _plain(v) for n, v in zip(self.class_names, self.recall(t))}}
            if curves:
                entry["curves"] = {n: None if math.isnan(c.ap) else  # no ground truth
                                   {"recall": c.recall.tolist(), "precision": c.precision.tolist()}
                                   for n, c in zip(self.class_names, self.curves[t])}
            out["results"][f"{t:g}"] = entry
        return out


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def _plain(value: float):
    return None if value is None or math.isnan(value) else float(value)


def evaluate_detection(pred_boxes, pred_scores, pred_labels, pred_scene, gt_boxes, gt_labels,
                       gt_scene, num_classes: int, *,
                       iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
                       class_names: Sequence[str] | None = None) -> DetectionResult:
    """Per-class AP / recall of predictions against ground truth over many scenes.

    Args:
        pred_boxes: (P, 6|7) predicted boxes; pred_scores (P,) confidences; pred_labels (P,)
            int classes in ``[0, num_classes)``; pred_scene (P,) int scene ids.
        gt_boxes: (G, 6|7) ground-truth boxes; gt_labels (G,); gt_scene (G,) (same ids).
        num_classes: C; class_names: C names (``class_<i>`` when ``None``).
        iou_thresholds: IoU a true positive must exceed (VoteNet reports 0.25 and 0.5).

    Returns:
        a ``DetectionResult`` (AP per class and threshold, mAP via ``mean_ap``).
    """
    pred_boxes, gt_boxes = check_boxes(pred_boxes, "pred_boxes"), check_boxes(gt_boxes, "gt_boxes")
    dev = pred_boxes.device
    gt_boxes = gt_boxes.to(device=dev, dtype=torch.promote_types(pred_boxes.dtype, gt_boxes.dtype))
    pred_boxes = pred_boxes.to(gt_boxes.dtype)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    names = [f"class_{i}" for i in range(num_classes)] if class_names is None else list(class_names)
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names but num_classes={num_classes}")
    thresholds = tuple(float(t) for t in iou_thresholds)
    if not thresholds or any(not 0 <= t < 1 for t in thresholds):
        raise ValueError(f"iou_thresholds must be non-empty values in [0, 1), got {iou_thresholds}")
    p, g = len(pred_boxes), len(gt_boxes)
    pred_labels = _check_labels(pred_labels, p, "pred_labels", num_classes, dev)
    gt_labels = _check_labels(gt_labels, g, "gt_labels", num_classes, dev)
    pred_scene = _check_labels(pred_scene, p, "pred_scene", None, dev)
    gt_scene = _check_labels(gt_scene, g, "gt_scene", None, dev)
    if not isinstance(pred_scores, torch.Tensor):
        pred_scores = torch.as_tensor(np.asarray(pred_scores))
    if pred_scores.shape != (p,) or not torch.isfinite(pred_scores.double()).all():
        raise ValueError(f"pred_scores must be ({p},) finite scores, got shape "
                         f"{tuple(pred_scores.shape)}")
    pred_scores = pred_scores.to(dev)

    best_iou, best_gt, rank = match_detections(pred_boxes, pred_scores, pred_labels, pred_scene,
                                               gt_boxes, gt_labels, gt_scene)
    order = torch.argsort(rank)  # predictions in rank order
    labels_ranked = pred_labels[order]
    num_gt = torch.bincount(gt_labels, minlength=num_classes).cpu().numpy()
    num_pred = torch.bincount(pred_labels, minlength=num_classes).cpu().numpy()
    result = DetectionResult(names, thresholds, num_gt, num_pred)
    for t in thresholds:
        tp_ranked = true_positives(best_iou, best_gt, rank, g, t)[order]
        result.curves[t] = []
        for c in range(num_classes):  # one pass per class (C is small), vectorised within
            tp = tp_ranked[labels_ranked == c].double()
            cum_tp = tp.cumsum(0)
            precision = cum_tp / torch.arange(1, len(tp) + 1, device=dev, dtype=tp.dtype)
            if num_gt[c] == 0:
                recall = torch.full_like(cum_tp, float("nan"))
                ap = final = float("nan")
            else:
                recall = cum_tp / float(num_gt[c])
                ap = average_precision(recall, precision)
                final = float(recall[-1]) if len(recall) else 0.0
            result.curves[t].append(ClassCurve(recall.cpu().numpy(), precision.cpu().numpy(),
                                               ap, final))
    return result


class DetectionEvaluator:
    """Collects predictions and ground truth batch by batch; ``compute`` evaluates them all.

    Each ``update`` call brings its own scenes (scene ids are offset so calls never mix).
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None,
                 iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS):
        self.num_classes, self.class_names = num_classes, class_names
        self.iou_thresholds = tuple(iou_thresholds)
        self._pred: list[tuple[torch.Tensor, ...]] = []
        self._gt: list[tuple[torch.Tensor, ...]] = []
        self._scenes = 0

    def update(self, pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels, *,
               pred_batch: torch.Tensor | None = None, gt_batch: torch.Tensor | None = None,
               num_scenes: int | None = None) -> None:
        """Add B scenes: boxes (P, 6|7) / (G, 6|7), scores (P,), labels (P,) / (G,), and the
        scene of each row within this batch, pred_batch (P,) / gt_batch (G,) (one scene when
        ``None``); B is ``num_scenes`` or the largest scene index + 1."""
        pred_boxes, gt_boxes = check_boxes(pred_boxes, "pred_boxes"), check_boxes(gt_boxes,
                                                                                  "gt_boxes")
        pb = torch.zeros(len(pred_boxes), dtype=torch.long) if pred_batch is None else pred_batch
        gb = torch.zeros(len(gt_boxes), dtype=torch.long) if gt_batch is None else gt_batch
        pb = _check_labels(pb, len(pred_boxes), "pred_batch", num_scenes, pred_boxes.device)
        gb = _check_labels(gb, len(gt_boxes), "gt_batch", num_scenes, gt_boxes.device)
        if num_scenes is None:
            num_scenes = 1 + max([int(x.max()) for x in (pb, gb) if len(x)], default=0)
        self._pred.append((pred_boxes.detach(), torch.as_tensor(pred_scores).detach(),
                           torch.as_tensor(pred_labels).detach(), pb + self._scenes))
        self._gt.append((gt_boxes.detach(), torch.as_tensor(gt_labels).detach(),
                         gb + self._scenes))
        self._scenes += num_scenes

    def compute(self) -> DetectionResult:
        if not self._pred:
            raise RuntimeError("DetectionEvaluator.compute() before any update()")
        width = max(x[0].shape[1] for x in self._pred + self._gt)
        fix = (lambda b: as_oriented(b)) if width == 7 else (lambda b: b)  # noqa: E731
        dev = self._pred[0][0].device
        cat = lambda xs: torch.cat([x.to(dev) for x in xs])  # noqa: E731
        pred = [cat([fix(x[0]) for x in self._pred])] + [cat([x[i] for x in self._pred])
                                                          for i in (1, 2, 3)]
        gt = [cat([fix(x[0]) for x in self._gt])] + [cat([x[i] for x in self._gt]) for i in (1, 2)]
        return evaluate_detection(*pred, *gt, self.num_classes, class_names=self.class_names,
                                  iou_thresholds=self.iou_thresholds)


def detection_table(result: DetectionResult) -> str:
    """Markdown table: one row per class (AP and recall per threshold), then the means."""
    head = ["class", "GT", "pred"]
    for t in result.iou_thresholds:
        head += [f"AP@{t:g}", f"AR@{t:g}"]
    fmt = lambda v: "n/a" if math.isnan(v) else f"{100 * v:.2f}"  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c, name in enumerate(result.class_names):
        cells = [name, str(int(result.num_gt[c])), str(int(result.num_pred[c]))]
        for t in result.iou_thresholds:
            cells += [fmt(result.ap(t)[c]), fmt(result.recall(t)[c])]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["**mean**", str(int(result.num_gt.sum())), str(int(result.num_pred.sum()))]
    for t in result.iou_thresholds:
        cells += [f"**{fmt(result.mean_ap(t))}**", f"**{fmt(result.mean_recall(t))}**"]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_detection_report(result: DetectionResult, run_dir: str | os.PathLike,
                           name: str = "detection", extra: dict | None = None,
                           then: str = RERUN) -> dict[str, Path]:
    """Write ``<name>.md`` (table, values in %) and ``<name>.json`` (all numbers and curves;
    with ``extra``: ``extra``, then ``mAP@<t>`` per threshold, then all numbers and curves),
    then ``<name>_pr.png`` (per class the interpolated precision envelope over recall, whose
    area is the AP, and the raw precision/recall points; one panel per IoU threshold) to
    ``run_dir``, each atomically. Returns the paths by kind (``markdown``, ``json``, ``plot``).
    An I/O error is an ``OutputError`` naming the file (``then``: what to run when fixed); one
    met writing the plot says that the results were written before it."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # headless, no global backend
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    paths = {"markdown": run_dir / f"{name}.md", "json": run_dir / f"{name}.json",
             "plot": run_dir / f"{name}_pr.png"}
    summary = ", ".join(f"mAP@{t:g} = {100 * result.mean_ap(t):.2f}"
                        for t in result.iou_thresholds)
    numbers = result.to_dict()
    if extra is not None:
        numbers = {**extra, **{f"mAP@{t:g}": result.mean_ap(t) for t in result.iou_thresholds},
                   **numbers}
    with output_file(paths["markdown"], then=then) as tmp:
        tmp.write_text(f"# 3D detection ({summary})\n\n" + detection_table(result))
    with output_file(paths["json"], then=then) as tmp:
        tmp.write_text(json.dumps(numbers, indent=1))

    n = len(result.iou_thresholds)
    fig = Figure(figsize=(5.5 * n, 5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)
    colors = colormaps["tab20"]
    for ax, t in zip(axes[0], result.iou_thresholds):
        for c, (cname, curve) in enumerate(zip(result.class_names, result.curves[t])):
            if math.isnan(curve.ap):
                continue  # no ground truth: no curve
            # the interpolated envelope (its area is the AP) and the raw points, faint
            rec = np.concatenate([[0.0], curve.recall])
            env = np.maximum.accumulate(np.concatenate([[0.0], curve.precision])[::-1])[::-1]
            ax.step(rec, env, where="pre", color=colors(c % 20),
                    label=f"{cname} ({100 * curve.ap:.1f})")
            ax.plot(curve.recall, curve.precision, ".", color=colors(c % 20), alpha=0.3, ms=3)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
               title=f"IoU {t:g}: mAP {100 * result.mean_ap(t):.2f}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower left", ncol=2)
    fig.tight_layout()
    try:
        with output_file(paths["plot"], then=then) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    except OutputError as e:
        raise written_before(e, [paths["markdown"], paths["json"]]) from None
    return paths
