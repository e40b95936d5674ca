"""Semantic segmentation: fine-tuning, probes on a frozen backbone, evaluation.

- :mod:`.config`: the config schemas; :mod:`.model`: datasets, model, optimizer, module;
- :mod:`.run`: :func:`finetune_seg` (what ``mink-ssl-finetune-seg`` calls);
- :mod:`.probe`: linear and kNN probes; :mod:`.inference`: predictions and evaluation over
  scenes; :mod:`.evaluate`: the final evaluation and ``evaluate_only``.
"""
from mink_ssl.tasks.segmentation.config import (AugmentConfig, FinetuneSegConfig, SegDataConfig,
                                                SegEvalConfig, SegOptimConfig)
from mink_ssl.tasks.segmentation.evaluate import (check_fine_tuned, evaluate_only,
                                                  final_evaluation, load_fine_tuned)
from mink_ssl.tasks.segmentation.model import (SegmentationModule, build_seg_dataset,
                                               build_seg_model, build_seg_optimizer,
                                               check_labelled_points, poly_lambda)
from mink_ssl.tasks.segmentation.run import finetune_seg

__all__ = ["AugmentConfig", "FinetuneSegConfig", "SegDataConfig", "SegEvalConfig",
           "SegOptimConfig", "SegmentationModule", "build_seg_dataset", "build_seg_model",
           "build_seg_optimizer", "check_fine_tuned", "check_labelled_points", "evaluate_only",
           "final_evaluation", "finetune_seg", "load_fine_tuned", "poly_lambda"]
