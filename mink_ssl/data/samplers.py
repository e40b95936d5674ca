"""Samplers shared by every task's loader."""
from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler


class ResumableSampler(Sampler):
    """Endless (epoch, index) keys: a fresh permutation per epoch, split across ranks.

    Rank r of w takes ``perm[r::w]`` (truncated to equal lengths), so w ranks with batch b see
    together what one process with batch w*b sees. ``start`` skips that many keys of this rank:
    a resumed run passes the number of samples it already consumed.
    """

    def __init__(self, n: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start: int = 0):
        if n < world_size:
            raise ValueError(f"{n} pairs cannot be split across {world_size} ranks")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self.per_rank = n // world_size

    def _epoch(self, epoch: int) -> np.ndarray:
        perm = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                else np.arange(self.n))
        return perm[self.rank::self.world_size][: self.per_rank]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, pos = divmod(self.start, self.per_rank)
        while True:
            for index in self._epoch(epoch)[pos:]:
                yield epoch, int(index)
            epoch, pos = epoch + 1, 0

    def __len__(self) -> int:  # one epoch of this rank (the iterator itself is endless)
        return self.per_rank
