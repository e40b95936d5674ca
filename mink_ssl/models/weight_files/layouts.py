"""Every weights file a user may hold, recognised: its layout, its backbone and its architecture.

:func:`read_weights` reads a file with the safe reader (:mod:`.safe_pickle`, nothing in the
file is run) and answers with a :class:`WeightsFile`: the backbone's state dict under our key
names, the architecture (recorded in the file where it records one, otherwise inferred from the
key names and shapes, and it says which), the iteration, the config it carries as plain data,
and notices for whatever it set aside. Layouts:

===============================  ==========================================================
layout                           recognised by
===============================  ==========================================================
``mink_ssl.*/1`` (ours)          the ``format`` tag; architecture in its ``model`` entry
PointContrast pretraining        ``state_dict``, ``curr_iter``, ``config`` (an OmegaConf
                                 DictConfig whose ``net.model``, ``net.model_n_out`` and
                                 ``net.conv1_kernel_size`` name the network)
CSC pretraining                  ``state_dict``, ``curr_iter``, no ``config``
fine-tuning checkpoint           ``state_dict``, ``iteration``, ``arch`` (PointContrast's and
(PointContrast / CSC semseg)     CSC's downstream code; ``best_val`` or ``best_val_miou``)
detection checkpoint (VoteNet)   ``state_dict``, ``epoch``, ``optimizer_state_dict``
other ``state_dict`` / ``model_state`` checkpoints, and a bare state dict of tensors
===============================  ==========================================================

Kernel order: the released code (PointContrast, CSC, their semseg and VoteNet backbones) builds
its residual blocks' 3x3x3 convolutions with MinkowskiEngine 0.4's ``RegionType.HYBRID``, whose
27 taps come in another order than the hypercube's (ME 0.5 removed HYBRID; docs/fidelity.md
"MinkowskiEngine 0.4.3 vs 0.5.4"). Files in those layouts have their block kernels reordered to
ours on read (``kernel_order="auto"``) and the report says so; our own files and other state
dicts are in hypercube order already. ``kernel_order="me0.4-hybrid"`` / ``"hypercube"`` decide it
for a file whose layout cannot tell (e.g. a bare state dict extracted from a released file).

Key prefixes: the backbone is found by its stem key ``conv0p1s1.kernel``. Where it sits under a
prefix (``module.`` of DistributedDataParallel, ``encoder.``, ``backbone.``, a detector's
``backbone_net.net.``), the prefix is removed and said; keys outside the backbone (a detector's
heads, a projector) are listed and not loaded.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mink_ssl.formats.model_files import BACKBONE_ENTRY, verify_checksum
from mink_ssl.models.weight_files.safe_pickle import Foreign, plain_data, safe_torch_load

STEM = "conv0p1s1.kernel"
#: constructor arguments that decide tensor names and shapes
ARCHITECTURE_KEYS = ("name", "in_channels", "out_channels", "stem_kernel_size", "dimension")


@dataclass
class WeightsFile:
    """A weights file, understood. ``state_dict``: the backbone's tensors under our key names;
    ``architecture``: constructor arguments (``ARCHITECTURE_KEYS``); ``architecture_source``:
    how they were found; ``layout``: which program wrote the file; ``entry``: where in the file
    the state dict was; ``prefix``: the key prefix removed (None: none)."""

    path: Path
    layout: str
    entry: str
    state_dict: dict[str, torch.Tensor]
    architecture: dict[str, Any]
    architecture_source: str
    prefix: str | None = None
    #: registered names with the same structure as ``architecture["name"]`` (same weights)
    equivalent_names: list[str] = field(default_factory=list)
    iteration: int | None = None
    config: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    #: the tap order the file's block kernels were read in (``state_dict`` is in ours)
    kernel_order: str = "hypercube"

    @property
    def source(self) -> str:
        prefix = f", prefix {self.prefix!r} removed" if self.prefix else ""
        return f"{self.layout}, entry {self.entry!r}{prefix}"

    def parameter_count(self) -> int:
        """Elements of the learned tensors (batch-norm running statistics not counted)."""
        return sum(v.numel() for k, v in self.state_dict.items()
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


KERNEL_ORDERS = ("auto", "me0.4-hybrid", "hypercube")
#: the layouts written by the released code, whose block kernels are in HYBRID order
RELEASED_LAYOUTS = ("PointContrast pretraining checkpoint", "CSC pretraining checkpoint",
                    "fine-tuning checkpoint (PointContrast / CSC semseg)",
                    "detection checkpoint (VoteNet)")


def hybrid_offsets() -> list[tuple[int, int, int]]:
    """The 27 offsets of ME 0.4's ``RegionType.HYBRID`` 3x3x3 kernel with cube axes, in tap
    order: from the centre; then for x, y and z in turn, after the offsets listed so far, each of
    them again at -1 and at +1 on that axis (``convert_region_type`` in ME 0.4.3's
    ``Common.py``)."""
    offsets = [(0, 0, 0)]
    for axis in range(3):
        offsets = offsets + [tuple(step if a == axis else o[a] for a in range(3))
                             for o in offsets for step in (-1, 1)]
    return offsets


def hybrid_to_hypercube() -> list[int]:
    """``perm`` with ``W_ours = W_hybrid[perm]``: our tap ``k = ix + 3*(iy + 3*iz)`` (offset
    ``i - 1`` per axis, x fastest) takes the HYBRID tap of the same offset."""
    where = {o: j for j, o in enumerate(hybrid_offsets())}
    return [where[(k % 3 - 1, k // 3 % 3 - 1, k // 9 - 1)] for k in range(27)]


def block_kernels(state: dict[str, torch.Tensor]) -> list[str]:
    """The residual blocks' 3x3x3 kernels: the convolutions the released code built HYBRID."""
    return [k for k, v in state.items() if k.startswith("block") and k.endswith(".kernel")
            and v.dim() == 3 and v.shape[0] == 27]


def _kernel_order(layout: str, requested: str, state: dict) -> tuple[dict, str, str]:
    """(state in our order, the order the file was read in, a notice or '')."""
    if requested not in KERNEL_ORDERS:
        raise ValueError(f"kernel_order must be one of {KERNEL_ORDERS}, got {requested!r}")
    order = requested if requested != "auto" else (
        "me0.4-hybrid" if layout in RELEASED_LAYOUTS else "hypercube")
    blocks = block_kernels(state)
    if order == "hypercube" or not blocks:
        return state, order, ""
    perm = torch.tensor(hybrid_to_hypercube(), dtype=torch.int64)
    state = {k: (v[perm].clone() if k in blocks else v) for k, v in state.items()}
    why = "its layout is the released code's" if requested == "auto" else "as requested"
    return state, order, (f"{len(blocks)} residual-block 3x3x3 kernels reordered from ME 0.4's "
                          f"HYBRID tap order to ours ({why}; docs/fidelity.md)")


def read_weights(path: str | os.PathLike, kernel_order: str = "auto") -> WeightsFile:
    """The :class:`WeightsFile` of ``path`` (see the module docstring); ``ValueError`` naming the
    file for anything it cannot understand, :class:`~.safe_pickle.UnsafeFileError` for a file
    that names code to run. ``kernel_order``: one of ``KERNEL_ORDERS`` (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    raw, _ = safe_torch_load(path)
    foreign: list[str] = []
    obj = plain_data(raw, foreign)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds {_describe(obj)}, not a state dict or a checkpoint")
    layout, entry, recorded, extra = _layout(path, obj)
    state = obj[entry] if entry != "<top>" else obj
    state, prefix, outside = _backbone(path, state, entry)
    state, order, reordered = _kernel_order(layout, kernel_order, state)
    notices = [reordered] if reordered else []
    if prefix:
        notices.append(f"keys under {prefix!r} are the backbone; the prefix was removed")
    if outside:
        notices.append(f"{len(outside)} tensor(s) outside the backbone not loaded: "
                       f"{_groups(outside)}")
    if foreign:
        notices.append(f"objects of unknown classes kept as inert records (not run): "
                       f"{'; '.join(foreign[:6])}{' ...' if len(foreign) > 6 else ''}")
    inferred = infer_architecture(state, path)
    architecture, how = _reconcile(path, recorded, inferred)
    config = obj.get("config") if isinstance(obj.get("config"), dict) else None
    iteration = next((obj[k] for k in ("curr_iter", "iteration") if isinstance(obj.get(k), int)),
                     None)
    if iteration is None and isinstance(obj.get("state"), dict):
        iteration = obj["state"].get("iteration")
    same = inferred["candidates"] if inferred else [architecture.get("name")]
    return WeightsFile(path, layout, entry, state, architecture, how, prefix, same, iteration,
                       config, extra, notices, order)


def _describe(obj) -> str:
    return f"a call to {obj.name} (not run)" if isinstance(obj, Foreign) else \
        f"a {type(obj).__name__}"


def _layout(path: Path, obj: dict) -> tuple[str, str, dict, dict]:
    """(layout, entry of the state dict, architecture the file records, other facts)."""
    fmt = obj.get("format")
    if fmt is not None:
        if fmt not in BACKBONE_ENTRY:
            raise ValueError(f"{path} has format {fmt!r}; weights can come from "
                             f"{sorted(BACKBONE_ENTRY)}, a released checkpoint or a state dict")
        verify_checksum(obj, path)
        entry = BACKBONE_ENTRY[fmt]
        if not isinstance(obj.get(entry), dict):
            raise ValueError(f"{path} (format {fmt!r}) has no {entry!r} entry")
        model = obj.get("model") if isinstance(obj.get("model"), dict) else {}
        return fmt, entry, {k: model[k] for k in ARCHITECTURE_KEYS if k in model}, {}
    if isinstance(obj.get("state_dict"), dict):
        if "curr_iter" in obj and isinstance(obj.get("config"), dict):
            net = obj["config"].get("net") if isinstance(obj["config"].get("net"), dict) else {}
            recorded = {k: net[src] for k, src in (("name", "model"), ("out_channels",
                        "model_n_out"), ("stem_kernel_size", "conv1_kernel_size"))
                        if isinstance(net.get(src), (str, int))}
            return "PointContrast pretraining checkpoint", "state_dict", recorded, {}
        if "curr_iter" in obj:
            return "CSC pretraining checkpoint", "state_dict", {}, {}
        if "arch" in obj and "iteration" in obj:
            extra = {k: obj[k] for k in ("epoch", "best_val", "best_val_miou", "best_val_iter")
                     if k in obj}
            recorded = {"name": obj["arch"]} if isinstance(obj["arch"], str) else {}
            return "fine-tuning checkpoint (PointContrast / CSC semseg)", "state_dict", \
                recorded, extra
        if "optimizer_state_dict" in obj and "epoch" in obj:
            return "detection checkpoint (VoteNet)", "state_dict", {}, \
                {k: obj[k] for k in ("epoch", "best_mAP") if k in obj}
        return "checkpoint with a 'state_dict' entry", "state_dict", {}, {}
    if isinstance(obj.get("model_state"), dict):
        return "checkpoint with a 'model_state' entry", "model_state", {}, {}
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "bare state dict", "<top>", {}, {}
    raise ValueError(f"{path} is neither a mink-ssl file, a released checkpoint nor a state dict "
                     f"(top-level keys {sorted(map(str, obj))[:8]})")


def _backbone(path: Path, state: dict, entry: str) -> tuple[dict, str | None, list[str]]:
    """(backbone tensors under our names, prefix removed, keys outside the backbone)."""
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entry {entry!r} holds non-tensors at {bad[:4]} "
                         f"({_describe(state[bad[0]])}); it is not a state dict")
    stems = [k[:-len(STEM)] for k in state if k == STEM or k.endswith("." + STEM)]
    if not stems:
        return dict(state), None, []  # not a Res16UNet: the caller's strict load says why
    if len(stems) > 1:
        raise ValueError(f"{path} holds {len(stems)} networks (stems under prefixes {stems}); "
                         "extract the one you want as a bare state dict")
    prefix = stems[0]
    inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    outside = [k for k in state if not k.startswith(prefix)]
    return inside, prefix or None, outside


def _groups(keys: list[str]) -> str:
    count = Counter(k.split(".")[0] for k in keys)
    return ", ".join(f"{g}. ({n})" for g, n in sorted(count.items()))


def infer_architecture(state: dict[str, torch.Tensor], path: Path | None = None) -> dict | None:
    """The Res16UNet whose key names and shapes ``state`` has, as constructor arguments plus
    ``"candidates"`` (every registered name with that structure); None if ``state`` is not one."""
    from mink_ssl.models.registry import MODELS
    from mink_ssl.models.res16unet import Bottleneck

    stem = state.get(STEM)
    if stem is None or stem.dim() != 3 or "block1.0.conv1.kernel" not in state:
        return None
    k = round(stem.shape[0] ** (1 / 3))
    if k ** 3 != stem.shape[0]:
        raise ValueError(f"{path}: the stem kernel has {stem.shape[0]} offsets, not a cube; "
                         "only 3D networks are supported")
    bottleneck = "block1.0.conv3.kernel" in state
    layers = tuple(len({key.split(".")[1] for key in state if key.startswith(f"block{i}.")
                        and key.split(".")[1].isdigit()}) for i in range(1, 9))
    last = "conv3" if bottleneck else "conv2"
    planes = tuple(int(state[f"block{i}.0.{last}.kernel"].shape[-1]) //
                   (Bottleneck.expansion if bottleneck else 1)
                   if f"block{i}.0.{last}.kernel" in state else 0 for i in range(1, 9))
    final = state.get("final.kernel")
    candidates = [name for name in MODELS.names()
                  if getattr(MODELS.get(name), "BLOCK", None) is not None
                  and (MODELS.get(name).BLOCK is Bottleneck) == bottleneck
                  and tuple(MODELS.get(name).LAYERS) == layers
                  and tuple(MODELS.get(name).PLANES) == planes
                  and MODELS.get(name).INIT_DIM == stem.shape[2]]
    return {"name": candidates[0] if candidates else None, "candidates": candidates,
            "in_channels": int(stem.shape[1]),
            "out_channels": int(final.shape[-1]) if final is not None else None,
            "stem_kernel_size": k, "dimension": 3,
            "structure": {"block": "Bottleneck" if bottleneck else "BasicBlock",
                          "layers": layers, "planes": planes, "init_dim": int(stem.shape[2])}}


def _reconcile(path: Path, recorded: dict, inferred: dict | None) -> tuple[dict, str]:
    """The architecture to use, and how it was found; recorded and inferred must agree."""
    if inferred is None:
        if recorded:
            return dict(recorded), "recorded in the file (the keys are not a Res16UNet's)"
        raise ValueError(f"{path}: its tensors are not a Res16UNet's (no {STEM!r} with "
                         "residual blocks), and the file records no architecture")
    arch = {k: inferred[k] for k in ARCHITECTURE_KEYS}
    if inferred["name"] is None:  # incomplete or foreign: a strict load names the keys
        return dict(arch, **recorded), (
            f"inferred from the key names and shapes, but no registered network has this "
            f"structure ({inferred['structure']}; each class's LAYERS and PLANES are in "
            "mink_ssl/models/res16unet.py)")
    if not recorded:
        return arch, "inferred from the key names and shapes"
    diff = [f"{k}: recorded {v!r}, tensors say {inferred[k]!r}" for k, v in recorded.items()
            if k in inferred and v != inferred[k]
            and not (k == "name" and v in inferred["candidates"])]
    if diff:
        raise ValueError(f"{path}: the architecture it records disagrees with its tensors "
                         f"({'; '.join(diff)}); the file is inconsistent, re-export it")
    arch.update(recorded)
    return arch, "recorded in the file, checked against the key names and shapes"
