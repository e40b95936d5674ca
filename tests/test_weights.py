"""Weights files in and out (``mink_ssl.models.weight_files``, ``mink-ssl-weights``).

The released layouts are rebuilt here exactly as the released code writes them (PointContrast's
``ddp_trainer._save_checkpoint``: ``curr_iter``, ``state_dict``, ``optimizer``, ``scheduler``,
``config`` as an OmegaConf DictConfig; CSC's pretraining the same without ``config``; the
fine-tuning code's ``iteration``, ``epoch``, ``arch``, ``state_dict``, ``optimizer``,
``best_val_miou``), with real optimiser and scheduler states, and read without running code.
Every conversion is proven on a real Kinect frame: the converted network's output equals the
original's.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mink_ssl.models import build_model, load_model
from mink_ssl.models.engines import engine_unavailable
from mink_ssl.models.pretrained import load_pretrained
from mink_ssl.models.weight_files import UnsafeFileError, read_weights, safe_torch_load
from mink_ssl.models.weight_files.convert import convert, spconv_weight
from mink_ssl.sparse import SparseVoxels, quantize, sparse_tensor

REPO = Path(__file__).resolve().parents[1]
# input: the net keys of PointContrast's pretrain/pointcontrast/config/defaults.yaml, as its
# released checkpoints record them in 'config'
PC_NET = {"model": "Res16UNet34C", "model_n_out": 32, "conv1_kernel_size": 3,
          "normalize_feature": True, "dist_type": "L2"}


# ---------------------------------------------------------------------- the released layouts

def _optimised(model):
    """The optimiser and scheduler states the released trainers save (SGD with momentum,
    ExponentialLR), after one real step so that momentum buffers exist."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.1,
                          weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.99)
    for p in model.parameters():
        p.grad = torch.ones_like(p) * 1e-3
    opt.step()
    sched.step()
    return opt.state_dict(), sched.state_dict()


#: our tap k takes ME 0.4 HYBRID tap PERM[k]. Measured, not derived: ME 0.4.3 built for CPU
#: outside the project (torch 2.13, c++17, <cstdint>, collections.abc), a 3x3x3 convolution with
#: RegionType.HYBRID (the released Res16UNet blocks' ConvType.SPATIAL_HYPERCUBE_TEMPORAL_HYPERCROSS)
#: given one-hot kernels, the neighbour each tap reads recorded at tensor strides 1, 2, 4, 8 and
#: dilations 1, 2 (docs/fidelity.md, "MinkowskiEngine 0.4.3 vs 0.5.4")
# golden: NVIDIA/MinkowskiEngine v0.4.3 (b683e25) MinkowskiEngine/Common.py convert_region_type
# with src/region.cpp, for RegionType.HYBRID as PointContrast's model/modules/common.py builds
# it. how: the one-hot measurement above, run on the 0.4.3 build in a throwaway venv (its
# scripts stayed in /tmp, not recorded); added in 1aeb42d; the rule-derived permutation
# (hybrid_to_hypercube) is checked equal to it below.
PERM_MEASURED_ON_ME_0_4_3 = [19, 15, 23, 11, 9, 13, 21, 17, 25, 5, 3, 7, 1, 0, 2, 6, 4, 8, 20,
                             16, 24, 12, 10, 14, 22, 18, 26]


def in_released_order(state: dict) -> dict:
    """``state`` with its residual-block 3x3x3 kernels in ME 0.4's HYBRID tap order, as the
    released files hold them."""
    from mink_ssl.models.weight_files.layouts import block_kernels

    perm = torch.tensor(PERM_MEASURED_ON_ME_0_4_3)
    out = dict(state)
    for k in block_kernels(state):
        hybrid = torch.empty_like(state[k])
        hybrid[perm] = state[k]
        out[k] = hybrid
    return out


def released_file(kind: str, path: Path, model, legacy: bool = False) -> Path:
    """``path`` written in the layout ``kind`` with ``model``'s weights, its block kernels in the
    released (HYBRID) tap order."""
    from omegaconf import OmegaConf

    opt, sched = _optimised(model)
    state = in_released_order(model.state_dict())
    if kind == "pointcontrast":
        cfg = OmegaConf.create({"net": dict(PC_NET, model=type(model).__name__,
                                            model_n_out=model.out_channels,
                                            conv1_kernel_size=model.stem_kernel_size),
                                "opt": {"lr": 0.1, "bn_momentum": 0.05, "max_iter": 300000},
                                "misc": {"weight": None, "npos": 4096, "nceT": 0.07},
                                "trainer": {"trainer": "HardestContrastiveLossTrainer"}})
        obj = {"curr_iter": 300000, "state_dict": state, "optimizer": opt, "scheduler": sched,
               "config": cfg}
    elif kind == "csc_pretrain":
        obj = {"curr_iter": 100000, "state_dict": state, "optimizer": opt, "scheduler": sched}
    elif kind in ("csc_finetuned", "encoder"):
        prefix = "module." if kind == "csc_finetuned" else "encoder."
        obj = {"iteration": 60000, "epoch": 120, "arch": type(model).__name__,
               "state_dict": {prefix + k: v for k, v in state.items()}, "optimizer": opt,
               "best_val_miou": 73.8, "best_val_iter": 60000}
    else:
        raise ValueError(kind)
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def net(name="Res16UNet14A", seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("in_channels", 3)
    kwargs.setdefault("out_channels", 32)
    return build_model(name, **kwargs)


@pytest.mark.parametrize("kind,layout,source,iteration", [
    ("pointcontrast", "PointContrast pretraining", "recorded in the file", 300000),
    ("csc_pretrain", "CSC pretraining", "inferred from the key names and shapes", 100000),
    ("csc_finetuned", "fine-tuning checkpoint", "recorded in the file", 60000),
    ("encoder", "fine-tuning checkpoint", "recorded in the file", 60000),
])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_each_released_layout_is_read_and_loaded(tmp_path, kind, layout, source, iteration,
                                                 legacy):
    # golden: the layouts' keys from facebookresearch/PointContrast pretrain/pointcontrast/lib/
    # ddp_trainer.py _save_checkpoint and downstream/semseg/lib/utils.py checkpoint (CSC's the
    # same; its pretraining without 'config'). how: read from the code; released_file writes
    # them with real optimiser / scheduler states. No number of a released run is compared.
    model = net()
    path = released_file(kind, tmp_path / "w.pth", model, legacy=legacy)
    with pytest.raises(Exception):  # what the user met before: the safe torch.load refuses it
        if kind == "pointcontrast":
            torch.load(path, weights_only=True)
        else:
            raise RuntimeError("only the DictConfig is refused by weights_only")
    wf = read_weights(path)
    assert wf.layout.startswith(layout) and wf.architecture_source.startswith(source)
    assert wf.architecture == {"name": "Res16UNet14A", "in_channels": 3, "out_channels": 32,
                               "stem_kernel_size": 3, "dimension": 3}
    assert wf.iteration == iteration and len(wf.state_dict) == len(model.state_dict())
    assert all(torch.equal(wf.state_dict[k], v) for k, v in model.state_dict().items())
    assert wf.kernel_order == "me0.4-hybrid"
    assert any("16 residual-block 3x3x3 kernels reordered from ME 0.4's HYBRID" in n
               for n in wf.notices), wf.notices
    if kind == "pointcontrast":
        assert wf.config["net"]["model"] == "Res16UNet14A" and wf.config["opt"]["lr"] == 0.1
    if kind in ("csc_finetuned", "encoder"):
        assert wf.prefix == ("module." if kind == "csc_finetuned" else "encoder.")
        assert wf.extra["best_val_miou"] == 73.8

    # pretrained= reads it directly: every backbone tensor loaded, the final layer rebuilt
    from mink_ssl.engine.config import ModelConfig
    from mink_ssl.tasks.segmentation import build_seg_model

    seg = build_seg_model(ModelConfig(name="Res16UNet14A", out_channels=32), 3, 20)
    report = load_pretrained(seg, path)
    state = seg.backbone.state_dict()
    assert sorted(report.dropped) == ["final.bias", "final.kernel"]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()
               if not k.startswith("final."))
    assert layout in report.summary()


def test_released_34c_pointcontrast_file_is_374_tensors_of_37_85m(tmp_path):
    # golden: 37,847,808 parameters = the released Res16UNet34C(3, 32)'s count
    # (facebookresearch/PointContrast pretrain/pointcontrast/model/res16unet.py; how: see
    # RELEASED_PARAMETERS_OUT32 in test_fidelity_models.py). 374 tensors (62 batch norms x 5
    # entries + 64 kernels / bias): len(state_dict()) of that released model, re-run 2026-12-07
    # as RELEASED_INIT_SEED0_OUT32 says. The layout keys: PointContrast lib/ddp_trainer.py
    # _save_checkpoint, as released_file writes them.
    model = net("Res16UNet34C")
    path = released_file("pointcontrast", tmp_path / "hardest_contrastive.pth", model)
    out = subprocess.run([sys.executable, "-m", "mink_ssl.cli.weights", "inspect", str(path)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for line in ("PointContrast pretraining checkpoint", "Res16UNet34C (recorded in the file",
                 "in 3, out 32; stem kernel 3", "iteration     300000",
                 "37,847,808 in 374 tensors", "net.model=Res16UNet34C", "opt.bn_momentum=0.05"):
        assert line in out.stdout, (line, out.stdout)


@pytest.mark.parametrize("kwargs", [dict(stem_kernel_size=5), dict(in_channels=1),
                                    dict(in_channels=3, out_channels=20)],
                         ids=["stem5", "in1", "out20"])
def test_architecture_inferred_from_keys_and_shapes(tmp_path, kwargs):
    model = net(**kwargs)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    wf = read_weights(tmp_path / "bare.pth")
    expected = dict({"name": "Res16UNet14A", "in_channels": 3, "out_channels": 32,
                     "stem_kernel_size": 3, "dimension": 3}, **kwargs)
    assert wf.architecture == expected
    assert wf.architecture_source == "inferred from the key names and shapes"
    assert wf.layout == "bare state dict" and wf.kernel_order == "hypercube"
    assert all(torch.equal(wf.state_dict[k], v) for k, v in model.state_dict().items())


def test_every_family_member_is_recognised_by_its_shapes():
    from mink_ssl.models import MODELS
    from mink_ssl.models.weight_files import infer_architecture

    for name in MODELS.names():
        if getattr(MODELS.get(name), "BLOCK", None) is None:
            continue
        arch = infer_architecture(net(name).state_dict())
        assert name in arch["candidates"], (name, arch)


def test_recorded_and_inferred_architecture_must_agree(tmp_path):
    model = net()
    path = released_file("pointcontrast", tmp_path / "w.pth", model)
    obj = torch.load(path, weights_only=False)  # our own file, written just above
    obj["config"].net.conv1_kernel_size = 5
    torch.save(obj, path)
    with pytest.raises(ValueError, match="stem_kernel_size: recorded 5, tensors say 3"):
        read_weights(path)


def test_one_channel_file_into_a_three_channel_model_names_the_fix(tmp_path):
    from mink_ssl.engine.config import ModelConfig
    from mink_ssl.tasks.segmentation import build_seg_model

    path = released_file("csc_pretrain", tmp_path / "w.pth", net(in_channels=1))
    seg = build_seg_model(ModelConfig(name="Res16UNet14A", out_channels=32), 3, 20)
    with pytest.raises(ValueError, match="in_channels: file 1 vs model 3.*inferred from the key "
                                         "names.*data.features=ones1"):
        load_pretrained(seg, path)


# ---------------------------------------------------------------------- nothing runs

class _Payload:
    def __init__(self, marker: Path, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        if self.how == "eval":
            return (eval, (f"open({str(self.marker)!r}, 'w')",))
        return (subprocess.call, (["touch", str(self.marker)],))


@pytest.mark.parametrize("how", ["system", "eval", "subprocess"])
def test_a_code_running_pickle_is_refused_and_never_runs(tmp_path, capsys, how):
    from mink_ssl.cli.weights import main

    marker = tmp_path / "ran"
    model = net()
    evil = {"curr_iter": 1, "state_dict": model.state_dict(), "config": _Payload(marker, how)}
    torch.save(evil, tmp_path / "evil.pth")
    torch.save(_Payload(marker, how), tmp_path / "top.pth")
    for name in ("evil.pth", "top.pth"):
        with pytest.raises(UnsafeFileError, match="runs code when unpickled.*nothing was run"):
            safe_torch_load(tmp_path / name)
        with pytest.raises(UnsafeFileError):
            load_pretrained(net(), tmp_path / name, prefix="")
        assert main(["inspect", str(tmp_path / name)]) == 3
        assert "refused" in capsys.readouterr().err
    assert not marker.exists()
    # the payload is live: the unsafe load that the old advice led to runs it
    torch.load(tmp_path / "top.pth", weights_only=False)
    assert marker.exists()


def test_unknown_classes_become_inert_records(tmp_path):
    """An object of a class the reader does not know is kept as data (never imported)."""
    import argparse

    model = net()
    obj = {"state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1, arch="x"),
           "step": np.int64(7), "path": Path("/data/scannet"), "odd": _Inert(3)}
    torch.save(obj, tmp_path / "w.pth")
    wf = read_weights(tmp_path / "w.pth")
    assert any("odd: test_weights._Inert" in n for n in wf.notices), wf.notices
    raw, report = safe_torch_load(tmp_path / "w.pth")
    assert "test_weights._Inert" in report.foreign
    assert type(raw["odd"]).__name__ == "_Inert" and raw["odd"].state == {"x": 3}


class _Inert:
    def __init__(self, x):
        self.x = x


def test_damaged_and_foreign_files_are_named(tmp_path):
    path = released_file("csc_pretrain", tmp_path / "w.pth", net())
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pth cannot be read as a torch weights file.*complete"):
        read_weights(tmp_path / "cut.pth")
    torch.save({"optimizer": {}}, tmp_path / "no_weights.pth")
    with pytest.raises(ValueError, match="neither a mink-ssl file.*top-level keys"):
        read_weights(tmp_path / "no_weights.pth")
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(tmp_path / "script.pt"))
    with pytest.raises(ValueError, match="TorchScript archive"):
        read_weights(tmp_path / "script.pt")


# ---------------------------------------------------------------------- conversions

@pytest.fixture(scope="module")
def frame(realdata) -> SparseVoxels:
    """A real Kinect frame (7-Scenes RedKitchen, frame 0) at 5 cm with its RGB, float64."""
    from data_prep.scannet.exported import ExportedFrames
    from mink_ssl.data.features import input_features
    from mink_ssl.geometry import backproject

    kitchen = realdata / "7scenes-redkitchen-a"
    if not (kitchen / "depth").is_dir():
        pytest.skip(f"{kitchen} missing")
    src = ExportedFrames(kitchen)
    h, fr = src.header, src.frame(0)
    pts, pixel = backproject(fr.depth(h), h.intrinsic_depth, h.depth_shift, fr.camera_to_world)
    q = quantize(pts, 0.05)
    rgb = fr.color(h).reshape(-1, 3)[pixel][q.index.numpy()]
    coords = torch.cat([torch.zeros(len(q.coords), 1, dtype=torch.int32), q.coords], 1)
    return sparse_tensor(coords, input_features(rgb, 3).double())


def _out(model, x):
    model.double().eval()
    with torch.no_grad():
        return model(x).F


def _scrambled(model):
    """Batch-norm statistics that are not the identity, so that they are tested too."""
    g = torch.Generator().manual_seed(1)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
        elif name.endswith("running_var"):
            buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
    return model


def test_convert_to_our_format_gives_the_same_network(tmp_path, frame, capsys):
    from mink_ssl.cli.weights import main

    model = _scrambled(net("Res16UNet34C"))
    path = released_file("pointcontrast", tmp_path / "pc.pth", model, legacy=True)
    assert main(["convert", str(path), "--out", str(tmp_path / "backbone.pth")]) == 0
    state = torch.load(tmp_path / "backbone.pth", weights_only=True)  # plain data
    assert state["format"] == "mink_ssl.model/1" and state["model"]["bn_momentum"] == 0.05
    assert state["converted_from"]["layout"] == "PointContrast pretraining checkpoint"
    converted = load_model(tmp_path / "backbone.pth")
    assert torch.equal(_out(converted, frame), _out(model, frame))
    capsys.readouterr()
    assert main(["convert", str(path), "--out", str(tmp_path / "backbone.pth")]) == 2
    assert "exists; choose another --out or add --overwrite" in capsys.readouterr().err


SPCONV_MISSING = engine_unavailable("spconv")


def _spconv_res16unet(model):
    """Res16UNet built from spconv 2's own layers under our module names (not our engine)."""
    import spconv.pytorch as spconv
    from torch import nn

    from mink_ssl.models.res16unet import BasicBlock

    assert model.BLOCK is BasicBlock
    P, L, D0 = model.PLANES, model.LAYERS, model.INIT_DIM

    def subm(cin, cout, k, key, bias=False):
        return spconv.SubMConv3d(cin, cout, k, bias=bias, indice_key=key)

    class Block(nn.Module):
        def __init__(self, cin, planes, key):
            super().__init__()
            self.conv1, self.norm1 = subm(cin, planes, 3, key), nn.BatchNorm1d(planes)
            self.conv2, self.norm2 = subm(planes, planes, 3, key), nn.BatchNorm1d(planes)
            self.downsample = None if cin == planes else nn.Sequential(
                subm(cin, planes, 1, key + "p"), nn.BatchNorm1d(planes))

        def forward(self, x):
            res = x if self.downsample is None else self.downsample[0](x)
            if self.downsample is not None:
                res = res.replace_feature(self.downsample[1](res.features))
            out = self.conv1(x)
            out = out.replace_feature(torch.relu(self.norm1(out.features)))
            out = self.conv2(out)
            return out.replace_feature(torch.relu(self.norm2(out.features) + res.features))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0p1s1 = subm(model.in_channels, D0, model.stem_kernel_size, "stem")
            self.bn0 = nn.BatchNorm1d(D0)
            cin = D0
            for i, s in enumerate((1, 2, 4, 8), start=1):
                setattr(self, f"conv{i}p{s}s2", spconv.SparseConv3d(
                    cin, cin, 2, 2, bias=False, indice_key=f"down{s}"))
                setattr(self, f"bn{i}", nn.BatchNorm1d(cin))
                setattr(self, f"block{i}", nn.Sequential(*[
                    Block(cin if j == 0 else P[i - 1], P[i - 1], f"s{2 * s}")
                    for j in range(L[i - 1])]))
                cin = P[i - 1]
            skips = (P[2], P[1], P[0], D0)
            for i, s in zip(range(4, 8), (16, 8, 4, 2)):
                setattr(self, f"convtr{i}p{s}s2", spconv.SparseInverseConv3d(
                    cin, P[i], 2, bias=False, indice_key=f"down{s // 2}"))
                setattr(self, f"bntr{i}", nn.BatchNorm1d(P[i]))
                setattr(self, f"block{i + 1}", nn.Sequential(*[
                    Block(P[i] + skips[i - 4] if j == 0 else P[i], P[i], f"s{s // 2}")
                    for j in range(L[i])]))
                cin = P[i]
            self.final = subm(cin, model.out_channels, 1, "final", bias=True)

        def forward(self, t):
            def cbr(conv, bn, x):
                x = conv(x)
                return x.replace_feature(torch.relu(bn(x.features)))

            out = cbr(self.conv0p1s1, self.bn0, t)
            skips = [out]
            for i, s in enumerate((1, 2, 4, 8), start=1):
                out = cbr(getattr(self, f"conv{i}p{s}s2"), getattr(self, f"bn{i}"), out)
                out = getattr(self, f"block{i}")(out)
                skips.append(out)
            for i, s in zip(range(4, 8), (16, 8, 4, 2)):
                out = cbr(getattr(self, f"convtr{i}p{s}s2"), getattr(self, f"bntr{i}"), out)
                skip = skips[7 - i]
                out = out.replace_feature(torch.cat([out.features, skip.features], 1))
                out = getattr(self, f"block{i + 1}")(out)
            return self.final(out)

    return Net()


@pytest.mark.skipif(bool(SPCONV_MISSING), reason=f"needs spconv: {SPCONV_MISSING}")
@pytest.mark.parametrize("name,stem", [("Res16UNet14A", 3), ("Res16UNet34C", 5)])
def test_convert_to_spconv_runs_equal_in_spconv_own_layers(tmp_path, frame, name, stem):
    import spconv.pytorch as spconv

    model = _scrambled(net(name, stem_kernel_size=stem))
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    obj, _ = convert(read_weights(tmp_path / "bare.pth"), "spconv")
    plain = _spconv_res16unet(model)
    plain.load_state_dict(obj["state_dict"], strict=True)
    plain.double().eval()
    xyz = frame.coords[:, 1:].long()
    shift = torch.div(xyz.min(0).values, 16, rounding_mode="floor") * 16
    idx = torch.cat([frame.coords[:, :1], (xyz - shift).int()], 1)
    shape = [int(v) for v in ((idx[:, 1:].max(0).values // 16) + 2) * 16]
    with torch.no_grad():
        got = plain(spconv.SparseConvTensor(frame.feats, idx, shape, 1))
    assert torch.equal(got.indices, idx)  # submanifold output: the input's rows
    expected = _out(model, frame)
    err = (got.features - expected).abs().max() / expected.abs().max()
    assert err < 1e-10, err


def test_spconv_kernel_layout_for_each_kind():
    """The layout rule on a one-hot kernel: our offset k = ix + 3*(iy + 3*iz), Cin i -> Cout o,
    is spconv's weight[o, ix, iy, iz, i] for index columns (batch, x, y, z)."""
    k = 3
    kernel = torch.zeros(27, 2, 4)
    kernel[1 + 3 * (2 + 3 * 0), 1, 3] = 1.0  # ix=1, iy=2, iz=0, Cin 1 -> Cout 3
    w = spconv_weight(kernel)
    assert w.shape == (4, k, k, k, 2) and w[3, 1, 2, 0, 1] == 1.0 and w.sum() == 1.0
    one = torch.arange(6.0).reshape(2, 3)  # 1x1: the raw (Cin, Cout) memory, viewed
    assert torch.equal(spconv_weight(one).reshape(2, 3), one)


def test_convert_to_pointcept(tmp_path, frame):
    model = _scrambled(net("Res16UNet34C", stem_kernel_size=5, out_channels=20))
    path = released_file("csc_finetuned", tmp_path / "csc.pth", model)
    wf = read_weights(path)
    obj, notes = convert(wf, "pointcept-minkunet")
    assert set(obj) == {"state_dict", "epoch"} and obj["epoch"] == 0
    assert list(obj["state_dict"]) == ["backbone." + k for k in model.state_dict()]
    assert any("MinkUNet34C(in_channels=3, out_channels=20)" in n for n in notes)
    torch.save(obj, tmp_path / "pointcept.pth")
    back = torch.load(tmp_path / "pointcept.pth", weights_only=True)["state_dict"]
    again = net("Res16UNet34C", seed=3, stem_kernel_size=5, out_channels=20)
    again.load_state_dict({k[len("backbone."):]: v for k, v in back.items()}, strict=True)
    assert torch.equal(_out(again, frame), _out(model, frame))
    # a stem of 3 (PointContrast's pretraining) has no Pointcept MinkUNet; SpUNet never matches
    pc = read_weights(released_file("pointcontrast", tmp_path / "pc.pth", net("Res16UNet34C")))
    with pytest.raises(ValueError, match="stem kernel 3, Pointcept's MinkUNet has 5"):
        convert(pc, "pointcept-minkunet")
    with pytest.raises(ValueError, match="SpUNet-v1m1 is not this network.*encoder stages 2-4"
                                         ".*eps: SpUNet 1e-3.*momentum: SpUNet 0.01"):
        convert(wf, "pointcept-spunet")


# ---------------------------------------------------------------------- damaged weights

def _flip_a_weight_bit(path: Path, tensor: torch.Tensor) -> None:
    """Flip one bit inside ``tensor``'s bytes in the saved file (torch's zip has no CRC check)."""
    data = bytearray(path.read_bytes())
    at = data.find(tensor.detach().contiguous().numpy().tobytes()[:64])
    assert at > 0
    data[at + 9] ^= 0x04
    path.write_bytes(bytes(data))


def test_our_files_carry_a_checksum_that_finds_a_flipped_bit(tmp_path):
    from mink_ssl.models import save_model

    model = net()
    save_model(model, tmp_path / "backbone.pth")
    assert len(torch.load(tmp_path / "backbone.pth", weights_only=True)["checksum"]["sha256"]) == 64
    load_model(tmp_path / "backbone.pth")  # intact: loads
    _flip_a_weight_bit(tmp_path / "backbone.pth", model.state_dict()["block1.0.conv1.kernel"])
    torch.load(tmp_path / "backbone.pth", weights_only=True)  # torch itself sees nothing
    for load in (load_model, lambda p: load_pretrained(net(), p, prefix="")):
        with pytest.raises(ValueError, match="backbone.pth is damaged: its content does not "
                                             "match the checksum"):
            load(tmp_path / "backbone.pth")
    data = (tmp_path / "m.pth")
    save_model(model, data)
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ValueError, match="m.pth cannot be read as a mink-ssl model file: it is "
                                         "damaged, truncated"):
        load_model(data)


def test_non_finite_pretrained_weights_are_named_at_load(tmp_path):
    state = net().state_dict()
    state["block2.0.conv2.kernel"][0, 0, 0] = float("nan")
    state["bn0.bn.running_var"][1] = float("inf")
    torch.save({"state_dict": state}, tmp_path / "nan.pth")
    model = net(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"non-finite values.*2 tensor\(s\): "
                                         r"(?=.*block2\.0\.conv2\.kernel)(?=.*bn0\.bn\.running_var)"):
        load_pretrained(model, tmp_path / "nan.pth", prefix="")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------- ME 0.4 kernel order

def test_the_hybrid_order_rule_gives_the_permutation_measured_on_me_0_4_3():
    from mink_ssl.models.weight_files.layouts import hybrid_offsets, hybrid_to_hypercube

    assert hybrid_to_hypercube() == PERM_MEASURED_ON_ME_0_4_3
    assert hybrid_offsets()[:3] == [(0, 0, 0), (-1, 0, 0), (1, 0, 0)]
    assert sorted(hybrid_offsets()) == sorted(
        (x, y, z) for x in (-1, 0, 1) for y in (-1, 0, 1) for z in (-1, 0, 1))


@pytest.mark.parametrize("engine", ["spconv", "minkowski"])
def test_a_reordered_kernel_reads_the_neighbour_the_released_code_read(engine):
    """One-hot kernels in HYBRID order, reordered on read, in our 3x3x3 convolution: the centre
    voxel of a full 3x3x3 block receives exactly the neighbour at the released tap's offset.

    golden: the tap offsets are hybrid_offsets(), the order of NVIDIA/MinkowskiEngine v0.4.3
    MinkowskiEngine/Common.py convert_region_type. how: checked equal to the measured
    PERM_MEASURED_ON_ME_0_4_3 by the test above."""
    from mink_ssl.models.engines import get_engine
    from mink_ssl.models.weight_files.layouts import hybrid_offsets, hybrid_to_hypercube

    if engine_unavailable(engine):
        pytest.skip(engine_unavailable(engine))
    E = get_engine(engine)
    grid = torch.tensor([(x, y, z) for z in range(3) for y in range(3) for x in range(3)],
                        dtype=torch.int32)
    ids = (grid[:, 0] + 10 * grid[:, 1] + 100 * grid[:, 2]).double()[:, None]
    x = sparse_tensor(torch.cat([torch.zeros(27, 1, dtype=torch.int32), grid], 1), ids)
    conv = E.conv(1, 1, 3, dimension=3).double()
    centre = int(((grid == 1).all(1)).nonzero())
    perm = torch.tensor(hybrid_to_hypercube())
    for tap, (dx, dy, dz) in enumerate(hybrid_offsets()):
        released = torch.zeros(27, 1, 1, dtype=torch.float64)
        released[tap] = 1.0
        with torch.no_grad():
            conv.kernel.copy_(released[perm])
            out = E.to_voxels(conv(E.to_native(x, align=16)))
        row = int(((out.coords[:, 1:] == grid[centre]).all(1)).nonzero())
        assert out.feats[row, 0] == (1 + dx) + 10 * (1 + dy) + 100 * (1 + dz), tap


def test_kernel_order_can_be_declared_and_the_centre_tap_is_evidence(tmp_path, capsys):
    from mink_ssl.cli.weights import main

    model = net()
    with torch.no_grad():  # trained 3x3x3 kernels weigh the centre most; make it so
        for k in (k for k in model.state_dict() if k.startswith("block") and "conv" in k):
            kernel = dict(model.named_parameters())[k]
            if kernel.dim() == 3 and kernel.shape[0] == 27:
                kernel[13] *= 10
    torch.save(in_released_order(model.state_dict()), tmp_path / "extracted.pth")
    assert read_weights(tmp_path / "extracted.pth").kernel_order == "hypercube"  # undecidable
    assert main(["inspect", str(tmp_path / "extracted.pth")]) == 0
    assert "strongest tap is 0 (13 is the centre" in capsys.readouterr().out
    wf = read_weights(tmp_path / "extracted.pth", kernel_order="me0.4-hybrid")
    assert all(torch.equal(wf.state_dict[k], v) for k, v in model.state_dict().items())
    assert main(["inspect", "--kernel-order", "me0.4-hybrid", str(tmp_path / "extracted.pth")]) == 0
    assert "strongest tap is 13" in capsys.readouterr().out
    assert main(["convert", "--kernel-order", "me0.4-hybrid", str(tmp_path / "extracted.pth"),
                 "--out", str(tmp_path / "ours.pth")]) == 0
    assert torch.load(tmp_path / "ours.pth", weights_only=True)["converted_from"][
        "kernel_order"] == "me0.4-hybrid"
    assert all(torch.equal(load_model(tmp_path / "ours.pth").state_dict()[k], v)
               for k, v in model.state_dict().items())
