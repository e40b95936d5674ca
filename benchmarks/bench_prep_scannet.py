"""Pair prep of one ScanNet-shaped scene on one core, projected to all of ScanNet.

The scene is a ``.sens`` shaped like ScanNet's: colour 1296x968 JPEG, depth 640x480 zlib,
``--frames`` frames (ScanNet: 2,000 to 5,000; its mean is 2.5M frames / 1,513 scans = 1,650).
The views prep samples (every ``--frame-skip``-th frame) are rendered rooms
(:func:`data_prep.synthetic.generate_scene`: ray-cast, sensor noise, a structured-light
sensor's disparity steps so depth compresses like a real sensor's, a view every 6 degrees
around the room as ScanNet's frames 25 apart); the frames between them carry the payloads of
the view before (real sizes, never decoded by prep). Generating is not timed.

Each of ``--repeats`` runs prepares the scene with the prep code itself
(:func:`data_prep.pairs.scene.prepare_scene`) in a fresh process pinned to one core, and
reports per stage (:class:`data_prep.pairs.scene.StageClock`): seconds, peak RSS and bytes
written, for

- decode: read the sampled frames, decode depth and colour, re-encode colour at 640x480;
- overlap: back-projection and 5 cm clouds, the overlap of every pair, the self-check;
- write: fragments.bin / .npz, overlap.txt, scene.json, the rename.

It then projects, from these measured per-scene figures, the core-hours and the disk for
ScanNet's 1,513 scans, against PointContrast's published figures (about 15 hours with 50
processes = 750 core-hours, up to 1 TB of disk). Targets: at most 15 core-hours (50x less than
750) and under 20 GB.

    .venv/bin/python benchmarks/bench_prep_scannet.py [--frames 5000] [--repeats 3]
        [--frame-skip 25] [--color-size 1296x968] [--depth-size 640x480] [--work DIR]

``--work DIR`` keeps the generated scene there and reuses it on the next run (the default is a
temporary folder under /tmp, removed at the end: a 5,000-frame ``.sens`` is about 1.6 GB).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNET_SCENES = 1513  # scans of ScanNet v2 (train + val)
SCANNET_FRAMES = 2_500_000  # "2.5 million views in more than 1500 scans" (ScanNet's README)
PC_CORE_HOURS = 750.0  # PointContrast: about 15 hours with 50 processes
PC_DISK_BYTES = 1e12  # PointContrast: up to 1 TB
PC_PAIRS = 843_000  # pairs in PointContrast's lists
TARGET_CORE_HOURS, TARGET_DISK_BYTES = 15.0, 20e9
DEG_PER_VIEW = 6.0  # camera turn between sampled views (ScanNet's frames 25 apart)
SCENE = "scene0000_00"


def size_arg(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1296x968") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be >= 16 pixels")
    return w, h


# -- the scene ------------------------------------------------------------------------------
def make_scene(work: Path, frames: int, skip: int, color: tuple[int, int],
               depth: tuple[int, int]) -> tuple[Path, float]:
    """``work/raw/<SCENE>/<SCENE>.sens`` of ``frames`` frames (reused when its shape matches);
    returns the scene folder and the seconds generating took (0 when reused)."""
    from data_prep.scannet.sens import SensReader
    from data_prep.scannet.sens_writer import write_sens
    from data_prep.synthetic import SensorModel, generate_scene

    scene_dir = work / "raw" / SCENE
    shape = {"frames": frames, "frame_skip": skip, "color": list(color), "depth": list(depth),
             "deg_per_view": DEG_PER_VIEW, "version": 1}
    stamp = work / "shape.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == shape \
            and (scene_dir / f"{SCENE}.sens").is_file():
        return scene_dir, 0.0
    t0 = time.perf_counter()
    shutil.rmtree(work / "raw", ignore_errors=True)
    views = (frames - 1) // skip + 1  # the frames prep samples: 0, skip, 2 skip, ...
    sensor = SensorModel(disparity_step=0.125)  # a structured-light sensor (1/8 px steps)
    rendered = generate_scene(work / "render", "views", 0, n_frames=views, image_size=depth,
                              color_size=color, deg_per_frame=DEG_PER_VIEW, sensor=sensor)

    with SensReader(rendered / "views.sens") as src:
        header = src.header

        def expanded():
            view = None
            for i in range(frames):
                if i % skip == 0:
                    view = src.frame(i // skip)
                ts = i * 1_000_000 // 30  # microseconds at 30 fps
                yield view.camera_to_world, view.color_bytes, view.depth_bytes, ts, ts

        write_sens(scene_dir / f"{SCENE}.sens", header, expanded(), color_compression="jpeg",
                   depth_compression="zlib_ushort")
    shutil.rmtree(work / "render")
    stamp.write_text(json.dumps(shape))
    return scene_dir, time.perf_counter() - t0


# -- one measured run (a child process, pinned to one core) ----------------------------------
def child(scene_dir: str, out: str, skip: str) -> None:
    cpu = sorted(os.sched_getaffinity(0))[0]
    os.sched_setaffinity(0, {cpu})  # one core, whatever the libraries' thread pools want
    t0 = time.perf_counter()
    import resource

    import open3d  # noqa: F401  (what a prep process imports once, counted as imports)

    from data_prep.pairs.scene import PrepParams, StageClock, prepare_scene
    t_import = time.perf_counter() - t0
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    clock = StageClock()
    peaks: dict[str, int] = {}
    stop = threading.Event()

    def sample():  # peak RSS per stage, sampled every 5 ms
        while not stop.is_set():
            stage = clock.current or "other"
            peaks[stage] = max(peaks.get(stage, 0), rss())
            time.sleep(0.005)

    rss_start = rss()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    w0, c0 = time.perf_counter(), time.process_time()
    report = prepare_scene(Path(scene_dir), Path(out), PrepParams(frame_skip=int(skip)),
                           clock=clock)
    wall, cpu_s = time.perf_counter() - w0, time.process_time() - c0
    stop.set()
    sampler.join()
    if report.status != "done":
        raise SystemExit(f"prep did not finish the scene: {report.status}: {report.reason}")
    done = Path(out) / Path(scene_dir).name
    files = {p.name: p.stat().st_size for p in done.iterdir()
             if p.is_file() and not p.name.startswith(".")}
    import numpy as np

    with np.load(done / "fragments.npz") as z:
        depth_bytes = int(z["depth_offsets"][:, 1].sum())  # (F, 2) int64 offset, length
    print(json.dumps({"wall": wall, "cpu": cpu_s, "imports": t_import, "stages": clock.seconds,
                      "stages_cpu": clock.cpu,
                      "peaks": peaks, "rss_start": rss_start,
                      "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "fragments": report.fragments, "pairs": report.pairs,
                      "pairs_kept": report.pairs_kept, "files": files,
                      "depth_bytes": depth_bytes}))


def measure(scene_dir: Path, work: Path, skip: int) -> dict:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, __file__, "--child", str(scene_dir), str(out), str(skip)],
                         capture_output=True, text=True, env=env, cwd=REPO)
    shutil.rmtree(out, ignore_errors=True)
    if res.returncode != 0:
        raise SystemExit(f"the measured prep process failed (exit {res.returncode}):\n"
                         f"{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- the report -----------------------------------------------------------------------------
def real_depth_bytes() -> float | None:
    """Mean zlib (level 6) depth payload of the real 7-Scenes frames (a structured-light
    Kinect, 640x480, like ScanNet's Structure sensor), or None without ../shared."""
    from data_prep.scannet.exported import ExportedFrames
    from mink_ssl.formats.fragments import encode_depth

    kitchen = REPO.parent / "shared" / "realdata" / "7scenes-redkitchen-a"
    if not (kitchen / "depth").is_dir():
        return None
    src = ExportedFrames(kitchen)
    sizes = [len(encode_depth(f.depth(src.header))) for f in src.frames(step=5)]
    return statistics.mean(sizes)


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def report(runs: list[dict], frames: int, skip: int, sens_bytes: int, color, depth,
           t_gen: float, load: float) -> None:
    r0 = runs[0]
    F, pairs, files = r0["fragments"], r0["pairs"], r0["files"]
    cpus, walls = [r["cpu"] for r in runs], [r["wall"] for r in runs]
    cpu, wall = statistics.median(cpus), statistics.median(walls)
    c = {s: statistics.median(r["stages_cpu"][s] for r in runs) for s in r0["stages_cpu"]}
    w = {s: statistics.median(r["stages"][s] for r in runs) for s in r0["stages"]}
    peak = {s: max(r["peaks"].get(s, 0) for r in runs) for s in ("decode", "clouds", "overlap",
                                                                 "write")}
    mb = 1 / 2**20
    print(f"ScanNet-shaped scene: {frames:,} frames (colour {color[0]}x{color[1]} JPEG, depth "
          f"{depth[0]}x{depth[1]} zlib), {gb(sens_bytes)} .sens; frame skip {skip}: {F} "
          f"fragments, {pairs:,} pairs" + (f" (generated in {t_gen:.0f} s, not timed)"
                                           if t_gen else " (reused)"))
    print(f"per scene on one core, measured on this machine: CPU seconds of the prep process "
          f"(median of {len(runs)} runs) and its wall seconds (load average {load:.1f} on "
          f"{os.cpu_count()} cores: wall includes other work)")
    print(f"  decode : {c['decode']:6.2f} s CPU ({w['decode']:6.2f} s wall)  peak RSS "
          f"{peak['decode'] * mb:4.0f} MB  written 0 (the {F} sampled frames read and decoded, "
          f"colour re-encoded at {depth[0]}x{depth[1]}; the other {frames - F:,} frames' "
          f"payloads never read)")
    print(f"  overlap: {c['clouds'] + c['overlap']:6.2f} s CPU ({w['clouds'] + w['overlap']:6.2f}"
          f" s wall)  peak RSS {max(peak['clouds'], peak['overlap']) * mb:4.0f} MB  written 0 "
          f"(clouds {c['clouds']:.2f} s + all {pairs:,} pairs and the self-check "
          f"{c['overlap']:.2f} s)")
    written = sum(files.values())
    print(f"  write  : {c['write']:6.2f} s CPU ({w['write']:6.2f} s wall)  peak RSS "
          f"{peak['write'] * mb:4.0f} MB  written {gb(written)} (" + ", ".join(
              f"{k} {v / 1e3:,.0f} KB" for k, v in sorted(files.items())) + ")")
    print(f"  total  : {cpu:6.2f} s CPU (runs {min(cpus):.2f} to {max(cpus):.2f}), {wall:.2f} s "
          f"wall; peak RSS {max(r['max_rss'] for r in runs) * mb:.0f} MB (at start "
          f"{r0['rss_start'] * mb:.0f} MB: the imports, {r0['imports']:.1f} s once per "
          f"process); {r0['pairs_kept']:,} pairs >= 0.3 "
          f"({100 * r0['pairs_kept'] / max(pairs, 1):.0f}%)")

    mean_frames = SCANNET_FRAMES / SCANNET_SCENES
    hours = [SCANNET_SCENES * x / 3600 for x in cpus]
    h = SCANNET_SCENES * cpu / 3600
    print(f"projected to ScanNet's {SCANNET_SCENES:,} scans, computed from the measured "
          f"per-scene figures, every scan the size of this one ({frames:,} frames; ScanNet's "
          f"mean is {mean_frames:,.0f}; an upper bound if no scan is larger):")
    ok = "met" if h <= TARGET_CORE_HOURS else "NOT met"
    print(f"  core-hours: {h:.2f} (runs {min(hours):.2f} to {max(hours):.2f}); PointContrast's "
          f"{PC_CORE_HOURS:.0f} core-hours / ours: {PC_CORE_HOURS / h:.0f}x (runs "
          f"{PC_CORE_HOURS / max(hours):.0f}x to {PC_CORE_HOURS / min(hours):.0f}x; target "
          f"{PC_CORE_HOURS / TARGET_CORE_HOURS:.0f}x, <= {TARGET_CORE_HOURS:.0f} core-hours: "
          f"{ok}); by wall seconds on this loaded machine {SCANNET_SCENES * wall / 3600:.2f}")
    frag_bytes = (files.get("fragments.bin", 0) + files.get("fragments.npz", 0)) / F
    n_frags = SCANNET_FRAMES / skip
    line = files.get("overlap.txt", 0) / max(pairs, 1)  # bytes of one pair's line
    lists = SCANNET_SCENES * (files.get("overlap.txt", 0) + files.get("scene.json", 0))
    disk = n_frags * frag_bytes + lists
    ok = "met" if disk < TARGET_DISK_BYTES else "NOT met"
    print(f"  disk: {gb(disk)} = ScanNet's {n_frags:,.0f} fragments ({SCANNET_FRAMES:,} frames "
          f"/ {skip}) x {frag_bytes / 1e3:.0f} KB + {SCANNET_SCENES:,} x this scene's overlap.txt "
          f"and scene.json ({gb(lists)}); PointContrast's 1 TB / ours: "
          f"{PC_DISK_BYTES / disk:.0f}x (target under {TARGET_DISK_BYTES / 1e9:.0f} GB: {ok}); "
          f"pairs.txt ~{gb(PC_PAIRS * line)} for {PC_PAIRS:,} pairs")
    if frames >= mean_frames:  # a tighter bound from ScanNet's frame count
        full = SCANNET_FRAMES / frames
        hb, db = full * cpu / 3600, n_frags * frag_bytes + full * lists / SCANNET_SCENES
        print(f"  by ScanNet's frame budget (its {SCANNET_FRAMES:,} frames; a scan's cost grows "
              f"faster than its frames, so the total is largest with the frames in the fewest "
              f"scans, {full:,.0f} of this size, if none is larger): {hb:.2f} core-hours, "
              f"PointContrast's / ours: {PC_CORE_HOURS / hb:.0f}x; disk {gb(db)}")
    real = real_depth_bytes()
    if real is not None and r0.get("depth_bytes"):
        ours = r0["depth_bytes"] / F
        alt = disk - n_frags * (ours - real)
        print(f"  depth is {100 * r0['depth_bytes'] / files['fragments.bin']:.0f}% of the "
              f"fragment bytes, kept as the .sens stores it: {ours / 1e3:.0f} KB a frame here; "
              f"real 7-Scenes Kinect depth is {real / 1e3:.0f} KB a frame (zlib level 6): with "
              f"it, disk {gb(alt)} (target: {'met' if alt < TARGET_DISK_BYTES else 'NOT met'})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=5000, help="frames in the .sens (ScanNet: "
                   "2,000 to 5,000; default 5000, the conservative end)")
    p.add_argument("--frame-skip", type=int, default=25, help="prep's --frame-skip (default 25)")
    p.add_argument("--color-size", type=size_arg, default=(1296, 968), metavar="WxH")
    p.add_argument("--depth-size", type=size_arg, default=(640, 480), metavar="WxH")
    p.add_argument("--repeats", type=int, default=3, help="measured runs (default 3)")
    p.add_argument("--work", type=Path, default=None, help="keep the generated scene here and "
                   "reuse it (default: a temporary folder, removed)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return 0
    if args.frame_skip < 1:
        p.error(f"--frame-skip must be >= 1, got {args.frame_skip}")
    if args.frames < args.frame_skip + 1:
        p.error(f"--frames must be > --frame-skip ({args.frame_skip}) so that prep samples at "
                f"least 2 frames, got {args.frames}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    tmp = None
    if args.work is None:
        tmp = tempfile.mkdtemp(prefix="mink-ssl-bench-prep-", dir="/tmp")
        work = Path(tmp)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    try:
        scene_dir, t_gen = make_scene(work, args.frames, args.frame_skip, args.color_size,
                                      args.depth_size)
        runs = [measure(scene_dir, work, args.frame_skip) for _ in range(args.repeats)]
        report(runs, args.frames, args.frame_skip, (scene_dir / f"{SCENE}.sens").stat().st_size,
               args.color_size, args.depth_size, t_gen, os.getloadavg()[0])
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
