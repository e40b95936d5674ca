"""Semantic segmentation: fine-tuning, probes on a frozen backbone, evaluation.

- :mod:`.config`: the config schemas; :mod:`.datasets`: a split's dataset; :mod:`.model`: the
  model and the trainer's module (the loss); :mod:`.optim`: the optimizer and poly schedule;
- :mod:`.run`: the task's parts of the fine-tuning skeleton (:mod:`mink_ssl.tasks.finetune`)
  and :func:`finetune_seg` (what ``mink-ssl-finetune-seg`` calls);
- :mod:`.probe`: linear and kNN probes; :mod:`.inference`: predictions and evaluation over
  scenes; :mod:`.evaluate`: the final evaluation and ``evaluate_only``.
"""
from mink_ssl.tasks.segmentation.config import (AugmentConfig, FinetuneSegConfig, SegDataConfig,
                                                SegEvalConfig, SegOptimConfig)
from mink_ssl.tasks.segmentation.evaluate import (check_fine_tuned, evaluate_only,
                                                  final_evaluation, load_fine_tuned)
from mink_ssl.tasks.segmentation.datasets import build_seg_dataset, check_labelled_points
from mink_ssl.tasks.segmentation.model import SegmentationModule, build_seg_model
from mink_ssl.tasks.segmentation.optim import build_seg_optimizer, poly_lambda
from mink_ssl.tasks.segmentation.run import SegmentationTask, finetune_seg

__all__ = ["AugmentConfig", "FinetuneSegConfig", "SegDataConfig", "SegEvalConfig",
           "SegOptimConfig", "SegmentationModule", "SegmentationTask", "build_seg_dataset", "build_seg_model",
           "build_seg_optimizer", "check_fine_tuned", "check_labelled_points", "evaluate_only",
           "final_evaluation", "finetune_seg", "load_fine_tuned", "poly_lambda"]
