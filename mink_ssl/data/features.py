"""Network input features of voxels, one definition for pretraining, fine-tuning, demo and viz.

Every mode but ``ones1`` has 3 channels, so a backbone pretrained on one mode loads into a model
fed another (PointContrast pretrains on constant ones and fine-tunes segmentation on RGB through
the same 3-channel stem). The modes, and the released code each follows:

    ones         3 x 1.0                                   PointContrast detection
                                                           (votenet_det_new ``voxel_feats``)
    ones_jitter  3 x 1.0 + N(0, 0.01) per value, with      PointContrast pretraining
                 probability 0.95 per view (training)      (``ddp_data_loaders.py``, ``Jitter``)
    rgb          RGB / 255 - 0.5                           segmentation (``normalize_color``)
    rgb_jitter   (RGB + N(0, 0.01) per value, with         CSC pretraining (jitter on 0..255
                 probability 0.95 per view) / 255 - 0.5    colours, then normalised)
    ones1        1 x 1.0 (one channel)                     our earlier ``ones``; its backbones
                                                           only load into ``ones1`` models

The jitter is drawn from the sample's generator and only when one is given (training data);
evaluation features are deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

JITTER_STD = 0.01  # the released ``Jitter(mu=0, sigma=0.01)``
JITTER_PROB = 0.95  # ``if random.random() < 0.95``: one draw per view


@dataclass(frozen=True)
class FeatureMode:
    """channels: input width; colour: reads point colours; jitter: adds the training jitter."""

    channels: int
    colour: bool
    jitter: bool


FEATURE_MODES: dict[str, FeatureMode] = {
    "ones": FeatureMode(3, colour=False, jitter=False),
    "ones_jitter": FeatureMode(3, colour=False, jitter=True),
    "rgb": FeatureMode(3, colour=True, jitter=False),
    "rgb_jitter": FeatureMode(3, colour=True, jitter=True),
    "ones1": FeatureMode(1, colour=False, jitter=False),
}


def feature_mode(name: str) -> FeatureMode:
    """The mode called ``name``; an unknown name is an error listing the valid ones."""
    if name not in FEATURE_MODES:
        raise ValueError(f"unknown input feature mode {name!r}; valid: {sorted(FEATURE_MODES)} "
                         "(ones_jitter: PointContrast pretraining, rgb_jitter: CSC pretraining, "
                         "rgb: segmentation, ones: PointContrast detection, ones1: 1-channel)")
    return FEATURE_MODES[name]


def make_features(mode: str, colors: np.ndarray | None, n: int,
                  rng: np.random.Generator | None = None) -> torch.Tensor:
    """(n, C) float32 features of n voxels in ``mode``.

    Args:
        colors: (n, 3) uint8 colours of the voxels (needed by the rgb modes, else ignored).
        rng: the sample's generator; the jitter modes draw their noise from it (one Bernoulli
            0.95 for the view, then one normal value per feature); None: no jitter.
    """
    m = feature_mode(mode)
    if m.colour:
        if colors is None:
            raise ValueError(f"features {mode!r} need colours; read the data with colour or "
                             "use features=ones")
        colors = np.asarray(colors)
        if colors.shape != (n, 3):
            raise ValueError(f"expected colours ({n}, 3), got {colors.shape}")
    if not (m.jitter and rng is not None and rng.random() < JITTER_PROB):
        if m.colour:
            return torch.from_numpy(colors.astype(np.float32)) / 255.0 - 0.5
        return torch.ones(n, m.channels)
    # float64 as the released code (NumPy colours / ones plus NumPy noise), then float32
    base = colors.astype(np.float64) if m.colour else np.ones((n, m.channels))  # 0..255 / 1
    feats = base + rng.normal(0.0, JITTER_STD, base.shape)
    if m.colour:
        feats = feats / 255.0 - 0.5
    return torch.from_numpy(feats.astype(np.float32))


def input_features(colors: np.ndarray | None, in_channels: int, n: int | None = None
                   ) -> torch.Tensor:
    """Deterministic features by width, for tools that only know a network's ``in_channels``
    (demo, viz): 1 -> ``ones1``, 3 -> ``rgb`` (``colors`` (N, 3) uint8; may be None for 1
    channel, then ``n`` gives N)."""
    if in_channels == 1:
        return make_features("ones1", None, len(colors) if colors is not None else n)
    if in_channels == 3:
        if colors is None:
            raise ValueError("RGB features need colours; read the fragment with colour")
        return make_features("rgb", colors, len(colors))
    raise ValueError(f"input features have 1 (ones1) or 3 (rgb) channels, got {in_channels}")
