"""MinkowskiEngine 0.5.4 as an engine: its own layers, unchanged (the reference)."""
from __future__ import annotations

import MinkowskiEngine as ME
import torch
import torch.nn as nn

from mink_ssl.sparse import SparseVoxels


class MinkowskiEngineLayers:
    name = "minkowski"

    def conv(self, in_channels, out_channels, kernel_size, stride=1, bias=False, dimension=3):
        return ME.MinkowskiConvolution(in_channels, out_channels, kernel_size=kernel_size,
                                       stride=stride, bias=bias, dimension=dimension)

    def conv_transpose(self, in_channels, out_channels, kernel_size=2, stride=2, bias=False,
                       dimension=3):
        return ME.MinkowskiConvolutionTranspose(in_channels, out_channels,
                                                kernel_size=kernel_size, stride=stride,
                                                bias=bias, dimension=dimension)

    def batch_norm(self, channels, momentum):
        return ME.MinkowskiBatchNorm(channels, momentum=momentum)

    def relu(self):
        return ME.MinkowskiReLU(inplace=True)

    def cat(self, *xs):
        return ME.cat(*xs)

    def is_conv(self, module: nn.Module) -> bool:
        return isinstance(module, ME.MinkowskiConvolution | ME.MinkowskiConvolutionTranspose)

    def to_native(self, x: SparseVoxels, align: int = 16) -> ME.SparseTensor:
        """``align`` (the network's total stride) matters only to spconv."""
        return ME.SparseTensor(features=x.feats, coordinates=x.coords.to(torch.int32))

    def to_voxels(self, t: ME.SparseTensor) -> SparseVoxels:
        return SparseVoxels(coords=t.C, feats=t.F, stride=int(t.tensor_stride[0]))


ENGINE = MinkowskiEngineLayers()
