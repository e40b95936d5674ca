#!/usr/bin/env python3
"""``make gpu-check``: the CUDA path proven and timed on a GPU machine without network.

Two stages, on two machines:

``prepare`` (``make gpu-wheels``; a networked CPU machine with the project's venv): into
``build/gpu-check/`` (ignored by git) it writes real fragments prepared from
``../shared/realdata`` (7-Scenes RedKitchen, a few MB), the MinkowskiEngine sdist, and wheels
for Python 3.12 of what a bare GPU image may lack (``WHEELS``; no open3d, no hydra, no torch).
The whole folder stays under 64 MiB so it can travel with the working tree.

``run`` (``make gpu-check``; the GPU machine: a CUDA torch, nvcc, no network): installs the
missing wheels into ``build/gpu-check/site-<python>`` (``--no-index``), builds ME for the visible
GPU's architecture with all cores through scripts/build_minkowski.py (cached in
``build/gpu-check/cache``), then runs scripts/gpu_checks.py in a fresh process: correctness
(Res16UNet34C forward/backward CUDA vs CPU, each objective one step, detection ops CUDA vs CPU,
DDP with nccl + SyncBatchNorm) and speed (pretraining full step vs bare forward+backward on the
same batch of 8 pairs at 2.5 cm, peak memory; one segmentation fine-tuning step). It prints a
table and writes ``build/gpu-check/results.json`` (and ``$OUT/gpu_check.json`` when ``$OUT`` is
set). Exit status 1 when a correctness check fails.

``GPU_CHECK_ME=no`` (or ``--no-me``) skips MinkowskiEngine's CUDA build (about 87 min on 2
cores, too long for one device call on 16): the checks then run on the spconv engine alone and
the two engine comparisons say they were skipped.

``GPU_CHECK_DEVICE=cpu`` (or ``--device cpu``) runs the same checks on CPU against the installed
CPU build of ME, preparing the data when missing: the test that keeps this script from rotting.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / "build" / "gpu-check"
REALDATA = REPO.parent / "shared" / "realdata" / "7scenes-redkitchen-a"
MAX_BYTES = 64 * 2**20  # what the device machine's working tree may carry
# module -> pip requirement for what the checks import beyond torch; a bare GPU image has the
# first three (KINDS.md), geomloss (cluster_render's Sinkhorn loss) it lacks. WHEELS are pure
# Python (geomloss ships only an sdist: we build its py3-none-any wheel here).
NEEDS = {"numpy": "numpy", "scipy": "scipy", "PIL": "pillow", "geomloss": "geomloss"}
WHEELS = ("geomloss",)
# the spconv engine on a GPU machine without network: spconv's CUDA wheels (97 MB with cumm)
# exceed what a device run carries; spconv-triton (69 KB, pure Python on the Triton that CUDA
# torch ships) has the same API and is installed where no spconv imports
SPCONV_WHEEL = "spconv-triton==1.0.0"


# sitecustomize of the checks process under --no-me: MinkowskiEngine does not import
NO_ME = """
import importlib.abc, sys
class _NoME(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'MinkowskiEngine':
            raise ImportError('MinkowskiEngine is left out of this gpu-check (--no-me)')
sys.meta_path.insert(0, _NoME())
"""


def log(msg: str) -> None:
    print(f"[gpu-check] {msg}", flush=True)


def _bm():
    spec = importlib.util.spec_from_file_location("build_minkowski",
                                                  REPO / "scripts" / "build_minkowski.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def prepare_data(d: Path, frame_skip: int) -> Path:
    """Real fragments and pairs (our ScanNet prep on 7-Scenes frames) under ``d/data``."""
    pairs = d / "data" / "pairs"
    if (pairs / "manifest.json").exists():
        return pairs
    if not (REALDATA / "depth").is_dir():
        raise SystemExit(f"no real frames at {REALDATA}: gpu-check's data is prepared from "
                         "../shared/realdata (run `make gpu-wheels` where it exists)")
    from data_prep.pairs.prep import PrepParams, run as run_prep

    raw = d / "data" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    if not (raw / "redkitchen").exists():
        (raw / "redkitchen").symlink_to(REALDATA)
    tmp = d / "data" / "pairs.part"
    shutil.rmtree(tmp, ignore_errors=True)
    run_prep(raw, tmp, PrepParams(frame_skip=frame_skip), progress=False, log=lambda s: None)
    os.replace(tmp, pairs)
    (raw / "redkitchen").unlink()  # the link must not travel: the GPU machine lacks its target
    log(f"prepared {pairs} ({_size(pairs) / 2**20:.1f} MB)")
    return pairs


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def prepare(d: Path, frame_skip: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    prepare_data(d, frame_skip)
    sdist = _bm().fetch_sdist(d)
    (d / "sdist").mkdir(exist_ok=True)
    shutil.copy2(sdist, d / "sdist" / sdist.name)
    wheels = d / "wheels"
    wheels.mkdir(exist_ok=True)
    from importlib.metadata import version

    reqs = [f"{name}=={version(name)}" for name in WHEELS]  # the versions the tests here ran with
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
                    *reqs], check=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
                    SPCONV_WHEEL], check=True)
    impure = [w.name for w in wheels.glob("*.whl") if not w.name.endswith("-py3-none-any.whl")]
    if impure:
        raise SystemExit(f"wheels {impure} are not pure Python: they may not install on the GPU "
                         "machine's Python 3.12; download its platform's wheels instead")
    total = _size(d / "data") + _size(d / "sdist") + _size(wheels)
    if total > MAX_BYTES:
        raise SystemExit(f"{d} holds {total / 2**20:.1f} MiB, over the 64 MiB a device run "
                         "carries: use a larger --frame-skip")
    log(f"ready to carry: {d.relative_to(REPO) if d.is_relative_to(REPO) else d} "
        f"({total / 2**20:.1f} MiB: data, ME sdist, wheels {sorted(p.name for p in wheels.iterdir())})")


def install_needs(d: Path) -> Path | None:
    """Install the importable-nowhere needs from ``d/wheels`` into a folder on sys.path."""
    missing = [req for mod, req in NEEDS.items() if importlib.util.find_spec(mod) is None]
    if all(importlib.util.find_spec(m) is None for m in ("spconv", "spconv_triton")):
        missing.append(SPCONV_WHEEL.split("==")[0])
    if not missing:
        return None
    site = d / f"site-py{sys.version_info.major}{sys.version_info.minor}"
    wheels = d / "wheels"
    if not any(wheels.glob("*.whl")):
        raise SystemExit(f"missing Python packages {missing} and no wheels in {wheels}: run "
                         "`make gpu-wheels` on a networked machine and carry build/gpu-check")
    log(f"installing {missing} from {wheels} (no network)")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--upgrade", "--target", str(site), "--find-links",
                    str(wheels), *missing], check=True)
    return site


def build_me(d: Path) -> float:
    """MinkowskiEngine for the visible GPUs' architectures (scripts/build_minkowski.py)."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible to torch: set GPU_CHECK_DEVICE=cpu for the CPU run")
    arch = ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                            for i in range(torch.cuda.device_count())}))
    env = dict(os.environ, MINK_SSL_CACHE=str(d / "cache"), MAX_JOBS=str(os.cpu_count() or 2))
    sdists = sorted((d / "sdist").glob("*.tar.gz"))
    if sdists:
        env["MINK_SSL_ME_SDIST"] = str(sdists[0])
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_minkowski.py"), "--cuda", "yes",
                    "--arch-list", arch], check=True, env=env)
    return time.perf_counter() - t0


def run(d: Path, device: str, sizes_args: list[str], with_me: bool = True) -> int:
    t0 = time.perf_counter()
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (d / "data" / "pairs" / "manifest.json").exists():
        if device == "cuda":
            raise SystemExit(f"no prepared data in {d / 'data'}: run `make gpu-wheels` on a "
                             "networked machine and carry build/gpu-check")
        prepare_data(d, frame_skip=10)
    site = install_needs(d)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (REPO, site) if p) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    build_s = build_me(d) if device == "cuda" and with_me else 0.0
    if not with_me:  # the checks process refuses to import MinkowskiEngine
        blocker = d / "no-me"
        blocker.mkdir(parents=True, exist_ok=True)
        (blocker / "sitecustomize.py").write_text(NO_ME)
        env["PYTHONPATH"] = str(blocker) + os.pathsep + env["PYTHONPATH"]
    out = d / "results.json"
    cmd = [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "checks", "--dir", str(d),
           "--device", device, *sizes_args]
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not out.exists():
        log(f"the checks process failed (exit {proc.returncode})")
        return 1
    res = json.loads(out.read_text())
    res["build_me_s"], res["total_s"] = build_s, time.perf_counter() - t0
    text = json.dumps(res, indent=1)
    out.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text)
    print(table(res))
    return 0 if res["ok"] else 1


def checks(d: Path, device: str, sizes) -> None:
    """In a fresh process (after ME was installed): every check, then the JSON."""
    import torch

    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_checks as gc

    from mink_ssl.models.engines import engine_unavailable

    dev = torch.device(device)
    me_missing = engine_unavailable("minkowski")
    if me_missing is None:
        import MinkowskiEngine as ME

        if dev.type == "cuda" and not ME.is_cuda_available():
            raise SystemExit("MinkowskiEngine was built CPU-only; the CUDA checks need its CUDA "
                             "build")
    else:
        log(f"MinkowskiEngine unavailable ({me_missing}): the engine comparisons are skipped")
    root = d / "data" / "pairs"
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
           f"CPU ({torch.get_num_threads()} threads)",
           "stack": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda,
                     "minkowski_engine": "missing" if me_missing else ME.__version__,
                     "me_cuda": bool(me_missing is None and ME.is_cuda_available()),
                     "spconv": _spconv_backend()},
           "sizes": asdict(sizes), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "correctness": {}, "speed": {}}
    for name, fn in {**gc.CHECKS, **gc.SPEED}.items():
        t0 = time.perf_counter()
        try:
            r = fn(root, dev, sizes)
        except Exception as e:  # one failing check must not hide the others' results
            r = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1000]}
        r["seconds"] = time.perf_counter() - t0
        res["correctness" if name in gc.CHECKS else "speed"][name] = r
        state = "skipped: " + r["skipped"] if "skipped" in r else \
            "ok" if r.get("ok", True) else "FAILED"
        log(f"{name}: {state} ({r['seconds']:.1f} s)")
    res["ok"] = all(r["ok"] for r in res["correctness"].values()) and all(
        r.get("ok", True) for r in res["speed"].values())
    (d / "results.json").write_text(json.dumps(res, indent=1))


def _spconv_backend() -> str:
    from mink_ssl.models.engines import engine_unavailable

    why = engine_unavailable("spconv")
    if why:
        return f"missing ({why})"
    from mink_ssl.models.engines.spconv_engine import backend

    return backend()


def table(res: dict) -> str:
    lines = [f"gpu-check on {res['device']} | torch {res['stack']['torch']} | spconv engine: "
             f"{res['stack'].get('spconv')} | ME {res['stack']['minkowski_engine']} "
             f"({'cuda' if res['stack']['me_cuda'] else 'cpu'})"
             f" | {res['sizes']['model']} at {res['sizes']['voxel_size'] * 100:g} cm"]
    for name, r in res["correctness"].items():
        detail = r.get("error") or ", ".join(
            f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
            if k not in ("ok", "seconds", "objectives", "tolerance"))
        if "objectives" in r:
            detail = ", ".join(f"{k}:{'ok' if v['ok'] else 'FAIL'}" for k, v in r["objectives"].items())
        mark = "skip" if "skipped" in r else "ok  " if r["ok"] else "FAIL"
        lines.append(f"  {mark} {name:18s} {detail}")
    p = res["speed"].get("pretrain_step", {})
    if "full_ms" in p:
        rt = p["ratio_full_over_bare"]
        lines.append(f"  speed pretrain step ({p['pairs']} pairs, {p['voxels']:,} voxels): full "
                     f"{p['full_ms']['median']:.1f} ms (IQR {p['full_ms']['iqr']:.1f}), bare fwd+bwd "
                     f"{p['bare_ms']['median']:.1f} ms (IQR {p['bare_ms']['iqr']:.1f}), full/bare "
                     f"{rt['median']:.3f} (IQR {rt['iqr']:.3f}), {p['steps_per_s']:.2f} steps/s"
                     + (f", peak {p['peak_mem_mb']:.0f} MB" if p.get("peak_mem_mb") else ""))
        lines.append(f"    {p['verdict']}")
    elif p:
        lines.append(f"  FAIL speed pretrain step: {p.get('error')}")
    e = res["speed"].get("engines_speed", {})
    if "speedup" in e:
        lines.append(f"  speed engines ({res['sizes']['model']} fwd+bwd, {e['voxels']:,} voxels): "
                     f"MinkowskiEngine {e['minkowski_ms']['median']:.1f} ms, spconv "
                     f"{e['spconv_ms']['median']:.1f} ms, speed-up {e['speedup']['median']:.2f}x "
                     f"(IQR {e['speedup']['iqr']:.2f})")
    elif e:
        lines.append(f"  {'skip' if 'skipped' in e else 'FAIL'} speed engines: "
                     f"{e.get('skipped') or e.get('error')}")
    s = res["speed"].get("segmentation_step", {})
    if "step_ms" in s:
        lines.append(f"  speed segmentation step ({s['voxels']:,} voxels): "
                     f"{s['step_ms']['median']:.1f} ms (IQR {s['step_ms']['iqr']:.1f})")
    elif s:
        lines.append(f"  FAIL speed segmentation step: {s.get('error')}")
    lines.append(f"  {'OK' if res['ok'] else 'FAILED'}; ME build {res.get('build_me_s', 0):.0f} s, "
                 f"total {res.get('total_s', 0):.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["prepare", "run", "checks"])
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--device", default=os.environ.get("GPU_CHECK_DEVICE", "auto"),
                   choices=["auto", "cuda", "cpu"])
    p.add_argument("--frame-skip", type=int, default=10, help="prepare: every n-th real frame")
    p.add_argument("--model", default="Res16UNet34C")
    p.add_argument("--voxel-size", type=float, default=0.025)
    p.add_argument("--batch", type=int, default=8, help="pairs in the speed batch")
    p.add_argument("--repeats", type=int, default=7, help="alternated full/bare rounds")
    p.add_argument("--check-pairs", type=int, default=2, help="pairs in the correctness batch")
    p.add_argument("--no-me", action="store_true",
                   default=os.environ.get("GPU_CHECK_ME", "yes").lower() in ("no", "0", "false"),
                   help="skip MinkowskiEngine (its build and the engine comparisons)")
    a = p.parse_args(argv)
    sys.path.insert(0, str(REPO))  # mink_ssl and data_prep from this checkout, installed or not
    sizes_args = ["--model", a.model, "--voxel-size", str(a.voxel_size), "--batch", str(a.batch),
                  "--repeats", str(a.repeats), "--check-pairs", str(a.check_pairs)]
    if a.stage == "prepare":
        prepare(a.dir, a.frame_skip)
        return 0
    if a.stage == "run":
        return run(a.dir, a.device, sizes_args, with_me=not a.no_me)
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_checks import Sizes

    checks(a.dir, "cuda" if a.device == "auto" else a.device,
           Sizes(a.model, a.voxel_size, a.batch, a.repeats, a.check_pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
