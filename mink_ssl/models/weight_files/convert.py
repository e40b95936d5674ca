"""Converting a weights file: to our tagged format, to spconv's layout, to Pointcept's networks.

Every target is exact or refused; nothing is converted approximately.

- ``mink-ssl``: ``mink_ssl.model/1`` (what ``save_model`` writes): the network rebuilt from the
  file's architecture, loaded strictly, saved as plain data (``torch.load(weights_only=True)``).
- ``spconv``: a state dict for a network built from spconv 2's own layers under our module
  names (``SubMConv3d`` / ``SparseConv3d`` / ``SparseInverseConv3d`` for ``...kernel``,
  ``BatchNorm1d`` for ``...bn``): kernels ``.weight`` in spconv's ``(Cout, k, k, k, Cin)``
  layout for index columns in our order (batch, x, y, z), batch norms without the ``.bn``
  wrapper, the final bias as ``(Cout,)``. A 1x1 kernel is the raw ``(Cin, Cout)`` memory viewed
  as ``(Cout, 1, 1, 1, Cin)``: spconv 2.1 to 2.3 multiply a 1x1 conv by
  ``weight.view(Cin, Cout)`` (spconv issue 450), and the tests run the real spconv layers.
- ``pointcept-minkunet``: Pointcept's MinkowskiEngine ``MinkUNet`` family, whose networks are
  ours under other names (same keys, shapes, order, batch-norm eps 1e-5, stem kernel 5):
  ``{"state_dict": {"backbone.<key>": ...}, "epoch": 0}``, what Pointcept's checkpoint loader
  and its test tool read.
- ``pointcept-spunet``: Pointcept's spconv ``SpUNet-v1m1`` is a different network; refused, the
  differences named (:data:`SPUNET_V1M1_DIFFERENCES`).
"""
from __future__ import annotations

from typing import Any

import torch

from mink_ssl.models.weight_files.layouts import WeightsFile

TARGETS = ("mink-ssl", "spconv", "pointcept-minkunet", "pointcept-spunet")

#: Pointcept's MinkUNet classes (pointcept/models/sparse_unet/mink_unet.py) by structure:
#: (block, LAYERS, PLANES) -> name; INIT_DIM 32 and stem kernel 5 throughout
_L14, _L18, _L34 = (1,) * 8, (2,) * 8, (2, 3, 4, 6, 2, 2, 2, 2)
POINTCEPT_MINKUNETS = {
    ("BasicBlock", _L14, (32, 64, 128, 256, 128, 128, 96, 96)): "MinkUNet14A",
    ("BasicBlock", _L14, (32, 64, 128, 256, 128, 128, 128, 128)): "MinkUNet14B",
    ("BasicBlock", _L14, (32, 64, 128, 256, 192, 192, 128, 128)): "MinkUNet14C",
    ("BasicBlock", _L14, (32, 64, 128, 256, 384, 384, 384, 384)): "MinkUNet14D",
    ("BasicBlock", _L18, (32, 64, 128, 256, 128, 128, 96, 96)): "MinkUNet18A",
    ("BasicBlock", _L18, (32, 64, 128, 256, 128, 128, 128, 128)): "MinkUNet18B",
    ("BasicBlock", _L18, (32, 64, 128, 256, 384, 384, 384, 384)): "MinkUNet18D",
    ("BasicBlock", _L34, (32, 64, 128, 256, 256, 128, 96, 96)): "MinkUNet34C",
    ("BasicBlock", _L34, (32, 64, 128, 256, 256, 128, 64, 32)): "MinkUNet34B",
}
POINTCEPT_STEM_KERNEL = 5

#: why SpUNet-v1m1 (pointcept/models/sparse_unet/spconv_unet_v1m1_base.py) is not our network
SPUNET_V1M1_DIFFERENCES = (
    "encoder stages 2-4: SpUNet's stride-2 conv changes the channels and its blocks have no "
    "projection; ours keeps them and the stage's first block changes them through a 1x1 "
    "projection (174 of SpUNet's 356 tensors have no counterpart)",
    "batch-norm eps: SpUNet 1e-3 in every batch norm, ours 1e-5 (changes every output)",
    "batch-norm momentum: SpUNet 0.01, ours 0.05 / 0.02 outside the blocks and 0.1 inside",
)


def convert(wf: WeightsFile, target: str) -> tuple[dict, list[str]]:
    """``(object to save, notes for the user)`` of ``wf`` in ``target``'s layout."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if wf.architecture.get("name") is None:
        raise ValueError(f"{wf.path}: cannot convert, its architecture is "
                         f"{wf.architecture_source}")
    return {"mink-ssl": to_mink_ssl, "spconv": to_spconv,
            "pointcept-minkunet": to_pointcept_minkunet,
            "pointcept-spunet": to_pointcept_spunet}[target](wf)


def rebuild(wf: WeightsFile, engine: str | None = None):
    """Our network with ``wf``'s weights, loaded strictly (the proof that they fit)."""
    from mink_ssl.models import build_model

    arch = wf.architecture
    kwargs: dict[str, Any] = {k: arch[k] for k in ("in_channels", "out_channels",
                                                     "stem_kernel_size")}
    momentum = _recorded_bn_momentum(wf)
    if momentum is not None:
        kwargs["bn_momentum"] = momentum
    if engine is not None:
        kwargs["engine"] = engine
    model = build_model(arch["name"], **kwargs)
    model.load_state_dict(wf.state_dict, strict=True)
    return model


def _recorded_bn_momentum(wf: WeightsFile) -> float | None:
    opt = (wf.config or {}).get("opt") if isinstance(wf.config, dict) else None
    value = opt.get("bn_momentum") if isinstance(opt, dict) else None
    return float(value) if isinstance(value, (int, float)) and 0 < value <= 1 else None


def to_mink_ssl(wf: WeightsFile) -> tuple[dict, list[str]]:
    from mink_ssl.models import model_state

    state = model_state(rebuild(wf))
    state["converted_from"] = {"file": wf.path.name, "layout": wf.layout,
                               "architecture": wf.architecture_source,
                               "iteration": wf.iteration, "kernel_order": wf.kernel_order}
    return state, [f"architecture {wf.architecture['name']} "
                   f"({wf.architecture_source}); load it with pretrained=<this file>"] + [
                       n for n in wf.notices if "HYBRID" in n]


def spconv_weight(kernel: torch.Tensor) -> torch.Tensor:
    """One of our kernels (``(K, Cin, Cout)``, or ``(Cin, Cout)`` for 1x1) in spconv 2's
    ``(Cout, k, k, k, Cin)`` layout, for index columns in our order (batch, x, y, z)."""
    if kernel.dim() == 2:  # 1x1: spconv multiplies by weight.view(Cin, Cout)
        cin, cout = kernel.shape
        return kernel.contiguous().reshape(cout, 1, 1, 1, cin).clone()
    volume, cin, cout = kernel.shape
    k = round(volume ** (1 / 3))
    if k ** 3 != volume:
        raise ValueError(f"a kernel of {volume} offsets is not a 3D cube")
    # ours: k = ix + kx * (iy + ky * iz), x fastest; spconv: (Cout, k0, k1, k2, Cin), last fastest
    return kernel.reshape(k, k, k, cin, cout).permute(4, 2, 1, 0, 3).contiguous()


def to_spconv(wf: WeightsFile) -> tuple[dict, list[str]]:
    rebuild(wf)  # strict: the file is a whole network of ours
    out = {}
    for key, value in wf.state_dict.items():
        if key.endswith(".kernel"):
            out[key[:-len("kernel")] + "weight"] = spconv_weight(value)
        elif key == "final.bias":
            out["final.bias"] = value.reshape(-1).clone()
        elif ".bn." in key:
            out[key.replace(".bn.", ".")] = value.clone()
        else:
            raise ValueError(f"{wf.path}: no spconv counterpart for {key!r}")
    return {"state_dict": out, "layout": "spconv 2 (Cout, k, k, k, Cin); coordinates "
            "(batch, x, y, z)", "architecture": dict(wf.architecture)}, [
        "kernels as spconv 2 stores them, (Cout, k, k, k, Cin), for coordinates fed as "
        "(batch, x, y, z) and shifted non-negative by a multiple of 16; 1x1 kernels as spconv "
        "2.1-2.3 read them (weight.view(Cin, Cout)); batch norms as nn.BatchNorm1d (eps 1e-5)"]


def to_pointcept_minkunet(wf: WeightsFile) -> tuple[dict, list[str]]:
    from mink_ssl.models.weight_files.layouts import infer_architecture

    structure = infer_architecture(wf.state_dict)["structure"]
    name = POINTCEPT_MINKUNETS.get((structure["block"], tuple(structure["layers"]),
                                    tuple(structure["planes"])))
    problems = []
    if name is None:
        problems.append(f"no Pointcept MinkUNet has this structure ({structure}); it has "
                        f"{sorted(set(POINTCEPT_MINKUNETS.values()))}")
    if structure["init_dim"] != 32:
        problems.append(f"stem width {structure['init_dim']}, Pointcept's is 32")
    if wf.architecture["stem_kernel_size"] != POINTCEPT_STEM_KERNEL:
        problems.append(f"stem kernel {wf.architecture['stem_kernel_size']}, Pointcept's "
                        f"MinkUNet has {POINTCEPT_STEM_KERNEL} (pretrain with "
                        "model.stem_kernel_size=5 to hand weights to it)")
    if problems:
        raise ValueError(f"{wf.path} cannot be converted to Pointcept's MinkUNet exactly: "
                         + "; ".join(problems))
    rebuild(wf)
    state = {"backbone." + k: v.clone() for k, v in wf.state_dict.items()}
    return {"state_dict": state, "epoch": 0}, [
        f"Pointcept model: {name}(in_channels={wf.architecture['in_channels']}, "
        f"out_channels={wf.architecture['out_channels']}); set these in its config (its "
        "checkpoint loader refuses any shape mismatch; drop final.* for another class count)",
        "Pointcept's MinkUNet uses batch-norm momentum 0.1 everywhere (not stored in weights; "
        "outputs are the same, continued training follows Pointcept's setting)"]


def to_pointcept_spunet(wf: WeightsFile) -> tuple[dict, list[str]]:
    differences = list(SPUNET_V1M1_DIFFERENCES)
    if wf.architecture.get("stem_kernel_size") != POINTCEPT_STEM_KERNEL:
        differences.append(f"stem kernel: SpUNet 5, this file "
                           f"{wf.architecture.get('stem_kernel_size')}")
    raise ValueError(
        f"{wf.path}: Pointcept's SpUNet-v1m1 is not this network, so no exact conversion "
        f"exists: {'; '.join(differences)}. Pointcept's MinkUNet is: use --to "
        "pointcept-minkunet (needs a stem of kernel 5)")
