import json

from mink_ssl.cli.demo import main, run_demo


def test_demo_runs_prep_and_backbone_end_to_end(tmp_path):
    lines = []
    res = run_demo(tmp_path, n_scenes=2, n_frames=60, model_name="Res16UNet14A",
                   voxel_size=0.05, repeats=1, device="cpu", pretrain_iterations=2,
                   objectives=("point_info_nce", "gmm_likelihood"), print_fn=lines.append)
    assert res["pretrained"].is_file() and (tmp_path / "pretrain" / "config.json").is_file()
    assert res["prep"]["scenes_done"] == 2 and res["prep"]["fragments"] == 2 * 3
    assert res["prep"]["pairs"] == 2 * 3 and res["prep"]["pairs_kept"] > 0
    assert (tmp_path / "pairs" / "pairs.txt").read_text().count("\n") == res["prep"]["pairs_kept"]
    back = res["backbone"]
    assert back["output_shape"] == (back["voxels"], 32) and back["voxels"] > 1000
    assert back["forward"].median_s > 0 and back["forward_backward"].median_s > 0
    assert json.loads((tmp_path / "demo_config.json").read_text())["n_scenes"] == 2
    # a rerun reuses the generated scenes and the prepared pairs
    lines.clear()
    run_demo(tmp_path, n_scenes=2, n_frames=60, model_name="Res16UNet14A", voxel_size=0.05,
             repeats=1, device="cpu", pretrain_iterations=0, print_fn=lines.append)
    text = "\n".join(lines)
    assert "generated" not in text and "(2 already done)" in text


def test_demo_cli_rejects_unknown_model(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--scenes", "1", "--frames", "30",
                 "--model", "Res16UNet99"]) == 2
    assert "valid choices" in capsys.readouterr().err
