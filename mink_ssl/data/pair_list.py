"""A pair list (``pairs.txt``) held as compact int32 arrays, not as Python objects.

ScanNet's pair lists hold about 850K pairs. As a list of ``(scene, frame, frame)`` tuples that is
~150 MB of small Python objects per process, and forked loader workers do not keep sharing
it: every access writes a reference count, and each touched page is copied into the worker.
:class:`PairList` keeps one int32 scene index and two int32 frame indices per pair (12 bytes)
and a tuple of the distinct scene names: a handful of large objects that workers share
copy-on-write as they are.

:meth:`PairList.read` parses the file with array operations when every line has the plain form
prep writes (``<scene>/<digits> <scene>/<digits> <overlap>``, ASCII, single spaces); any other
file goes through the line-by-line parser, which accepts what it always accepted (frame indices
must now fit int32) and names the first bad line. Both give the same pairs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

_NEWLINE, _SPACE, _SLASH, _ZERO = 10, 32, 47, 48
_MAX_DIGITS = 9  # a frame index of up to 9 digits fits int32; longer ones take the slow path
_INT32_MAX = 2**31 - 1


class PairList:
    """Pairs of frames of one scene: ``pairs[i]`` is ``(scene, frame_a, frame_b)``.

    scenes: tuple of the distinct scene names, sorted
    scene:  (P,) int32 index into ``scenes`` of each pair
    frames: (P, 2) int32 frame indices of each pair
    """

    def __init__(self, scenes, scene: np.ndarray, frames: np.ndarray):
        self.scenes = tuple(scenes)
        self.scene = np.ascontiguousarray(scene, np.int32)
        self.frames = np.ascontiguousarray(frames, np.int32).reshape(-1, 2)
        if len(self.scene) != len(self.frames):
            raise ValueError(f"{len(self.scene)} scene indices for {len(self.frames)} pairs")

    def __len__(self) -> int:
        return len(self.scene)

    def __getitem__(self, i) -> tuple[str, int, int]:
        i = int(i)
        fa, fb = self.frames[i]
        return self.scenes[self.scene[i]], int(fa), int(fb)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays and the scene names (what the list costs in memory)."""
        return (self.scene.nbytes + self.frames.nbytes + sys.getsizeof(self.scenes)
                + sum(sys.getsizeof(s) for s in self.scenes))

    def first_of_each_scene(self) -> np.ndarray:
        """(S,) int64: the index of the first pair of each scene, in ``scenes`` order."""
        _, first = np.unique(self.scene, return_index=True)
        return first.astype(np.int64)

    @classmethod
    def read(cls, path: str | Path) -> "PairList":
        """The pairs of ``path`` (``scene/frame scene/frame overlap`` lines); ``ValueError``
        naming the first malformed line, or an empty list."""
        path = Path(path)
        data = path.read_bytes()
        pairs = cls._parse_plain(data)
        if pairs is None:
            pairs = cls._parse_lines(path, data.decode())
        if not len(pairs):
            raise ValueError(f"{path} lists no pairs: lower --min-overlap or add scenes")
        return pairs

    @classmethod
    def _parse_lines(cls, path: Path, text: str) -> "PairList":
        """Line by line: any file the array parser does not take, with its error message."""
        ids: dict[str, int] = {}
        scene, frames = [], []
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            try:
                (sa, fa), (sb, fb) = (p.rsplit("/", 1) for p in parts[:2])
                if sa != sb or len(parts) != 3:
                    raise ValueError
                pair = int(fa), int(fb)
                if not all(-_INT32_MAX - 1 <= f <= _INT32_MAX for f in pair):
                    raise OverflowError
            except ValueError:
                raise ValueError(f"{path}:{n}: expected 'scene/frame scene/frame overlap' with "
                                 f"one scene, got {line!r}") from None
            except OverflowError:
                raise ValueError(f"{path}:{n}: frame index out of the int32 range in "
                                 f"{line!r}") from None
            scene.append(ids.setdefault(sa, len(ids)))
            frames.append(pair)
        names = sorted(ids)
        rank = {s: k for k, s in enumerate(names)}
        order = np.array([rank[s] for s in ids], np.int32)  # first-seen id -> sorted id
        return cls(names, order[np.array(scene, np.int64)] if scene else np.zeros(0, np.int32),
                   np.array(frames, np.int64).reshape(-1, 2))

    @classmethod
    def _parse_plain(cls, data: bytes) -> "PairList | None":
        """Array parse of the plain form prep writes, chunk by chunk (the temporaries stay a few
        times :data:`CHUNK` bytes); None for anything else."""
        runs, lengths, frames, pos = [], [], [], 0
        while pos < len(data):
            newline = -1 if pos + CHUNK >= len(data) else data.rfind(b"\n", pos, pos + CHUNK)
            if newline < 0 and pos + CHUNK < len(data):  # a line longer than a chunk
                newline = data.find(b"\n", pos + CHUNK)
            stop = len(data) if newline < 0 else newline + 1
            chunk = _parse_chunk(data, pos, stop)
            if chunk is None:
                return None
            runs += chunk[0]
            lengths.append(chunk[1])
            frames.append(chunk[2])
            pos = stop
        names = sorted(set(runs))
        index = {n: k for k, n in enumerate(names)}
        run_ids = np.array([index[n] for n in runs], np.int32)
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        return cls(names, np.repeat(run_ids, lengths),
                   np.concatenate(frames) if frames else np.zeros((0, 2), np.int32))


CHUNK = 1 << 22  # bytes of pairs.txt parsed at a time (~80K lines)


def _parse_chunk(data: bytes, pos: int, stop: int):
    """Lines ``data[pos:stop]`` (whole lines) in the plain form: (scene name of each run of
    consecutive lines of one scene, (R,) lines per run, (P, 2) int32 frames), or None."""
    buf = np.frombuffer(data, np.uint8, stop - pos, pos)
    if ((buf < _SPACE) & (buf != _NEWLINE)).any() or (buf >= 127).any():
        return None  # tabs, CR, non-ASCII: the line parser
    end = np.flatnonzero(buf == _NEWLINE)  # (P,) each line's newline
    if buf[-1] != _NEWLINE:
        end = np.append(end, len(buf))  # the file's last line, without its newline
    start = np.concatenate([[0], end[:-1] + 1])  # (P,) int64
    spaces = np.flatnonzero(buf == _SPACE)
    if len(spaces) != 2 * len(end) or (np.searchsorted(end, spaces[0::2]) != np.arange(
            len(end))).any() or (np.searchsorted(end, spaces[1::2]) != np.arange(len(end))).any():
        return None  # not two spaces on every line
    s1, s2 = spaces[0::2], spaces[1::2]  # the two separators of each line
    if ((s1 <= start) | (s2 <= s1 + 1) | (end <= s2 + 1)).any():  # an empty token
        return None
    slashes = np.flatnonzero(buf == _SLASH)
    k1, k2 = np.searchsorted(slashes, s1) - 1, np.searchsorted(slashes, s2) - 1
    if (k1 < 0).any() or (k2 < 0).any():
        return None
    slash1, slash2 = slashes[k1], slashes[k2]  # the last '/' of each of the two tokens
    if ((slash1 <= start) | (slash2 <= s1 + 1)).any():  # no '/', or an empty scene name
        return None
    fa, fb = _digits(buf, slash1 + 1, s1), _digits(buf, slash2 + 1, s2)
    if fa is None or fb is None:
        return None
    runs = _scene_runs(buf, start, slash1, s1 + 1, slash2)
    if runs is None:
        return None
    names = [data[pos + a:pos + b].decode() for a, b in zip(start[runs].tolist(),
                                                             slash1[runs].tolist())]
    lengths = np.diff(np.append(runs, len(end)))  # (R,) lines per run
    return names, lengths, np.stack([fa, fb], 1).astype(np.int32)


def _digits(buf: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """(P,) int64 value of each field ``buf[a:b]`` of 1 to 9 ASCII digits; None otherwise."""
    length = b - a
    if (length < 1).any() or (length > _MAX_DIGITS).any():
        return None
    value = np.zeros(len(a), np.int64)
    for k in range(int(length.max())):
        inside = k < length
        digit = buf[np.where(inside, a + k, 0)].astype(np.int64) - _ZERO
        if ((digit < 0) | (digit > 9))[inside].any():
            return None
        value = np.where(inside, value * 10 + digit, value)
    return value


def _scene_runs(buf: np.ndarray, a0: np.ndarray, b0: np.ndarray, a1: np.ndarray,
                b1: np.ndarray) -> np.ndarray | None:
    """(R,) the first line of each run of lines whose field ``[a0, b0)`` (the scene) is the
    same (prep writes pairs.txt scene by scene); None when a line's two fields differ."""
    length = b0 - a0
    if (length != b1 - a1).any():
        return None
    new_run = np.ones(len(a0), bool)
    new_run[1:] = length[1:] != length[:-1]
    for k in range(int(length.max())):
        inside = k < length
        c0 = buf[np.where(inside, a0 + k, 0)]
        if (c0 != buf[np.where(inside, a1 + k, 0)])[inside].any():
            return None
        new_run[1:] |= inside[1:] & (c0[1:] != c0[:-1])
    return np.flatnonzero(new_run)
