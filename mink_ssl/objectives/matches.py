"""Sampling helpers shared by the point-level objectives: seeded generators
(:class:`~mink_ssl.seeding.SeededGenerator`), match checks, one-to-one match selection, and a
zero loss that stays connected to the graph."""
from __future__ import annotations

import torch

from mink_ssl.seeding import SeededGenerator

__all__ = ["SeededGenerator", "check_match_rows", "check_nce_args", "one_to_one_matches",
           "random_subset", "sample_matches", "zero_loss"]


def random_subset(n: int, k: int, generator: torch.Generator | None,
                  device: torch.device) -> torch.Tensor:
    """``min(n, k)`` distinct indices of ``range(n)`` in random order, (min(n, k),) int64."""
    return torch.randperm(n, generator=generator, device=device)[:k]


def check_match_rows(matches: torch.Tensor, n0: int, n1: int) -> torch.Tensor:
    """``matches`` as (M, 2) int64; ``ValueError`` naming the bad shape or out-of-range rows."""
    if matches.ndim != 2 or matches.shape[1] != 2:
        raise ValueError(f"matches must have shape (M, 2), got {tuple(matches.shape)}")
    if matches.is_floating_point() or matches.dtype == torch.bool:
        raise ValueError(f"matches must be integer row indices, got dtype {matches.dtype}")
    matches = matches.long()
    if len(matches):
        lo, hi = matches.min(dim=0).values.tolist(), matches.max(dim=0).values.tolist()
        if min(lo) < 0 or hi[0] >= n0 or hi[1] >= n1:
            raise ValueError(f"matches index rows out of range: column 0 spans [{lo[0]}, {hi[0]}] "
                             f"for {n0} view-0 rows, column 1 spans [{lo[1]}, {hi[1]}] for {n1} "
                             "view-1 rows")
    return matches


def _first_per_value(values: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each distinct value of ``values`` (N,)."""
    order = torch.sort(values, stable=True).indices  # (N,)
    sorted_values = values[order]
    first = torch.ones_like(sorted_values, dtype=torch.bool)
    first[1:] = sorted_values[1:] != sorted_values[:-1]
    return order[first]


def one_to_one_matches(matches: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A random subset of ``matches`` (M, 2) in which every view-0 and view-1 row appears once.

    Shuffle, keep the first match of each view-0 row, then the first of each view-1 row; the
    stable sort makes each kept match a uniform pick among its row's matches. Fully vectorised.
    """
    shuffled = matches[torch.randperm(len(matches), generator=generator, device=matches.device)]
    per_row0 = shuffled[_first_per_value(shuffled[:, 0])]
    return per_row0[_first_per_value(per_row0[:, 1])]


def sample_matches(matches: torch.Tensor, num: int,
                   generator: torch.Generator | None) -> torch.Tensor:
    """Up to ``num`` one-to-one matches (K, 2), K = min(num, #one-to-one matches)."""
    unique = one_to_one_matches(matches, generator)
    return unique[random_subset(len(unique), num, generator, matches.device)]


def zero_loss(*features: torch.Tensor) -> torch.Tensor:
    """A scalar 0 connected to ``features`` (gradient zero), for steps with nothing to contrast."""
    total = features[0][:0].sum()
    for f in features[1:]:
        total = total + f[:0].sum()
    return total


# --- PointInfoNCE --------------------------------------------------------------------------


def check_nce_args(num_matches: int, temperature: float) -> None:
    """The arguments every InfoNCE-style objective shares; ``ValueError`` naming the bad one."""
    if num_matches < 1:
        raise ValueError(f"num_matches must be >= 1, got {num_matches}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
