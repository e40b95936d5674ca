"""The checks of ``make gpu-check`` (driven by scripts/gpu_check.py): correctness of the CUDA
path against the CPU path, the two sparse engines against each other on the device, and speed
(both engines side by side), on real fragments prepared beforehand.

The backbone runs on the default engine (``mink_ssl.models.res16unet.DEFAULT_ENGINE``) unless a
check names one. Each check returns a dict with ``ok`` (correctness checks) and its numbers.
Needs only torch, spconv (or spconv-triton), MinkowskiEngine, numpy, scipy, pillow (and geomloss
for cluster_render): no open3d, no hydra.
"""
from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _timing import alternate, paired_ratio, ratio_verdict, summary, sync  # noqa: E402

FRAME_SIZE = (60, 80)  # frames for the rendering objective
# CUDA vs CPU: relative L2 error of features and of every parameter gradient (float32 sums in
# another order, cuBLAS/cuSPARSE vs OpenBLAS; no TF32 in MinkowskiEngine's kernels)
FEATURE_RTOL, GRAD_RTOL = 1e-4, 1e-3
# MinkowskiEngine vs spconv on one device: features as above; float32 gradients of the whole
# network by norm (a ReLU input within rounding of 0 takes the other side on one engine: see
# tests/test_engines.py, measured up to 3e-3 on CPU)
ENGINE_GRAD_RTOL = 1e-2


@dataclass
class Sizes:
    model: str = "Res16UNet34C"
    voxel_size: float = 0.025
    batch: int = 8  # pairs in the speed batch
    repeats: int = 7  # alternated full/bare rounds
    check_pairs: int = 2  # pairs in the correctness batch
    ddp_world: int = 0  # DDP ranks; 0: 1 on CUDA (one GPU), 2 on CPU


def dataset(root: Path, sizes: Sizes, frames: bool = False):
    from mink_ssl.data.pairs import PairDataset

    return PairDataset(root, voxel_size=sizes.voxel_size, seed=0,
                       frame_size=FRAME_SIZE if frames else None)


def pair_batch(ds, n: int):
    """A batch of the first ``n`` usable pairs (deterministic: epoch 0)."""
    from mink_ssl.data.pairs import collate_pairs

    samples = []
    for i in range(len(ds)):
        s = ds[(0, i)]
        if s is not None:
            samples.append(s)
        if len(samples) == n:
            return collate_pairs(samples)
    raise SystemExit(f"only {len(samples)} usable pairs in {ds.root}, need {n}: prepare more "
                     "frames (scripts/gpu_check.py prepare --frame-skip smaller)")


def backbone(sizes: Sizes, seed: int = 0, engine: str | None = None):
    from mink_ssl.models import build_model

    torch.manual_seed(seed)
    return build_model(sizes.model, in_channels=3, out_channels=32,
                       **({"engine": engine} if engine else {}))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_forward_backward(root: Path, dev: torch.device, sizes: Sizes) -> dict:
    """The backbone on the device vs on CPU, same weights, same batch (both views): output
    features and every parameter's gradient."""
    from mink_ssl.sparse import sparse_tensor

    batch = pair_batch(dataset(root, sizes), sizes.check_pairs)
    cpu_net = backbone(sizes).train()
    dev_net = backbone(sizes, seed=1)
    dev_net.load_state_dict(cpu_net.state_dict())  # the same weights (ME modules do not deepcopy)
    dev_net = dev_net.to(dev).train()
    worst_f, outs = 0.0, {}
    for name, net, d in (("cpu", cpu_net, torch.device("cpu")), ("dev", dev_net, dev)):
        loss, feats = 0.0, []
        for v in batch.views:
            out = net(sparse_tensor(v.coords.to(d), v.feats.to(d))).F
            feats.append(out)
            w = torch.randn(out.shape, generator=torch.Generator().manual_seed(len(feats)))
            loss = loss + (out * w.to(d)).sum()  # a gradient that is not all ones
        loss.backward()
        outs[name] = (feats, {k: p.grad for k, p in net.named_parameters()})
    for fc, fd in zip(outs["cpu"][0], outs["dev"][0]):
        worst_f = max(worst_f, _rel(fd, fc))
    grads = {k: _rel(outs["dev"][1][k], gc) for k, gc in outs["cpu"][1].items()
             if gc is not None and gc.norm() > 0}
    worst_g = max(grads.values())
    return {"ok": worst_f <= FEATURE_RTOL and worst_g <= GRAD_RTOL,
            "voxels": sum(len(v.coords) for v in batch.views),
            "feature_rel_err": worst_f, "grad_rel_err_max": worst_g,
            "grad_worst_param": max(grads, key=grads.get), "params_compared": len(grads),
            "tolerance": {"features": FEATURE_RTOL, "grads": GRAD_RTOL}}


def check_objectives(root: Path, dev: torch.device, sizes: Sizes) -> dict:
    """Every registered objective: one training step on the device (finite loss and grads)."""
    import mink_ssl.objectives  # noqa: F401
    from mink_ssl.objectives import OBJECTIVES
    from mink_ssl.tasks.pretrain import PretrainModule, build_objectives

    batch = pair_batch(dataset(root, sizes, frames=True), sizes.check_pairs).to(dev)
    rows = {}
    for name in [n for n in OBJECTIVES.names() if not n.startswith("_")]:
        objectives, weights = build_objectives({name: {}}, 32)
        module = PretrainModule(backbone(sizes), objectives, weights).to(dev).train()
        sync(dev)
        t0 = time.perf_counter()
        try:
            out = module(batch, 0, 1000)
            out["loss"].backward()
            sync(dev)
            finite = bool(torch.isfinite(out["loss"])) and all(
                bool(torch.isfinite(p.grad).all()) for p in module.parameters()
                if p.grad is not None)
            rows[name] = {"ok": finite, "loss": float(out["loss"].detach()),
                          "ms": (time.perf_counter() - t0) * 1e3}
        except Exception as e:  # report every objective, not just the first failure
            rows[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
    return {"ok": all(r["ok"] for r in rows.values()), "objectives": rows}


def check_detection_ops(root: Path, dev: torch.device, sizes: Sizes) -> dict:
    """Farthest point sampling, ball query and 3D NMS: the device's answer vs CPU's, on the
    voxel centres of real fragments."""
    from mink_ssl.ops import ball_query, farthest_point_sampling, nms_3d

    batch = pair_batch(dataset(root, sizes), sizes.check_pairs)
    v = batch.views[0]
    pts, bidx = v.world.float(), v.batch_index
    B = int(bidx.max()) + 1
    res = {}
    args = dict(batch_index=bidx, num_scenes=B)
    fps = {d: farthest_point_sampling(pts.to(d), 256, **{k: t.to(d) if torch.is_tensor(t) else t
                                                           for k, t in args.items()}).cpu()
           for d in ("cpu", dev)}
    res["fps_equal"] = bool(torch.equal(fps["cpu"], fps[dev]))
    centres_idx = fps["cpu"].reshape(-1)  # (B * 256,) rows of pts
    centres, cb = pts[centres_idx], bidx[centres_idx]
    bq = {d: ball_query(pts.to(d), centres.to(d), 0.2, 16, points_batch=bidx.to(d),
                        centres_batch=cb.to(d), num_scenes=B) for d in ("cpu", dev)}
    res["ball_query_equal"] = all(torch.equal(a.cpu(), b.cpu())
                                  for a, b in zip(bq["cpu"], bq[dev]))
    g = torch.Generator().manual_seed(0)
    size = 0.2 + torch.rand(len(centres), 3, generator=g)
    heading = (torch.rand(len(centres), 1, generator=g) - 0.5) * 6.2832
    boxes = torch.cat([centres, size, heading], 1)  # (K, 7) centre, size, heading about +z
    scores = torch.rand(len(centres), generator=g)
    for mode in ("aligned_hull", "oriented"):
        keep = {d: nms_3d(boxes.to(d), scores.to(d), 0.25, batch_index=cb.to(d), mode=mode).cpu()
                for d in ("cpu", dev)}
        res[f"nms_{mode}_equal"] = bool(torch.equal(keep["cpu"], keep[dev]))
        res[f"nms_{mode}_kept"] = f"{len(keep['cpu'])}/{len(boxes)}"
    res["ok"] = all(v for k, v in res.items() if k.endswith("_equal"))
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, root: str, dev_type: str, sizes: Sizes,
                out: str) -> None:
    import torch.distributed as dist

    from mink_ssl.engine.distributed import DistInfo, sync_batchnorm, wrap_ddp
    from mink_ssl.sparse import sparse_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dev = torch.device("cuda", 0) if dev_type == "cuda" else torch.device("cpu")
    backend = "nccl" if dev_type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        batch = pair_batch(dataset(Path(root), sizes), world)
        v = batch.views[0]
        mine = v.batch_index == rank  # this rank's pair
        x = sparse_tensor(v.coords[mine].to(dev), v.feats[mine].to(dev))
        plain = float(backbone(sizes).to(dev).train()(x).F.square().mean())  # no DDP, same seed
        net = backbone(sizes).to(dev).train()
        info = DistInfo(rank, world, rank)
        if info.enabled:  # the library's wrapping, as pretraining does it
            model = wrap_ddp(net, info, dev, sync_bn=dev_type == "cuda",
                             find_unused_parameters=False)
        else:  # one rank: wrap_ddp would leave the module alone; wrap it anyway
            net = sync_batchnorm(net) if dev_type == "cuda" else net
            model = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[0] if dev_type == "cuda" else None)
        loss = model(x).F.square().mean()
        loss.backward()
        t = torch.tensor([float(loss.detach())], device=dev)
        dist.all_reduce(t)
        grad = next(p.grad for p in net.parameters() if p.grad is not None).flatten()[:8]
        torch.save({"rank": rank, "loss_sum": float(t), "grad": grad.cpu(),
                    "loss": float(loss.detach()), "plain_loss": plain,
                    "sync_bn": any("SyncBatchNorm" in type(m).__name__ for m in model.modules()),
                    "backend": backend}, f"{out}/rank{rank}.pt")
        # no rank tears the group down while another still talks over it: under load, gloo
        # aborted a rank ("terminate called without an active exception") without this
        dist.barrier()
        del model, net
    finally:
        dist.destroy_process_group()


def check_distributed(root: Path, dev: torch.device, sizes: Sizes) -> dict:
    """DDP over the real backend: nccl with SyncBatchNorm on CUDA (world size 1: NCCL refuses
    two ranks on one GPU, and one GPU is all a check machine has), gloo with 2 ranks on CPU.
    Ranks must agree on the all-reduced loss and on the (averaged) gradients."""
    import torch.multiprocessing as mp

    world = sizes.ddp_world or (1 if dev.type == "cuda" else 2)
    with tempfile.TemporaryDirectory(prefix="gpu-check-ddp-") as tmp:
        mp.spawn(_ddp_worker, args=(world, _free_port(), str(root), dev.type, sizes, tmp),
                 nprocs=world, join=True)
        outs = [torch.load(f"{tmp}/rank{r}.pt") for r in range(world)]
    same_grad = all(torch.allclose(o["grad"], outs[0]["grad"]) for o in outs)
    same_loss = all(o["loss_sum"] == outs[0]["loss_sum"] for o in outs)
    # DDP (and SyncBatchNorm) change no forward result: each rank's loss is the plain model's
    ddp_err = max(abs(o["loss"] - o["plain_loss"]) / max(abs(o["plain_loss"]), 1e-30)
                  for o in outs)
    return {"ok": same_grad and same_loss and ddp_err < 1e-5
            and (dev.type != "cuda" or outs[0]["sync_bn"]),
            "world_size": world, "backend": outs[0]["backend"], "sync_bn": outs[0]["sync_bn"],
            "loss_sum": outs[0]["loss_sum"], "ddp_vs_plain_rel_err": ddp_err}


def speed_pretrain(root: Path, dev: torch.device, sizes: Sizes) -> dict:
    """Pretraining steps/s of the backbone at ``sizes`` (hardest contrastive, SGD): the full
    step (objective + backward + optimizer) and the bare forward+backward of both views, on the
    same batch, alternated; peak device memory of the full step."""
    from mink_ssl.engine.build import build_optimizer
    from mink_ssl.engine.config import OptimConfig
    from mink_ssl.sparse import sparse_tensor
    from mink_ssl.tasks.pretrain import PretrainModule, build_objectives

    batch = pair_batch(dataset(root, sizes), sizes.batch).to(dev)
    objectives, weights = build_objectives({"hardest_contrastive": {}}, 32)
    module = PretrainModule(backbone(sizes), objectives, weights).to(dev).train()
    opt, _ = build_optimizer(OptimConfig(), module.parameters())

    def full():
        loss = module(batch, 0, 1000)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def bare():
        v0, v1 = batch.views
        (module.backbone(sparse_tensor(v0.coords, v0.feats)).F.sum()
         + module.backbone(sparse_tensor(v1.coords, v1.feats)).F.sum()).backward()
        module.zero_grad(set_to_none=True)

    times = alternate({"full": full, "bare": bare}, dev, sizes.repeats)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        full()
        sync(dev)
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = None
    s_full, s_bare = summary(times["full"]), summary(times["bare"])
    s_ratio = paired_ratio(times["full"], times["bare"])
    return {"pairs": len(batch), "voxels": sum(len(v.coords) for v in batch.views),
            "full_ms": _ms(s_full), "bare_ms": _ms(s_bare), "ratio_full_over_bare": s_ratio,
            "verdict": ratio_verdict(s_ratio), "steps_per_s": 1.0 / s_full["median"],
            "peak_mem_mb": peak}


def _engine_outputs(net, batch, dev) -> tuple[list, dict]:
    """Both views through ``net``: (outputs sorted by coordinates, {param: grad}) of a fixed
    random projection's backward."""
    from mink_ssl.sparse import pack_keys, sparse_tensor

    loss, outs = 0.0, []
    for i, v in enumerate(batch.views):
        out = net(sparse_tensor(v.coords.to(dev), v.feats.to(dev)))
        c = out.coords.to(torch.int64)
        lo = c.min(0).values
        order = torch.argsort(pack_keys(c, lo, c.max(0).values - lo + 1))
        w = torch.randn(out.feats.shape, generator=torch.Generator().manual_seed(i)).to(dev)
        loss = loss + (out.feats[order] * w).sum()
        outs.append(out.feats[order])
    loss.backward()
    return outs, {k: p.grad for k, p in net.named_parameters() if p.grad is not None}


def check_engines(root: Path, dev: torch.device, sizes: Sizes) -> dict:
    """MinkowskiEngine and spconv on the device, the same weights and batch: output features
    (relative L2, per view) and the whole gradient (relative L2 by norm)."""
    from mink_ssl.models.engines import engine_unavailable

    missing = {e: why for e in ("minkowski", "spconv") if (why := engine_unavailable(e))}
    if missing:
        return {"ok": True, "skipped": f"needs both engines: {missing}"}
    batch = pair_batch(dataset(root, sizes), sizes.check_pairs)
    ref_net = backbone(sizes, engine="minkowski").to(dev).train()
    sp_net = backbone(sizes, seed=1, engine="spconv")
    sp_net.load_state_dict(ref_net.state_dict())
    sp_net = sp_net.to(dev).train()
    ref, got = _engine_outputs(ref_net, batch, dev), _engine_outputs(sp_net, batch, dev)
    worst_f = max(_rel(a, b) for a, b in zip(got[0], ref[0]))
    keys = sorted(ref[1])
    g_ref = torch.cat([ref[1][k].flatten() for k in keys])
    g_sp = torch.cat([got[1][k].flatten() for k in keys])
    grad = _rel(g_sp, g_ref)
    return {"ok": worst_f <= FEATURE_RTOL and grad <= ENGINE_GRAD_RTOL,
            "voxels": sum(len(v.coords) for v in batch.views), "feature_rel_err": worst_f,
            "grad_rel_err": grad, "params_compared": len(keys),
            "tolerance": {"features": FEATURE_RTOL, "grads": ENGINE_GRAD_RTOL}}


def speed_engines(root: Path, dev: torch.device, sizes: Sizes) -> dict:
    """The backbone's forward+backward on view 0 of the speed batch, MinkowskiEngine against
    spconv with the same weights, alternated; speed-up = ME time / spconv time per round."""
    from mink_ssl.models.engines import engine_unavailable
    from mink_ssl.sparse import sparse_tensor

    missing = {e: why for e in ("minkowski", "spconv") if (why := engine_unavailable(e))}
    if missing:
        return {"ok": True, "skipped": f"needs both engines: {missing}"}
    v = pair_batch(dataset(root, sizes), sizes.batch).views[0].to(dev)
    x = sparse_tensor(v.coords, v.feats)
    nets = {e: backbone(sizes, engine=e).to(dev).train() for e in ("minkowski", "spconv")}

    def fwd_bwd(e):
        def fn():
            nets[e](x).feats.sum().backward()
            nets[e].zero_grad(set_to_none=True)
        return fn

    times = alternate({e: fwd_bwd(e) for e in nets}, dev, sizes.repeats)
    ratio = paired_ratio(times["minkowski"], times["spconv"])
    return {"voxels": len(v.coords), "minkowski_ms": _ms(summary(times["minkowski"])),
            "spconv_ms": _ms(summary(times["spconv"])), "speedup": ratio,
            "verdict": ratio_verdict(ratio, "MinkowskiEngine / spconv")}


def _ms(s: dict) -> dict:
    return {"median": s["median"] * 1e3, "iqr": s["iqr"] * 1e3, "n": s["n"]}


def speed_segmentation(root: Path, dev: torch.device, sizes: Sizes) -> dict:
    """One segmentation fine-tuning step (the fine-tuning model builder's default classifier,
    cross-entropy, SGD with the fine-tuning defaults) on the first view of the speed batch.
    Labels: 13 bins of the voxels' world height, a stand-in for annotations (the step's cost
    does not depend on their values)."""
    from mink_ssl.engine.config import ModelConfig
    from mink_ssl.sparse import sparse_tensor
    from mink_ssl.tasks.segmentation import build_seg_model

    v = pair_batch(dataset(root, sizes), sizes.batch).views[0].to(dev)
    z = v.world[:, 2].contiguous()
    edges = torch.quantile(z.float().cpu(), torch.linspace(0, 1, 14)[1:-1]).to(dev)
    labels = torch.bucketize(z, edges)  # (N,) int64 in [0, 13)
    torch.manual_seed(0)
    model = build_seg_model(ModelConfig(name=sizes.model), 3, 13).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.1,
                          weight_decay=1e-4)

    def step():
        logits = model(sparse_tensor(v.coords, v.feats)).F
        loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = alternate({"step": step}, dev, max(3, sizes.repeats // 2))["step"]
    return {"voxels": len(v.coords), "step_ms": _ms(summary(t))}


CHECKS = {"forward_backward": check_forward_backward, "objectives": check_objectives,
          "detection_ops": check_detection_ops, "distributed": check_distributed,
          "engines_equal": check_engines}
SPEED = {"pretrain_step": speed_pretrain, "segmentation_step": speed_segmentation,
         "engines_speed": speed_engines}
