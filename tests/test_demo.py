import json

import pytest

from mink_ssl.cli.demo import main
from mink_ssl.tools.demo import run_demo


@pytest.mark.slow
def test_demo_runs_prep_pretraining_backbone_and_finetuning_end_to_end(tmp_path):
    lines = []
    res = run_demo(tmp_path, n_scenes=2, n_frames=60, model_name="Res16UNet14A",
                   voxel_size=0.05, repeats=1, device="cpu", pretrain_iterations=2,
                   objectives=("point_info_nce", "gmm_likelihood"), preset="tiny",
                   finetune_iterations=2, print_fn=lines.append)
    run = tmp_path / "transfer" / "pretrain" / "point_info_nce+gmm_likelihood" / "seed0"
    assert res["pretrained"] == run / "backbone.pth" and res["pretrained"].is_file()
    assert set(json.loads((run / "config.json").read_text())["objectives"]) == {
        "point_info_nce", "gmm_likelihood"}
    assert res["prep"]["scenes_done"] == 2 and res["prep"]["fragments"] == 2 * 3
    assert res["prep"]["pairs"] == 2 * 3 and res["prep"]["pairs_kept"] > 0
    assert (tmp_path / "pairs" / "pairs.txt").read_text().count("\n") == res["prep"]["pairs_kept"]
    back = res["backbone"]
    assert back["output_shape"] == (back["voxels"], 32) and back["voxels"] > 1000
    assert back["forward"].median_s > 0 and back["forward_backward"].median_s > 0
    assert json.loads((tmp_path / "demo_config.json").read_text())["n_scenes"] == 2
    # step 5: scratch and the step-3 checkpoint fine-tuned on the same limited labels
    transfer = res["transfer"]
    assert transfer["objectives"] == ["none", "point_info_nce+gmm_likelihood"]
    assert transfer["data"]["pairs"] == str(tmp_path / "pairs")  # pretrained on the demo's pairs
    for r in transfer["runs"]:
        per_run = json.loads((tmp_path / "transfer" / r["dir"] / "results.json").read_text())
        assert per_run["pretrained"] == (None if r["objective"] == "none"
                                         else str(res["pretrained"]))
    printed = "\n".join(lines).splitlines()
    table = [line for line in printed if line.startswith("| ")]
    assert table[0] == "| objective | pts20 | full |" and table[1].startswith("| scratch | ")
    assert table[2].startswith("| point_info_nce+gmm_likelihood | ")
    assert printed[-1] == table[-1]  # the demo ends with the results table
    assert (tmp_path / "transfer" / "results.md").is_file()
    # a rerun reuses the generated scenes, the prepared pairs and every trained run
    lines.clear()
    run_demo(tmp_path, n_scenes=2, n_frames=60, model_name="Res16UNet14A", voxel_size=0.05,
             repeats=1, device="cpu", pretrain_iterations=2,
             objectives=("point_info_nce", "gmm_likelihood"), preset="tiny",
             finetune_iterations=2, print_fn=lines.append)
    text = "\n".join(lines)
    assert "generated" not in text and "(2 already done)" in text
    assert "pretrain:" not in text and "finetune-seg:" not in text
    # cluster_render renders frames: the demo asks the pairs for them
    lines.clear()
    res = run_demo(tmp_path, n_scenes=2, n_frames=60, model_name="Res16UNet14A",
                   voxel_size=0.05, repeats=1, device="cpu", pretrain_iterations=1,
                   objectives=("cluster_render",), preset="tiny", finetune_iterations=0,
                   print_fn=lines.append)
    cfg = json.loads((res["pretrained"].parent / "config.json").read_text())
    assert res["pretrained"].is_file() and cfg["data"]["frame_size"] == [60, 80]
    assert res["transfer"] is None


def test_demo_cli_rejects_unknown_model_objective_and_preset(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--scenes", "1", "--frames", "30",
                 "--model", "Res16UNet99"]) == 2
    assert "valid choices" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--objective", "infonce"]) == 2
    assert "point_info_nce" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--preset", "huge"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'huge'; valid choices: ['demo', 'full', 'tiny']" in err
    assert not (tmp_path / "raw").exists()  # checked before any work
