"""The two sparse engines are equal: MinkowskiEngine (the reference) and spconv (the fast path)
give the same outputs and the same gradients for the same weights, layer by layer and for every
network of the family, on real Kinect frames and on generated multi-scene batches, at one thread
and at several.

Tolerances. In float64 both engines compute the same sums in different orders, so they agree to
rounding: outputs to 1e-10 relative to their scale and gradients likewise (measured here:
3e-15 on outputs, 6e-15 on gradients for Res16UNet14A). In float32 outputs agree to 1e-4 of
their scale (measured: 2e-6); float32 gradients are compared with the float64 truth by norm,
where spconv must be as accurate as MinkowskiEngine (see the float32 test for why).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from mink_ssl.models import MODELS, build_model
from mink_ssl.models.engines import ENGINES, engine_unavailable, get_engine
from mink_ssl.sparse import SparseVoxels, batched_coordinates, pack_keys, quantize, sparse_tensor

REPO = Path(__file__).resolve().parents[1]
MISSING = {e: engine_unavailable(e) for e in ENGINES}
needs_both = pytest.mark.skipif(any(MISSING.values()),
                                reason=f"needs both engines: {MISSING}")


# ----------------------------------------------------------------------------- inputs

def generated_batch(n_scenes: int = 3, seed: int = 0, n: int = 1500) -> SparseVoxels:
    """Several scenes per batch: noisy room-like surfaces (floor, two walls, a box) at 5 cm,
    some coordinates negative, 3 input channels."""
    g = np.random.default_rng(seed)
    coords = []
    for s in range(n_scenes):
        u = g.uniform(0, 4, (n, 2))
        floor = np.c_[u, np.zeros(n)]
        wall = np.c_[u[:, 0], np.zeros(n), u[:, 1] * 0.6]
        wall2 = np.c_[np.zeros(n), u[:, 1], u[:, 0] * 0.6]
        box = g.uniform([1.5, 1.5, 0], [2.2, 2.5, 0.8], (n // 2, 3))
        pts = np.concatenate([floor, wall, wall2, box]) + g.normal(0, 0.01, (3 * n + n // 2, 3))
        pts += g.uniform(-3, 3, 3) - s  # a different offset per scene, negative coordinates too
        coords.append(quantize(torch.from_numpy(pts), 0.05).coords)
    c = batched_coordinates(coords)
    f = torch.from_numpy(g.normal(0, 1, (len(c), 3)))
    return sparse_tensor(c, f.float())


def kitchen_batch(kitchen: Path, frames=(0, 475), voxel_size: float = 0.05) -> SparseVoxels:
    """Real Kinect frames of 7-Scenes RedKitchen, one scene each, with their RGB."""
    from data_prep.scannet.exported import ExportedFrames
    from mink_ssl.data.features import input_features
    from mink_ssl.geometry import backproject

    src = ExportedFrames(kitchen)
    h = src.header
    coords, feats = [], []
    for i in frames:
        fr = src.frame(i)
        pts, pixel = backproject(fr.depth(h), h.intrinsic_depth, h.depth_shift, fr.camera_to_world)
        rgb = fr.color(h).reshape(-1, 3)[pixel]
        q = quantize(pts, voxel_size)
        coords.append(q.coords)
        feats.append(input_features(rgb[q.index.numpy()], 3))
    return sparse_tensor(batched_coordinates(coords), torch.cat(feats))


def as_dtype(x: SparseVoxels, dtype) -> SparseVoxels:
    return SparseVoxels(x.coords, x.feats.to(dtype), x.stride)


def by_coordinates(v: SparseVoxels) -> torch.Tensor:
    """Row order that sorts ``v`` by its coordinates (engines order strided outputs differently)."""
    c = v.coords.to(torch.int64)
    lo = c.min(0).values
    return torch.argsort(pack_keys(c, lo, c.max(0).values - lo + 1))


# ----------------------------------------------------------------------------- comparison

def run_net(engine: str, make, x: SparseVoxels, dtype=torch.float64, state=None, train=True):
    """Build ``make(engine)``, load ``state`` if given, run ``x`` and backprop a fixed random
    projection of the output (rows sorted by coordinates). Returns (output sorted by
    coordinates, {param name: grad}, input grad, state dict)."""
    torch.manual_seed(0)
    net = make(engine).to(dtype)
    if state is not None:
        net.load_state_dict(state)
    net.train(train)
    x = as_dtype(x, dtype)
    feats = x.feats.clone().requires_grad_(True)
    out = net(SparseVoxels(x.coords, feats, x.stride))
    order = by_coordinates(out)
    y = out.feats[order]
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    (y * weight).sum().backward()
    grads = {k: p.grad.detach().clone() for k, p in net.named_parameters() if p.grad is not None}
    return y.detach(), grads, feats.grad.detach(), net.state_dict()


def assert_engines_equal(make, x: SparseVoxels, dtype=torch.float64, rtol: float = 1e-10,
                         train: bool = True) -> dict:
    """Same weights on both engines (MinkowskiEngine's init, loaded into spconv): outputs, every
    parameter's gradient and the input's gradient agree to ``rtol`` of their scale."""
    ref_out, ref_grads, ref_in, state = run_net("minkowski", make, x, dtype, train=train)
    out, grads, in_grad, _ = run_net("spconv", make, x, dtype, state=state, train=train)
    errors = {"output": rel_err(out, ref_out), "input grad": rel_err(in_grad, ref_in)}
    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
    for k in ref_grads:
        errors[k] = rel_err(grads[k], ref_grads[k])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{worst}: relative error {errors[worst]:.3g} > {rtol}"
    return errors


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = float(b.abs().max()) or 1.0
    return float((a.double() - b.double()).abs().max()) / scale


# ----------------------------------------------------------------------------- layers

class LayerNet(nn.Module):
    """One layer kind in isolation, built by the engine's constructors."""

    def __init__(self, engine: str, kind: str, cin: int = 3, cout: int = 8):
        super().__init__()
        E = self.E = get_engine(engine)
        self.kind = kind
        if kind in ("stem3", "stem5"):
            self.conv = E.conv(cin, cout, int(kind[-1]))
        elif kind == "conv1x1":
            self.conv = E.conv(cin, cout, 1, bias=True)
        elif kind == "strided2":
            self.conv = E.conv(cin, cout, 2, stride=2)
        elif kind == "transposed2":
            self.down = E.conv(cin, cout, 2, stride=2)
            self.conv = E.conv_transpose(cout, cout, 2, stride=2)
        elif kind == "two_levels":  # strided twice, then back up twice (a UNet's spine)
            self.down = nn.Sequential(E.conv(cin, cout, 2, stride=2), E.conv(cout, cout, 2, stride=2))
            self.conv = nn.Sequential(E.conv_transpose(cout, cout, 2, stride=2),
                                      E.conv_transpose(cout, cout, 2, stride=2))
        elif kind == "batch_norm":
            self.conv = E.conv(cin, cout, 3)
            self.bn = E.batch_norm(cout, 0.1)
        elif kind == "cat":
            self.conv = E.conv(cin, cout, 3)
        else:
            raise ValueError(kind)

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        E, t = self.E, self.E.to_native(x, align=16)
        if self.kind in ("transposed2", "two_levels"):
            t = self.conv(self.down(t))
        elif self.kind == "batch_norm":
            t = self.bn(self.conv(t))
        elif self.kind == "cat":
            t = E.cat(self.conv(t), t)
        else:
            t = self.conv(t)
        return E.to_voxels(t)


LAYER_KINDS = ("stem3", "stem5", "conv1x1", "strided2", "transposed2", "two_levels",
               "batch_norm", "cat")


@needs_both
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_each_layer_kind_is_equal_in_float64(kind):
    x = generated_batch(2, n=400)
    errors = assert_engines_equal(lambda e: LayerNet(e, kind), x, rtol=1e-12)
    assert len(errors) >= 3  # output, input grad and at least the kernel's grad were compared


@needs_both
def test_strided_outputs_cover_the_same_voxels_in_the_same_cells():
    """MinkowskiEngine puts a stride-s voxel at floor(c / s) * s, negative coordinates
    included; spconv's shifted grid must land on the very same cells."""
    x = generated_batch(2, n=400)
    outs = {}
    for e in ENGINES:
        torch.manual_seed(0)
        net = LayerNet(e, "strided2")
        out = net(x)
        outs[e] = out.coords[by_coordinates(out)]
        assert out.stride == 2
    assert torch.equal(outs["spconv"], outs["minkowski"])
    assert int(outs["minkowski"][:, 1:].min()) < 0  # the case that needs floor, not truncation


# ----------------------------------------------------------------------------- networks

def family_net(name: str, **kwargs):
    return lambda engine: build_model(name, in_channels=3, out_channels=5, engine=engine, **kwargs)


@needs_both
@pytest.mark.parametrize("name", ["Res16UNet14", "Res16UNet14A", "Res16UNet14S", "Res16UNet34C"])
def test_networks_equal_in_float64_on_generated_scenes(name):
    assert_engines_equal(family_net(name), generated_batch(3, n=700), rtol=1e-10)


@needs_both
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(MODELS.names()) - {
    "Res16UNet14", "Res16UNet14A", "Res16UNet14S", "Res16UNet34C"}))
def test_every_family_member_equal_in_float64(name):
    """The rest of the family, Bottleneck networks (50, 101) included."""
    assert_engines_equal(family_net(name), generated_batch(2, n=500), rtol=1e-10)


@needs_both
@pytest.mark.slow
def test_res16unet34c_equal_on_real_kinect_frames(kitchen):
    """Two real frames as two scenes of one batch, RGB input, stem of kernel 5 too."""
    x = kitchen_batch(kitchen)
    assert len(x.coords) > 5000
    assert_engines_equal(family_net("Res16UNet34C"), x, rtol=1e-10)
    assert_engines_equal(family_net("Res16UNet14A", stem_kernel_size=5), x, rtol=1e-10)


@needs_both
def test_float32_is_as_accurate_as_minkowski_engine():
    """In float32 the outputs agree to 1e-4 of their scale (measured 2e-6). Gradients are not
    compared entry by entry: a ReLU input within rounding of 0 takes the other side on one
    engine, and a few gradient entries then move by a finite amount. Which engine lands closer
    to the float64 truth changes with the summation order (MinkowskiEngine's own float32
    gradients were 3e-3 off at one thread and 1e-2 off at two, spconv's 1e-2 and 2e-6). So each
    engine's whole float32 gradient is compared with the float64 truth, by norm: within 1e-2
    (measured at most 3e-3 for either)."""
    x, make = generated_batch(2, n=700), family_net("Res16UNet14A")
    truth = run_net("minkowski", make, x, torch.float64)
    me32 = run_net("minkowski", make, x, torch.float32, state=truth[3])
    sp32 = run_net("spconv", make, x, torch.float32, state=truth[3])
    assert rel_err(sp32[0], me32[0]) < 1e-4

    def flat(grads):
        return torch.cat([grads[k].double().flatten() for k in sorted(grads)])

    exact = flat(truth[1])
    for run in (me32, sp32):
        assert float((flat(run[1]) - exact).norm() / exact.norm()) < 1e-2


@needs_both
def test_eval_mode_uses_running_statistics_on_both():
    assert_engines_equal(family_net("Res16UNet14A"), generated_batch(2, n=500), train=False,
                         rtol=1e-10)


@needs_both
def test_same_seed_builds_the_same_weights_on_both_engines():
    """spconv's layers draw their initial weights as MinkowskiEngine's do, in the same order."""
    states = {}
    for e in ENGINES:
        torch.manual_seed(7)
        states[e] = build_model("Res16UNet34C", in_channels=3, out_channels=32,
                                engine=e).state_dict()
    assert list(states["spconv"]) == list(states["minkowski"])  # same keys, same order
    for k, v in states["minkowski"].items():
        assert states["spconv"][k].shape == v.shape, k
        assert torch.equal(states["spconv"][k], v), k


@needs_both
def test_stage_outputs_agree_for_the_multiscale_probe():
    x = as_dtype(generated_batch(2, n=500), torch.float64)
    stages = {}
    for e in ("minkowski", "spconv"):
        torch.manual_seed(0)
        net = build_model("Res16UNet14A", in_channels=3, out_channels=5, engine=e).double()
        if e == "spconv":
            net.load_state_dict(state)
        state = net.state_dict()
        _, stages[e] = net.forward_stages(x, ("block5", "block6", "block7", "block8"))
    for name, ref in stages["minkowski"].items():
        got = stages["spconv"][name]
        assert got.stride == ref.stride
        a, b = by_coordinates(got), by_coordinates(ref)
        assert torch.equal(got.coords[a], ref.coords[b]), name
        assert rel_err(got.feats[a], ref.feats[b]) < 1e-10, name


# ----------------------------------------------------------------------------- threads

THREADED = """
import torch, sys
sys.path.insert(0, {tests!r})
from test_engines import assert_engines_equal, family_net, generated_batch, LayerNet
torch.set_num_threads({threads})  # torch caps its default at the core count
e1 = assert_engines_equal(lambda e: LayerNet(e, "stem3", 3, 64), generated_batch(2, n=1500), rtol=1e-12)
e2 = assert_engines_equal(family_net("Res16UNet14A"), generated_batch(3, n=700), rtol=1e-10)
print("worst", max(e1.values()), max(e2.values()))
"""


@needs_both
@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_engines_equal_at_any_thread_count(threads):
    """Both engines' CPU arithmetic in a fresh process with OMP_NUM_THREADS set (MinkowskiEngine
    and torch read it at start-up). spconv's own CPU kernels fail this at 2 threads; ours must
    not."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    code = THREADED.format(tests=str(REPO / "tests"), threads=threads)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "worst" in proc.stdout


@needs_both
def test_offsets_gathered_in_small_groups_give_the_same_result(monkeypatch):
    """The gather buffer's limit splits a convolution's offsets into groups (one offset alone
    may exceed it): every split gives the unsplit result."""
    import mink_ssl.models.engines.spconv_engine as sp

    x = generated_batch(2, n=400)
    monkeypatch.setattr(sp, "GATHER_ELEMENTS", 2000)  # a few hundred rows per group at 8 channels
    assert_engines_equal(family_net("Res16UNet14A"), x, rtol=1e-10)
    groups = list(sp._groups(sp._KernelMap(0, 0, None, None, [(0, 0, 300), (1, 300, 500),
                                                               (2, 500, 900)], None, None, None),
                             channels=4))  # 500 rows per group
    assert [(a, b) for a, b, _ in groups] == [(0, 500), (500, 900)]


# ----------------------------------------------------------------------------- spconv's own CPU kernels

SPCONV_OWN_CPU = """
import torch, sys
sys.path.insert(0, {tests!r})
import mink_ssl.models.engines.spconv_engine as sp
from test_engines import LayerNet, generated_batch, as_dtype
x = as_dtype(generated_batch(2, n=3000), torch.float64)
torch.manual_seed(0)
net = LayerNet("spconv", "stem3", 3, 64).double()
ours = net(x).feats
sp.ARITHMETIC = "spconv"  # spconv's own CPU kernels on the same maps and weights
worst = max(float((net(x).feats - ours).abs().max()) for _ in range(3))
feats = x.feats.clone().requires_grad_(True)
try:
    net(sp.SparseVoxels(x.coords, feats)).feats.sum().backward()
    backward = "ran"
except Exception as e:
    backward = type(e).__name__ + ": " + str(e)
print("RESULT", worst, "|", backward)
"""


@pytest.mark.skipif(bool(MISSING["spconv"]), reason=f"needs spconv: {MISSING['spconv']}")
@pytest.mark.skipif(torch.cuda.is_available(), reason="spconv's CPU-only-torch fault needs a CPU-only torch")
@pytest.mark.slow
def test_spconv_own_cpu_kernels_still_need_replacing():
    """Why the spconv engine does its own CPU arithmetic, checked against the installed spconv:
    with 2 OpenMP threads its CPU convolution is wrong (a race in its scatter), and its CPU
    backward fails with a CPU-only torch. When a spconv release fixes both, this test fails:
    then its own kernels may replace ours on CPU (mink_ssl/models/engines/spconv_engine.py)."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", SPCONV_OWN_CPU.format(tests=str(REPO / "tests"))],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    worst, backward = line[len("RESULT "):].split(" | ", 1)
    race, broken = float(worst) > 1e-6, "not compiled with CUDA" in backward
    assert race or broken, (f"spconv's own CPU kernels now agree with ours at 2 threads "
                            f"({worst}) and their backward runs ({backward})")
