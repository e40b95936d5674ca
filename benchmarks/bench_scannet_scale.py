"""ScanNet scale without ScanNet's disk: 1,513 scenes and ~850K pairs through the pair list, the
sampler, the loader and pretraining start-up, under a cluster node's ``ulimit -n 1024`` (#25).

The pairs folder is 1,513 hard links of one real prepared scene (benchmarks/_scale.py: the
7-Scenes frames of ../shared/realdata prepared by our prep, 100 fragments), each listing
``--pairs / --scenes`` of its real pairs. Measured, each against a baseline of the same run:

1. the pair list: memory held, parse time, and what a forked worker copies when it reads every
   pair, ours (int32 arrays) vs the list of tuples the dataset held before (baseline);
2. per-epoch work at full size: the manifest, the pair list, the correspondence self-check,
   the sampler's shuffle and one epoch of keys (all once, in the training process); an epoch
   resumed after k batches gives the same remaining keys; the sampler state's bytes in a
   checkpoint vs a stored permutation (baseline);
3. start-up, for each ``--workers``, under ``ulimit -n --nofile``: the loader alone (the
   dataset built and the first batch of pretraining's views, each in a fresh process, alternated
   with the same on a one-scene folder over ``--repeats`` rounds: the ratio is what scale adds);
   then ``mink-ssl-pretrain`` itself in a fresh process: wall time from its start to the first
   step (target 60 s) and to each step, vs the same run on the one-scene folder; peak RSS of the
   main process and of each loader worker; open descriptors over the run. The network is the
   smallest (``--model res16unet14s``) so that the step does not hide the start-up: on CPU a
   Res16UNet34C step at batch 8 takes minutes (docs/scale.md);
4. the scene sweep, for each ``--workers``: every worker opens scene after scene (cheap views)
   under the same limit; descriptors and private memory early vs late (target: flat, 1.0x).

The folders are built under ``--tmp`` (default the system's temporary folder) and removed at
the end (``--keep`` keeps them). Figures: docs/scale.md.

    .venv/bin/python benchmarks/bench_scannet_scale.py [--scenes 1513] [--pairs 850000]
        [--workers 2,8] [--steps 3] [--batch 8] [--model res16unet14s] [--nofile 1024]
        [--repeats 3] [--sweep-items 2400] [--tmp /tmp] [--keep]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _data import KITCHEN, require_kitchen  # noqa: E402
from _scale import proc_stats, children, prepare_source, remove_folder, scale_folder  # noqa: E402

TARGET_FIRST_STEP_S, TARGET_PAIRS_MB = 60.0, 100.0


def legacy_read(path: Path) -> list:
    """The pair list as PairDataset held it before #25: a list of (scene, frame, frame)."""
    pairs = []
    for line in path.read_text().splitlines():
        (sa, fa), (sb, fb) = (p.rsplit("/", 1) for p in line.split()[:2])
        pairs.append((sa, int(fa), int(fb)))
    return pairs


def child_pair_list(root: Path, kind: str) -> dict:
    """In a fresh process: read the pair list (``ours`` or ``legacy``); the memory it holds,
    its parse peak, and the private memory a forked worker gains by reading every pair."""
    import gc

    from mink_ssl.data.pair_list import PairList

    gc.collect()
    before = proc_stats(os.getpid())
    t0 = time.perf_counter()
    pairs = PairList.read(root / "pairs.txt") if kind == "ours" else legacy_read(
        root / "pairs.txt")
    seconds = time.perf_counter() - t0
    gc.collect()
    after = proc_stats(os.getpid())
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a loader worker's view: every pair read once, a garbage collection
        start = proc_stats(os.getpid())["private_mb"]
        for i in range(len(pairs)):
            pairs[i]
        gc.collect()
        os.write(w, json.dumps(proc_stats(os.getpid())["private_mb"] - start).encode())
        os._exit(0)
    os.close(w)
    copied = json.loads(os.read(r, 1000))
    os.waitpid(pid, 0)
    return {"pairs": len(pairs), "seconds": seconds, "held_mb": after["rss_mb"] - before["rss_mb"],
            "peak_mb": after["peak_rss_mb"] - before["rss_mb"], "worker_copied_mb": copied,
            "arrays_mb": pairs.nbytes / 2**20 if kind == "ours" else None}


def run_child(*args: str) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                         text=True)
    if res.returncode:
        raise SystemExit(f"child {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.splitlines()[-1])


def pair_list(root: Path) -> None:
    ours, old = run_child("pairs", str(root), "ours"), run_child("pairs", str(root), "legacy")
    print(f"pair list: {ours['pairs']} pairs")
    for name, r in (("ours (int32 arrays)", ours), ("list of tuples (before)", old)):
        print(f"  {name:24s}: {r['held_mb']:7.1f} MB held (parse peak {r['peak_mb']:.1f} MB), "
              f"{r['seconds']:.2f} s; a forked worker reading every pair copies "
              f"{r['worker_copied_mb']:.1f} MB")
    held = max(ours["held_mb"], ours["arrays_mb"])
    print(f"  arrays {ours['arrays_mb']:.1f} MB; held: list of tuples / ours "
          f"{old['held_mb'] / max(held, 0.1):.1f}x; parse time {old['seconds'] / ours['seconds']:.1f}x; "
          f"target < {TARGET_PAIRS_MB:g} MB: {'met' if held < TARGET_PAIRS_MB else 'NOT met'}")


def epoch_work(root: Path, batch: int, voxel_size: float) -> None:
    import numpy as np
    import torch

    from mink_ssl.data.pairs import PairDataset, read_manifest
    from mink_ssl.data.samplers import ResumableSampler
    from mink_ssl.engine.trainer import TrainState

    t0 = time.perf_counter()
    read_manifest(root)
    t_manifest = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds = PairDataset(root, voxel_size=voxel_size, verify_matches=0)
    t_dataset = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds.verify_matches(2)
    t_check = time.perf_counter() - t0
    n = len(ds)
    sampler = ResumableSampler(n, seed=0)
    t0 = time.perf_counter()
    sampler._epoch(0)
    t_shuffle = time.perf_counter() - t0
    t0 = time.perf_counter()
    keys = np.fromiter((i for _, i in _take(iter(sampler), n)), np.int64, n)
    t_keys = time.perf_counter() - t0
    print(f"per-epoch work at {n} pairs (once, in the training process; workers get indices): "
          f"manifest {t_manifest:.2f} s ({(root / 'manifest.json').stat().st_size / 1e6:.1f} MB), "
          f"dataset (manifest + pair list) {t_dataset:.2f} s, self-check of 2 pairs "
          f"{t_check:.2f} s, shuffle {t_shuffle * 1e3:.0f} ms, one epoch of keys {t_keys:.2f} s")
    exact = True
    for k in ((n // 2) // batch, n // batch - 3):  # mid-epoch; 24 keys before its end
        start = k * batch
        resumed = iter(ResumableSampler(n, seed=0, start=start))
        tail = np.fromiter((i for _, i in _take(resumed, n - start)), np.int64, n - start)
        nxt = list(_take(resumed, 2000))  # and on into the next epoch
        ref = list(_take(iter(ResumableSampler(n, seed=0)), n + 2000))[n:]
        exact &= bool(np.array_equal(tail, keys[start:])) and nxt == ref
    state = TrainState(iteration=n // batch - 3, samples=(n // batch - 3) * batch,
                       counts={"skipped_pairs": 12, "skipped_batches": 0}).to_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    perm = np.arange(n, dtype=np.int64).nbytes
    print(f"  resume after k batches of {batch} (mid-epoch and 3 batches before its end): "
          f"{'exact' if exact else 'DIFFERS'}; sampler state in a checkpoint "
          f"{len(buf.getvalue())} bytes (samples consumed) vs a stored permutation {perm} bytes: "
          f"{perm / len(buf.getvalue()):.0f}x smaller")


def _take(it, n):
    for _ in range(n):
        yield next(it)


def startup(root: Path, out: Path, workers: int, args) -> dict:
    """``mink-ssl-pretrain`` on ``root`` in a fresh process under ``ulimit -n``: the times of
    its 'pretrain:' line and of each step, and its processes' resources over the run."""
    nofile = args.nofile

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    cmd = [sys.executable, "-m", "mink_ssl.cli.pretrain", f"data.root={root}",
           f"model={args.model}", f"data.num_workers={workers}", f"batch_size={args.batch}",
           f"max_iterations={args.steps}", f"data.voxel_size={args.voxel_size}", "device=cpu",
           "log_every=1", "checkpoint_every=1000000", "progress=false", f"hydra.run.dir={out}"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], preexec_fn=limit,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.time() - t0, ln)
                                                          for ln in proc.stdout), daemon=True)
    reader.start()
    metrics, steps, samples, peaks, private = out / "metrics.jsonl", [], [], {}, {}
    while proc.poll() is None:
        now = time.time() - t0
        if metrics.is_file():
            rows = metrics.read_text().count("\n")
            steps += [now] * (rows - len(steps))
        procs = {"main": proc_stats(proc.pid)}
        procs.update({f"worker{k}": proc_stats(p) for k, p in enumerate(children(proc.pid))})
        procs = {k: v for k, v in procs.items() if v}
        for k, v in procs.items():
            peaks[k] = max(peaks.get(k, 0.0), v["peak_rss_mb"])
            private[k] = max(private.get(k, 0.0), v["private_mb"])
        samples.append((now, procs))
        time.sleep(0.2)
    reader.join(10)
    if proc.returncode:
        raise SystemExit(f"pretraining failed ({proc.returncode}):\n"
                         + "".join(ln for _, ln in lines)[-3000:])
    said = next((t for t, ln in lines if ln.startswith("pretrain:")), float("nan"))
    return {"first_step": steps[0] if steps else float("nan"), "steps": steps, "said": said,
            "peaks": peaks, "private": private, "samples": samples}


def report_startup(workers: int, full: dict, one: dict, nofile: int) -> None:
    ratio = full["first_step"] / one["first_step"]
    ok = full["first_step"] <= TARGET_FIRST_STEP_S
    print(f"start-up, {workers} workers: first step {full['first_step']:.1f} s after start "
          f"(dataset and model ready at {full['said']:.1f} s; one scene {one['said']:.1f} s), "
          f"{ratio:.2f}x the one-scene folder's {one['first_step']:.1f} s; target "
          f"{TARGET_FIRST_STEP_S:g} s: "
          f"{'met' if ok else 'NOT met'} (load average {os.getloadavg()[0]:.1f})")
    gaps = [round(b - a, 1) for a, b in zip(full["steps"], full["steps"][1:])]
    print(f"  steps at {[round(t, 1) for t in full['steps']]} s (gaps {gaps}); peak RSS MB: "
          + ", ".join(f"{k} {v:.0f}" for k, v in full["peaks"].items()))
    print("  of which private (not shared with the main process), MB at most: "
          + ", ".join(f"{k} {v:.0f}" for k, v in full["private"].items()))
    for name in full["peaks"]:
        fds = [p[name]["fds"] for _, p in full["samples"] if name in p]
        print(f"  {name} open files over the run: min {min(fds)}, max {max(fds)}, "
              f"last {fds[-1]} ({len(fds)} samples; limit {nofile})")


def scale_pass(root: Path, workers: int, args, mode: str, batch: int, every: int, voxel: float,
               limit: int, features: str = "ones", env: dict | None = None) -> dict:
    """benchmarks/_scale.py's loader pass in a fresh process under ``ulimit -n``."""
    cmd = [sys.executable, str(Path(__file__).with_name("_scale.py")), str(root), str(workers),
           str(args.nofile), mode, str(batch), str(every), str(voxel), str(limit), features]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if res.returncode:
        raise SystemExit(f"{mode} pass failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.splitlines()[-1])


def loader_startup(root: Path, one: Path, workers: int, args) -> None:
    """The data side of start-up alone, with pretraining's views (``--voxel-size``, PointContrast's
    features): the dataset built and the loader's first batch, full size vs one scene, each in
    a fresh process, alternated over ``--repeats`` rounds (the order reversed every round)."""
    from _timing import paired_ratio, summary

    got: dict[str, list[dict]] = {"full": [], "one": []}
    for r in range(args.repeats):
        for name in (("full", "one") if r % 2 == 0 else ("one", "full")):
            got[name].append(scale_pass(root if name == "full" else one, workers, args, "epoch",
                                        args.batch, 1, args.voxel_size, 1, "ones_jitter"))
    med = {k: {key: summary([x[key] for x in v])["median"] for key in ("dataset_s",
                                                                        "first_batch_s")}
           for k, v in got.items()}
    ratio = paired_ratio([x["first_batch_s"] for x in got["full"]],
                         [x["first_batch_s"] for x in got["one"]])
    f, o = med["full"], med["one"]
    print(f"loader start-up, {workers} workers (batch {args.batch}, {args.voxel_size:g} m, median "
          f"of {args.repeats}): dataset built in {f['dataset_s']:.2f} s, first batch at "
          f"{f['first_batch_s']:.1f} s; one scene {o['dataset_s']:.2f} s, "
          f"{o['first_batch_s']:.1f} s: {ratio['median']:.2f}x (IQR {ratio['iqr']:.2f}; load "
          f"average {os.getloadavg()[0]:.1f})")


def sweep(root: Path, workers: int, args) -> None:
    # allocations from 128 KB up mapped and unmapped (glibc otherwise raises that threshold as
    # it goes and keeps freed arrays in its heap): resident memory is then what is held
    out = scale_pass(root, workers, args, "sweep", 1, max(1, args.sweep_items // 20),
                     args.sweep_voxel, args.sweep_items, env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    from mink_ssl.data.pairs import STORES_OPEN

    s = out["samples"]
    w = max(workers, 1)
    per_worker = s[-1]["items"] // w
    # from warm-up (a quarter in, and each worker holding its STORES_OPEN stores) to the end
    warm = [k for k, x in enumerate(s) if x["items"] // w > 2 * STORES_OPEN and k >= len(s) // 4]
    procs = [p for p in s[-1] if p == "main" or p.startswith("worker")]
    if len(warm) >= 4:
        half = warm[0] + (len(s) - warm[0]) // 2
        early, late = s[warm[0]:half], s[half:]
        got = {key: max((floor(late, p, key) / floor(early, p, key), p) for p in procs)
               for key in ("fds", "rss_mb")}
        verdict = "flat" if all(r <= 1.1 for r, _ in got.values()) else "GROWS"
        detail = (f"open files {got['fds'][0]:.2f}x ({got['fds'][1]}), resident memory "
                  f"{got['rss_mb'][0]:.2f}x ({got['rss_mb'][1]})")
        span = f"{early[0]['items'] // w}-{late[0]['items'] // w} vs {late[0]['items'] // w}-"
    else:
        verdict = f"too few scenes per worker to judge (a worker keeps up to {STORES_OPEN} open)"
        detail, span = "open files 1.00x, resident memory 1.00x (not judged)", "-"
    print(f"sweep, {workers} workers: each opened {per_worker} scenes in turn (first batch after "
          f"{out['first_batch_s']:.1f} s, {s[-1]['seconds']:.0f} s in all); the least value over "
          f"scenes {span}{per_worker} per worker, the worst process: {detail}: {verdict}")
    for p in procs:
        print(f"  {p}: open files {[x[p]['fds'] for x in s]}")
        print(f"  {p}: resident MB {[round(x[p]['rss_mb']) for x in s]}, private "
              f"{[round(x[p]['private_mb']) for x in s]}")


def floor(samples: list[dict], proc: str, key: str) -> float:
    """The least ``key`` of ``proc`` over ``samples``: what a leak raises, while a batch in
    flight (its tensors' descriptors and buffers) comes and goes."""
    return min(smp[proc][key] for smp in samples)


def disk_used(path: Path) -> int:
    seen, total = set(), 0
    for f in path.rglob("*"):
        st = f.lstat()
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_blocks * 512
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=1513)
    p.add_argument("--pairs", type=int, default=850_000, help="pairs in all (about)")
    p.add_argument("--workers", default="2,8", help="loader workers, comma-separated")
    p.add_argument("--steps", type=int, default=3, help="pretraining iterations per run")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--model", default="res16unet14s", help="a configs/model/ name (the smallest"
                   " by default: on CPU a Res16UNet34C step at batch 8 takes minutes)")
    p.add_argument("--voxel-size", type=float, default=0.025)
    p.add_argument("--nofile", type=int, default=1024, help="soft ulimit -n of the runs")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the loader start-up")
    p.add_argument("--sweep-items", type=int, default=2400, help="items of each scene sweep")
    p.add_argument("--sweep-voxel", type=float, default=0.1)
    p.add_argument("--frame-skip", type=int, default=1, help="of the source scene's prep")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="folder for the build")
    p.add_argument("--keep", action="store_true", help="keep the built folders")
    args = p.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    for name in ("scenes", "pairs", "steps", "batch", "nofile", "sweep_items", "frame_skip",
                 "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(w < 0 for w in workers):
        p.error(f"--workers must be >= 0, got {args.workers}")
    require_kitchen()
    work = Path(tempfile.mkdtemp(prefix="mink-ssl-scale-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        source = prepare_source(KITCHEN, work, args.frame_skip)
        t_source = time.perf_counter() - t0
        per_scene = max(1, round(args.pairs / args.scenes))
        t0 = time.perf_counter()
        info = scale_folder(source, work / "pairs", args.scenes, per_scene)
        t_build = time.perf_counter() - t0
        scale_folder(source, work / "one", 1, per_scene)
        linked = (source / "scene0000_00" / "fragments.bin").stat().st_size * args.scenes
        print(f"folder: {info['scenes']} scenes x {per_scene} pairs = {info['pairs']} pairs "
              f"(source scene prepared in {t_source:.0f} s, folder built in {t_build:.1f} s); "
              f"pairs.txt {info['pairs_file_bytes'] / 1e6:.1f} MB; on disk "
              f"{disk_used(work / 'pairs') / 1e6:.0f} MB for {linked / 1e9:.1f} GB of fragments")
        pair_list(work / "pairs")
        epoch_work(work / "pairs", args.batch, args.voxel_size)
        for w in workers:
            loader_startup(work / "pairs", work / "one", w, args)
        for w in workers:
            full = startup(work / "pairs", work / f"run_full_{w}", w, args)
            one = startup(work / "one", work / f"run_one_{w}", w, args)
            report_startup(w, full, one, args.nofile)
        for w in workers:
            sweep(work / "pairs", w, args)
    finally:
        if not args.keep:
            remove_folder(work)
        else:
            print(f"kept {work}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child_pair_list(Path(sys.argv[3]), sys.argv[4])))
        sys.exit(0)
    sys.exit(main())
