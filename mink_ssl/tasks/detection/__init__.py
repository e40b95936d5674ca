"""3D object detection: VoteNet-style fine-tuning on the Res16UNet backbone and its evaluation.

- :mod:`.config`: the config schemas; :mod:`.model`: datasets, model, optimizer, module;
- :mod:`.run`: :func:`finetune_det` (what ``mink-ssl-finetune-det`` calls);
- :mod:`.inference`: per-class AP of a detector over a dataset, results files.
"""
from mink_ssl.tasks.detection.config import (DetAugmentConfig, DetDataConfig, DetEvalConfig,
                                             DetHeadConfig, DetOptimConfig, FinetuneDetConfig)
from mink_ssl.tasks.detection.inference import evaluate_detector, write_det_results
from mink_ssl.tasks.detection.model import (DetectionModule, build_det_dataset, build_det_model,
                                            build_det_optimizer, check_head, epoch_milestones)
from mink_ssl.tasks.detection.run import finetune_det

__all__ = ["DetAugmentConfig", "DetDataConfig", "DetEvalConfig", "DetHeadConfig",
           "DetOptimConfig", "DetectionModule", "FinetuneDetConfig", "build_det_dataset",
           "build_det_model", "build_det_optimizer", "check_head", "epoch_milestones",
           "evaluate_detector", "finetune_det", "write_det_results"]
