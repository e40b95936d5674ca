"""Detection inference: a detector's per-class AP over every scene of a dataset (metrics:
:mod:`mink_ssl.eval.detection`), and the run's results files."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from mink_ssl.data.detection import collate_detection
from mink_ssl.eval.detection import DetectionEvaluator, write_detection_report
from mink_ssl.models.votenet import detect
from mink_ssl.errors import RERUN


@torch.no_grad()
def evaluate_detector(model: nn.Module, dataset, device: torch.device, *, batch_size: int = 4,
                      conf_threshold: float = 0.05, nms_iou: float = 0.25,
                      per_class_proposal: bool = True, iou_thresholds=(0.25, 0.5),
                      nms: str = "aligned_hull"):
    """Per-class AP of ``model`` (a :class:`~mink_ssl.models.votenet.VoteNetDetector`) on
    every scene of ``dataset`` (unaugmented), -> :class:`~mink_ssl.eval.detection.
    DetectionResult`. Axis-aligned heads (one heading bin) are scored with axis-aligned IoU."""
    head = model.head
    evaluator = DetectionEvaluator(head.num_classes, dataset.classes, tuple(iou_thresholds))
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(dataset), batch_size):
            batch = collate_detection([dataset[i] for i in range(lo, min(lo + batch_size,
                                                                         len(dataset)))])
            batch = batch.to(device)
            out = model(batch.coords, batch.feats, batch.points)
            det = detect(out, head.mean_sizes, head.num_heading_bins,
                         conf_threshold=conf_threshold, nms_iou=nms_iou,
                         per_class_proposal=per_class_proposal, nms=nms)
            gt = batch.boxes[:, :6] if head.num_heading_bins == 1 else batch.boxes
            evaluator.update(det.boxes, det.scores, det.labels, gt, batch.box_labels,
                             pred_batch=det.batch, gt_batch=batch.box_batch,
                             num_scenes=len(batch))
    finally:
        model.train(was_training)
    return evaluator.compute()


def write_det_results(out_dir: Path, result, extra: dict, then: str = RERUN) -> dict:
    """``results.md``, ``results.json`` = ``extra`` plus every number and curve, then the plot
    ``results_pr.png`` (:func:`~mink_ssl.eval.detection.write_detection_report`, which names
    the file of an I/O error, ``then`` what to run when fixed); returns ``results.json``'s
    content."""
    write_detection_report(result, out_dir, name="results", extra=extra, then=then)
    return {**extra, **{f"mAP@{t:g}": result.mean_ap(t) for t in result.iou_thresholds},
            **result.to_dict()}
