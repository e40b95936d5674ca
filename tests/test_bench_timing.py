"""The paired, alternated timing that the step benchmarks and make gpu-check report with."""
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _timing import alternate, paired_ratio, ratio_verdict, summary  # noqa: E402


def test_alternate_interleaves_and_reverses_the_order_every_round():
    calls = []
    times = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                      torch.device("cpu"), repeats=4, warmup=1)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(times["a"]) == len(times["b"]) == 4 and all(t >= 0 for t in times["a"])
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        alternate({"a": lambda: None}, torch.device("cpu"), repeats=0)


def test_a_step_containing_another_measures_at_least_as_long():
    def bare():
        time.sleep(0.004)

    def full():
        bare()
        time.sleep(0.002)

    t = alternate({"full": full, "bare": bare}, torch.device("cpu"), repeats=5)
    r = paired_ratio(t["full"], t["bare"])
    assert r["n"] == 5 and r["median"] > 1.0


def test_summary_median_and_iqr():
    s = summary([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median"] == 3.0 and s["iqr"] == 2.0 and s["n"] == 5
    assert summary([2.5]) == {"median": 2.5, "iqr": 0.0, "n": 1}


def test_verdict_says_when_the_spread_exceeds_the_effect():
    noisy = paired_ratio([1.0, 1.5, 0.7, 1.3, 0.8], [1.0] * 5)  # median 1.0, IQR 0.5
    assert ratio_verdict(noisy).startswith("WARNING: the spread")
    clear = paired_ratio([1.20, 1.21, 1.19, 1.22, 1.20], [1.0] * 5)
    assert ratio_verdict(clear).startswith("full / bare = 1.200 is outside its spread")
    impossible = paired_ratio([0.60, 0.61, 0.62, 0.60, 0.61], [1.0] * 5)
    assert "not physical" in ratio_verdict(impossible)
    assert ratio_verdict(paired_ratio([1.0], [1.0])).startswith("NOTE")
