"""S3DIS segmentation prep: ``Stanford3dDataset_v1.2_Aligned_Version`` rooms -> scene files.

Input layout (the original release)::

    <raw>/Area_<n>/<room>/<room>.txt                 the room's points, "x y z r g b" per line
    <raw>/Area_<n>/<room>/Annotations/<class>_<k>.txt  the points of one object, same format

Each room becomes one scene ``Area_<n>/<room>`` whose points are the concatenation of its
annotation files in file-name order, labelled by the class in the file name. This is the
protocol of the Minkowski / PointContrast S3DIS experiments (Choy et al. 2019, followed by Xie
et al. 2020): 13 classes, ``stairs`` removed from evaluation (``--stairs ignore``, label -1, as
SegCloud and MinkowskiNet do; ``--stairs clutter`` maps it to clutter as PointNet's
``indoor3d_util`` does), Area 5 as the test area and the other areas for training (no
separate validation split: the original recipes validate on Area 5). Unlike the Minkowski
converter, points are not deduplicated at 1 cm here: training voxelises.

The room file itself is located (``Area_6/copyRoom_1`` ships it as ``copy_Room_1.txt``; the
misnaming is reported as a repair) and, with ``check_room_file``, parsed and compared with the
annotations as a multiset of rows; a disagreement is reported, the annotations are used.

Parsing is vectorised: a file is read as bytes, bytes that cannot occur in "x y z r g b" text
(control bytes other than tab / CR / LF, and non-ASCII) are found with one numpy comparison, and
the whole buffer is then parsed by ``np.loadtxt``. The release has a few such stray bytes, each
in place of one character: ``185\\x10187`` at line 180389 of ``Area_5/hallway_6/Annotations/
ceiling_1.txt`` (a space: the fixed file reads ``185 187``), ``167.\\x1000000`` at line 741101
of ``Area_2/auditorium_1/auditorium_1.txt`` and ``-9.1\\x160`` at line 926337 of
``Area_3/hallway_2/hallway_2.txt`` (digits that lost bit 5: 0x30 '0' -> 0x10, 0x36 '6' -> 0x16).
Only the lines holding one are looked at one by one, trying in turn: a byte 0x10-0x19 as the
digit it was (bit 5 set again), the bytes as field separators, the bytes removed; the first
reading that gives 6 numbers is kept, else the line is dropped. Each such line is reported
with its 1-based line number and what was done; the buffer is then fixed by one vectorised
byte filter.
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from data_prep.ply import colors_uint8
from data_prep.reading import read_bytes, reading
from data_prep.runner import as_json
from data_prep.scene_store import SceneJob
from data_prep.segmentation.writer import IGNORE_LABEL, SceneData, repair, run_prep
from mink_ssl.errors import BadInput

CLASSES = ("ceiling", "floor", "wall", "beam", "column", "window", "door", "table", "chair",
           "sofa", "bookcase", "board", "clutter")
STAIRS = "stairs"  # the 14th class of the release, not one of the benchmark's 13
VOXEL_SIZE = 0.05
MAX_REPAIRED_LINES = 1000  # more lines with stray bytes than this: a damaged file, not a typo
_AREA = re.compile(r"^Area_(\d+)$")


@dataclass(frozen=True)
class S3DISParams:
    test_area: int = 5  # the held-out area (the "Area 5 test" / fold 1 benchmark)
    stairs: str = "ignore"  # "ignore" (label -1, Minkowski / SegCloud) or "clutter" (PointNet)
    check_room_file: bool = True  # parse <room>.txt and compare it with the annotations

    def __post_init__(self):
        if self.stairs not in ("ignore", "clutter"):
            raise ValueError(f"stairs must be 'ignore' or 'clutter', got {self.stairs!r}")
        if not isinstance(self.test_area, int) or self.test_area < 1:
            raise ValueError(f"test_area must be an area number >= 1, got {self.test_area!r}")


# -- parsing ----------------------------------------------------------------------------------
_STRAY = np.ones(256, dtype=bool)  # bytes that cannot be part of "x y z r g b" text
_STRAY[32:127] = False
_STRAY[[9, 10, 13]] = False


def _stray_bytes(buf: np.ndarray) -> np.ndarray:
    """Positions of control (except tab, LF, CR) and non-ASCII bytes in ``buf`` (uint8)."""
    return np.flatnonzero(_STRAY[buf])


def _six_numbers(text: bytes) -> bool:
    tok = text.split()
    if len(tok) != 6:
        return False
    try:
        [float(t) for t in tok]
    except ValueError:
        return False
    return True


def _show(seg: bytes) -> str:
    return ascii(seg.decode("latin-1"))


def _repair(buf: np.ndarray, stray: np.ndarray, where: str
            ) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Fix the lines that hold stray bytes; returns the repaired buffer and (line, what)."""
    nl = np.flatnonzero(buf == 10)
    line_of = np.searchsorted(nl, stray)  # (S,) 0-based line of each stray byte
    lines, first = np.unique(line_of, return_index=True)
    if len(lines) > MAX_REPAIRED_LINES:
        raise BadInput(f"{where}: {len(lines)} lines hold bytes that are not text (first at "
                       f"line {lines[0] + 1}); the file is damaged or binary, not a stray "
                       "byte: restore it from the release")
    starts = np.where(lines > 0, nl[np.maximum(lines - 1, 0)] + 1, 0)
    ends = np.where(lines < len(nl), nl[np.minimum(lines, len(nl) - 1)], len(buf))
    fixed = buf.copy()
    keep = np.ones(len(buf), dtype=bool)
    repairs = []
    for line, s, e, pos in zip(lines, starts, ends, np.split(stray, first[1:])):
        seg = buf[s:e]  # one damaged line (a handful per dataset), not a per-point loop
        bad = np.zeros(len(seg), dtype=bool)
        bad[pos - s] = True
        hexes = " ".join(f"0x{b:02x}" for b in seg[bad])
        text = seg.tobytes()
        digit = bool(((seg[bad] >= 0x10) & (seg[bad] <= 0x19)).all())
        restored = np.where(bad, seg | 0x20, seg).astype(np.uint8).tobytes()
        spaced = np.where(bad, 32, seg).astype(np.uint8).tobytes()
        removed = seg[~bad].tobytes()
        if digit and _six_numbers(restored):
            fixed[pos] |= 0x20
            what = f"stray byte {hexes} read as the digit it was (bit 5 lost): " \
                   f"{_show(text)} -> {_show(restored)}"
        elif _six_numbers(spaced):
            fixed[pos] = 32
            what = f"stray byte {hexes} read as a field separator: {_show(text)} -> " \
                   f"{_show(spaced)}"
        elif _six_numbers(removed):
            keep[pos] = False
            what = f"stray byte {hexes} inside a number removed: {_show(text)} -> " \
                   f"{_show(removed)}"
        else:
            keep[s:e + 1] = False
            what = f"stray byte {hexes}, not 6 numbers as a digit, a separator or removed: " \
                   f"line dropped: {_show(text)}"
        repairs.append((int(line) + 1, what))
    return fixed[keep], repairs


def _diagnose(buf: np.ndarray) -> str | None:
    """The first line that is not 6 numbers (for the error message of a bad file)."""
    nl = np.flatnonzero(buf == 10)
    word = buf > 32
    start = word.copy()
    start[1:] &= ~word[:-1]
    per_line = np.bincount(np.searchsorted(nl, np.flatnonzero(start)), minlength=len(nl) + 1)
    allowed = np.zeros(256, dtype=bool)
    allowed[list(b"0123456789.+-eE \t\r\n")] = True
    odd = np.zeros(len(nl) + 1, dtype=bool)
    odd[np.searchsorted(nl, np.flatnonzero(~allowed[buf]))] = True
    bad = np.flatnonzero(((per_line != 0) & (per_line != 6)) | odd)
    if not len(bad):
        return None
    k = int(bad[0])
    s = nl[k - 1] + 1 if k > 0 else 0
    e = nl[k] if k < len(nl) else len(buf)
    return f"line {k + 1} is not 6 numbers x y z r g b: {_show(buf[s:e].tobytes()[:200])}"


def _utf16(data: bytes) -> str | None:
    """The codec of UTF-16 text (a byte-order mark, or a NUL byte in every other position of
    the first 4 KB, as an editor saving "Unicode" text writes), or None."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16"
    head = np.frombuffer(data[:4096], dtype=np.uint8)
    if len(head) >= 8 and len(head) % 2 == 0:
        for codec, zeros in (("utf-16-le", head[1::2]), ("utf-16-be", head[0::2])):
            if (zeros == 0).all() and (head[(0 if codec == "utf-16-le" else 1)::2] != 0).all():
                return codec
    return None


def parse_xyzrgb(data: bytes, where: str = "<bytes>"
                 ) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Parse S3DIS text ("x y z r g b" lines) into (N, 6) float64 rows.

    Returns the rows and the repairs [(1-based line, what)] of lines that held stray bytes.
    Raises :class:`BadInput` naming ``where`` and the first bad line if the text is not 6
    numbers per line even after the repairs.
    """
    repairs: list[tuple[int, str]] = []
    codec = _utf16(data)
    if codec is not None:  # the same text, saved as UTF-16: read it as such
        try:
            data = data.decode(codec).encode("ascii")
        except (UnicodeDecodeError, UnicodeEncodeError) as e:
            raise BadInput(f"{where} is {codec.upper()} text holding characters that are not "
                           f"x y z r g b numbers ({e.reason} at byte {e.start}); convert it to "
                           "ASCII (iconv -f UTF-16 -t ASCII) or restore it from the "
                           "release") from None
        repairs.append((1, f"the file is {codec.upper()} text: read as the same ASCII text"))
    buf = np.frombuffer(data, dtype=np.uint8)
    stray = _stray_bytes(buf)
    if stray.size:
        buf, repairs = _repair(buf, stray, where)
        data = buf.tobytes()
    if not (buf > 32).any():
        return np.zeros((0, 6)), repairs
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data"
            rows = np.loadtxt(io.BytesIO(data), dtype=np.float64, comments=None, ndmin=2)
    except ValueError as e:
        raise BadInput(f"{where}: {_diagnose(buf) or e}") from None
    if rows.shape[1] != 6:
        raise BadInput(f"{where}: lines hold {rows.shape[1]} numbers, expected 6 (x y z r g b)")
    bad = ~np.isfinite(rows).all(1)
    if bad.any():  # "nan" / "inf" parse as numbers: drop those points, naming each line
        nl = np.flatnonzero(buf == 10)
        word = buf > 32
        first = np.flatnonzero(word & ~np.r_[False, word[:-1]])  # first byte of each number
        lines = np.unique(np.searchsorted(nl, first))  # 0-based lines holding numbers
        for k in np.flatnonzero(bad):
            repairs.append((int(lines[k]) + 1, f"non-finite value(s) {rows[k].tolist()}: "
                                               "point dropped"))
        rows = rows[~bad]
    return rows, repairs


def read_xyzrgb(path: Path, raw: Path, scene: str) -> tuple[np.ndarray, list[dict]]:
    """(N, 6) float64 rows of an S3DIS text file and its repairs as manifest entries."""
    rel = path.relative_to(raw).as_posix()
    rows, fixes = parse_xyzrgb(read_bytes(path), rel)
    return rows, [repair(scene, rel, line, what) for line, what in fixes]


def _fingerprint(rows: np.ndarray) -> tuple[int, int, int]:
    """An order-independent fingerprint of a multiset of rows (count and two hash sums)."""
    bits = np.ascontiguousarray(rows, dtype=np.float64).view(np.uint64)  # (N, 6)
    h = np.zeros(len(bits), dtype=np.uint64)
    for j in range(bits.shape[1]):  # 6 columns; uint64 arithmetic wraps
        h = (h ^ bits[:, j]) * np.uint64(0x9E3779B97F4A7C15 - 2 * j)
        h ^= h >> np.uint64(29)
    return len(rows), int(h.sum(dtype=np.uint64)), int((h * (h | np.uint64(1))).sum(
        dtype=np.uint64))


# -- rooms ------------------------------------------------------------------------------------
def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_rooms(raw: Path) -> list[tuple[str, Path, int]]:
    """(scene name ``Area_<n>/<room>``, folder, area number) of every room folder."""
    raw = Path(raw)
    if not raw.is_dir():
        raise FileNotFoundError(f"--raw {raw} is not a directory; pass the "
                                "Stanford3dDataset_v1.2_Aligned_Version folder (it holds Area_1 "
                                "... Area_6)")
    areas = sorted((p for p in raw.iterdir() if p.is_dir() and _AREA.match(p.name)),
                   key=lambda p: int(_AREA.match(p.name)[1]))
    if not areas:
        raise FileNotFoundError(f"no Area_<n> folders in {raw}; pass the "
                                "Stanford3dDataset_v1.2_Aligned_Version folder")
    return [(f"{a.name}/{r.name}", r, int(_AREA.match(a.name)[1])) for a in areas
            for r in sorted(a.iterdir(), key=lambda p: _natural(p.name))
            if r.is_dir() and not r.name.startswith(".")]


def find_room_file(room_dir: Path) -> tuple[Path | None, str | None]:
    """The room's own point file and, if it is not ``<room>.txt``, what was found instead."""
    expected = room_dir / f"{room_dir.name}.txt"
    if expected.is_file():
        return expected, None
    txt = sorted(p for p in room_dir.glob("*.txt") if p.is_file())
    norm = room_dir.name.lower().replace("_", "")
    alike = [p for p in txt if p.stem.lower().replace("_", "") == norm]
    found = alike if len(alike) == 1 else txt if len(txt) == 1 else []
    if found:
        return found[0], f"room file is named {found[0].name}, expected {expected.name}: used it"
    return None, f"no room file {expected.name}" + (f" (.txt files: {[p.name for p in txt]})"
                                                    if txt else "")


def class_label(name: str, stairs: str) -> int | None:
    """Benchmark label of an annotation class name; None if the name is unknown."""
    if name in CLASSES:
        return CLASSES.index(name)
    if name == STAIRS:
        return IGNORE_LABEL if stairs == "ignore" else CLASSES.index("clutter")
    return None


def prepare_room(room_dir: Path, raw: Path, scene: str, params: S3DISParams) -> SceneData:
    """One room as a scene: the annotation files in name order, labelled by class."""
    ann = room_dir / "Annotations"
    if not ann.is_dir():
        raise BadInput(f"{room_dir.relative_to(raw).as_posix()} has no Annotations/ folder")
    with reading(ann):
        files = sorted(p for p in ann.iterdir() if p.suffix == ".txt" and p.is_file())
    if not files:
        raise BadInput(f"{ann.relative_to(raw).as_posix()} holds no .txt files")
    rows, labels, repairs = [], [], []
    for f in files:  # one per object (tens per room)
        r, fixes = read_xyzrgb(f, raw, scene)
        cls = f.stem.rsplit("_", 1)[0] if re.search(r"_\d+$", f.stem) else f.stem
        label = class_label(cls, params.stairs)
        if label is None:
            label = IGNORE_LABEL
            fixes.append(repair(scene, f.relative_to(raw).as_posix(), 0,
                                f"unknown class {cls!r}: its {len(r)} points are labelled "
                                f"ignore (-1); S3DIS classes are {list(CLASSES) + [STAIRS]}"))
        rows.append(r)
        labels.append(np.full(len(r), label, dtype=np.int16))
        repairs += fixes
    rows = np.concatenate(rows)
    if not len(rows):
        raise BadInput(f"the annotation files of {scene} hold no points")
    room_file, note = find_room_file(room_dir)
    if note:
        rel = (room_file or room_dir / f"{room_dir.name}.txt").relative_to(raw).as_posix()
        repairs.append(repair(scene, rel, 0, note + ("" if room_file else
                                                     ": the annotations alone are used")))
    if params.check_room_file and room_file is not None:
        rel = room_file.relative_to(raw).as_posix()
        try:  # only a check: an unreadable room file does not cost the room
            room_rows, fixes = read_xyzrgb(room_file, raw, scene)
        except BadInput as e:
            repairs.append(repair(scene, rel, 0, f"room file not checked: {e}; the "
                                  "annotations are used"))
        else:
            repairs += fixes
            a, b = _fingerprint(room_rows), _fingerprint(rows)
            if a != b:
                repairs.append(repair(scene, rel, 0, f"room file ({a[0]} points) and "
                                      f"Annotations/ ({b[0]} points) hold different points: "
                                      "the annotations are used"))
    colors = colors_uint8(rows[:, 3:], f"{scene} annotations")
    return SceneData(coords=rows[:, :3].astype(np.float32), colors=colors,
                     labels=np.concatenate(labels), repairs=repairs)


def run(raw: Path, out: Path, params: S3DISParams = S3DISParams(), workers: int = 1,
        rooms: Sequence[str] | None = None, progress: bool = True,
        log: Callable[[str], None] = print) -> dict:
    """Prepare every room of ``raw`` into ``out``; returns the manifest (also written)."""
    raw = Path(raw)
    found = list_rooms(raw)
    if rooms:
        names = {n for n, _, _ in found}
        missing = [r for r in rooms if r not in names]
        if missing:
            raise FileNotFoundError(f"rooms {missing} not found in {raw} (it has {len(found)} "
                                    "rooms, named like Area_1/office_1)")
        found = [f for f in found if f[0] in set(rooms)]
    if not found:
        raise FileNotFoundError(f"no room folders in the Area_<n> folders of {raw}")
    areas = sorted({a for _, _, a in found})
    if params.test_area not in areas:
        log(f"s3dis: warning: test area {params.test_area} is not among the areas found "
            f"{areas}: the test split is empty")
    jobs = [SceneJob(name, "test" if area == params.test_area else "train", prepare_room,
                     (path, raw, name, params)) for name, path, area in found]
    return run_prep(out, benchmark="s3dis", classes=CLASSES, voxel_size=VOXEL_SIZE, jobs=jobs,
                    params={**asdict(params), "up_axis": "z"},
                    inputs={"raw": as_json(raw.resolve())}, workers=workers,
                    progress=progress, log=log)
