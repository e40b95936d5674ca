"""Timing and peak-memory measurement of a callable on CPU or CUDA (for the demo and benchmarks)."""
from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_s: float
    min_s: float
    runs: int
    peak_mem_mb: float  # CUDA: peak allocated by torch; CPU: peak resident set of the process

    def __str__(self) -> str:
        return (f"median {self.median_s * 1e3:8.1f} ms  min {self.min_s * 1e3:8.1f} ms  "
                f"peak mem {self.peak_mem_mb:8.1f} MB  ({self.runs} runs)")


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kB on Linux


def measure(fn: Callable[[], object], device: torch.device, repeats: int = 5,
            warmup: int = 1) -> Timing:
    """Run ``fn`` ``warmup`` + ``repeats`` times; wall-clock statistics of the timed runs."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    sync_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), repeats, peak_memory_mb(device))
