"""Seeded random generators that checkpoints capture: any module attribute that is a
:class:`SeededGenerator` has its state saved and restored with the run (see
:mod:`mink_ssl.engine.checkpoint`)."""
from __future__ import annotations

import torch


class SeededGenerator:
    """A ``torch.Generator`` on the features' device, created on first use and seeded once.

    ``seed=None`` returns ``None`` (torch's global RNG, which ``torch.manual_seed`` controls).
    The generator lives on across steps, so successive steps draw different samples.
    """

    def __init__(self, seed: int | None):
        self.seed = seed
        self._generator: torch.Generator | None = None

    def __call__(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        device = torch.device(device)
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator
