"""Strict, loud loading of pretrained backbone weights into a task model.

Accepted files: every layout :func:`mink_ssl.models.weight_files.read_weights` knows, read
without running anything from the file's pickle:

- a backbone exported by pretraining (``backbone.pth``, :func:`mink_ssl.models.save_model`,
  format ``mink_ssl.model/1``): its ``state_dict``;
- a training checkpoint (``checkpoint_<it>.pth``, :mod:`mink_ssl.engine.checkpoint`, format
  ``mink_ssl.checkpoint/1``), a fine-tuning checkpoint (``mink_ssl.seg_checkpoint/1``) or a
  segmentation model (``mink_ssl.seg_model/1``): their ``backbone`` entry;
- the released checkpoints: PointContrast's and CSC's pretraining files (``state_dict`` with
  ``curr_iter``, and PointContrast's OmegaConf ``config``), their fine-tuned semseg and VoteNet
  files, any ``{"state_dict": ...}`` and a bare state dict of tensors; a backbone under a key
  prefix (``module.``, ``encoder.``, ...) is found by its stem and the prefix removed, said in
  the report.

Rules: a missing file is an error; the file's architecture (recorded in the file, or inferred
from its key names and shapes) must match the model's; every key of the file must land on a key
of the target module (after ``prefix``) with the same shape, and every key of the model must come from the file, except the task layers
(``model.task_layers``: the head, or ``backbone.final.`` where the backbone's final layer is
rebuilt for the task as the released code does). File keys that land on a task layer (the
pretrained ``final.kernel`` / ``final.bias``) are dropped, whatever their shape, and listed in the
report. Anything else raises ``ValueError`` naming the keys, with a hint when all unexpected keys
share an extra prefix. Nothing is ever loaded partially.

The released code (``load_state_with_same_shape``) loads every key whose name and shape match and
silently skips the rest; on a rebuilt final layer that skips exactly ``final.kernel`` and
``final.bias``, which is what is dropped here, but here any other mismatch is an error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from mink_ssl.models.weight_files import read_weights
#: constructor arguments that decide tensor names and shapes (bn_momentum, normalize_output
#: do not, and may differ between pretraining and fine-tuning)
from mink_ssl.models.weight_files.layouts import ARCHITECTURE_KEYS
_SHOW = 8  # keys listed per problem in error messages


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    loaded: model keys set from the file; allowed_missing: model keys left at their
    initialisation (the task layers); dropped: keys of the file not loaded because they land on
    a task layer (e.g. ``final.kernel``, ``final.bias``); matched_fraction: loaded / all model
    keys; matched_elements: the same fraction counted in tensor elements.
    """

    path: Path
    source: str
    loaded: list[str]
    allowed_missing: list[str]
    matched_fraction: float
    matched_elements: float
    dropped: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    def summary(self) -> str:
        n, total = len(self.loaded), len(self.loaded) + len(self.allowed_missing)
        layers = sorted({".".join(k.split(".")[:2]) if k.startswith("backbone.") else
                         k.split(".")[0] for k in self.allowed_missing})
        kept = (f"; left at initialisation (task layers): {len(self.allowed_missing)} tensors of "
                f"{', '.join(layers)}" if self.allowed_missing else "")
        dropped = (f"; dropped from the file (task layer rebuilt): {', '.join(self.dropped)}"
                   if self.dropped else "")
        notes = "".join(f"; {n}" for n in self.notices)
        return (f"pretrained: {self.path} ({self.source}): loaded {n}/{total} tensors "
                f"({100 * self.matched_fraction:.1f}% of keys, {100 * self.matched_elements:.1f}%"
                f" of elements){kept}{dropped}{notes}")


def _listing(keys: Sequence[str]) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _extra_prefix(unexpected: list[str], targets: set[str], prefix: str) -> str | None:
    """A leading ``something.`` shared by all unexpected keys whose removal makes them fit."""
    first = unexpected[0].split(".")[0] + "."
    if all(k.startswith(first) and prefix + k[len(first):] in targets for k in unexpected):
        return first
    return None


def load_pretrained(model: nn.Module, path: str | os.PathLike, *, prefix: str = "backbone.",
                    allow_missing: Sequence[str] | None = None,
                    architecture: dict | None = None) -> LoadReport:
    """Load the backbone weights of ``path`` into ``model`` strictly (see the module docstring).

    Args:
        model: the task model, e.g. a :class:`~mink_ssl.models.heads.SegmentationModel`.
        path: pretrained file.
        prefix: where the file's keys live in ``model`` (``"backbone."``; ``""`` for a bare
            backbone).
        allow_missing: key prefixes of ``model`` that stay at their initialisation (the task
            layers; file keys landing there are dropped); None: ``model.task_layers``, or
            ``("head.",)`` for a model without it.
        architecture: the model's backbone constructor arguments (``backbone.config()``), checked
            against the file's where it records them; None: taken from ``model.backbone``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} do not exist; give an existing file "
                                "or pretrained=null to train from scratch")
    wf = read_weights(path)
    source, file_arch, desc = wf.state_dict, wf.architecture, wf.source
    if allow_missing is None:
        allow_missing = tuple(getattr(model, "task_layers", ("head.",)))
    allow = tuple(allow_missing)
    if architecture is None and hasattr(model, "backbone") and hasattr(model.backbone, "config"):
        architecture = model.backbone.config()
    # a rebuilt final layer makes the file's output width irrelevant
    arch_keys = [k for k in ARCHITECTURE_KEYS
                 if not (k == "out_channels" and (prefix + "final.").startswith(allow))]
    if architecture is not None:
        diff = [f"{k}: file {file_arch.get(k)!r} vs model {architecture.get(k)!r}"
                for k in arch_keys if file_arch.get(k) is not None
                and file_arch.get(k) != architecture.get(k)
                and not (k == "name" and architecture.get(k) in wf.equivalent_names)]
        if diff:
            hint = ("; a 1-channel backbone was pretrained on data.features=ones1: fine-tune with "
                    "data.features=ones1, or pretrain on a 3-channel mode (ones_jitter)"
                    if file_arch.get("in_channels") == 1 else "")
            raise ValueError(f"{path} holds a different backbone architecture ({'; '.join(diff)}; "
                             f"{wf.architecture_source}); "
                             "configure the model like the pretraining run (e.g. model=<same> "
                             f"model.out_channels=<same>){hint}")
    bad = [k for k, v in source.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path} ({desc}) holds non-finite values (NaN or inf) in {len(bad)} "
                         f"tensor(s): {_listing(bad)}; these weights are broken (a diverged run "
                         "or a damaged file): use an earlier checkpoint or another copy")
    target = model.state_dict()
    mapped = {prefix + k: v for k, v in source.items()}
    dropped = [k[len(prefix):] for k in mapped if k.startswith(allow)]
    mapped = {k: v for k, v in mapped.items() if not k.startswith(allow)}
    unexpected = [k[len(prefix):] for k in mapped if k not in target]
    missing = [k for k in target if k not in mapped]
    not_allowed = [k for k in missing if not k.startswith(allow)]
    shapes = [f"{k[len(prefix):]} {tuple(v.shape)} vs {tuple(target[k].shape)}"
              for k, v in mapped.items() if k in target and v.shape != target[k].shape]
    if unexpected or not_allowed or shapes:
        problems = []
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s) in the file: "
                            f"{_listing(unexpected)}")
            extra = _extra_prefix(unexpected, set(target), prefix)
            if extra:
                problems.append(f"every unexpected key carries the extra prefix {extra!r} (saved "
                                f"from a wrapper?); strip it: "
                                f"{{k.removeprefix({extra!r}): v for k, v in state.items()}}")
        if not_allowed:
            problems.append(f"{len(not_allowed)} model key(s) missing from the file (only "
                            f"{list(allow_missing)} may be): {_listing(not_allowed)}")
        if shapes:
            problems.append(f"{len(shapes)} shape mismatch(es) (file vs model): "
                            f"{_listing(shapes)}")
        problems += wf.notices
        if file_arch.get("name") is None:
            problems.append(f"architecture {wf.architecture_source}")
        raise ValueError(f"cannot load {path} ({desc}) strictly: " + "; ".join(problems))
    merged = dict(target)
    merged.update({k: v.to(target[k].dtype) for k, v in mapped.items()})
    model.load_state_dict(merged, strict=True)
    loaded = [k for k in target if k in mapped]
    elements = sum(target[k].numel() for k in loaded)
    total_elements = sum(v.numel() for v in target.values()) or 1
    return LoadReport(path=path, source=desc, loaded=loaded, allowed_missing=missing,
                      matched_fraction=len(loaded) / max(len(target), 1),
                      matched_elements=elements / total_elements, dropped=dropped,
                      notices=list(wf.notices))
