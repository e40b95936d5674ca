"""ScanNet scale, reduced for CI (issue #25): a few hundred hard-linked copies of a real prepared
scene under a proportionally lower ``ulimit -n``. One epoch of the real pretraining loader that
touches every scene keeps each process's open files and resident memory flat (early vs late,
with a tolerance); a long epoch resumes at its exact position from a small state; the pair list
is a few compact arrays, parsed as the line-by-line parser parses; open fragment stores are
bounded, and a forked worker does not keep the ones it inherited.

The full-size run (1,513 scenes, ~850K pairs, ``ulimit -n 1024``) is
``benchmarks/bench_scannet_scale.py``; its figures are in docs/scale.md.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mink_ssl.data import pair_list
from mink_ssl.data.pair_list import PairList
from mink_ssl.data.pairs import PairDataset, collate_pairs
from mink_ssl.data.samplers import ResumableSampler
from mink_ssl.engine.build import build_loader
from mink_ssl.formats.fragments import StoreCache

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _scale import prepare_source, scale_folder  # noqa: E402

SCENES = 300
# ScanNet's 1,513 scenes under a node's 1024 open files, scaled to SCENES: a worker that kept one
# descriptor per scene it touched (each worker touches ~3/4 of them in the epoch) runs out
NOFILE = 1024 * SCENES // 1513
WORKERS = 2


@pytest.fixture(scope="module")
def scale_root(kitchen, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("scale")
    source = prepare_source(kitchen, work, frame_skip=25)  # 20 real fragments
    scale_folder(source, work / "pairs", SCENES, pairs_per_scene=2)
    return work / "pairs"


def payloads_open() -> int:
    """Descriptors of this process open on a fragment store's ``fragments.bin``."""
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += os.readlink(f"/proc/self/fd/{fd}").endswith("/fragments.bin")
        except OSError:  # the listing's own descriptor, gone
            pass
    return found


# ----------------------------------------------------------------------------------- pair list

PLAIN = "s1/000000 s1/000025 0.9\ns1/25 s1/50 0.5\ns0/7 s0/8 1\nab/c/s2/3 ab/c/s2/4 0.31\n"
ODD = [  # valid for the line parser, each outside the plain form (the array parser declines)
    "s1/0 s1/5 0.9\r\ns0/1 s0/2 0.4\n", "s1/0\ts1/5  0.9\n", "scène/0 scène/5 0.9\n",
    "s1/+5 s1/6 0.3", "s1/-5 s1/6 0.3\n", "/5 /6 0.3\n", "s/1234567890 s/1 0.3\n",
]
BAD = [  # (text, the line the error names)
    ("s1/0 s1/5 0.9\n\ns1/1 s1/2 0.4\n", 2), ("s1/0 s2/5 0.9\n", 1), ("s1/0 s1/5\n", 1),
    ("s1/0 s1/5 0.9 x\n", 1), ("s1/0 s1/x 0.9\n", 1), ("s1 s1/5 0.9\n", 1),
    ("s1/0 s1/5 0.9\ns1/0 s1/9999999999 0.9\n", 2),
]


def old_parse(text: str) -> list[tuple[str, int, int]]:
    """The pair list as PairDataset read it before #25 (a list of tuples), for comparison."""
    out = []
    for line in text.splitlines():
        (sa, fa), (sb, fb) = (p.rsplit("/", 1) for p in line.split()[:2])
        out.append((sa, int(fa), int(fb)))
    return out


@pytest.mark.parametrize("chunk", [1 << 22, 16])  # one chunk; lines across many tiny chunks
def test_pair_list_parses_as_the_line_parser(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(pair_list, "CHUNK", chunk)
    path = tmp_path / "pairs.txt"
    for text in [PLAIN, PLAIN.rstrip("\n"), *ODD]:
        path.write_bytes(text.encode())
        got = PairList.read(path)
        assert [got[i] for i in range(len(got))] == old_parse(text), text
        assert got.scene.dtype == np.int32 and got.frames.dtype == np.int32
        assert list(got.scenes) == sorted(set(got.scenes))
    assert PairList._parse_plain(PLAIN.encode()) is not None  # the array path took it
    for text in ODD:
        assert PairList._parse_plain(text.encode()) is None, text
    for text, line in BAD:
        path.write_bytes(text.encode())
        with pytest.raises(ValueError, match=rf"pairs.txt:{line}: "):
            PairList.read(path)
    path.write_text("")
    with pytest.raises(ValueError, match="lists no pairs"):
        PairList.read(path)


def test_pair_list_of_a_scannet_size_file_is_compact(tmp_path):
    """850K pairs over 1,513 scenes cost 12 bytes a pair (the 100 MB target with room), and
    the first pair of each scene is found without a Python loop."""
    names = [f"scene{k:04d}_00" for k in range(1513)]
    per = 562
    frames = np.arange(per, dtype=np.int64) * 5
    block = "".join(f"{{0}}/{a:06d} {{0}}/{a + 5:06d} 0.5\n" for a in frames)
    path = tmp_path / "pairs.txt"
    path.write_text("".join(block.format(n) for n in names))
    pairs = PairList.read(path)
    assert len(pairs) == 1513 * per and pairs.scenes == tuple(names)
    assert pairs[per * 700 + 3] == ("scene0700_00", 15, 20)
    assert pairs.nbytes < 12 * len(pairs) + 200_000 < 100e6
    np.testing.assert_array_equal(pairs.first_of_each_scene(), np.arange(1513) * per)


# --------------------------------------------------------------------------- fragment stores

def test_open_stores_are_bounded_and_a_forked_worker_drops_what_it_inherited(scale_root):
    cache = StoreCache(scale_root, 3)
    assert payloads_open() == 0
    scenes = [f"scene{k:04d}_00" for k in range(12)]
    for s in scenes:
        cache.get(s).get(0, color=False)  # a read opens the store's descriptor
    assert len(cache) == 3 and payloads_open() == 3  # the 9 least recently used were closed

    def in_worker(queue):
        before = payloads_open()
        cache.get(scenes[0]).get(0, color=False)  # first use in this process
        queue.put((before, payloads_open(), len(cache)))

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=in_worker, args=(queue,))
    proc.start()
    before, after, held = queue.get(timeout=60)
    proc.join(60)
    assert (before, after, held) == (3, 1, 1)  # its 3 inherited copies closed, 1 opened
    assert payloads_open() == 3  # the parent's stay open
    cache.clear()
    assert payloads_open() == 0 and len(cache) == 0
    with pytest.raises(ValueError, match="capacity must be an integer >= 1, got 0"):
        StoreCache(scale_root, 0)


def test_dataset_pickles_without_its_open_stores(scale_root):
    ds = PairDataset(scale_root, voxel_size=0.1, features="ones", min_matches=1,
                     verify_matches=0)
    a = ds[(0, 5)]
    copy = pickle.loads(pickle.dumps(ds))  # what a spawned loader worker gets
    assert len(copy._stores) == 0 and len(ds._stores) == 1
    b = copy[(0, 5)]
    assert torch.equal(a.views[1].coords, b.views[1].coords) and torch.equal(a.matches, b.matches)


# ----------------------------------------------------------------------- one epoch, long epochs

def run_pass(root: Path, mode: str, batch: int, every: int) -> dict:
    cmd = [sys.executable, str(REPO / "benchmarks" / "_scale.py"), str(root), str(WORKERS),
           str(NOFILE), mode, str(batch), str(every), "0.1"]
    # allocations from 128 KB up are mapped and unmapped (glibc otherwise raises that
    # threshold as it goes and keeps freed arrays in its heap): resident memory is what is held
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1",
                              "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert res.returncode == 0, f"{mode} pass failed:\n{res.stderr[-3000:]}"
    return json.loads(res.stdout.splitlines()[-1])


def floor(samples: list[dict], proc: str, key: str, part: slice) -> float:
    """The least ``key`` of ``proc`` over ``part`` of the pass: what a leak raises, while a
    batch in flight (its tensors' descriptors and buffers) comes and goes."""
    return min(s[proc][key] for s in samples[part])


@pytest.mark.slow
def test_one_epoch_over_every_scene_keeps_files_and_memory_flat(scale_root):
    out = run_pass(scale_root, "epoch", batch=4, every=5)
    assert out["pairs"] == 2 * SCENES
    assert len(out["scenes_seen"]) == SCENES and out["skipped"] == 0  # every scene touched
    samples = out["samples"]
    n = len(samples)
    second, last = slice(n // 4, n // 2), slice(3 * n // 4, n)
    procs = [p for p in samples[-1] if p == "main" or p.startswith("worker")]
    assert len(procs) == 1 + WORKERS, procs
    for proc in procs:
        curve = [(s[proc]["fds"], round(s[proc]["rss_mb"])) for s in samples]
        # one descriptor kept per scene touched would have ended the pass (EMFILE) or shown
        assert floor(samples, proc, "fds", last) <= floor(samples, proc, "fds", second) + 1, \
            (proc, curve)
        assert max(s[proc]["fds"] for s in samples) < NOFILE // 2, (proc, curve)
        # resident memory (a forked worker's shared pages count once, copied or not): a worker
        # reads ~75 scenes it had not read between the two quarters. The floors' noise was
        # +-3 MB quiet and up to 7.5 MB in a loaded CI run (2026-12-07); 12 MB still fails a
        # leak of 160 KB a scene (240 MB over ScanNet's 1,513). The full-size benchmark
        # (docs/scale.md) judges the same curve over 1,200 scenes a worker: 1.00x
        grew = floor(samples, proc, "rss_mb", last) - floor(samples, proc, "rss_mb", second)
        assert grew < 12.0, (proc, curve)


def test_a_long_epoch_resumes_at_its_exact_position():
    """85K pairs (a tenth of ScanNet's), two ranks: the keys after k batches, restored from
    the one number a checkpoint keeps (samples consumed), are those of the run that went on,
    within the epoch and across its end."""
    n, batch = 85_031, 8
    for rank in range(2):
        whole = iter(ResumableSampler(n, seed=7, rank=rank, world_size=2))
        keys = [next(whole) for _ in range(n // 2 + 5000)]  # into the second epoch
        assert keys[n // 2 - 1][0] == 0 and keys[n // 2][0] == 1
        assert sorted(i for _, i in keys[:n // 2]) != list(range(n // 2))  # shuffled
        for k in (1, 3000, (n // 2) // batch, (n // 2) // batch + 17):
            resumed = iter(ResumableSampler(n, seed=7, rank=rank, world_size=2, start=k * batch))
            assert [next(resumed) for _ in range(len(keys) - k * batch)] == keys[k * batch:], k


@pytest.mark.slow
def test_the_loader_resumed_after_k_batches_gives_the_same_batches(scale_root):
    ds = PairDataset(scale_root, voxel_size=0.1, features="ones", min_matches=1, seed=2)
    batch, k, more = 4, 3, 2

    def batches(start: int, count: int) -> list:
        it = iter(build_loader(ds, batch, WORKERS, 2, 0, 1, start, collate_pairs))
        return [next(it) for _ in range(count)]

    whole = batches(0, k + more)
    resumed = batches(k * batch, more)
    for a, b in zip(whole[k:], resumed):
        assert a.names == b.names
        assert torch.equal(a.views[0].coords, b.views[0].coords)
        assert torch.equal(a.matches, b.matches)
