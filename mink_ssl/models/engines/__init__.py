"""Sparse engines: what runs a network's convolutions. The only place that imports one.

Two engines run the same networks with the same weights:

- ``minkowski``: MinkowskiEngine 0.5.4, the engine of the papers' released code (the reference);
- ``spconv``: spconv 2 computes the kernel maps (which input voxel meets which output voxel
  through which kernel offset); the arithmetic over them is ours: gather, matrix product and
  ``index_add_`` in torch on CPU (right at any thread count), spconv's own kernels on CUDA.

An engine is a set of layer constructors (:class:`Engine`): ``conv``, ``conv_transpose``,
``batch_norm``, ``relu`` and ``cat``, plus ``to_native`` / ``to_voxels`` between
:class:`~mink_ssl.sparse.SparseVoxels` and the engine's own tensor. Every layer holds its
parameters in MinkowskiEngine's names, shapes and kernel-offset order, so a state dict moves
between engines unchanged (see :mod:`mink_ssl.models.engines.spconv_engine` for the order).
Nothing above :mod:`mink_ssl.models` sees an engine's tensor.
"""
from __future__ import annotations

import importlib
from typing import Protocol

import torch.nn as nn

from mink_ssl.sparse import SparseVoxels

#: the engines (the first is the default, mink_ssl.models.res16unet.DEFAULT_ENGINE)
ENGINES = ("spconv", "minkowski")
#: what to install for each engine
INSTALL_HINTS = {
    "minkowski": "MinkowskiEngine 0.5.4: `make setup` builds it (scripts/build_minkowski.py)",
    "spconv": "spconv 2.3: `pip install spconv` (CPU), `pip install spconv-cu126` (CUDA 12.x) "
              "or `pip install spconv-triton` (any recent GPU); `make setup` picks one",
}
#: engine -> (our module, the packages that can back it, in order of preference); spconv's
#: kernel maps and CUDA kernels come from spconv 2 (CPU or CUDA wheels) or from spconv-triton
_MODULES = {"minkowski": ("mink_ssl.models.engines.minkowski_engine", ("MinkowskiEngine",)),
            "spconv": ("mink_ssl.models.engines.spconv_engine",
                       ("spconv.pytorch", "spconv_triton.pytorch"))}


class Engine(Protocol):
    """Layer constructors and conversions of one sparse engine (see the module docstring)."""

    name: str

    def conv(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
             bias: bool = False, dimension: int = 3) -> nn.Module: ...

    def conv_transpose(self, in_channels: int, out_channels: int, kernel_size: int = 2,
                       stride: int = 2, bias: bool = False, dimension: int = 3) -> nn.Module: ...

    def batch_norm(self, channels: int, momentum: float) -> nn.Module: ...

    def relu(self) -> nn.Module: ...

    def cat(self, *xs): ...

    def is_conv(self, module: nn.Module) -> bool: ...

    def to_native(self, x: SparseVoxels, align: int = 16): ...

    def to_voxels(self, t) -> SparseVoxels: ...


def check_engine(name: str) -> str:
    """``name`` if it is a known engine; ``ValueError`` listing the valid names otherwise."""
    if name not in ENGINES:
        raise ValueError(f"model.engine must be one of {ENGINES}, got {name!r}")
    return name


def engine_unavailable(name: str) -> str | None:
    """Why engine ``name`` cannot run here (its package does not import), or None."""
    check_engine(name)
    reasons = []
    for package in _MODULES[name][1]:
        try:
            importlib.import_module(package)
            return None
        except Exception as e:  # an ImportError, or a broken build failing while it loads
            reasons.append(f"{package} does not import ({type(e).__name__}: {e})")
    return "; ".join(reasons)


def available_engines() -> tuple[str, ...]:
    return tuple(e for e in ENGINES if engine_unavailable(e) is None)


def get_engine(name: str) -> Engine:
    """The engine ``name``; an error naming the missing package and how to install it."""
    reason = engine_unavailable(name)
    if reason is not None:
        others = [e for e in available_engines() if e != name]
        alt = f"; or run on {others[0]} (model.engine={others[0]})" if others else ""
        raise RuntimeError(f"model.engine={name} cannot run here: {reason}. Install "
                           f"{INSTALL_HINTS[name]}{alt}")
    return importlib.import_module(_MODULES[name][0]).ENGINE


__all__ = ["ENGINES", "Engine", "available_engines", "check_engine", "engine_unavailable",
           "get_engine"]
