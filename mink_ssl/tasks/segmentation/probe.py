"""Segmentation probes on a frozen backbone, run by
:func:`mink_ssl.tasks.segmentation.finetune_seg` when ``probe`` is set (the probes themselves:
:mod:`mink_ssl.models.probe`).

    mink-ssl-finetune-seg finetune=s3dis data.root=... pretrained=runs/pt/backbone.pth probe=linear
    ... probe=linear_multiscale     # one linear layer on the four decoder stages, concatenated
    ... probe=knn knn_k=20          # no training: cosine kNN against labelled training voxels

The linear probes train only their head with fine-tuning's trainer, schedule, checkpoints,
periodic and final evaluation and limited-label options; the run directory holds the same files
(``model.pth`` holds the frozen backbone and the probe head, ``evaluate_only`` takes it). The
backbone starts from ``pretrained`` with every tensor, its ``final`` layer included (``null``: the
random initialisation, the probe's floor) and ``final_layer`` does not apply.

The kNN probe trains nothing: the bank is the labelled voxels of the training split (limited
labels applied, no augmentation) with the backbone's output features, at most ``knn_bank`` of
them (a seeded random subset); the run writes ``config.json`` and the final evaluation's
results (no checkpoint, no ``model.pth``).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from mink_ssl.data.segmentation import collate_segmentation
from mink_ssl.engine.build import build_backbone
from mink_ssl.models.probe import FrozenProbe, check_probe
from mink_ssl.sparse import sparse_tensor
from mink_ssl.tasks.segmentation.evaluate import final_evaluation
from mink_ssl.tasks.segmentation.datasets import build_seg_dataset


def build_probe_model(cfg, in_channels: int, num_classes: int):
    """A :class:`~mink_ssl.models.probe.FrozenProbe` on a backbone built as pretraining built it
    (``cfg.model``, ``out_channels`` as configured); ``cfg`` is the whole fine-tuning config."""
    check_probe(cfg.probe)
    return FrozenProbe(build_backbone(cfg.model, in_channels), num_classes, cfg.probe,
                       knn_k=cfg.knn_k)


@torch.no_grad()
def knn_bank(model, train_set, max_size: int, seed: int, device) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """(features (B, W), labels (B,)): the frozen backbone's output features of the labelled
    voxels of every scene of ``train_set``, one scene at a time, at most ``max_size`` rows (a
    random subset, ``seed``)."""
    if not isinstance(max_size, int) or max_size < 1:
        raise ValueError(f"knn_bank must be an int >= 1 (most labelled voxels kept), got "
                         f"{max_size!r}")
    model.eval()
    feats, labels = [], []
    for i in range(len(train_set)):
        b = collate_segmentation([train_set[i]]).to(device)
        f = model.features(sparse_tensor(b.coords, b.feats))  # (M, W)
        keep = b.labels >= 0
        feats.append(f[keep].cpu())
        labels.append(b.labels[keep].cpu())
    feats, labels = torch.cat(feats), torch.cat(labels)
    if len(feats) > max_size:
        pick = torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed))
        pick = pick[:max_size]
        feats, labels = feats[pick], labels[pick]
    return feats, labels


def run_knn_probe(cfg, model, train_set, eval_set, run, out_dir: Path, device, extra: dict,
                  print_fn=print) -> dict:
    """Fill the kNN bank from ``train_set`` (its unaugmented twin) and evaluate on
    ``eval_set``; returns the final evaluation (empty without an evaluation split)."""
    if cfg.resume not in (None, "auto"):
        raise ValueError(f"probe=knn trains nothing, so there is no run to resume; drop "
                         f"resume={cfg.resume}")
    plain = build_seg_dataset(replace(cfg.data, augment=False), cfg.data.train_split,
                              train=True, seed=cfg.seed)
    model = model.to(device)
    feats, labels = knn_bank(model, plain, cfg.knn_bank, cfg.seed, device)
    model.head.fit(feats, labels)
    print_fn(f"finetune-seg: kNN probe (k={cfg.knn_k}, cosine) with a bank of {len(feats)} "
             f"labelled voxels, {feats.shape[1]} features, from {len(plain)} "
             f"{cfg.data.train_split} scenes")
    run.record(0, None)
    if eval_set is None:
        return {}
    return final_evaluation(model, eval_set, cfg, out_dir, device,
                            {**extra, "knn_k": cfg.knn_k, "knn_bank": len(feats)}, print_fn)
