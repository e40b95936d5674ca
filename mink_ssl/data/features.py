"""Network input features of voxels, one definition for training, demo, benchmarks and viz."""
from __future__ import annotations

import numpy as np
import torch


def input_features(colors: np.ndarray | None, in_channels: int, n: int | None = None
                   ) -> torch.Tensor:
    """(N, in_channels) float32: 1 channel -> constant ones, 3 -> RGB scaled to [-0.5, 0.5].

    ``colors`` is (N, 3) uint8 (may be None for 1 channel, then ``n`` gives N).
    """
    if in_channels == 1:
        return torch.ones(len(colors) if colors is not None else n, 1)
    if in_channels == 3:
        if colors is None:
            raise ValueError("RGB features need colours; read the fragment with colour")
        return torch.from_numpy(np.asarray(colors, np.float32)) / 255.0 - 0.5
    raise ValueError(f"input features have 1 (ones) or 3 (rgb) channels, got {in_channels}")
