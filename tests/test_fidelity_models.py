"""Golden tests, reference fidelity of models, input features and the fine-tuning optimizer
(docs/fidelity.md rows 4, 6, 7, 9, 10).

The expected numbers were computed once with the released code, run outside this project on
MinkowskiEngine 0.5.4 / torch 2.13 CPU: PointContrast ``pretrain/pointcontrast/model`` and CSC
``downstream/semseg/models`` (``Res16UNet34C``), CSC ``downstream/semseg/lib/solvers.py``
(``initialize_optimizer``, ``PolyLR``) configured as ``config/default.yaml`` and
``scripts/train_scannet.sh``, the released ``Jitter`` transform and ``load_state_with_same_shape``.
Only inputs and numbers are kept here.
"""
from __future__ import annotations

import pytest
import torch

from helpers import compose_config

# ------------------------------------------------------------------ row 9: batch norm, init

# golden: facebookresearch/PointContrast pretrain/pointcontrast/model/res16unet.py Res16UNet34C
# (resnet.py, modules/resnet_block.py, modules/common.py: which BNs take bn_momentum) and
# facebookresearch/ContrastiveSceneContexts downstream/semseg/models/res16unet.py (same names).
# how: the released classes instantiated as Res16UNet34C(3, 32, config) after
# torch.manual_seed(0), outside the project on MinkowskiEngine 0.5.4 / torch 2.13 CPU (commit
# b332ee9); momenta read from the modules, the sums from named_parameters() in float64.
# Re-run 2026-12-07 on PointContrast @47e8682 under ME 0.4 names mapped onto ME 0.5.4
# (RegionType.HYBRID built as HYPER_CUBE: the same 27 taps in another order, which leaves
# these sums unchanged; has_bias -> bias; collections.Sequence restored): equal to the bit.
#: batch norms that get the model's bn_momentum in the released Res16UNet34C (PointContrast
#: pretraining with opt.bn_momentum 0.05 and CSC fine-tuning with optimizer.bn_momentum 0.02
#: give the same names); the other 46 of its 62 batch norms keep 0.1
RELEASED_MODEL_MOMENTUM_BNS = [
    "block2.0.downsample.1", "block3.0.downsample.1", "block4.0.downsample.1",
    "block5.0.downsample.1", "block6.0.downsample.1", "block7.0.downsample.1",
    "block8.0.downsample.1", "bn0", "bn1", "bn2", "bn3", "bn4", "bntr4", "bntr5", "bntr6", "bntr7"]
#: torch.manual_seed(0); released Res16UNet34C(3, 32): (sum, sum of squares, max |w|) of tensors
RELEASED_INIT_SEED0_OUT32 = {
    "block1.0.conv1.kernel": (4.125581072265504, 10.603032461318358, 0.03401969373226166),
    "block2.0.downsample.0.kernel": (7.780660566026199, 21.908484030681777, 0.17677423357963562),
    "convtr4p16s2.kernel": (9.900482052007556, 85.329949715196, 0.02209707535803318),
    "convtr7p2s2.kernel": (6.311156337633179, 31.751327118413727, 0.03608398139476776),
    "block8.1.conv2.kernel": (8.455865881238537, 32.074536518175194, 0.01964149810373783),
    "final.kernel": (4.085136581111328, 10.779229446546205, 0.10205373913049698),
    "final.bias": (-0.27182912174612284, 0.12651526899778834, 0.09839780628681183),
}
RELEASED_PARAMETERS_OUT32 = 37847808


def _batch_norms(net) -> dict:
    """{module name: momentum} of the network's batch norms (a ``bn`` BatchNorm1d on either
    engine, MinkowskiEngine's key)."""
    return {n: m.bn.momentum for n, m in net.named_modules()
            if isinstance(getattr(m, "bn", None), torch.nn.BatchNorm1d)}


@pytest.mark.parametrize("engine", ["minkowski", "spconv"])
def test_row9_bn_momentum_and_init_equal_the_released_res16unet34c(engine):
    """Both engines build the released network: its batch-norm momenta, parameter count and
    (same seed) initial weights."""
    from mink_ssl.models import build_model
    from mink_ssl.models.engines import engine_unavailable

    if engine_unavailable(engine):
        pytest.skip(f"engine {engine}: {engine_unavailable(engine)}")
    torch.manual_seed(0)
    net = build_model("Res16UNet34C", in_channels=3, out_channels=32, bn_momentum=0.05,
                      engine=engine)
    bns = _batch_norms(net)
    assert len(bns) == 62
    assert sorted(n for n, v in bns.items() if v != 0.1) == RELEASED_MODEL_MOMENTUM_BNS
    assert {bns[n] for n in RELEASED_MODEL_MOMENTUM_BNS} == {0.05}
    assert sum(p.numel() for p in net.parameters()) == RELEASED_PARAMETERS_OUT32
    params = dict(net.named_parameters())
    for name, (s, ss, mx) in RELEASED_INIT_SEED0_OUT32.items():
        p = params[name].detach().double()
        got = (float(p.sum()), float(p.square().sum()), float(p.abs().max()))
        assert got == pytest.approx((s, ss, mx), abs=1e-6), name
    # our earlier variant stays an option: every BN at the model momentum, Kaiming kernels
    torch.manual_seed(0)
    ours = build_model("Res16UNet34C", in_channels=3, out_channels=32, bn_momentum=0.05,
                       block_bn_momentum=None, init="kaiming", engine=engine)
    assert set(_batch_norms(ours).values()) == {0.05}
    k = dict(ours.named_parameters())["block1.0.conv1.kernel"].detach().double()
    assert float(k.square().sum()) != pytest.approx(
        RELEASED_INIT_SEED0_OUT32["block1.0.conv1.kernel"][1], rel=0.1)
    with pytest.raises(ValueError, match="init must be one of"):
        build_model("Res16UNet14A", in_channels=3, out_channels=8, init="xavier")


# ------------------------------------------------------------- rows 4 and 10: the optimizer

# golden: facebookresearch/ContrastiveSceneContexts downstream/semseg/lib/solvers.py
# initialize_optimizer + PolyLR (config/default.yaml: sgd_momentum 0.9, sgd_dampening 0.1,
# weight_decay 1e-4, poly_power 0.9; scripts/train_scannet.sh lr 0.8). how: W0 (float64) and
# GRAD x (k + 1) stepped 3 times (trajectory); a zero-gradient weight stepped 21 times with
# PolyLR(max_iter=20), param_groups[0]['lr'] read before each step (lrs). Added in b332ee9.
# Re-run 2026-12-07 on CSC @83515be, torch 2.13 CPU: equal to the last bit.
# input: W0 and GRAD (fixed weights and gradients, chosen by hand)
#: CSC solvers: SGD(lr 0.8, momentum 0.9, dampening 0.1, weight decay 1e-4) and
#: PolyLR(max_iter=20, power 0.9) on w0 with gradients GRAD x (k + 1) at steps k = 0, 1, 2
W0 = [[0.5, -1.0, 2.0], [0.25, 0.0, -0.75]]
GRAD = [[0.1, -0.2, 0.3], [0.0, 0.5, -0.4]]
RELEASED_SGD_TRAJECTORY = [
    [[0.41996, -0.83992, 1.75984], [0.24998, -0.4, -0.42994]],
    [[0.2131761869213915, -0.426352373842783, 1.1394196567132562],
     [0.24994554797454077, -1.43357454513845, 0.3970229921871379]],
    [[-0.16194150454752151, 0.32388300909504303, 0.013974474496895983],
     [0.24989949406973014, -3.308702463434909, 1.8972634885387367]],
]
RELEASED_POLY_LRS = [
    0.8, 0.7656311910083899, 0.7310900320073699, 0.6963665094873275, 0.6614494367484798,
    0.6263262388878881, 0.5909826823596459, 0.5554025301292856, 0.5195670951042881,
    0.48345465158320106, 0.44703964378382066, 0.41029159630642403, 0.3731735725337727,
    0.33563992086510264, 0.2976328464090412, 0.25907693295330225, 0.2198698224114396,
    0.17986498007549923, 0.13883589074732197, 0.0963872562422696, 0.05165265168357517]


def _seg_optimizer(*overrides):
    from omegaconf import OmegaConf

    from mink_ssl.tasks.segmentation import build_seg_optimizer

    cfg = OmegaConf.to_object(compose_config("finetune_seg", "data.root=/x", *overrides))
    w = torch.tensor(W0, dtype=torch.float64, requires_grad=True)
    opt, sched = build_seg_optimizer(cfg.optim, [w], max_iterations=20)
    return cfg, w, opt, sched


def test_row10_sgd_dampening_step_equals_the_released_solver():
    cfg, w, opt, sched = _seg_optimizer("finetune=scannet")
    group = opt.param_groups[0]
    assert (group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"]) == (
        0.9, 0.1, 1e-4, False)
    for k, expected in enumerate(RELEASED_SGD_TRAJECTORY):
        w.grad = torch.tensor(GRAD, dtype=torch.float64) * (k + 1)
        opt.step()
        sched.step()
        torch.testing.assert_close(w.detach(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=0, atol=1e-6)
    # without dampening (the earlier default) the second step already differs
    cfg, w, opt, sched = _seg_optimizer("finetune=scannet", "optim.dampening=0.0")
    for k in range(2):
        w.grad = torch.tensor(GRAD, dtype=torch.float64) * (k + 1)
        opt.step()
        sched.step()
    assert not torch.allclose(w.detach(), torch.tensor(RELEASED_SGD_TRAJECTORY[1],
                                                       dtype=torch.float64), atol=1e-3)


def test_row4_scannet_recipe_is_lr_0_8_poly_batch_48():
    cfg, w, opt, sched = _seg_optimizer("finetune=scannet")
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.scheduler) == ("sgd", 0.8, "poly")
    assert cfg.batch_size * 8 == 48 and cfg.max_iterations == 20000  # 8 processes
    lrs = []
    for _ in range(21):
        lrs.append(opt.param_groups[0]["lr"])
        w.grad = torch.zeros_like(w)
        opt.step()
        sched.step()
    assert lrs == pytest.approx(RELEASED_POLY_LRS, abs=1e-6)
    for bench in ("s3dis", "synthia"):  # train_stanford3d.sh: lr 0.1, PolyLR; Synthia: none
        other, *_ = _seg_optimizer(f"finetune={bench}")
        assert (other.optim.lr, other.optim.scheduler, other.optim.dampening) == (
            0.1, "poly", 0.1)


# ------------------------------------------------------------------- row 7: input features

# golden: facebookresearch/PointContrast pretrain/pointcontrast/lib/transforms.py Jitter()
# (mu 0, sigma 0.01, p 0.95) and the semseg normalize_color step (downstream/semseg/lib/
# train.py, test.py: input[:, :3] / 255. - 0.5). how: random.seed(0), np.random.seed(0), then
# Jitter()(None, np.ones((64, 3))) 4,000 times: fraction of views changed, np.mean / np.std
# (ddof 0) of the noise of those views; COLOURS / 255. - 0.5 in float64. Added in b332ee9.
# Re-run 2026-12-07 on PointContrast @47e8682: equal.
# input: COLOURS (fixed colours)
#: the released Jitter on 4,000 views of ones (64, 3) (random.seed(0), np.random.seed(0)):
#: fraction of jittered views, mean and std of the noise
RELEASED_JITTER = {"fraction": 0.951, "mean": 2.337820330088497e-05, "std": 0.009995004066353315}
#: the released normalize_color of fixed colours (no jitter drawn)
COLOURS = [[0, 128, 255], [17, 34, 51]]
RELEASED_RGB = [[-0.5, 0.0019607843137254832, 0.5],
                [-0.43333333333333335, -0.3666666666666667, -0.3]]


def test_row7_feature_modes_are_3_channel_with_the_released_jitter():
    import numpy as np

    from mink_ssl.data.features import FEATURE_MODES, make_features

    assert {k: m.channels for k, m in FEATURE_MODES.items()} == {
        "ones": 3, "ones_jitter": 3, "rgb": 3, "rgb_jitter": 3, "ones1": 1}
    colours = np.array(COLOURS, np.uint8)
    torch.testing.assert_close(make_features("rgb", colours, 2),
                               torch.tensor(RELEASED_RGB, dtype=torch.float32), rtol=0, atol=1e-6)
    assert torch.equal(make_features("ones", None, 5), torch.ones(5, 3))
    # jitter modes without a generator (evaluation) are deterministic
    assert torch.equal(make_features("ones_jitter", None, 4), torch.ones(4, 3))
    views, n = 4000, 64
    noise = [make_features("ones_jitter", None, n, np.random.default_rng([0, i])) - 1
             for i in range(views)]
    jittered = torch.cat([d for d in noise if bool((d != 0).any())]).double()
    fraction = sum(bool((d != 0).any()) for d in noise) / views
    # sampling tolerances (two independent samples): 6 binomial sd of the fraction's
    # difference, 1e-4 on the mean (~8 sd), 2% on the std
    sd = (2 * 0.05 * 0.95 / views) ** 0.5
    assert fraction == pytest.approx(RELEASED_JITTER["fraction"], abs=6 * sd)
    assert float(jittered.mean()) == pytest.approx(RELEASED_JITTER["mean"], abs=1e-4)
    assert float(jittered.std()) == pytest.approx(RELEASED_JITTER["std"], rel=0.02)
    # CSC: the noise is added to 0..255 colours before normalising
    rgb = torch.stack([make_features("rgb_jitter", np.full((n, 3), 100, np.uint8), n,
                                     np.random.default_rng([1, i])) for i in range(400)])
    on_255 = (rgb.double() + 0.5) * 255 - 100  # (400, n, 3) noise in colour units
    moved = on_255.abs().amax(dim=(1, 2)) > 1e-3
    assert float(on_255[moved].std()) == pytest.approx(0.01, rel=0.05)
    with pytest.raises(ValueError, match="unknown input feature mode 'rgbd'"):
        make_features("rgbd", None, 3)
    with pytest.raises(ValueError, match="need colours"):
        make_features("rgb", None, 3)


@pytest.mark.slow
def test_row7_pretraining_defaults_and_recipes_name_their_input_mode(synthetic_pairs):
    from pathlib import Path

    from omegaconf import OmegaConf

    from mink_ssl.data.pairs import PairDataset

    experiments = Path(__file__).resolve().parents[1] / "experiments" / "configs"
    for recipe in ("pc_pretrain_hc", "pc_pretrain_nce"):
        cfg = OmegaConf.to_object(compose_config(
            "pretrain", f"hydra.searchpath=[file://{experiments}]", f"+experiment={recipe}",
            "data.root=/x"))
        assert cfg.data.features == "ones_jitter"
    assert OmegaConf.to_object(compose_config("pretrain", "data.root=/x")).data.features == (
        "ones_jitter")
    assert OmegaConf.to_object(compose_config("finetune_det", "data.root=/x")).data.features == (
        "ones")
    assert OmegaConf.to_object(compose_config("finetune_seg", "data.root=/x")).data.features == (
        "rgb")
    data = PairDataset(synthetic_pairs, voxel_size=0.05, features="ones_jitter", min_matches=1)
    assert data.in_channels == 3
    a, b = data[(0, 0)], data[(1, 0)]
    f = torch.cat([a.views[0].feats, a.views[1].feats])
    assert f.shape[1] == 3 and float((f - 1).abs().max()) < 0.1
    assert not torch.equal(a.views[0].feats, b.views[0].feats)  # a new draw every epoch
    assert torch.equal(data[(0, 0)].views[0].feats, a.views[0].feats)  # seeded by the sample


# ------------------------------------------------------- row 6: task layers on the backbone

# golden: facebookresearch/ContrastiveSceneContexts downstream/semseg/lib/utils.py
# load_state_with_same_shape (PointContrast's is the same) and the task models' final layer
# (downstream/semseg/ddp_main.py; votenet_det_new models/backbone_module.py
# SparseConvBackbone: Res16UNet34C(3, 256)). how: a Res16UNet14A(3, 32) state dict loaded into
# Res16UNet14A(3, 20) and (3, 256); the keys it leaves out, the count it keeps, final.kernel's
# shape. Added in b332ee9. Re-run 2026-12-07 (CSC @83515be) with our Res16UNet14A's state
# dicts (same keys and shapes as the released model's): equal.
#: the released load_state_with_same_shape of a pretrained Res16UNet14A(3, 32) state into the
#: released Res16UNet14A(3, 20) (segmentation) and Res16UNet14A(3, 256) (VoteNet's
#: SparseConvBackbone): the keys it skips, how many it loads, the rebuilt final kernel's shape
RELEASED_SKIPPED = ["final.bias", "final.kernel"]
RELEASED_LOADED_14A = 192
RELEASED_FINAL_KERNEL = {"seg": (96, 20), "det": (96, 256)}


def test_row6_final_layer_rebuilt_for_the_task_and_pretrained_final_dropped(tmp_path):
    from mink_ssl.engine.config import ModelConfig
    from mink_ssl.models import build_model, save_model
    from mink_ssl.models.heads import (load_segmentation_model, save_segmentation_model)
    from mink_ssl.models.pretrained import load_pretrained
    from mink_ssl.sparse import sparse_tensor
    from mink_ssl.tasks.detection import DetHeadConfig, build_det_model
    from mink_ssl.tasks.segmentation import build_seg_model

    torch.manual_seed(0)
    pre = build_model("Res16UNet14A", in_channels=3, out_channels=32, normalize_output=True)
    save_model(pre, tmp_path / "backbone.pth")
    cfg = ModelConfig(name="Res16UNet14A", out_channels=32, bn_momentum=0.02,
                      normalize_output=False)
    seg = build_seg_model(cfg, 3, 20)
    det = build_det_model(cfg, DetHeadConfig(num_heading_bins=1, num_seeds=16, num_proposals=8),
                          3, 18, torch.ones(18, 3))
    for task, model in (("seg", seg), ("det", det)):
        assert tuple(model.backbone.final.kernel.shape) == RELEASED_FINAL_KERNEL[task]
        report = load_pretrained(model, tmp_path / "backbone.pth")
        assert sorted(report.dropped) == RELEASED_SKIPPED
        assert len(report.loaded) == RELEASED_LOADED_14A
        assert "dropped from the file (task layer rebuilt): final.kernel, final.bias" in (
            report.summary())
        state = model.backbone.state_dict()
        assert all(torch.equal(state[k], v) for k, v in pre.state_dict().items()
                   if not k.startswith("final."))
    assert not any(k.startswith("head.seed_proj") for k in det.state_dict())
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 2, 1]], dtype=torch.int32)
    seg.eval()
    logits = seg(sparse_tensor(coords, torch.ones(3, 3))).F
    assert logits.shape == (3, 20)

    # our earlier variant: the pretrained 32-channel final kept, a 32 -> C head on top
    keep = build_seg_model(cfg, 3, 20, final_layer="keep")
    report = load_pretrained(keep, tmp_path / "backbone.pth")
    assert report.dropped == [] and len(report.loaded) == RELEASED_LOADED_14A + 2
    assert sorted(report.allowed_missing) == ["head.conv.bias", "head.conv.kernel"]
    # a file written before final_layer existed (head config without it) is a keep model
    save_segmentation_model(keep, tmp_path / "old.pth", classes=[str(i) for i in range(20)],
                            voxel_size=0.05, features="rgb")
    old = torch.load(tmp_path / "old.pth", weights_only=True)
    del old["head"]["final_layer"], old["checksum"]  # as written before both existed
    torch.save(old, tmp_path / "old.pth")
    again, meta = load_segmentation_model(tmp_path / "old.pth")
    assert again.final_layer == "keep" and meta["features"] == "rgb"
    keep.eval(), again.eval()
    x = sparse_tensor(coords, torch.ones(3, 3))
    torch.testing.assert_close(again(x).F, keep(x).F)

    # row 7: a backbone pretrained on 3-channel ones loads into an RGB model; 1-channel does not
    save_model(build_model("Res16UNet14A", in_channels=1, out_channels=32), tmp_path / "o1.pth")
    with pytest.raises(ValueError, match="in_channels: file 1 vs model 3.*data.features=ones1"):
        load_pretrained(build_seg_model(cfg, 3, 20), tmp_path / "o1.pth")
