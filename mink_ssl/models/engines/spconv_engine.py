"""spconv 2 as an engine, with MinkowskiEngine's weights.

What spconv does here: kernel maps. For each convolution it lists, per kernel offset, the pairs
(input row, output row) that the offset connects (``spconv.pytorch.ops.get_indice_pairs``, the
"native" algorithm), and the output voxels of a strided convolution. Maps are computed once per
forward pass and tensor stride and shared by every layer that needs them (the blocks of a stage,
and a transposed convolution with the strided one it inverts).

What we do: the arithmetic. On CPU, for each offset k, ``out.index_add_(0, out_rows,
x[in_rows] @ W[k])`` in torch, whose backward is torch's too. spconv's own CPU kernels are not
used: with more than one OpenMP thread spconv 2.3.8's CPU scatter gives wrong sums that change
from run to run (measured: 0.6-0.9 max abs error against MinkowskiEngine in float64), and its CPU
backward calls ``torch.cuda.current_stream()``, which fails with a CPU-only torch. On CUDA the
same maps go to spconv's own kernels (``spconv.pytorch.functional``), with the kernel permuted to
spconv's layout on the fly.

Weights: every layer holds its parameters exactly as MinkowskiEngine does, so a state dict moves
between engines unchanged:

- a convolution's ``kernel`` is ``(K, C_in, C_out)`` for ``K = k**3 > 1`` (``(C_in, C_out)``
  for a 1x1x1 convolution), its ``bias`` ``(1, C_out)``;
- the K offsets are enumerated with the first spatial axis fastest, ``k = ix + kx * (iy + ky *
  iz)``; odd kernels reach ``(i - k // 2) * tensor_stride`` from the output voxel, the 2x2x2
  strided kernel ``i * tensor_stride`` (from 0), and a transposed convolution sends input voxel
  ``o`` to ``o + i * tensor_stride / 2`` with the same enumeration;
- spconv enumerates offsets with the last axis fastest, so the ME offset of spconv's offset
  ``(ix, iy, iz)`` is ``arange(K).reshape(k, k, k).permute(2, 1, 0)``, and spconv's kernel
  layout ``(C_out, k0, k1, k2, C_in)`` is ``W.reshape(k, k, k, C_in, C_out).permute(4, 2, 1,
  0, 3)``;
- a batch norm is a ``bn`` (``nn.BatchNorm1d``) submodule; parameters are initialised as
  MinkowskiEngine does (uniform in +-1/sqrt(fan), fan = C_in x K, C_out x K when transposed),
  drawing from torch's generator in the same order, so a seed gives the same network on both
  engines.

Coordinates: spconv needs non-negative indices. The batch is shifted by a multiple of the
network's total stride (``align``), so strided outputs fall on the same cells as
MinkowskiEngine's (``floor(c / s) * s``, negative coordinates included), and each level's
indices are ``(c - shift) / s``.

Supported layers (all the Res16UNet family uses): stride-1 convolutions with an odd kernel
(submanifold: the output voxels are the input's), 1x1x1 convolutions, the 2x2x2 stride-2
convolution and its transposed convolution, in 3-D.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from mink_ssl.sparse import SparseVoxels

_NATIVE = None


def _sp():
    """spconv's ``ops`` and ``functional`` modules and its native algorithm, from spconv 2 or,
    where that is not installed, from spconv-triton (the same API on Triton; imported once)."""
    global _NATIVE
    if _NATIVE is None:
        try:
            from spconv.core import ConvAlgo
            from spconv.pytorch import functional, ops
        except ImportError:
            from spconv_triton.core import ConvAlgo
            from spconv_triton.pytorch import functional, ops
        _NATIVE = (ops, functional, ConvAlgo.Native)
    return _NATIVE


def backend() -> str:
    """Which package computes the kernel maps: ``spconv`` or ``spconv_triton``."""
    return _sp()[0].__name__.split(".")[0]


#: which arithmetic runs the maps: "auto" (torch on CPU, spconv's kernels on CUDA), or one of
#: "torch" / "spconv" everywhere (tests compare them; spconv's CPU kernels need one thread)
ARITHMETIC = "auto"


def me_offset_order(k: int) -> torch.Tensor:
    """(k**3,) int64: the MinkowskiEngine kernel index of each spconv kernel offset."""
    return torch.arange(k ** 3).reshape(k, k, k).permute(2, 1, 0).reshape(-1)


def to_spconv_kernel(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """A MinkowskiEngine kernel (k**3, C_in, C_out) in spconv's layout (C_out, k, k, k, C_in)."""
    c_in, c_out = kernel.shape[-2:]
    return kernel.reshape(k, k, k, c_in, c_out).permute(4, 2, 1, 0, 3)  # (C_out, kx, ky, kz, C_in)


@dataclass
class _KernelMap:
    """The pairs of one convolution, offset after offset: ``rows_in`` / ``rows_out`` (P,) int64
    hold every offset's pairs concatenated, ``segments`` the ``(me_offset, start, end)`` of each
    offset's slice; plus spconv's own form for its kernels."""
    n_in: int
    n_out: int
    rows_in: torch.Tensor
    rows_out: torch.Tensor
    segments: list
    identity: int | None  # ME offset whose pairs are (i, i) for every row (a subm centre)
    pairs: torch.Tensor  # (2, K, n_in) int32, -1 padded (spconv's "native" layout)
    counts: torch.Tensor  # (K,) int32


@dataclass
class _Grid:
    """One forward pass's voxel grid: the shift to non-negative indices, the level-0 extent,
    each level's indices and the kernel maps computed so far."""
    shift: torch.Tensor  # (3,) int64
    shape: list  # level-0 extent per axis, a multiple of the alignment
    batch_size: int
    levels: dict = field(default_factory=dict)  # level -> (N_l, 4) int32 indices
    maps: dict = field(default_factory=dict)

    def kernel_map(self, key: tuple, level: int, k: int, subm: bool) -> _KernelMap:
        if key in self.maps:
            return self.maps[key]
        ops, _, native = _sp()
        indices = self.levels[level]
        shape = [s >> level for s in self.shape]
        pad = k // 2 if subm else 0
        out_inds, pairs, counts = ops.get_indice_pairs(
            indices, self.batch_size, shape, native, [k] * 3, [1 if subm else 2] * 3, [pad] * 3,
            [1] * 3, [0] * 3, subm, False)
        if not subm:
            self.levels.setdefault(level + 1, out_inds.contiguous())
        order = me_offset_order(k).tolist()
        volume, centre = k ** 3, (k ** 3) // 2
        counts_list = counts.tolist()
        # spconv's CPU submanifold maps list only the offsets before the centre: offset s
        # connecting (i -> o) means the mirrored offset volume-1-s connects (o -> i), and the
        # centre connects every row to itself. A full listing (centre included) is taken as is.
        half = subm and k > 1 and not any(counts_list[centre:])
        offsets, identity = [], order[centre] if half else None
        for s_off, n in enumerate(counts_list):
            if n == 0:
                continue
            rows_in = pairs[0, s_off, :n].long()
            rows_out = pairs[1, s_off, :n].long()
            if subm and n == len(indices) and torch.equal(rows_in, rows_out):
                identity = order[s_off]
                continue
            offsets.append((order[s_off], rows_in, rows_out))
            if half:
                offsets.append((order[volume - 1 - s_off], rows_out, rows_in))
        if subm and k > 1 and identity != order[centre]:
            raise RuntimeError(f"spconv's map of a {k}x{k}x{k} submanifold convolution does not "
                               "connect every voxel to itself through the centre offset")
        segments, start = [], 0
        for me_k, rows_in, _ in offsets:
            segments.append((me_k, start, start + len(rows_in)))
            start += len(rows_in)
        empty = torch.zeros(0, dtype=torch.int64, device=indices.device)
        m = _KernelMap(len(indices), len(indices) if subm else len(self.levels[level + 1]),
                       torch.cat([o[1] for o in offsets]) if offsets else empty,
                       torch.cat([o[2] for o in offsets]) if offsets else empty,
                       segments, identity, pairs, counts)
        self.maps[key] = m
        return m


class SpconvTensor:
    """The spconv engine's sparse tensor: features, their level's indices and the grid."""

    def __init__(self, feats: torch.Tensor, level: int, grid: _Grid):
        self.feats, self.level, self.grid = feats, level, grid

    @property
    def indices(self) -> torch.Tensor:
        return self.grid.levels[self.level]

    def replace(self, feats: torch.Tensor) -> "SpconvTensor":
        return SpconvTensor(feats, self.level, self.grid)

    def __add__(self, other: "SpconvTensor") -> "SpconvTensor":
        if other.grid is not self.grid or other.level != self.level:
            raise ValueError("cannot add sparse tensors on different voxels")
        return self.replace(self.feats + other.feats)


def _arithmetic(feats: torch.Tensor) -> str:
    if ARITHMETIC != "auto":
        return ARITHMETIC
    return "spconv" if feats.is_cuda else "torch"


#: at most this many feature elements are gathered at once (4 MB in float32): offsets are
#: processed in groups whose gathered rows fit, so a large batch does not hold every offset's
#: copy of the features at the same time
GATHER_ELEMENTS = 1 << 20


def _groups(m: _KernelMap, channels: int):
    """Consecutive offsets grouped so that each group's pairs times ``channels`` stay within
    ``GATHER_ELEMENTS`` (a single offset may exceed it alone): (start, end, segments)."""
    limit = max(GATHER_ELEMENTS // max(channels, 1), 1)
    group, g_start = [], 0
    for seg in m.segments:
        if group and seg[2] - g_start > limit:
            yield g_start, group[-1][2], group
            group, g_start = [], seg[1]
        group.append(seg)
    if group:
        yield g_start, group[-1][2], group


class _GatherMatmulScatter(torch.autograd.Function):
    """``out[dst] += x[src] @ W[k]`` over a kernel map's offsets: per group of offsets one
    gather, one matrix product per offset into one buffer, one scatter-add. The backward
    accumulates into one gradient buffer per tensor (autograd's own backward of a per-offset
    loop would allocate and add a full-size zero gradient per offset)."""

    @staticmethod
    def forward(ctx, feats, kernel, m: _KernelMap, transpose: bool):
        ctx.save_for_backward(feats, kernel)
        ctx.m, ctx.transpose = m, transpose
        src_all, dst_all = (m.rows_out, m.rows_in) if transpose else (m.rows_in, m.rows_out)
        n_out = m.n_in if transpose else m.n_out
        if m.identity is not None:
            out = feats @ kernel[m.identity]  # (N, C_out): the centre maps each row to itself
        else:
            out = feats.new_zeros((n_out, kernel.shape[-1]))
        weights = kernel.unbind(0)  # K views (C_in, C_out), taken once
        for a, b, segments in _groups(m, max(kernel.shape[-2:])):
            sizes = [s1 - s0 for _, s0, s1 in segments]
            x = feats.index_select(0, src_all[a:b])  # (P_g, C_in)
            y = x.new_empty((b - a, kernel.shape[-1]))  # (P_g, C_out)
            for (me_k, _, _), xs, ys in zip(segments, x.split(sizes), y.split(sizes)):
                torch.mm(xs, weights[me_k], out=ys)
            out.index_add_(0, dst_all[a:b], y)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        feats, kernel = ctx.saved_tensors
        m = ctx.m
        src_all, dst_all = (m.rows_out, m.rows_in) if ctx.transpose else (m.rows_in, m.rows_out)
        grad_out = grad_out.contiguous()
        grad_kernel = torch.zeros_like(kernel)  # (K, C_in, C_out); offsets without pairs: 0
        if m.identity is not None:
            grad_feats = grad_out @ kernel[m.identity].T  # (N, C_in)
            grad_kernel[m.identity] = feats.T @ grad_out
        else:
            grad_feats = torch.zeros_like(feats)
        weights_t = kernel.transpose(1, 2).unbind(0)  # K views (C_out, C_in)
        grads = grad_kernel.unbind(0)  # K views (C_in, C_out), accumulated in place
        for a, b, segments in _groups(m, max(kernel.shape[-2:])):
            sizes = [s1 - s0 for _, s0, s1 in segments]
            x = feats.index_select(0, src_all[a:b])  # (P_g, C_in)
            g = grad_out.index_select(0, dst_all[a:b])  # (P_g, C_out)
            gx = x.new_empty(x.shape)  # (P_g, C_in)
            for (me_k, _, _), xs, gs, gxs in zip(segments, x.split(sizes), g.split(sizes),
                                                 gx.split(sizes)):
                grads[me_k].addmm_(xs.T, gs)  # (C_in, C_out)
                torch.mm(gs, weights_t[me_k], out=gxs)
            grad_feats.index_add_(0, src_all[a:b], gx)
        return grad_feats, grad_kernel, None, None


def _torch_apply(feats, kernel, m: _KernelMap, transpose: bool) -> torch.Tensor:
    """sum over offsets of W[k] applied along the map's pairs, in torch."""
    return _GatherMatmulScatter.apply(feats, kernel, m, transpose)


class SpconvConvolution(nn.Module):
    """A convolution of the spconv engine with MinkowskiEngine's parameters (``kernel``,
    ``bias``); see the module docstring for the supported shapes."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 bias: bool = False, dimension: int = 3, transpose: bool = False):
        super().__init__()
        if dimension != 3:
            raise ValueError(f"the spconv engine runs 3-D networks, got dimension={dimension}")
        supported = (kernel_size == stride == 2) if (transpose or stride != 1) else \
            kernel_size % 2 == 1
        if not supported:
            kind = "transposed convolution" if transpose else "convolution"
            raise ValueError(f"the spconv engine has no {kind} with kernel_size={kernel_size}, "
                             f"stride={stride} (it runs odd kernels at stride 1 and 2x2x2 at "
                             "stride 2); use model.engine=minkowski for this network")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.transpose = kernel_size, stride, transpose
        volume = kernel_size ** 3
        shape = (volume, in_channels, out_channels) if volume > 1 else (in_channels, out_channels)
        self.kernel = nn.Parameter(torch.empty(*shape))
        self.bias = nn.Parameter(torch.empty(1, out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MinkowskiEngine's default: uniform in +-1/sqrt(fan), kernel then bias."""
        fan = (self.out_channels if self.transpose else self.in_channels) * self.kernel_size ** 3
        bound = 1.0 / math.sqrt(fan)
        with torch.no_grad():
            self.kernel.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, transpose={self.transpose}, bias={self.bias is not None}")

    def forward(self, x: SpconvTensor) -> SpconvTensor:
        feats, grid, level, k = x.feats, x.grid, x.level, self.kernel_size
        if self.kernel_size == 1:
            out, out_level = feats @ self.kernel, level  # (N, C_out)
        elif self.stride == 1:
            m = grid.kernel_map(("subm", level, k), level, k, subm=True)
            out, out_level = self._convolve(feats, m, "subm"), level
        elif not self.transpose:
            m = grid.kernel_map(("down", level, k), level, k, subm=False)
            out, out_level = self._convolve(feats, m, "down"), level + 1
        else:
            if level == 0 or ("down", level - 1, k) not in grid.maps:
                raise RuntimeError(f"a transposed convolution at tensor stride {2 ** level} "
                                   "inverts a strided convolution of the same pass, and there "
                                   "was none")
            m = grid.maps[("down", level - 1, k)]
            out, out_level = self._convolve(feats, m, "up"), level - 1
        if self.bias is not None:
            out = out + self.bias
        return SpconvTensor(out, out_level, grid)

    def _convolve(self, feats: torch.Tensor, m: _KernelMap, kind: str) -> torch.Tensor:
        if _arithmetic(feats) == "torch":
            return _torch_apply(feats, self.kernel, m, transpose=kind == "up")
        _, functional, native = _sp()
        filters = to_spconv_kernel(self.kernel, self.kernel_size).contiguous()
        feats = feats.contiguous()
        if kind == "subm":
            return functional.indice_subm_conv(feats, filters, m.pairs, m.counts, m.n_out, native)
        if kind == "down":
            return functional.indice_conv(feats, filters, m.pairs, m.counts, m.n_out, native)
        return functional.indice_inverse_conv(feats, filters, m.pairs, m.counts, m.n_in, native)


class SpconvBatchNorm(nn.Module):
    """Batch norm over a sparse tensor's features (``bn``: MinkowskiEngine's key)."""

    def __init__(self, channels: int, momentum: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm1d(channels, momentum=momentum)

    def forward(self, x: SpconvTensor) -> SpconvTensor:
        return x.replace(self.bn(x.feats))


class SpconvReLU(nn.Module):
    def forward(self, x: SpconvTensor) -> SpconvTensor:
        return x.replace(torch.relu(x.feats))


class SpconvEngineLayers:
    name = "spconv"

    def conv(self, in_channels, out_channels, kernel_size, stride=1, bias=False, dimension=3):
        return SpconvConvolution(in_channels, out_channels, kernel_size, stride, bias, dimension)

    def conv_transpose(self, in_channels, out_channels, kernel_size=2, stride=2, bias=False,
                       dimension=3):
        return SpconvConvolution(in_channels, out_channels, kernel_size, stride, bias, dimension,
                                 transpose=True)

    def batch_norm(self, channels, momentum):
        return SpconvBatchNorm(channels, momentum)

    def relu(self):
        return SpconvReLU()

    def cat(self, *xs: SpconvTensor) -> SpconvTensor:
        first = xs[0]
        if any(x.grid is not first.grid or x.level != first.level for x in xs[1:]):
            raise ValueError("cat needs sparse tensors on the same voxels")
        return first.replace(torch.cat([x.feats for x in xs], dim=1))

    def is_conv(self, module: nn.Module) -> bool:
        return isinstance(module, SpconvConvolution)

    def to_native(self, x: SparseVoxels, align: int = 16) -> SpconvTensor:
        c = x.coords
        if x.stride != 1:
            raise ValueError(f"the spconv engine takes inputs at tensor stride 1, got {x.stride}")
        if len(c) == 0:
            raise ValueError("the network got an empty sparse tensor (0 voxels)")
        # rows must be unique (each voxel once): the network's input check holds that
        xyz = c[:, 1:].to(torch.int64)  # (N, 3)
        shift = torch.div(xyz.min(0).values, align, rounding_mode="floor") * align  # (3,) int64
        idx = xyz - shift  # (N, 3) int64, >= 0
        shape = ((idx.max(0).values // align + 1) * align).tolist()
        if max(shape) >= 2 ** 31:
            raise ValueError(f"voxel coordinates span {shape} cells, beyond int32 indices")
        indices = torch.cat([c[:, :1].to(torch.int32), idx.to(torch.int32)], 1).contiguous()
        grid = _Grid(shift=shift, shape=shape, batch_size=int(c[:, 0].max()) + 1)
        grid.levels[0] = indices
        return SpconvTensor(x.feats, 0, grid)

    def to_voxels(self, t: SpconvTensor) -> SparseVoxels:
        s = 2 ** t.level
        idx = t.indices
        xyz = idx[:, 1:].to(torch.int64) * s + t.grid.shift  # (N, 3) int64, stride-1 units
        coords = torch.cat([idx[:, :1], xyz.to(torch.int32)], 1)  # (N, 4) int32
        return SparseVoxels(coords=coords, feats=t.feats, stride=s)


ENGINE = SpconvEngineLayers()
