"""A pairs folder of ScanNet's size without its disk, and a process's resources from /proc.

:func:`scale_folder` makes what ``mink-ssl-prep scannet`` writes for N scenes (``manifest.json``,
``pairs.txt``, ``<scene>/fragments.{npz,bin}`` and ``<scene>/scene.json``), every scene a hard
link of one real prepared scene: 1,513 scenes cost 1,513 directories and one scene's bytes.
The source scene is prepared once, by our prep, into the destination's filesystem (hard links
cannot cross filesystems), from the real 7-Scenes frames (../shared/realdata). Each scene lists
``pairs_per_scene`` of the source's kept pairs (evenly spread over them, so the overlap mix is
the real one) under its own name. ``overlap.txt`` (every pair, read only by prep) is left out.

:func:`proc_stats` reads a process's resident memory, its private (unshared) part and its open
file descriptors from ``/proc`` (Linux), for the scale benchmark and test.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

SOURCE_NAME = "scene0000_00"  # the source scene's name: every copy's name has its length


def scene_names(n: int) -> list[str]:
    """ScanNet-style names of ``n`` scenes: scene0000_00, scene0001_00, ..."""
    if not 1 <= n <= 10_000:
        raise ValueError(f"scenes must be in 1..10000 (4-digit ScanNet names), got {n}")
    return [f"scene{k:04d}_00" for k in range(n)]


def prepare_source(frames: Path, work: Path, frame_skip: int = 1) -> Path:
    """Our prep of the real frames folder ``frames`` as one scene named :data:`SOURCE_NAME`,
    into ``work/source`` (reused when already there); returns that prep output folder."""
    from data_prep.pairs.prep import PrepParams, run

    out = Path(work) / "source"
    if (out / "manifest.json").is_file() and (out / SOURCE_NAME / "fragments.bin").is_file():
        return out
    raw = Path(work) / "source_raw"
    raw.mkdir(parents=True, exist_ok=True)
    link = raw / SOURCE_NAME
    if not link.exists():
        link.symlink_to(Path(frames).resolve(), target_is_directory=True)
    run(raw, out, PrepParams(frame_skip=frame_skip), progress=False, log=lambda _: None)
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def scale_folder(source: Path, dest: Path, scenes: int, pairs_per_scene: int) -> dict:
    """``dest``: a pairs folder of ``scenes`` hard-linked copies of the prepared scene in
    ``source`` (a :func:`prepare_source` folder, on ``dest``'s filesystem), each listing
    ``pairs_per_scene`` pairs. Returns {scenes, pairs, pairs_file_bytes}."""
    source, dest = Path(source), Path(dest)
    lines = (source / "pairs.txt").read_text().splitlines()
    if not 1 <= pairs_per_scene <= len(lines):
        raise ValueError(f"pairs_per_scene must be in 1..{len(lines)} (the kept pairs of "
                         f"{source / SOURCE_NAME}), got {pairs_per_scene}")
    pick = np.unique(np.linspace(0, len(lines) - 1, pairs_per_scene).round().astype(np.int64))
    block = "".join(lines[k] + "\n" for k in pick)  # the source's pairs, named SOURCE_NAME
    names = scene_names(scenes)
    dest.mkdir(parents=True, exist_ok=True)
    src_scene = source / SOURCE_NAME
    meta = json.loads((src_scene / "scene.json").read_text())
    meta["files"].pop("overlap.txt", None)
    meta["pairs_kept"] = len(pick)
    for name in names:
        d = dest / name
        if not (d / "scene.json").is_file():
            d.mkdir(exist_ok=True)
            for f in ("fragments.bin", "fragments.npz", ".mink-ssl-scene"):
                if not (d / f).exists():
                    os.link(src_scene / f, d / f)
            _atomic_write(d / "scene.json", json.dumps({**meta, "scene": name}, indent=1))
    tmp = dest / ".pairs.txt.tmp"
    with open(tmp, "w") as f:
        for name in names:  # prep writes the scenes sorted by name
            f.write(block.replace(f"{SOURCE_NAME}/", f"{name}/"))
    os.replace(tmp, dest / "pairs.txt")
    manifest = json.loads((source / "manifest.json").read_text())
    entry = {**manifest["scenes"][SOURCE_NAME], "pairs_kept": len(pick)}
    manifest["scenes"] = {name: entry for name in names}
    c = manifest["counts"]
    manifest["counts"] = {**c, "scenes": scenes, "scenes_done": scenes,
                          "fragments": c["fragments"] * scenes, "pairs": c["pairs"] * scenes,
                          "pairs_kept": len(pick) * scenes}
    manifest["self_check"]["pairs_checked"] *= scenes
    _atomic_write(dest / "manifest.json", json.dumps(manifest, indent=1))
    return {"scenes": scenes, "pairs": len(pick) * scenes,
            "pairs_file_bytes": (dest / "pairs.txt").stat().st_size}


def remove_folder(path: Path) -> None:
    """Remove a folder this module built (hard links: only the names go)."""
    shutil.rmtree(path, ignore_errors=True)


def proc_stats(pid: int) -> dict | None:
    """{rss_mb, peak_rss_mb, private_mb, fds} of process ``pid`` from /proc; None when it has
    gone. ``private_mb``: pages only this process maps (what a forked worker has copied or
    allocated itself; RSS also counts the pages it still shares with its parent)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    kb = {}
    for text in (status, rollup):
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                kb[key] = int(value.split()[0])
    private = kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)
    return {"rss_mb": kb.get("VmRSS", 0) / 1024, "peak_rss_mb": kb.get("VmHWM", 0) / 1024,
            "private_mb": private / 1024, "fds": fds}


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (loader workers of a training process)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            # pid (comm) state ppid ...: comm may hold spaces, so split after its ')'
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return sorted(found)


# ------------------------------------------------------------- the loader pass (a subprocess)

def loader_pass(root: Path, workers: int, nofile: int, mode: str, batch: int, every: int,
                voxel_size: float, limit: int = 0, seed: int = 0,
                features: str = "ones") -> dict:
    """Run in a fresh process: under a soft ``ulimit -n`` of ``nofile``, build the pair
    dataset of ``root`` and pull batches through the training loader, sampling the resources
    of this process and of each loader worker every ``every`` batches.

    ``mode``: ``epoch``: one epoch of the real pretraining loader (``build_loader``: the
    resumable sampler's shuffled order; with ``limit``, its first ``limit`` batches); ``sweep``: the same loader settings over the first pair
    of every scene, each repeated once per worker (batch 1, dealt round-robin), so that every
    worker opens every scene once (with ``limit``, only the first ``limit // workers`` scenes).
    Cheap views (``voxel_size``, constant features) keep the
    pass short; what is measured is what grows with the scenes touched."""
    import resource
    import time

    import torch
    from torch.utils.data import DataLoader, Sampler

    from mink_ssl.data.pairs import PairDataset, collate_pairs
    from mink_ssl.engine.build import build_loader
    from mink_ssl.signals import ignore_stop_signals

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ds = PairDataset(root, voxel_size=voxel_size, features=features, min_matches=1, seed=seed)
    t_dataset = time.perf_counter() - t0
    if mode == "epoch":
        loader = build_loader(ds, batch, workers, seed, 0, 1, 0, collate_pairs)
        n_batches = min(len(ds) // batch, limit) if limit else len(ds) // batch
    elif mode == "sweep":
        first = ds.pairs.first_of_each_scene()  # (S,) int64
        if limit:
            first = first[:max(1, limit // max(workers, 1))]
        keys = [(0, int(i)) for i in first for _ in range(max(workers, 1))]

        class Listed(Sampler):
            def __iter__(self):
                return iter(keys)

            def __len__(self):
                return len(keys)

        loader = DataLoader(ds, batch_size=1, sampler=Listed(), num_workers=workers,
                            worker_init_fn=ignore_stop_signals if workers > 0 else None,
                            collate_fn=collate_pairs, persistent_workers=workers > 0,
                            prefetch_factor=4 if workers > 0 else None)
        batch, n_batches = 1, len(keys)
    else:
        raise ValueError(f"mode must be 'epoch' or 'sweep', got {mode!r}")
    samples, seen, skipped = [], set(), 0
    first_batch_s = None
    it = iter(loader)
    for b in range(n_batches):
        got = next(it)
        if b == 0:
            first_batch_s = time.perf_counter() - t0
        if got is None:
            skipped += batch
        else:
            skipped += got.skipped
            seen.update(a.split("/")[0] for a, _ in got.names)
        if (b + 1) % every == 0 or b + 1 == n_batches:
            procs = {"main": proc_stats(os.getpid())}
            procs.update({f"worker{k}": proc_stats(p)
                          for k, p in enumerate(children(os.getpid()))})
            samples.append({"items": (b + 1) * batch, "scenes_seen": len(seen),
                            "seconds": time.perf_counter() - t0, **procs})
    del it, loader
    return {"mode": mode, "workers": workers, "nofile": nofile, "pairs": len(ds),
            "scenes_seen": sorted(seen), "skipped": skipped, "dataset_s": t_dataset,
            "first_batch_s": first_batch_s, "samples": samples}


if __name__ == "__main__":  # _scale.py ROOT WORKERS NOFILE MODE BATCH EVERY VOXEL [LIMIT [FEATURES]]
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    a = sys.argv[1:]
    print(json.dumps(loader_pass(Path(a[0]), int(a[1]), int(a[2]), a[3], int(a[4]), int(a[5]),
                                 float(a[6]), int(a[7]) if len(a) > 7 else 0,
                                 features=a[8] if len(a) > 8 else "ones")))
