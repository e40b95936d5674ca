"""The fragment store: the compact on-disk form of a scene's RGB-D fragments.

A *fragment* is the point cloud of one sampled RGB-D frame in world coordinates. Instead of
float64 point arrays (6-17 MB per frame in the original pipeline) we keep what the point cloud
is computed from, losslessly: the depth image (zlib-compressed uint16, as in ``.sens`` files),
the colour image resized to the depth resolution (JPEG), the camera-to-world pose, the depth
intrinsics and the depth shift. Back-projection at load time costs a few milliseconds and keeps
every measured point, so 100% of the occupied voxels at any resolution are preserved, and the
pose and intrinsics are there for objectives that render or reproject.

A scene directory holds two files::

    fragments.bin   the payloads, concatenated (depth zlib, colour JPEG, fragment after fragment)
    fragments.npz   the index: frames (F,) int64 frame index in the sequence, poses (F, 4, 4)
                    float32 camera-to-world, intrinsics (4, 4) float32 depth camera,
                    depth_shift () float64 units per metre, image_size (2,) int64 (H, W),
                    depth_offsets / color_offsets (F, 2) int64 (byte offset, length) into .bin,
                    schema () str

Fragment names are ``<scene>/<frame index, 6 digits>``, e.g. ``scene0000_00/000025``.
"""
from __future__ import annotations

import io
import os
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mink_ssl.geometry import backproject

SCHEMA = "mink_ssl.fragments/1"
INDEX_FILE, PAYLOAD_FILE = "fragments.npz", "fragments.bin"


def fragment_name(scene: str, frame: int) -> str:
    return f"{scene}/{frame:06d}"


def encode_depth(depth: np.ndarray, level: int = 6) -> bytes:
    """(H, W) uint16 -> zlib of little-endian uint16 (ScanNet's ``zlib_ushort``)."""
    if depth.dtype != np.uint16 or depth.ndim != 2:
        raise ValueError(f"depth must be a (H, W) uint16 image, got {depth.dtype} {depth.shape}")
    return zlib.compress(depth.astype("<u2").tobytes(), level)


def encode_color(color: np.ndarray, size_hw: tuple[int, int], quality: int = 90) -> bytes:
    """(h, w, 3) uint8 RGB -> JPEG at ``size_hw`` (resized bilinearly when it differs)."""
    from PIL import Image

    if color.dtype != np.uint8 or color.ndim != 3 or color.shape[2] != 3:
        raise ValueError(f"color must be (H, W, 3) uint8, got {color.dtype} {color.shape}")
    img = Image.fromarray(color)
    if color.shape[:2] != tuple(size_hw):
        img = img.resize((size_hw[1], size_hw[0]), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class Fragment:
    """One decoded fragment. Images are at the depth camera's resolution."""

    name: str
    frame: int
    pose: np.ndarray  # (4, 4) float32 camera-to-world
    intrinsics: np.ndarray  # (4, 4) float32 depth camera
    depth_shift: float  # depth units per metre
    depth: np.ndarray  # (H, W) uint16, 0 = missing
    color: np.ndarray | None  # (H, W, 3) uint8 RGB; None when read with color=False

    def points(self, max_depth: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """World points (N, 3) float32 and their colours (N, 3) uint8 (None without colour),
        one per valid pixel."""
        pts, pixel = backproject(self.depth, self.intrinsics, self.depth_shift, self.pose,
                                 max_depth=max_depth)
        return pts, None if self.color is None else self.color.reshape(-1, 3)[pixel]


class FragmentWriter:
    """Appends fragments of one scene to ``<dir>/fragments.bin``; ``close()`` writes the index.

    The caller makes the scene directory atomic (data prep writes into a temporary directory
    and renames it when the scene is complete).
    """

    def __init__(self, directory: Path, intrinsics: np.ndarray, depth_shift: float,
                 image_size: tuple[int, int]):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.intrinsics = np.asarray(intrinsics, np.float32).reshape(4, 4)
        self.depth_shift, self.image_size = float(depth_shift), tuple(image_size)
        self._bin = open(self.dir / PAYLOAD_FILE, "wb")
        self._frames, self._poses, self._depth, self._color = [], [], [], []

    def add(self, frame: int, pose: np.ndarray, depth_bytes: bytes, color_bytes: bytes) -> None:
        """Add a fragment from already-encoded payloads (see ``encode_depth``/``encode_color``)."""
        for payload, spans in ((depth_bytes, self._depth), (color_bytes, self._color)):
            spans.append((self._bin.tell(), len(payload)))
            self._bin.write(payload)
        self._frames.append(int(frame))
        self._poses.append(np.asarray(pose, np.float32).reshape(4, 4))

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def frames(self) -> list[int]:
        """Frame indices added so far, in order."""
        return list(self._frames)

    def close(self) -> None:
        self._bin.close()
        np.savez(self.dir / INDEX_FILE, schema=np.array(SCHEMA),
                 frames=np.array(self._frames, np.int64),
                 poses=np.array(self._poses, np.float32).reshape(-1, 4, 4),
                 intrinsics=self.intrinsics, depth_shift=np.float64(self.depth_shift),
                 image_size=np.array(self.image_size, np.int64),
                 depth_offsets=np.array(self._depth, np.int64).reshape(-1, 2),
                 color_offsets=np.array(self._color, np.int64).reshape(-1, 2))

    def __enter__(self) -> "FragmentWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self._bin.close()


class FragmentStore:
    """Read access to one scene's fragments: ``store[k]`` or ``store.by_frame(frame)``."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.scene = self.dir.name
        index = self.dir / INDEX_FILE
        if not index.is_file() or not (self.dir / PAYLOAD_FILE).is_file():
            raise FileNotFoundError(f"{self.dir} is not a fragment directory ({INDEX_FILE} and "
                                    f"{PAYLOAD_FILE} expected); run `mink-ssl-prep scannet` first")
        try:
            with np.load(index) as z:
                schema = str(z["schema"])
                if schema != SCHEMA:
                    raise ValueError(f"{index} has fragment schema {schema!r}; this version of "
                                     f"mink-ssl reads {SCHEMA!r}: rerun data prep")
                self.frames = z["frames"]
                self.poses = z["poses"]
                self.intrinsics = z["intrinsics"]
                self.depth_shift = float(z["depth_shift"])
                self.image_size = tuple(int(v) for v in z["image_size"])
                self._depth, self._color = z["depth_offsets"], z["color_offsets"]
        except ValueError as e:
            if "fragment schema" in str(e):
                raise
            raise self._damaged(index, e) from None
        except (zipfile.BadZipFile, KeyError, EOFError, OSError) as e:
            raise self._damaged(index, e) from None
        self._row = {int(f): k for k, f in enumerate(self.frames)}

    def __len__(self) -> int:
        return len(self.frames)

    def __getstate__(self) -> dict:  # a descriptor does not survive pickling
        return {k: v for k, v in vars(self).items() if k not in ("_fd", "_fd_pid")}

    def __del__(self) -> None:
        if getattr(self, "_fd_pid", None) == os.getpid():
            os.close(self._fd)

    def close(self) -> None:
        """Close the descriptor of ``fragments.bin`` that this process holds, its own or, in a
        forked process, the copy it inherited (the store reopens it when read again)."""
        fd = vars(self).pop("_fd", None)
        vars(self).pop("_fd_pid", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:  # already closed by this process
                pass

    def _damaged(self, path: Path, e: BaseException, what: str = "") -> ValueError:
        return ValueError(f"scene {self.scene}: {path} is damaged{what} ({type(e).__name__}: "
                          f"{str(e)[:160]}); prepare the scene again: delete {self.dir} and rerun "
                          "`mink-ssl-prep scannet` with the same --out (it redoes only missing "
                          "scenes)")

    def names(self) -> list[str]:
        return [fragment_name(self.scene, int(f)) for f in self.frames]

    def _read(self, span) -> bytes:
        offset, length = (int(v) for v in span)
        if getattr(self, "_fd_pid", None) != os.getpid():  # one descriptor per process
            self._fd, self._fd_pid = os.open(self.dir / PAYLOAD_FILE, os.O_RDONLY), os.getpid()
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise ValueError(f"{self.dir / PAYLOAD_FILE} is truncated at byte {offset + len(data)}"
                             f" (expected {length} bytes at {offset}); rerun data prep for "
                             f"{self.scene}")
        return data

    def __getitem__(self, k: int) -> Fragment:
        return self.get(k)

    def get(self, k: int, color: bool = True) -> Fragment:
        """Fragment ``k`` decoded (colour only if ``color``)."""
        from PIL import Image

        if not -len(self) <= k < len(self):
            raise IndexError(f"fragment {k} out of range: {self.scene} has {len(self)}")
        H, W = self.image_size
        frame = int(self.frames[k])
        payload = self.dir / PAYLOAD_FILE
        name = fragment_name(self.scene, frame)
        try:
            raw = zlib.decompress(self._read(self._depth[k]))
            depth = np.frombuffer(raw, "<u2").astype(np.uint16).reshape(H, W)
        except (zlib.error, ValueError) as e:
            if "is truncated at byte" in str(e):  # _read's own message names file and scene
                raise
            raise self._damaged(payload, e, f": the depth of fragment {name} does not decode "
                                f"to {H}x{W} uint16") from None
        if color:
            try:
                color = np.array(Image.open(io.BytesIO(self._read(self._color[k]))).convert("RGB"))
            except (OSError, ValueError, SyntaxError) as e:  # PIL's decoding errors
                if "is truncated at byte" in str(e):
                    raise
                raise self._damaged(payload, e, f": the colour JPEG of fragment {name} does not "
                                    "decode") from None
        else:
            color = None
        return Fragment(name, frame, self.poses[k], self.intrinsics, self.depth_shift, depth,
                        color)

    def by_frame(self, frame: int, color: bool = True) -> Fragment:
        if frame not in self._row:
            raise KeyError(f"{self.scene} has no fragment for frame {frame}; it has "
                           f"{len(self)} fragments (frames {self.frames[:5].tolist()}...)")
        return self.get(self._row[frame], color)


SCENE_FILE = "scene.json"


def check_scene_files(root: str | os.PathLike, scenes) -> None:
    """Every scene in ``scenes`` has its fragment store under ``root``, at the sizes its
    ``scene.json`` recorded (pair prep writes them): one stat per file, so that a missing or
    truncated store is named when a dataset is built, not when a pair of it is reached."""
    import json

    root, problems = Path(root), []
    for scene in scenes:
        folder = root / scene
        try:
            recorded = json.loads((folder / SCENE_FILE).read_text()).get("files") or {}
        except FileNotFoundError:
            problems.append(f"{scene}: no {SCENE_FILE} (the scene's folder is missing or was "
                            "never finished)")
            continue
        except (ValueError, UnicodeDecodeError, AttributeError):
            problems.append(f"{scene}/{SCENE_FILE} is not a valid scene record")
            continue
        for name in (INDEX_FILE, PAYLOAD_FILE):
            try:
                size = (folder / name).stat().st_size
            except FileNotFoundError:
                problems.append(f"{scene}/{name} is missing")
                continue
            if name in recorded and size != recorded[name]:
                problems.append(f"{scene}/{name} has {size} bytes, {recorded[name]} recorded "
                                "(truncated or replaced)")
    if problems:
        more = f" ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError(f"{root}: {len(problems)} problem(s) with scenes the pair list names: "
                         f"{'; '.join(problems[:5])}{more}. Rerun `mink-ssl-prep scannet` into "
                         f"{root}: it redoes the damaged scenes and keeps the others")


class StoreCache:
    """The fragment stores of the scenes under ``root``, at most ``capacity`` of them open at
    once (the most recently used; one descriptor each), however many scenes a process reads.

    A forked process (a loader worker) does not use the stores it inherited: the first call
    there closes its copies of their descriptors and starts empty.
    """

    def __init__(self, root: str | os.PathLike, capacity: int):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        self.root, self.capacity = Path(root), capacity
        self._open: OrderedDict[str, FragmentStore] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._open)

    def get(self, scene: str) -> FragmentStore:
        """The store of ``root/scene``, opened (closing the least recently used) if need be."""
        if self._pid != os.getpid():
            self.clear()
        store = self._open.pop(scene, None)
        if store is None:
            store = FragmentStore(self.root / scene)
            while len(self._open) >= self.capacity:
                self._open.popitem(last=False)[1].close()
        self._open[scene] = store
        return store

    def clear(self) -> None:
        """Close every store this process holds (or inherited)."""
        for store in self._open.values():
            store.close()
        self._open.clear()
        self._pid = os.getpid()
