"""Probes on a frozen backbone (mink_ssl.models.probe, mink_ssl.tasks.segmentation.probe): the backbone
stays bit-identical, the multi-scale features hold every decoder stage for every voxel, kNN
equals brute force, and real probe runs on the synthetic rooms of test_finetune_seg."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import (SEG_CLASSES as CLASSES, SEG_VOXEL as VOXEL, REPO,
                      pretrained_backbone as _pretrained_backbone, tiny_seg_config as tiny_config,
                      write_benchmark)

from mink_ssl.models import build_model
from mink_ssl.models.probe import (DECODER_STAGES, FrozenProbe, KnnHead, multiscale_width,
                                   row_index)
from mink_ssl.sparse import sparse_tensor


@pytest.fixture(scope="module")
def rooms(tmp_path_factory):
    return write_benchmark(tmp_path_factory.mktemp("probe") / "rooms", {
        "train": [f"Area_1/room_{i}" for i in range(4)], "val": ["Area_5/room_0"], "test": []},
        seed=3)


def _scene(seed: int = 0, n: int = 300):
    """Two batch items of unique voxels around the origin (negative coordinates included)."""
    g = torch.Generator().manual_seed(seed)
    coords = []
    for b in range(2):
        c = torch.unique(torch.randint(-20, 20, (n, 3), generator=g), dim=0)
        coords.append(torch.cat([torch.full((len(c), 1), b), c], 1))
    coords = torch.cat(coords).to(torch.int32)  # (N, 4) batch index first
    return coords, torch.rand(len(coords), 3, generator=g) - 0.5


def test_multiscale_probe_gives_every_voxel_every_decoder_stage():
    torch.manual_seed(0)
    net = build_model("Res16UNet14A", in_channels=3, out_channels=16)
    probe = FrozenProbe(net, 4, "linear_multiscale")
    assert multiscale_width(net) == 128 + 128 + 96 + 96 == probe.head.in_channels
    assert multiscale_width(build_model("Res16UNet34C", in_channels=3, out_channels=32)) == 576
    assert multiscale_width(build_model("Res16UNet14S", in_channels=3, out_channels=32)) == 224
    coords, feats = _scene()
    x = sparse_tensor(coords, feats)
    f = probe.features(x)
    assert f.shape == (len(coords), 448)
    # the stages' own outputs, as the (frozen, eval-mode) network computes them
    with torch.no_grad():
        _, stages = net.forward_stages(x, [name for name, _ in DECODER_STAGES])
    # brute force: the row of each stage whose voxel cube [c, c + stride) holds the voxel
    offset = 0
    for name, stride in DECODER_STAGES:
        C, F = stages[name].coords, stages[name].feats
        assert stages[name].stride == stride
        width = F.shape[1]
        for i in range(0, len(coords), 7):
            p = coords[i]
            inside = ((C[:, 0] == p[0]) & (C[:, 1:] <= p[1:]).all(1)
                      & (p[1:] < C[:, 1:] + stride).all(1)).nonzero().flatten()
            assert len(inside) == 1, (name, p)
            torch.testing.assert_close(f[i, offset:offset + width], F[inside[0]], rtol=0, atol=0)
        offset += width
    assert offset == 448
    # the logits sit on the input's coordinates in its order
    out = probe(x)
    assert out.F.shape == (len(coords), 4) and torch.equal(out.C, x.C)
    with pytest.raises(ValueError, match="no match"):
        row_index(torch.tensor([[0, 1, 2, 3]]), torch.tensor([[0, 0, 0, 0]]))


def test_knn_vote_equals_brute_force():
    g = torch.Generator().manual_seed(1)
    bank, labels = torch.randn(60, 8, generator=g), torch.randint(0, 5, (60,), generator=g)
    queries = torch.randn(37, 8, generator=g)
    head = KnnHead(5, k=7, chunk_elements=60 * 4)  # chunks of 4 queries
    head.fit(bank * 3.0, labels)  # scale is irrelevant to cosine
    votes = head(queries)
    b, q = bank.double().numpy(), queries.double().numpy()
    cos = (q @ b.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(b, axis=1)[None, :]
    expected = np.zeros((37, 5))
    for i in range(37):
        for j in np.argsort(-cos[i])[:7]:
            expected[i, labels[j]] += 1
    np.testing.assert_array_equal(votes.numpy(), expected)
    assert (votes.sum(1) == 7).all()
    with pytest.raises(ValueError, match=r"bank labels must be in \[0, 5\)"):
        head.fit(bank, labels - 1)
    with pytest.raises(ValueError, match="knn_k must be an int >= 1"):
        KnnHead(5, k=0)


@pytest.mark.parametrize("kind", ["linear", "linear_multiscale"])
def test_probing_leaves_the_backbone_bit_identical(kind):
    torch.manual_seed(0)
    net = build_model("Res16UNet14A", in_channels=3, out_channels=16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = FrozenProbe(net, 4, kind)
    model.train()
    assert model.training and model.head.training and not net.training
    assert not any(p.requires_grad for p in net.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    head_before = [p.clone() for p in model.head.parameters()]
    coords, feats = _scene(2)
    for _ in range(3):
        logits = model(sparse_tensor(coords, feats)).F
        loss = torch.nn.functional.cross_entropy(logits, torch.randint(0, 4, (len(coords),)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in net.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(head_before, model.head.parameters()))
    after = net.state_dict()
    for k, v in before.items():  # weights and batch-norm statistics, bit for bit
        assert torch.equal(after[k], v), k


def test_linear_multiscale_probe_run_keeps_the_pretrained_backbone(rooms, tmp_path):
    """finetune_seg(probe=linear_multiscale) on the synthetic rooms: the pretrained backbone in
    model.pth and the checkpoint equals the file bit for bit, only the head trained, the results
    say which probe, and the saved probe evaluates again through evaluate_only."""
    from mink_ssl.models.heads import load_segmentation_model
    from mink_ssl.tasks.segmentation import finetune_seg

    saved = _pretrained_backbone(tmp_path / "backbone.pth")
    run = tmp_path / "run"
    cfg = tiny_config(rooms, pretrained=str(tmp_path / "backbone.pth"),
                      probe="linear_multiscale", max_iterations=6, checkpoint_every=6)
    cfg = replace(cfg, data=replace(cfg.data, voxel_size=VOXEL))
    results = finetune_seg(cfg, run, print_fn=lambda *a: None)
    assert results["probe"] == "linear_multiscale"  # every backbone tensor, final included:
    # the head's tensors: linear weight and bias, its norm's mean, variance and batch count
    assert results["pretrained_loaded_fraction"] == pytest.approx(len(saved) / (len(saved) + 5))
    assert 0 <= results["miou"] <= 1 and (run / "results.md").is_file()
    model, meta = load_segmentation_model(run / "model.pth")
    assert isinstance(model, FrozenProbe) and model.probe == "linear_multiscale"
    assert meta["classes"] == CLASSES and model.head.in_channels == 448
    for k, v in saved.items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    ckpt = torch.load(run / "checkpoint_6.pth", weights_only=True)
    assert all(torch.equal(ckpt["backbone"][k], v) for k, v in saved.items())
    again = finetune_seg(replace(cfg, pretrained=None, evaluate_only=str(run / "model.pth")),
                         tmp_path / "again", print_fn=lambda *a: None)
    assert again["miou"] == pytest.approx(results["miou"])


@pytest.mark.slow
def test_cli_knn_probe_end_to_end(rooms, tmp_path):
    """`python -m mink_ssl.cli.finetune_seg probe=knn`: the bank holds every labelled voxel of
    the unaugmented training rooms, the run writes the fine-tuning results files and says which
    probe (the backbone here is random weights plus noise, so its mIoU says nothing)."""
    _pretrained_backbone(tmp_path / "backbone.pth")
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "mink_ssl.cli.finetune_seg", f"data.root={rooms}",
         "model=res16unet14a", "model.out_channels=16", f"pretrained={tmp_path / 'backbone.pth'}",
         f"data.voxel_size={VOXEL}", "data.num_workers=0", "data.eval_split=val", "probe=knn",
         "knn_k=5", "eval.ply_scenes=1", "device=cpu", "progress=false",
         f"hydra.run.dir={run}"], capture_output=True, text=True, cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kNN probe (k=5, cosine) with a bank of" in done.stdout
    from mink_ssl.tasks.segmentation import SegDataConfig, build_seg_dataset

    train = build_seg_dataset(SegDataConfig(root=str(rooms), voxel_size=VOXEL, augment=False),
                              "train", train=True, seed=0)
    labelled = sum(int((train[i].labels >= 0).sum()) for i in range(len(train)))
    results = json.loads((run / "results.json").read_text())
    assert results["probe"] == "knn" and results["knn_k"] == 5
    assert results["knn_bank"] == labelled > 1000  # every labelled voxel of the 4 rooms
    assert 0 < results["miou"] <= 1 and results["points"] > 500  # voxels of the val room
    assert json.loads((run / "config.json").read_text())["probe"] == "knn"
    assert (run / "predictions" / "Area_5__room_0.ply").is_file()
    assert not list(run.glob("checkpoint_*.pth"))


def test_knn_bank_follows_the_limited_labels(rooms, tmp_path):
    """data.labelled_points=N: the bank holds only the voxels of the N labelled points kept in
    each training room (at most N per room), no other voxel."""
    from mink_ssl.tasks.segmentation import finetune_seg

    cfg = tiny_config(rooms, probe="knn", knn_k=3)
    cfg = replace(cfg, data=replace(cfg.data, voxel_size=VOXEL, labelled_points=20))
    results = finetune_seg(cfg, tmp_path / "run", print_fn=lambda *a: None)
    assert 0 < results["knn_bank"] <= 4 * 20 and results["labelled_points"] == 20


def test_config_takes_the_probe_keys():
    from helpers import compose_config
    from omegaconf import OmegaConf

    default = OmegaConf.to_object(compose_config("finetune_seg", "data.root=/x"))
    assert default.probe is None and (default.knn_k, default.knn_bank) == (20, 200000)
    knn = OmegaConf.to_object(compose_config("finetune_seg", "data.root=/x", "probe=knn",
                                             "knn_k=5"))
    assert knn.probe == "knn" and knn.knn_k == 5
    with pytest.raises(Exception, match="knn_kk"):
        compose_config("finetune_seg", "data.root=/x", "knn_kk=5")


def test_unknown_probe_is_an_error_naming_the_choices(rooms, tmp_path):
    from mink_ssl.tasks.segmentation import finetune_seg

    with pytest.raises(ValueError, match=r"probe=linaer: must be one of linear, linear_multi"):
        finetune_seg(tiny_config(rooms, probe="linaer"), tmp_path / "run",
                     print_fn=lambda *a: None)


def test_linear_probe_normalises_its_input_and_stays_linear():
    """The linear probes' batch norm without affine parameters (MAE's linear probing): in
    training the logits do not depend on the features' scale or offset per channel; at
    evaluation the head is one affine map of the features; without ``norm`` (model files made
    before it) the head is the plain layer."""
    from mink_ssl.models.probe import LinearProbeHead

    torch.manual_seed(0)
    head = LinearProbeHead(6, 3, "linear")
    assert [n for n, _ in head.named_parameters()] == ["linear.weight", "linear.bias"]
    x = torch.randn(500, 6)
    scale, shift = torch.rand(6) * 100 + 0.1, torch.randn(6) * 50
    head.train()
    torch.testing.assert_close(head(x * scale + shift), head(x), rtol=1e-3, atol=1e-3)
    head.eval()  # running statistics: an affine map, W x + b
    a, b, c = head(x[:1]), head(x[1:2]), head(0.5 * x[:1] + 0.5 * x[1:2])
    torch.testing.assert_close(c, 0.5 * a + 0.5 * b)
    assert head.config()["norm"] is True
    plain = LinearProbeHead(6, 3, "linear", norm=False)
    assert plain.config()["norm"] is False and plain.norm is None
    torch.testing.assert_close(plain(x), plain.linear(x))
