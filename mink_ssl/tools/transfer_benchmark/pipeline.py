"""The benchmark's orchestration: every run in order (each skipped when its output exists),
then the results. The pipeline is described in :mod:`mink_ssl.tools.transfer_benchmark`."""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mink_ssl.io import atomic_path, library_versions
from mink_ssl.models.engines import check_engine
from mink_ssl.objectives import OBJECTIVES
from mink_ssl.locks import DirectoryLocked
from mink_ssl.tools.transfer_benchmark.presets import (PRESETS, SCRATCH, Preset, objective_args,
                                                       objective_optim, parse_setting)
from mink_ssl.tools.transfer_benchmark.report import (gains_table, paired_gains, results_table,
                                                      summarise, write_plot)
from mink_ssl.tools.transfer_benchmark.runs import (finetune_run, loss_curve,
                                                    prepare_data, pretrain_run, probe_run,
                                                    write_json)

@dataclass
class Collected:
    """What the benchmark's runs gave: fine-tuning and probe results (one dict per run),
    pretraining seconds per ``<objective>/seed<s>``, loss curves per objective and seed."""
    runs: list[dict] = field(default_factory=list)
    probe_runs: list[dict] = field(default_factory=list)
    pretrain_s: dict[str, float] = field(default_factory=dict)
    losses: dict[str, dict[int, dict]] = field(default_factory=dict)


def _objective_seed(out: Path, data: tuple[Path, Path], obj: str, seed: int, preset: Preset,
                    device: str, log: Callable[[str], None], into: Collected) -> None:
    """Every run of ``obj`` and ``seed`` (``data``: pairs and segmentation roots): pretraining,
    fine-tuning in each setting, each probe; what they give goes ``into``."""
    pairs, seg = data
    backbone = None
    if obj != SCRATCH:
        log(f"== pretrain {obj} seed {seed}")
        backbone, sec = pretrain_run(out, pairs, obj, seed, preset, device, log)
        into.pretrain_s[f"{obj}/seed{seed}"] = sec
        into.losses.setdefault(obj, {})[seed] = loss_curve(backbone.parent)
    for s in preset.settings:
        log(f"== finetune {obj} {s} seed {seed}")
        r = finetune_run(out, seg, obj, s, seed, backbone, preset, device, log)
        into.runs.append({"objective": obj, "setting": s, "seed": seed, **r})
        log(f"   mIoU {100 * r['miou']:.1f}")
    for probe in preset.probes:
        log(f"== probe {probe} {obj} seed {seed} ({preset.probe_setting} labels)")
        r = probe_run(out, seg, obj, probe, seed, backbone, preset, device, log)
        into.probe_runs.append({"objective": obj, "setting": probe, "seed": seed, **r})
        log(f"   mIoU {100 * r['miou']:.1f}")


def run_benchmark(out: Path, preset: Preset | str = "full", *,
                  objectives: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                  settings: Sequence[str] | None = None, device: str = "cpu",
                  pairs: Path | None = None, engine: str | None = None,
                  log: Callable[[str], None] = print) -> dict:
    """Run (or continue) the benchmark into ``out``; returns ``results.json``'s content.

    ``pairs``: pretrain on this pair-prep output instead of generating scans (the demo's).
    ``engine``: the sparse engine of every run (default: the preset's).
    Several processes may share the work: an objective and seed whose run another process
    holds is skipped (logged), and then nothing is summarised: the call returns
    ``{"incomplete": [<objective>/seed<s>, ...]}`` and a later call writes the summary."""
    name = preset if isinstance(preset, str) else "custom"
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; valid choices: {sorted(PRESETS)}")
        preset = PRESETS[preset]
    if engine is not None:
        preset = replace(preset, engine=check_engine(engine))
    objectives = list(objectives or preset.objectives)
    seeds = [int(s) for s in (preset.seeds if seeds is None else seeds)]
    settings = list(settings or preset.settings)
    valid = sorted(OBJECTIVES.names())
    bad = [o for o in objectives if o != SCRATCH and not set(o.split("+")) <= set(valid)]
    if bad:
        raise ValueError(f"unknown objective(s) {bad}; valid choices: {[SCRATCH] + valid}")
    if not seeds:
        raise ValueError("seeds is empty; pass at least one seed, e.g. --seeds 0")
    for s in settings:
        parse_setting(s)
    preset = replace(preset, objectives=tuple(objectives), seeds=tuple(seeds),
                     settings=tuple(settings))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    log(f"== data -> {out / 'data'}")
    pairs, seg = prepare_data(out, preset, log, pairs)
    t_data = time.perf_counter() - t_start

    got, busy = Collected(), []
    for obj in objectives:
        for seed in seeds:
            try:
                _objective_seed(out, (pairs, seg), obj, seed, preset, device, log, got)
            except DirectoryLocked as e:  # another process of this benchmark runs it
                busy.append(f"{obj}/seed{seed}")
                log(f"== skipped {obj} seed {seed}: {e}")
    if busy:
        log(f"== not summarised: {len(busy)} objective/seed unit(s) in use by another process "
            f"({', '.join(busy)}); call again when they have finished")
        return {"incomplete": busy}
    runs, probe_runs, pretrain_s, losses = got.runs, got.probe_runs, got.pretrain_s, got.losses

    summary = summarise(runs, objectives, settings)
    gains = paired_gains(runs, summary, objectives, settings)
    table = results_table(summary, objectives, settings)
    probes = list(preset.probes)
    probe_summary = summarise(probe_runs, objectives, probes) if probes else {}
    probe_gains = paired_gains(probe_runs, probe_summary, objectives, probes) if probes else {}
    mean_loss = {obj: {k: float(sum(c[k] for c in per.values()) / len(per))
                       for k in ("start", "end")} for obj, per in losses.items()}
    probe_table = (results_table(probe_summary, objectives, probes, mean_loss, "random init")
                   if probes else "")
    seg_manifest = json.loads((seg / "manifest.json").read_text())
    result = {
        "schema": "mink_ssl.transfer_benchmark/2", "preset": name, "config": asdict(preset),
        "objectives": objectives, "settings": {s: parse_setting(s) for s in settings},
        "seeds": seeds, "metric": "test mIoU (Area 5), fraction in [0, 1]",
        "summary": summary, "gain_over_scratch": gains, "runs": runs,
        "probes": {"setting": preset.probe_setting, "summary": probe_summary,
                   "gain_over_random_init": probe_gains, "runs": probe_runs},
        "pretraining_loss": {obj: {str(seed): c for seed, c in per.items()}
                             for obj, per in losses.items()},
        "data": {"pairs": str(pairs),
                 "pretrain_pairs": len((Path(pairs) / "pairs.txt").read_text().splitlines()),
                 "train_rooms": len(seg_manifest["splits"].get("train", [])),
                 "test_rooms": len(seg_manifest["splits"].get("test", [])),
                 "classes": seg_manifest["classes"]},
        "versions": library_versions(),
        "timings": {"this_call_s": time.perf_counter() - t_start, "data_this_call_s": t_data,
                    "pretrain_s": pretrain_s,
                    "pretrain_total_s": sum(pretrain_s.values()),
                    "finetune_total_s": sum(r["seconds"] for r in runs),
                    "probe_total_s": sum(r["seconds"] for r in probe_runs)},
    }
    write_json(out / "results.json", result)
    md = (f"# Synthetic transfer benchmark ({name} preset)\n\n"
          f"Test mIoU (%) on synthetic S3DIS Area 5, mean ± std over seeds {seeds} "
          f"(pretraining and fine-tuning seed); in brackets: gain over scratch.\n\n"
          f"## Fine-tuning\n\n{table}\n")
    if gains:
        md += ("\nGain over scratch (mIoU points) paired by seed (same labels), per seed; "
               "**beyond spread**: the mean gain exceeds both seed stds above.\n\n"
               + gains_table(gains, settings))
    if probes:
        md += (f"\n## Probes on the frozen backbone ({preset.probe_setting} labels)\n\n"
               f"linear: one linear layer on the output features, {preset.probe_iterations} "
               f"iterations; linear_multiscale: on the four decoder stages concatenated; knn: "
               f"k = {preset.knn_k} cosine neighbours among at most {preset.knn_bank} labelled "
               f"training voxels. In brackets: gain over the random initialisation of the same "
               f"seed. Pretraining loss: mean over the first -> the last tenth of the "
               f"iterations, mean over seeds.\n\n{probe_table}\n")
        if probe_gains:
            md += ("\nGain over the random initialisation (mIoU points), paired by seed; "
                   "**beyond spread**: the mean gain exceeds both seed stds above.\n\n"
                   + gains_table(probe_gains, probes))
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(md)
    write_plot(out / "results.png", summary, objectives, settings)
    log(table)
    if probe_table:
        log(probe_table)
    return result


__all__ = ["PRESETS", "SCRATCH", "Collected", "Preset", "finetune_run", "loss_curve",
           "objective_args", "objective_optim", "parse_setting", "prepare_data", "pretrain_run",
           "probe_run", "run_benchmark"]
