from mink_ssl.cli.demo import main, run_backbone_demo


def test_demo_runs_the_backbone_on_a_synthetic_scene():
    lines = []
    res = run_backbone_demo("Res16UNet14A", n_points=20_000, voxel_size=0.05, repeats=1,
                            device="cpu", print_fn=lines.append)
    assert res["output_shape"] == (res["voxels"], 32)
    assert res["forward"].median_s > 0 and res["forward_backward"].median_s > 0
    text = "\n".join(lines)
    assert "forward+backward" in text and "voxels at 5 cm" in text


def test_demo_cli_rejects_unknown_model(capsys):
    assert main(["--model", "Res16UNet99", "--points", "1000"]) == 2
    assert "valid choices" in capsys.readouterr().err
