"""The trainings: each task owns its config, its module (what the trainer optimises), its run
function and its inference loop, on top of the generic engine (:mod:`mink_ssl.engine`).

- :mod:`~mink_ssl.tasks.pretrain`: self-supervised pretraining on pairs of views;
- :mod:`~mink_ssl.tasks.segmentation`: semantic segmentation fine-tuning, probes, evaluation;
- :mod:`~mink_ssl.tasks.detection`: VoteNet detection fine-tuning and evaluation.
"""
