"""Small file helpers shared by data prep and training: atomic writes and version facts."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mink_ssl.errors import RERUN, RESUME, OutputError, output_error


#: the temporaries of atomic_path carry it, then the writer's pid: ``.<name>.mink-ssl-<pid>-..tmp``
TEMPORARY_PREFIX = "mink-ssl-"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds.
    Its name says it is ours and which process wrote it (``.<name>.mink-ssl-<pid>-<8>.tmp``).

    A crash or exception leaves any previous ``path`` untouched and no partial file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ".<name>.mink-ssl-<pid>-<8 random>.tmp": ours, and whose (TEMPORARY_PREFIX)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{TEMPORARY_PREFIX}"
                               f"{os.getpid()}-", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def output_file(path: str | os.PathLike, doing: str | None = None,
                then: str = RERUN) -> Iterator[Path]:
    """:func:`atomic_path` for an output file: an ``OSError`` while writing it (disk full,
    ``ulimit -f``, read-only, no permission, a name too long) is an ``OutputError`` naming
    ``path`` and what to do, ``then`` what to run when fixed (:data:`mink_ssl.errors.RESUME`
    for a training run's outputs)."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            yield tmp
    except OSError as e:
        raise output_error(e, path, doing or f"cannot write {path}", then) from None


class _Recording:
    """A binary file for ``torch.save`` that keeps the ``OSError`` of a failed write (torch's
    zip writer replaces it with its own RuntimeError, which has no errno)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as e:
            self.error = e
            raise


def atomic_torch_save(obj, path: str | os.PathLike, then: str | None = None) -> Path:
    """``torch.save`` atomically; a failed write is an ``OutputError`` naming the file and its
    cause (a full disk, the file-size limit ``ulimit -f``, ...), not torch's serializer
    message; ``then``: what to run when fixed (default: :data:`~mink_ssl.errors.RESUME`). Our
    tagged files (``format`` ``mink_ssl.*``) are written with their checksum
    (:func:`with_checksum`)."""
    import shutil

    import torch

    then = then or RESUME
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith("mink_ssl."):
        obj = with_checksum(obj)  # our tagged files carry the digest load_tagged verifies
    recording = None
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                recording = _Recording(f)
                torch.save(obj, recording)
    except OSError as e:
        raise output_error(e, path, f"cannot write {path}", then) from None
    except RuntimeError as e:  # torch's zip writer: "enforce fail ... unexpected pos"
        if recording is not None and recording.error is not None:
            raise output_error(recording.error, path, f"cannot write {path}", then) from None
        free = shutil.disk_usage(Path(path).parent).free
        raise OutputError(f"cannot write {path}: {free / 2**20:.1f} MiB free on its file "
                          f"system: is the disk full? Free space or choose another run directory; "
                          f"{then} (torch's writer said: "
                          f"{str(e).splitlines()[0][:160]})") from None
    return Path(path)


def library_versions() -> dict[str, str]:
    """Versions of the libraries a checkpoint depends on (plain strings): torch, mink_ssl and
    both sparse engines (``missing`` where not installed), read from the installed packages'
    metadata without importing them."""
    import importlib.metadata as md

    import torch

    import mink_ssl

    def version(*dists: str) -> str:
        for dist in dists:
            try:
                return f"{dist} {md.version(dist)}" if len(dists) > 1 else md.version(dist)
            except md.PackageNotFoundError:
                continue
        return "missing"

    return {"torch": str(torch.__version__), "mink_ssl": str(mink_ssl.__version__),
            "MinkowskiEngine": version("MinkowskiEngine"),
            # the spconv wheels (CPU, CUDA builds, Triton) all provide the module spconv
            "spconv": version("spconv", "spconv-cu126", "spconv-cu124", "spconv-cu121",
                              "spconv-cu120", "spconv-cu118", "spconv-triton")}


#: entry of a tagged file holding the digest of everything else in it
CHECKSUM = "checksum"


def content_digest(obj) -> str:
    """SHA-256 of ``obj``'s content, ``checksum`` entry excluded: every tensor's dtype, shape and
    bytes and every plain value, in a fixed walk (dict keys in their stored order)."""
    import hashlib

    import torch

    h = hashlib.sha256()

    def walk(node):
        if isinstance(node, torch.Tensor):
            t = node.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(node, dict):
            items = [(k, v) for k, v in node.items() if k != CHECKSUM]
            h.update(f"D{len(items)}".encode())
            for k, v in items:
                h.update(repr(k).encode())
                walk(v)
        elif isinstance(node, (list, tuple)):
            h.update(f"L{len(node)}".encode())
            for v in node:
                walk(v)
        else:
            h.update(f"V{type(node).__name__}:{node!r}".encode())

    walk(obj)
    return h.hexdigest()


def with_checksum(obj: dict) -> dict:
    """``obj`` with its :func:`content_digest` under ``checksum`` (verified by load_tagged)."""
    return {**{k: v for k, v in obj.items() if k != CHECKSUM},
            CHECKSUM: {"sha256": content_digest(obj)}}


def verify_checksum(obj: dict, path) -> None:
    """A ``ValueError`` naming ``path`` when its recorded checksum does not match its content
    (files written before checksums existed have none and pass)."""
    recorded = obj.get(CHECKSUM, {}).get("sha256") if isinstance(obj.get(CHECKSUM), dict) else None
    if recorded is None:
        return
    found = content_digest(obj)
    if found != recorded:
        raise ValueError(f"{path} is damaged: its content does not match the checksum written "
                         f"with it (sha256 {recorded[:12]}... recorded, {found[:12]}... now): "
                         "a bit flipped on disk or in a copy. Use another copy, or the previous "
                         "checkpoint (move this one away; resume=auto then takes the newest "
                         "remaining one)")
