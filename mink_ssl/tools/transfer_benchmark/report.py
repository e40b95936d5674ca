"""The benchmark's summary: mean and spread per objective and setting, paired gains, and the
tables and figure written next to ``results.json``."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mink_ssl.io import atomic_path
from mink_ssl.tools.transfer_benchmark.presets import SCRATCH


def summarise(runs: list[dict], objectives: Sequence[str], settings: Sequence[str]) -> dict:
    """objective -> setting -> {mean, std (sample, ddof 1; 0 for one seed), n, values}."""
    out: dict = {}
    for obj in objectives:
        for s in settings:
            v = np.array([r["miou"] for r in runs if r["objective"] == obj and r["setting"] == s])
            out.setdefault(obj, {})[s] = {
                "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "n": len(v), "values": v.tolist()}
    return out


def paired_gains(runs: list[dict], summary: dict, objectives: Sequence[str],
                 settings: Sequence[str]) -> dict:
    """objective -> setting -> the gain over scratch, paired by seed (same labelled subset):
    {mean, std (ddof 1; 0 for one seed), values (per seed), beyond_spread}. ``beyond_spread``:
    the mean gain exceeds both the objective's and scratch's seed std (needs 2+ seeds).
    Empty without scratch among the objectives."""
    if SCRATCH not in objectives:
        return {}
    miou = {(r["objective"], r["setting"], r["seed"]): r["miou"] for r in runs}
    out: dict = {}
    for obj in objectives:
        if obj == SCRATCH:
            continue
        for s in settings:
            seeds = sorted(seed for o, st, seed in miou if o == obj and st == s
                           and (SCRATCH, s, seed) in miou)
            v = np.array([miou[obj, s, seed] - miou[SCRATCH, s, seed] for seed in seeds])
            spread = max(summary[obj][s]["std"], summary[SCRATCH][s]["std"])
            out.setdefault(obj, {})[s] = {
                "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "values": v.tolist(), "seeds": seeds,
                "beyond_spread": bool(len(v) > 1 and v.mean() > spread)}
    return out


def results_table(summary: dict, objectives: Sequence[str], settings: Sequence[str],
                  losses: dict | None = None, scratch: str = "scratch") -> str:
    """Markdown table of mIoU (%) mean +- std over seeds, and the gain over scratch (named
    ``scratch`` in the first column); with ``losses`` (objective -> {start, end}, means over
    seeds) a first column of the pretraining loss, first -> last tenth of the iterations."""
    head = ("| objective | " + ("pretraining loss | " if losses is not None else "")
            + " | ".join(settings) + " |")
    lines = [head, "|" + "---|" * (len(settings) + 1 + (losses is not None))]
    for obj in objectives:
        cells = []
        if losses is not None:
            e = losses.get(obj)
            cells.append("-" if e is None else f"{e['start']:.3g} → {e['end']:.3g}"
                         + ("" if e["end"] < e["start"] else " (does not fall)"))
        for s in settings:
            e = summary[obj][s]
            cell = f"{100 * e['mean']:.1f} ± {100 * e['std']:.1f}"
            if obj != SCRATCH and SCRATCH in summary:
                cell += f" ({100 * (e['mean'] - summary[SCRATCH][s]['mean']):+.1f})"
            cells.append(cell)
        lines.append(f"| {scratch if obj == SCRATCH else obj} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gains_table(gains: dict, settings: Sequence[str]) -> str:
    """Markdown rows of the paired per-seed gains and whether each is beyond the spread."""
    md = "| objective | " + " | ".join(settings) + " |\n|" + "---|" * (len(settings) + 1) + "\n"
    for obj, per in gains.items():
        md += f"| {obj} | " + " | ".join(
            " / ".join(f"{100 * g:+.1f}" for g in per[s]["values"])
            + (" **beyond spread**" if per[s]["beyond_spread"] else "")
            for s in settings) + " |\n"
    return md


def write_plot(path: Path, summary: dict, objectives: Sequence[str], settings: Sequence[str]
               ) -> None:
    """Grouped bars: one group per setting, one bar per objective, error bars = std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(settings))
    width = 0.8 / len(objectives)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(settings) * max(len(objectives), 2) / 3, 3.6))
    for i, obj in enumerate(objectives):
        mean = [100 * summary[obj][s]["mean"] for s in settings]
        std = [100 * summary[obj][s]["std"] for s in settings]
        ax.bar(x + (i - (len(objectives) - 1) / 2) * width, mean, width, yerr=std, capsize=3,
               label="scratch" if obj == SCRATCH else obj)
    ax.set_xticks(x, settings)
    ax.set_ylabel("test mIoU (%)")
    ax.set_title("synthetic S3DIS (Area 5), mean ± std over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
