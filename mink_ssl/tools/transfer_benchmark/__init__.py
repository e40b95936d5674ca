"""Synthetic transfer benchmark: does self-supervised pretraining help limited-label segmentation?

Pipeline (everything under ``--out``; each step is skipped when its output exists, so an
interrupted benchmark continues where it stopped):

1. ``data/raw_scannet``: synthetic ScanNet scans (ray-cast RGB-D with Kinect-like depth noise and
   missing depth), ``data/pairs``: ScanNet pair prep (fragments, overlaps, matches);
2. ``data/raw_s3dis`` -> ``data/s3dis``: synthetic S3DIS rooms (objects coloured at random, so
   colour does not give the class) and S3DIS prep (Area 5 = test split);
3. ``pretrain/<objective>/seed<s>``: pretraining of the backbone with each objective, once per
   objective and seed (the pretraining seed is part of the spread);
4. ``finetune/<objective>/<setting>/seed<s>``: segmentation fine-tuning from that backbone
   (``none``: from scratch) in each limited-label setting, with the same seed for the labelled
   subset, so that all objectives see the same labels for a given seed (paired comparison);
5. ``results.json`` (every run's mIoU, mean and std per objective x setting, the preset, library
   versions, timings), ``results.md`` (table, mean +- std over seeds) and ``results.png``.

Settings are ``pts<N>`` (N labelled points per training room), ``frac<F>`` (a fraction F of the
training rooms, fully labelled) and ``full`` (every label).

    mink-ssl-transfer --out runs/transfer --preset full
    # from a source checkout, the same: python experiments/synthetic_transfer/run.py ...

The recorded run and what the benchmark can and cannot tell: ``experiments/synthetic_transfer``.
"""
from mink_ssl.tools.transfer_benchmark.pipeline import Collected, run_benchmark
from mink_ssl.tools.transfer_benchmark.presets import PRESETS, SCRATCH, Preset

__all__ = ["PRESETS", "SCRATCH", "Collected", "Preset", "run_benchmark"]
