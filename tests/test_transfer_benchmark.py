"""Synthetic transfer benchmark (mink_ssl/tools/transfer_benchmark/): the tiny preset end to
end (real synthetic scans and rooms, real pretraining and fine-tuning), the structure of
results.json / results.md / results.png, and resumability."""
import json

import numpy as np
import pytest
import torch

from mink_ssl.cli import transfer as transfer_cli
from mink_ssl.tools import transfer_benchmark as bench
from mink_ssl.tools.transfer_benchmark import runs as bench_runs
from mink_ssl.tools.transfer_benchmark import presets as bench_presets

OBJECTIVES = ["none", "point_info_nce", "hardest_contrastive"]
SETTINGS = ["pts20", "full"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer")
    logs: list[str] = []
    result = bench.run_benchmark(out, "tiny", objectives=OBJECTIVES, seeds=[0],
                                 settings=SETTINGS, log=logs.append)
    return out, result, logs


@pytest.mark.slow
def test_tiny_benchmark_writes_results_json_md_png(tiny_run):
    out, result, logs = tiny_run
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(result))  # what it returns is what it wrote
    assert saved["schema"] == "mink_ssl.transfer_benchmark/2" and saved["preset"] == "tiny"
    assert saved["objectives"] == OBJECTIVES and saved["seeds"] == [0]
    assert saved["settings"] == {"pts20": {"scene_fraction": 1.0, "labelled_points": 20},
                                 "full": {"scene_fraction": 1.0, "labelled_points": None}}
    assert {"torch", "MinkowskiEngine", "mink_ssl"} <= set(saved["versions"])
    assert saved["data"]["train_rooms"] == 5 and saved["data"]["test_rooms"] == 2  # Area 5
    runs = saved["runs"]
    assert len(runs) == len(OBJECTIVES) * len(SETTINGS)
    assert {(r["objective"], r["setting"], r["seed"]) for r in runs} == {
        (o, s, 0) for o in OBJECTIVES for s in SETTINGS}
    for r in runs:
        assert 0.0 <= r["miou"] <= 1.0 and r["seconds"] > 0
        per_run = json.loads((out / r["dir"] / "results.json").read_text())
        assert per_run["miou"] == r["miou"] and per_run["split"] == "test"
        # scratch runs start from nothing, the others from their objective's backbone
        if r["objective"] == "none":
            assert per_run["pretrained"] is None
        else:
            assert per_run["pretrained"].endswith(f"pretrain/{r['objective']}/seed0/backbone.pth")
            assert per_run["pretrained_loaded_fraction"] > 0.9
        assert per_run["labelled_points"] == (20 if r["setting"] == "pts20" else None)
    for o in OBJECTIVES:
        for s in SETTINGS:
            e = saved["summary"][o][s]
            assert e["n"] == 1 and e["std"] == 0.0 and e["values"] == [e["mean"]]
            assert e["mean"] == next(r["miou"] for r in runs
                                     if r["objective"] == o and r["setting"] == s)
    for o in OBJECTIVES[1:]:  # paired gains; one seed has no spread to beat
        for s in SETTINGS:
            g = saved["gain_over_scratch"][o][s]
            want = saved["summary"][o][s]["mean"] - saved["summary"]["none"][s]["mean"]
            assert g["seeds"] == [0] and g["values"] == [pytest.approx(want)]
            assert g["mean"] == pytest.approx(want) and g["beyond_spread"] is False
    assert "none" not in saved["gain_over_scratch"]
    assert set(saved["timings"]["pretrain_s"]) == {"point_info_nce/seed0",
                                                   "hardest_contrastive/seed0"}

    md = (out / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0] == "| objective | pts20 | full |"
    assert [row.split(" | ")[0] for row in rows[1:4]] == ["| scratch", "| point_info_nce",
                                                         "| hardest_contrastive"]
    scratch = 100 * saved["summary"]["none"]["pts20"]["mean"]
    assert f"{scratch:.1f} ± 0.0" in rows[1]
    gain = 100 * (saved["summary"]["point_info_nce"]["pts20"]["mean"]
                  - saved["summary"]["none"]["pts20"]["mean"])
    assert f"({gain:+.1f})" in rows[2]
    assert rows[4] == "| objective | pts20 | full |"  # the paired-gain table
    assert rows[5].startswith(f"| point_info_nce | {gain:+.1f} | ")
    # the probe table: the pretraining loss, then one column per probe; scratch's row is the
    # random initialisation, the probes' floor
    assert rows[7] == "| objective | pretraining loss | linear | linear_multiscale | knn |"
    assert rows[8].startswith("| random init | - | ")
    curve = saved["pretraining_loss"]["point_info_nce"]["0"]
    assert f"| point_info_nce | {curve['start']:.3g} → {curve['end']:.3g}" in rows[9]
    assert rows[11] == "| objective | linear | linear_multiscale | knn |"  # probe gains


def test_tiny_benchmark_probes_every_backbone_frozen(tiny_run):
    """Every objective's backbone (and the random initialisation) gets every probe, on the
    probe setting's labels; the probed backbone is the pretrained one, untouched; the loss
    curve is read from the pretraining run's metrics.jsonl."""
    import torch

    from mink_ssl.engine.hooks import read_metrics
    from mink_ssl.tasks.segmentation import load_fine_tuned

    out, result, _ = tiny_run
    preset = bench.PRESETS["tiny"]
    probes = result["probes"]
    assert probes["setting"] == "full" and preset.probes == ("linear", "linear_multiscale", "knn")
    assert {(r["objective"], r["setting"], r["seed"]) for r in probes["runs"]} == {
        (o, p, 0) for o in OBJECTIVES for p in preset.probes}
    for r in probes["runs"]:
        per_run = json.loads((out / r["dir"] / "results.json").read_text())
        assert per_run["miou"] == r["miou"] and per_run["probe"] == r["setting"]
        assert per_run["labelled_points"] is None  # probe_setting "full"
        if r["objective"] == "none":
            assert per_run["pretrained"] is None
            continue
        backbone = out / "pretrain" / r["objective"] / "seed0" / "backbone.pth"
        assert per_run["pretrained"] == str(backbone)
        if r["setting"] == "linear":  # the model file holds the frozen backbone unchanged
            probed = load_fine_tuned(out / r["dir"] / "model.pth")[0].backbone.state_dict()
            pretrained = torch.load(backbone, weights_only=True)["state_dict"]
            assert probed.keys() == pretrained.keys()
            for k, v in pretrained.items():
                assert torch.equal(probed[k], v), k
    knn = json.loads((out / "probe/point_info_nce/knn/seed0/results.json").read_text())
    assert knn["knn_k"] == 3 and 0 < knn["knn_bank"] <= 500
    for o in OBJECTIVES[1:]:
        curve = result["pretraining_loss"][o]["0"]
        loss = [m["loss"] for m in read_metrics(out / "pretrain" / o / "seed0").values()]
        assert curve["iterations"] == len(loss) == preset.pretrain_iterations
        assert curve["start"] == pytest.approx(loss[0]) and curve["end"] == pytest.approx(loss[-1])
        g = probes["gain_over_random_init"][o]["knn"]
        assert g["values"] == [pytest.approx(probes["summary"][o]["knn"]["mean"]
                                             - probes["summary"]["none"]["knn"]["mean"])]
    assert "none" not in result["pretraining_loss"]

    import matplotlib.image

    png = out / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert np.ptp(image[..., :3]) > 0.5  # bars drawn, not a blank canvas


def test_rerun_does_no_work_and_an_interrupted_run_continues(tiny_run):
    out, result, _ = tiny_run
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/**/results.json")}
    logs: list[str] = []
    again = bench.run_benchmark(out, "tiny", objectives=OBJECTIVES, seeds=[0],
                                settings=SETTINGS, log=logs.append)
    text = "\n".join(logs)
    assert "generated" not in text and "pretrain:" not in text and "finetune-seg:" not in text
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/**/results.json")} == stamps
    assert again["summary"] == result["summary"]

    # as if killed during one fine-tuning run: only that run is redone
    victim = out / "finetune" / "hardest_contrastive" / "full" / "seed0"
    (victim / "results.json").unlink()
    logs.clear()
    redone = bench.run_benchmark(out, "tiny", objectives=OBJECTIVES, seeds=[0],
                                 settings=SETTINGS, log=logs.append)
    starts = [line for line in logs if line.startswith("finetune-seg: ") and "train scenes" in line]
    assert len(starts) == 1 and str(victim) in starts[0]
    assert not any(line.startswith("pretrain:") for line in logs)
    assert (victim / "results.json").is_file() and len(redone["runs"]) == len(result["runs"])

    # as if killed during pretraining after its last checkpoint: it resumes from there
    pre = out / "pretrain" / "point_info_nce" / "seed0"
    before = torch.load(pre / "backbone.pth", weights_only=True)["state_dict"]
    (pre / "backbone.pth").unlink()
    (pre / "bench_time.json").unlink()
    logs.clear()
    bench.run_benchmark(out, "tiny", objectives=OBJECTIVES, seeds=[0], settings=SETTINGS,
                        log=logs.append)
    assert sum("resumed from" in line and str(pre) in line for line in logs) == 1, logs
    after = torch.load(pre / "backbone.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)

    # a finished run is not silently reused for another preset
    from dataclasses import replace

    other = replace(bench.PRESETS["tiny"], finetune_lr=1e-3)
    with pytest.raises(ValueError, match=r"finetune/none/pts20/seed0 was made with another "
                                         r"config \(differs in \['optim'\]\): use a new --out"):
        bench.run_benchmark(out, other, objectives=OBJECTIVES, seeds=[0], settings=SETTINGS)


def test_a_run_held_by_another_process_is_skipped_and_nothing_summarised(tiny_run):
    """Processes sharing a benchmark: a run whose directory another process holds is skipped,
    the others go on, no summary is written (exit code 3) until a later call finds it done."""
    from mink_ssl.locks import DirLock

    out, result, _ = tiny_run
    summary = out / "results.json"
    stamp = summary.stat().st_mtime_ns
    held = out / "finetune" / "none" / "pts20" / "seed0"
    (held / "results.json").unlink()
    logs: list[str] = []
    with DirLock(held, "finetune-seg"):
        partial = bench.run_benchmark(out, "tiny", objectives=OBJECTIVES, seeds=[0],
                                      settings=SETTINGS, log=logs.append)
        assert transfer_cli.main(["--out", str(out), "--preset", "tiny"]) == 3
    assert partial == {"incomplete": ["none/seed0"]}
    assert any(line.startswith("== skipped none seed 0: ") and "in use by another run" in line
               for line in logs), logs
    assert any("== probe knn hardest_contrastive seed 0" in line for line in logs)  # went on
    assert summary.stat().st_mtime_ns == stamp and not (held / "results.json").exists()
    done = bench.run_benchmark(out, "tiny", objectives=OBJECTIVES, seeds=[0], settings=SETTINGS,
                               log=lambda s: None)
    assert (held / "results.json").is_file() and done["summary"].keys() == result["summary"].keys()


def test_bad_arguments_name_the_value_and_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"unknown objective\(s\) \['infonce'\].*point_info_nce"):
        bench.run_benchmark(tmp_path, "tiny", objectives=["none", "infonce"])
    with pytest.raises(ValueError, match="unknown setting 'pts'; use pts<N>"):
        bench.run_benchmark(tmp_path, "tiny", settings=["pts"])
    with pytest.raises(ValueError, match=r"unknown preset 'huge'; valid choices: \['demo'"):
        bench.run_benchmark(tmp_path, "huge")
    assert bench_presets.parse_setting("frac0.1") == {"scene_fraction": 0.1, "labelled_points": None}
    assert transfer_cli.main(["--out", str(tmp_path), "--preset", "tiny",
                              "--settings", "frac0"]) == 2
    assert not (tmp_path / "data").exists()  # arguments are checked before any work


@pytest.mark.slow
def test_checkout_script_is_the_library_command(tmp_path):
    """experiments/synthetic_transfer/run.py runs mink_ssl.tools.transfer_benchmark's CLI."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "synthetic_transfer" / "run.py"
    p = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--seeds"],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 2 and "--seeds: expected at least one argument" in p.stderr
    p = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--preset", "huge"],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 2
    assert "mink-ssl-transfer: error: unknown preset 'huge'" in p.stderr
    assert not (tmp_path / "data").exists()


def test_random_room_colours_say_nothing_about_the_class(tmp_path):
    """The benchmark's rooms (random_colors=True) keep the geometry of the class-coloured ones,
    but a nearest-class-colour classifier that is mostly right on the class-coloured ones fails
    on them."""
    from data_prep.synthetic import generate_s3dis_rooms
    from data_prep.synthetic.s3dis_rooms import CLASS_COLORS

    kw = dict(areas=(1,), rooms_per_area=3, defects=False, seed=1, points_per_m2=20.0)
    plain = generate_s3dis_rooms(tmp_path / "plain", **kw)
    rand = generate_s3dis_rooms(tmp_path / "random", random_colors=True, **kw)
    assert plain.rooms.keys() == rand.rooms.keys()
    for name, t in plain.rooms.items():
        assert np.array_equal(t.coords, rand.rooms[name].coords)
        assert np.array_equal(t.classes, rand.rooms[name].classes)
    names = sorted(CLASS_COLORS)
    palette = np.array([CLASS_COLORS[c] for c in names], dtype=np.float64)  # (13, 3)

    def colour_accuracy(truth):
        rgb = np.concatenate([t.colors for t in truth.rooms.values()]).astype(np.float64)
        cls = np.concatenate([t.classes for t in truth.rooms.values()])
        nearest = np.linalg.norm(rgb[:, None] - palette[None], axis=2).argmin(1)  # (N,)
        return (np.array(names)[nearest] == cls).mean()

    assert colour_accuracy(plain) > 0.6 and colour_accuracy(rand) < 0.1
    noisy = generate_s3dis_rooms(tmp_path / "noisy", noise=0.02, **kw)
    t0, t1 = next(iter(plain.rooms.values())), next(iter(noisy.rooms.values()))
    floor0, floor1 = t0.coords[t0.classes == "floor", 2], t1.coords[t1.classes == "floor", 2]
    assert floor0.std() < 0.006 and 0.015 < floor1.std() < 0.025  # metres, along the normal
    with pytest.raises(ValueError, match=r"noise is a std in metres in \[0, 0.1\), got 0.5"):
        generate_s3dis_rooms(tmp_path / "bad", noise=0.5, **kw)


def test_runs_made_before_a_setting_was_added_are_reused_at_its_default():
    default = {"lr": 0.1, "eval": {"every": 0, "keep_best": True}}
    old_run = {"lr": 0.1, "eval": {"every": 0}}  # finished before eval.keep_best existed
    assert bench_runs._changed(default, old_run, default) == []
    assert bench_runs._changed({"lr": 0.1, "eval": {"every": 0, "keep_best": False}}, old_run,
                          default) == ["eval"]
    assert bench_runs._changed({"lr": 0.2, "eval": {"every": 0}}, old_run, default) == ["lr"]
    assert bench_runs._changed(default, {**old_run, "removed": 1}, default) == ["removed"]


def test_distillation_pretrains_with_its_papers_optimizer(tiny_run):
    """Distillation trains with DCGLR's AdamW, warm-up and cosine schedule and a teacher
    momentum for short runs; the other objectives with the preset's SGD."""
    out, _, _ = tiny_run
    full = bench.PRESETS["full"]
    assert bench_presets.objective_optim("point_info_nce", full) == {"lr": 0.1}
    want = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.04, "schedule": "cosine",
            "warmup_iterations": 80}
    assert bench_presets.objective_optim("distillation", full) == want
    assert bench_presets.objective_optim("point_info_nce+distillation", full) == want
    tiny = bench.PRESETS["tiny"]
    logs: list[str] = []
    backbone, _ = bench_runs.pretrain_run(out, out / "data" / "pairs", "distillation", 0, tiny,
                                     log=logs.append)
    assert "lr 0.001 (not scaled with world size, cosine)" in logs[0], logs[0]  # the peak lr
    cfg = json.loads((backbone.parent / "config.json").read_text())
    assert cfg["optim"]["name"] == "adamw" and cfg["optim"]["schedule"] == "cosine"
    assert cfg["objectives"]["distillation"]["momentum"] == 0.99
    assert len(bench_runs.loss_curve(backbone.parent)["curve"]) == tiny.pretrain_iterations
