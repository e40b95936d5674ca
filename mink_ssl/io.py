"""Small file helpers shared by data prep and training: atomic writes and version facts."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mink_ssl.safety import OutputError, output_error


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds.

    A crash or exception leaves any previous ``path`` untouched and no partial file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically; a failed write (disk full ...) is an ``OutputError`` naming
    the file and the free space, not torch's serializer message. Our tagged files (``format``
    ``mink_ssl.*``) are written with their checksum (:func:`~mink_ssl.formats.model_files.
    with_checksum`)."""
    import shutil

    import torch

    from mink_ssl.formats.model_files import with_checksum

    if isinstance(obj, dict) and str(obj.get("format", "")).startswith("mink_ssl."):
        obj = with_checksum(obj)  # our tagged files carry the digest load_tagged verifies
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except OSError as e:
        raise output_error(e, path, f"cannot write {path}") from None
    except RuntimeError as e:  # torch's zip writer reports ENOSPC as "enforce fail ..."
        free = shutil.disk_usage(Path(path).parent).free
        raise OutputError(f"cannot write {path}: {free / 2**20:.1f} MiB free on its file "
                          "system: is the disk full? Free space (or choose another run "
                          "directory) and resume with resume=auto (torch's writer said: "
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
