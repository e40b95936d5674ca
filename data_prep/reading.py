"""Reading a user's input files: an ``OSError`` met while reading one (missing, no permission,
an I/O error, a truncated network copy) becomes :class:`mink_ssl.errors.BadInput` naming the
file, so prep reports the scene as skipped; any other error of the code around it stays what it
is (a bug stops the run). Only for reads of input: writing the output has its own errors
(:func:`mink_ssl.errors.output_error`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mink_ssl.errors import BadInput


@contextmanager
def reading(path: str | os.PathLike) -> Iterator[None]:
    """Inside the block, an ``OSError`` is :class:`BadInput` naming ``path`` (or the file the
    error names)."""
    try:
        yield
    except OSError as e:
        raise BadInput.unreadable_file(e, path) from e


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of the input file ``path``; :class:`BadInput` if it cannot be read."""
    with reading(path):
        return Path(path).read_bytes()


def read_text(path: str | os.PathLike, encoding: str = "utf-8", errors: str = "strict") -> str:
    """The text of the input file ``path``; :class:`BadInput` if it cannot be read or is not
    text in ``encoding``."""
    data = read_bytes(path)
    try:
        return data.decode(encoding, errors)
    except UnicodeDecodeError as e:
        raise BadInput(f"{path} is not {encoding} text (byte {e.start}: {e.reason}): the file is "
                       "damaged or not the file expected; restore it from the dataset's "
                       "download", path) from None
