"""3D object detection: VoteNet-style fine-tuning on the Res16UNet backbone and its evaluation.

- :mod:`.config`: the config schemas; :mod:`.datasets`: a split's dataset; :mod:`.model`:
  VoteNet on the backbone, the trainer's module (its loss: :mod:`.loss`), the head's resume
  check; :mod:`.optim`: the optimizer with the epoch schedule;
- :mod:`.run`: the task's parts of the fine-tuning skeleton (:mod:`mink_ssl.tasks.finetune`)
  and :func:`finetune_det` (what ``mink-ssl-finetune-det`` calls);
- :mod:`.inference`: per-class AP of a detector over a dataset, results files.
"""
from mink_ssl.tasks.detection.config import (DetAugmentConfig, DetDataConfig, DetEvalConfig,
                                             DetHeadConfig, DetOptimConfig, FinetuneDetConfig)
from mink_ssl.tasks.detection.inference import evaluate_detector, write_det_results
from mink_ssl.tasks.detection.datasets import build_det_dataset
from mink_ssl.tasks.detection.model import DetectionModule, build_det_model, check_head
from mink_ssl.tasks.detection.optim import build_det_optimizer, epoch_milestones
from mink_ssl.tasks.detection.run import DetectionTask, finetune_det

__all__ = ["DetAugmentConfig", "DetDataConfig", "DetEvalConfig", "DetHeadConfig",
           "DetOptimConfig", "DetectionModule", "DetectionTask", "FinetuneDetConfig", "build_det_dataset",
           "build_det_model", "build_det_optimizer", "check_head", "epoch_milestones",
           "evaluate_detector", "finetune_det", "write_det_results"]
