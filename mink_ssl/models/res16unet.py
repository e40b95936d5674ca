"""The Res16UNet family of sparse residual UNets (the SR-UNet of PointContrast), one definition.

A network is declared by class attributes, as in MinkowskiEngine's examples:

    BLOCK     residual block class (BasicBlock or Bottleneck)
    LAYERS    blocks per stage, 8 stages: 4 encoder (tensor stride 2, 4, 8, 16 after the stage's
              strided conv) and 4 decoder (tensor stride 8, 4, 2, 1 after the stage's upsampling)
    PLANES    output channels of each stage's blocks
    INIT_DIM  channels of the stem (stride 1)

Layers are named by the tensor stride they read and write (``conv<k>p<in>s<stride>``) and the
names are those of the original PointContrast / MinkowskiEngine code, so its checkpoints load
unchanged. State-dict keys, stable across versions (checkpoints depend on them):

    conv0p1s1.kernel                    stem convolution (stride 1)
    bn0.bn.{weight,bias,running_mean,running_var,num_batches_tracked}
    conv{1,2,3,4}p{1,2,4,8}s2.kernel    encoder downsampling convolutions, bn{1..4}.bn.*
    block{1..8}.<i>.conv{1,2}.kernel    residual blocks (Bottleneck also conv3), norm{1,2,3}.bn.*
    block{k}.<i>.downsample.{0.kernel,1.bn.*}   1x1 projection where channels change
    convtr{4,5,6,7}p{16,8,4,2}s2.kernel decoder upsampling (transposed) convolutions, bntr{4..7}.bn.*
    final.{kernel,bias}                 1x1 output convolution

Forward (N voxels in, the same N voxels out, in the input's order):

    x (N, in_channels) @ stride 1
      stem -> p1 (INIT_DIM)
      conv1 s2 -> block1 -> b1 @ 2 ; conv2 -> block2 -> b2 @ 4 ; conv3 -> block3 -> b3 @ 8
      conv4 -> block4 @ 16
      convtr4 -> cat(b3) -> block5 @ 8 ; convtr5 -> cat(b2) -> block6 @ 4
      convtr6 -> cat(b1) -> block7 @ 2 ; convtr7 -> cat(p1) -> block8 @ 1
      final -> (N, out_channels), optionally L2-normalised per row

Batch norm and initialisation follow the released code (PointContrast / CSC ``models/
res16unet.py``, ``resnet.py``, ``modules/resnet_block.py``): the model's ``bn_momentum`` (0.05 in
pretraining, 0.02 in fine-tuning) reaches the stem, strided, transposed and 1x1 projection
(``downsample``) batch norms, while the batch norms inside the residual blocks (``norm1..3``) are
built without it and keep PyTorch's 0.1 (``block_bn_momentum``; None gives them ``bn_momentum``
too). Convolution kernels keep MinkowskiEngine's default initialisation, uniform in
+-1/sqrt(fan) with fan = in_channels x kernel volume (out_channels x kernel volume for transposed
convolutions), the ``final`` bias likewise; batch norms start at weight 1, bias 0
(``init="me"``). ``init="kaiming"`` is our earlier variant (Kaiming-normal kernels, fan-out).

The sparse engine (``engine``: ``minkowski`` or ``spconv``, :mod:`mink_ssl.models.engines`)
builds the layers; the definition above, the keys and the weights are the same on both. A
network takes and returns :class:`~mink_ssl.sparse.SparseVoxels`; the engine's own tensors stay
inside ``forward``.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import torch
import torch.nn as nn

from mink_ssl.models.engines import Engine, check_engine, get_engine
from mink_ssl.models.registry import MODELS
from mink_ssl.sparse import SparseVoxels, duplicate_rows

#: kernel initialisations: MinkowskiEngine's default (the released code) or Kaiming-normal
INITS = ("me", "kaiming")
#: the engine a network runs on unless told otherwise
DEFAULT_ENGINE = "spconv"


class BasicBlock(nn.Module):
    """Two 3x3x3 convolutions with batch norm and a residual connection (expansion 1).
    ``bn_momentum`` is that of the block's own batch norms (``norm1``, ``norm2``)."""

    expansion: ClassVar[int] = 1

    def __init__(self, engine: Engine, inplanes: int, planes: int, bn_momentum: float,
                 dimension: int, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = engine.conv(inplanes, planes, 3, dimension=dimension)
        self.norm1 = engine.batch_norm(planes, bn_momentum)
        self.conv2 = engine.conv(planes, planes, 3, dimension=dimension)
        self.norm2 = engine.batch_norm(planes, bn_momentum)
        self.relu = engine.relu()
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3x3, 1x1 expand (expansion 4), with a residual connection."""

    expansion: ClassVar[int] = 4

    def __init__(self, engine: Engine, inplanes: int, planes: int, bn_momentum: float,
                 dimension: int, downsample: nn.Module | None = None):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = engine.conv(inplanes, planes, 1, dimension=dimension)
        self.norm1 = engine.batch_norm(planes, bn_momentum)
        self.conv2 = engine.conv(planes, planes, 3, dimension=dimension)
        self.norm2 = engine.batch_norm(planes, bn_momentum)
        self.conv3 = engine.conv(planes, out, 1, dimension=dimension)
        self.norm3 = engine.batch_norm(out, bn_momentum)
        self.relu = engine.relu()
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.relu(out + residual)


class Res16UNetBase(nn.Module):
    """Base of the family; subclasses set ``BLOCK``, ``LAYERS``, ``PLANES`` (and ``INIT_DIM``).

    Args:
        in_channels: input feature channels (3 for RGB, 1 for constant ones).
        out_channels: output feature channels (32 for pretraining, the class count downstream).
        stem_kernel_size: kernel of the stride-1 stem convolution; 3 as in PointContrast's
            pretraining, 5 as in the MinkowskiEngine model zoo.
        bn_momentum: momentum of the stem, strided, transposed and projection batch norms.
        block_bn_momentum: momentum of the batch norms inside residual blocks; 0.1 as in the
            released code (its blocks are built without the model's momentum); None: the same
            as ``bn_momentum`` (our earlier variant).
        init: ``"me"`` (MinkowskiEngine's default uniform kernels, the released code) or
            ``"kaiming"`` (Kaiming-normal kernels, fan-out; our earlier variant).
        normalize_output: L2-normalise each output row (used by the contrastive objectives).
        dimension: spatial dimension of the sparse tensors (3).
        engine: the sparse engine that runs the layers, ``minkowski`` or ``spconv``; the
            weights are the same on both (not part of the state dict).
    """

    BLOCK: ClassVar[type | None] = None
    LAYERS: ClassVar[tuple[int, ...]] = (2,) * 8
    PLANES: ClassVar[tuple[int, ...]] = (32, 64, 128, 256, 256, 256, 256, 256)
    INIT_DIM: ClassVar[int] = 32
    #: the coarsest tensor stride; coordinates shifted by a multiple of it give shifted outputs
    TOTAL_STRIDE: ClassVar[int] = 16

    def __init__(self, in_channels: int, out_channels: int, *, stem_kernel_size: int = 3,
                 bn_momentum: float = 0.1, block_bn_momentum: float | None = 0.1,
                 init: str = "me", normalize_output: bool = False, dimension: int = 3,
                 engine: str = DEFAULT_ENGINE):
        super().__init__()
        if self.BLOCK is None:
            raise TypeError(f"{type(self).__name__} is abstract: use a concrete network such as "
                            f"{', '.join(MODELS.names())}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if stem_kernel_size not in (1, 3, 5, 7):
            raise ValueError(f"stem_kernel_size must be 1, 3, 5 or 7, got {stem_kernel_size!r}")
        for name, value in (("bn_momentum", bn_momentum),
                            ("block_bn_momentum", 0.1 if block_bn_momentum is None
                             else block_bn_momentum)):
            if not isinstance(value, int | float) or not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if len(self.LAYERS) != 8 or len(self.PLANES) != 8:
            raise TypeError(f"{type(self).__name__}: LAYERS and PLANES need 8 entries each")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stem_kernel_size, self.bn_momentum = stem_kernel_size, bn_momentum
        self.block_bn_momentum = None if block_bn_momentum is None else float(block_bn_momentum)
        self.init = init
        self.normalize_output, self.dimension = normalize_output, dimension
        self.engine = check_engine(engine)
        E = self._layers = get_engine(engine)
        block, P, L, D = self.BLOCK, self.PLANES, self.LAYERS, dimension
        exp = block.expansion

        def conv(cin, cout, k, s):
            return E.conv(cin, cout, k, stride=s, dimension=D)

        def up(cin, cout):
            return E.conv_transpose(cin, cout, 2, stride=2, dimension=D)

        def bn(c):
            return E.batch_norm(c, bn_momentum)

        self.inplanes = self.INIT_DIM
        self.conv0p1s1 = conv(in_channels, self.inplanes, stem_kernel_size, 1)
        self.bn0 = bn(self.inplanes)
        # encoder: strided 2x2x2 conv then blocks, tensor stride 2, 4, 8, 16
        self.conv1p1s2, self.bn1 = conv(self.inplanes, self.inplanes, 2, 2), bn(self.inplanes)
        self.block1 = self._make_layer(P[0], L[0])
        self.conv2p2s2, self.bn2 = conv(self.inplanes, self.inplanes, 2, 2), bn(self.inplanes)
        self.block2 = self._make_layer(P[1], L[1])
        self.conv3p4s2, self.bn3 = conv(self.inplanes, self.inplanes, 2, 2), bn(self.inplanes)
        self.block3 = self._make_layer(P[2], L[2])
        self.conv4p8s2, self.bn4 = conv(self.inplanes, self.inplanes, 2, 2), bn(self.inplanes)
        self.block4 = self._make_layer(P[3], L[3])
        # decoder: transposed conv, concatenate the skip of the same stride, blocks
        self.convtr4p16s2, self.bntr4 = up(self.inplanes, P[4]), bn(P[4])
        self.inplanes = P[4] + P[2] * exp
        self.block5 = self._make_layer(P[4], L[4])
        self.convtr5p8s2, self.bntr5 = up(self.inplanes, P[5]), bn(P[5])
        self.inplanes = P[5] + P[1] * exp
        self.block6 = self._make_layer(P[5], L[5])
        self.convtr6p4s2, self.bntr6 = up(self.inplanes, P[6]), bn(P[6])
        self.inplanes = P[6] + P[0] * exp
        self.block7 = self._make_layer(P[6], L[6])
        self.convtr7p2s2, self.bntr7 = up(self.inplanes, P[7]), bn(P[7])
        self.inplanes = P[7] + self.INIT_DIM
        self.block8 = self._make_layer(P[7], L[7])
        self.final = E.conv(P[7] * exp, out_channels, 1, bias=True, dimension=D)
        self.relu = E.relu()
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        E, block, exp = self._layers, self.BLOCK, self.BLOCK.expansion
        downsample = None
        if self.inplanes != planes * exp:
            downsample = nn.Sequential(
                E.conv(self.inplanes, planes * exp, 1, dimension=self.dimension),
                E.batch_norm(planes * exp, self.bn_momentum),
            )
        m = self.bn_momentum if self.block_bn_momentum is None else self.block_bn_momentum
        layers = [block(E, self.inplanes, planes, m, self.dimension, downsample=downsample)]
        self.inplanes = planes * exp
        layers += [block(E, self.inplanes, planes, m, self.dimension) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if self.init == "kaiming" and self._layers.is_conv(m):
                nn.init.kaiming_normal_(m.kernel, mode="fan_out", nonlinearity="relu")
            elif isinstance(getattr(m, "bn", None), nn.BatchNorm1d):
                nn.init.constant_(m.bn.weight, 1.0)
                nn.init.constant_(m.bn.bias, 0.0)

    def config(self) -> dict:
        """Constructor arguments as plain data (stored in checkpoints, see ``build_model``)."""
        return {
            "name": type(self).__name__, "in_channels": self.in_channels,
            "out_channels": self.out_channels, "stem_kernel_size": self.stem_kernel_size,
            "bn_momentum": self.bn_momentum, "block_bn_momentum": self.block_bn_momentum,
            "init": self.init, "normalize_output": self.normalize_output,
            "dimension": self.dimension, "engine": self.engine,
        }

    def _check_input(self, x) -> None:
        if not isinstance(x, SparseVoxels):
            raise ValueError(f"{type(self).__name__} takes a mink_ssl.sparse.SparseVoxels, got "
                             f"{type(x).__name__}; build one with mink_ssl.sparse.sparse_tensor")
        if x.feats.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} was built for in_channels="
                             f"{self.in_channels} but got features of shape {tuple(x.F.shape)}")
        if x.coords.shape[1] != self.dimension + 1:
            raise ValueError(f"expected {self.dimension}-D coordinates (N, {self.dimension + 1}) "
                             f"with the batch index first, got shape {tuple(x.coords.shape)}")
        if x.stride != 1:
            raise ValueError(f"input must have tensor stride 1, got {x.stride}")
        if len(x.coords) == 0:
            raise ValueError(f"{type(self).__name__} got an empty sparse tensor (0 voxels)")
        dup = duplicate_rows(x.coords)
        if dup:
            raise ValueError(f"{dup} voxel coordinate rows repeat an earlier row; a sparse tensor "
                             "holds each voxel once (quantise with mink_ssl.sparse.quantize)")

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        """(N, in_channels) at stride 1 -> (N, out_channels) on the same coordinates, in the
        input's row order."""
        return self.forward_stages(x, ())[0]

    def forward_stages(self, x: SparseVoxels, keep: tuple[str, ...] | list[str]
                       ) -> tuple[SparseVoxels, dict[str, SparseVoxels]]:
        """The output and the outputs of the stages named in ``keep`` (``block1`` ..
        ``block8``), each at its own tensor stride and in the engine's row order."""
        self._check_input(x)
        E = self._layers
        stages: dict[str, SparseVoxels] = {}

        def stage(name, t):
            t = getattr(self, name)(t)
            if name in keep:
                stages[name] = E.to_voxels(t)
            return t

        native = E.to_native(x, align=self.TOTAL_STRIDE)
        out = self.relu(self.bn0(self.conv0p1s1(native)))
        out_p1 = out
        out = self.relu(self.bn1(self.conv1p1s2(out_p1)))
        out_b1p2 = stage("block1", out)
        out = self.relu(self.bn2(self.conv2p2s2(out_b1p2)))
        out_b2p4 = stage("block2", out)
        out = self.relu(self.bn3(self.conv3p4s2(out_b2p4)))
        out_b3p8 = stage("block3", out)
        out = self.relu(self.bn4(self.conv4p8s2(out_b3p8)))
        out = stage("block4", out)  # stride 16

        out = self.relu(self.bntr4(self.convtr4p16s2(out)))
        out = stage("block5", E.cat(out, out_b3p8))  # stride 8
        out = self.relu(self.bntr5(self.convtr5p8s2(out)))
        out = stage("block6", E.cat(out, out_b2p4))  # stride 4
        out = self.relu(self.bntr6(self.convtr6p4s2(out)))
        out = stage("block7", E.cat(out, out_b1p2))  # stride 2
        out = self.relu(self.bntr7(self.convtr7p2s2(out)))
        out = stage("block8", E.cat(out, out_p1))  # stride 1
        out = E.to_voxels(self.final(out))
        if not torch.equal(out.coords, x.coords):  # both engines keep the input's rows; checked
            raise RuntimeError(f"the {self.engine} engine returned the voxels in another order "
                               "than the input's")
        feats = out.feats
        if self.normalize_output:
            feats = torch.nn.functional.normalize(feats, p=2, dim=1)  # (N, out_channels)
        return SparseVoxels(x.coords, feats, 1), stages


# The family. Letters vary the decoder widths; 14/18/34 the depth (BasicBlock), 50/101 use
# Bottleneck. Res16UNet34C is the backbone of PointContrast.


@MODELS.register()
class Res16UNet14(Res16UNetBase):
    BLOCK = BasicBlock
    LAYERS = (1, 1, 1, 1, 1, 1, 1, 1)


@MODELS.register()
class Res16UNet14A(Res16UNet14):
    PLANES = (32, 64, 128, 256, 128, 128, 96, 96)


@MODELS.register()
class Res16UNet14B(Res16UNet14):
    PLANES = (32, 64, 128, 256, 128, 128, 128, 128)


@MODELS.register()
class Res16UNet14S(Res16UNet14):
    """Res16UNet14A at half width, about 3x faster on CPU: the synthetic transfer benchmark's
    backbone (not in the original family)."""

    INIT_DIM = 16
    PLANES = (16, 32, 64, 128, 64, 64, 48, 48)


@MODELS.register()
class Res16UNet18(Res16UNetBase):
    BLOCK = BasicBlock
    LAYERS = (2, 2, 2, 2, 2, 2, 2, 2)


@MODELS.register()
class Res16UNet18A(Res16UNet18):
    PLANES = (32, 64, 128, 256, 128, 128, 96, 96)


@MODELS.register()
class Res16UNet18B(Res16UNet18):
    PLANES = (32, 64, 128, 256, 128, 128, 128, 128)


@MODELS.register()
class Res16UNet34(Res16UNetBase):
    BLOCK = BasicBlock
    LAYERS = (2, 3, 4, 6, 2, 2, 2, 2)


@MODELS.register()
class Res16UNet34A(Res16UNet34):
    PLANES = (32, 64, 128, 256, 256, 128, 64, 64)


@MODELS.register()
class Res16UNet34B(Res16UNet34):
    PLANES = (32, 64, 128, 256, 256, 128, 64, 32)


@MODELS.register()
class Res16UNet34C(Res16UNet34):
    PLANES = (32, 64, 128, 256, 256, 128, 96, 96)


@MODELS.register()
class Res16UNet50(Res16UNetBase):
    BLOCK = Bottleneck
    LAYERS = (2, 3, 4, 6, 2, 2, 2, 2)


@MODELS.register()
class Res16UNet101(Res16UNetBase):
    BLOCK = Bottleneck
    LAYERS = (2, 3, 4, 23, 2, 2, 2, 2)
