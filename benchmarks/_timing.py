"""Paired, alternated timing for the step benchmarks (and scripts/gpu_checks.py).

Comparing two steps fairly on a shared, loaded machine: both run on the same batch, in the same
process, interleaved (a b, b a, a b, ...) so that drift of the machine's speed hits both alike;
each round gives one ratio; the report is the median and the interquartile range (IQR) of the
times and of the per-round ratios, and says when the spread is larger than the effect.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def alternate(fns: dict[str, Callable[[], object]], dev: torch.device, repeats: int,
              warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each callable, ``repeats`` rounds, the order reversed every round."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            sync(dev)
            t0 = time.perf_counter()
            fns[n]()
            sync(dev)
            times[n].append(time.perf_counter() - t0)
    return times


def summary(xs: list[float]) -> dict:
    """median, IQR (upper minus lower quartile; 0 for one value), n."""
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "iqr": q[2] - q[0], "n": len(xs)}


def paired_ratio(num: list[float], den: list[float]) -> dict:
    """Summary of the per-round ratios num[i] / den[i]."""
    return summary([a / b for a, b in zip(num, den)])


def ratio_verdict(r: dict, what: str = "full / bare") -> str:
    """A line saying whether the ratio's spread leaves its distance from 1 meaningful."""
    effect = abs(r["median"] - 1.0)
    if r["n"] < 3:
        return f"NOTE: {what} from {r['n']} round(s) only: no spread to judge it by"
    if r["iqr"] > effect:
        return (f"WARNING: the spread of {what} (IQR {r['iqr']:.3f}) exceeds its distance from 1 "
                f"({effect:.3f}): the machine's noise is larger than the effect; add --repeats "
                "or run on an idle machine")
    if r["median"] < 1.0:
        return (f"WARNING: {what} = {r['median']:.3f} < 1 beyond the spread: the larger step "
                "measured faster than the part it contains, which is not physical; suspect the "
                "measurement")
    return f"{what} = {r['median']:.3f} is outside its spread (IQR {r['iqr']:.3f})"
