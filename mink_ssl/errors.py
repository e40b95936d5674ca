"""The errors a run reports to its user, and how an output error is worded (standard library
only: data prep imports it).

- :class:`OutputError`: writing the output failed; :func:`output_error` turns an ``OSError``
  met while writing (disk full, read-only, no permission, the file-size limit ``ulimit -f``, told
  apart from a full disk) into one that names the path and what to do. It aborts the run and is
  never reported as bad input; :func:`written_before` adds which results an optional export came
  after.
- :class:`Interrupted`: the run stopped on a signal at a safe point.
- :class:`BadInput`: a user's input file cannot be used (damaged, unreadable, not what the
  format allows); the only error prep reports as a skipped scene.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

#: errors that only writing produces: always about the output side
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


class OutputError(RuntimeError):
    """Writing the output failed (disk full, read-only, no permission): the run aborts."""


class Interrupted(RuntimeError):
    """The run stopped on SIGINT / SIGTERM at a safe point; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __reduce__(self):
        return type(self), (str(self), self.signum)


class BadInput(ValueError):
    """A user's input cannot be used: the message says what is wrong, naming the file, and what
    to do about it. Data prep reports the scene as skipped and goes on; every other error stops
    the run (it is a bug, or an output error). A ``ValueError``, so a command's usual handling
    of bad values applies to it outside a scene.

    ``path``: the file at fault (None when it is not one file). ``unreadable``: the file could
    not be read at all (an ``OSError``: permissions, an I/O error, a disk that went away), so a
    rerun tries the scene again rather than trusting the earlier verdict.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None,
                 unreadable: bool = False):
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)
        self.unreadable = unreadable

    @classmethod
    def unreadable_file(cls, e: OSError, path: str | os.PathLike) -> "BadInput":
        """The :class:`BadInput` for ``e``, an ``OSError`` met while reading the input file
        ``path`` (a missing, unreadable or vanished file)."""
        where = os.fsdecode(e.filename) if e.filename is not None else os.fspath(path)
        return cls(f"cannot read {where}: {e.strerror or e}; check that the file is there and "
                   "readable (its permissions, a disk or network mount that went away), or "
                   "copy it again from the dataset's download", where, unreadable=True)

    def __reduce__(self):  # keeps path and unreadable across processes
        return type(self), (str(self), self.path, self.unreadable)


def _inside(path, root: Path) -> bool:
    """Whether ``path`` lies in ``root``, as spelled or with symlinks resolved."""
    try:
        p, r = Path(os.fsdecode(path)), Path(root)
    except (TypeError, ValueError):
        return False
    for a, b in ((p.absolute(), r.absolute()), (p.resolve(), r.resolve())):
        if a == b or b in a.parents:
            return True
    return False


def is_output_error(e: BaseException, out: str | os.PathLike) -> bool:
    """Whether ``e`` is about writing the output rooted at ``out`` (not about reading input):
    disk full, quota, read-only file system and file-size limit always are; any other
    ``OSError`` is when the path it names lies in ``out``."""
    if not isinstance(e, OSError):
        return False
    if e.errno in _WRITE_ERRNOS:
        return True
    return any(name is not None and _inside(name, Path(out)) for name in (e.filename, e.filename2))


#: the closing advice of an output error: the default, and that of a training run's outputs
RERUN = "rerun the same command when fixed (finished work is kept)"
RESUME = ("when fixed, rerun the command with resume=auto: the run continues from its last "
          "checkpoint (a finished run redoes only its final evaluation and exports)")


def _size_limit_hint() -> str:
    """What EFBIG means here: this process's file-size limit (``ulimit -f``), when one is set,
    else the file system's largest file."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        soft = None
    if soft is not None and soft != resource.RLIM_INFINITY:
        return (f"the file reached this process's file-size limit of {soft / 2**20:.1f} MiB "
                f"({soft} bytes, ulimit -f): raise the limit (ulimit -f unlimited); more free "
                "disk space does not help")
    return ("the file is larger than its file system allows (e.g. 4 GiB on FAT32): choose "
            "an output directory on another file system")


def write_hint(e: OSError) -> str:
    """What to do about ``e``, an error met while writing the output."""
    if e.errno == errno.EFBIG:
        return _size_limit_hint()
    return {errno.ENOSPC: "the disk is full: free space or choose another output directory",
            errno.EDQUOT: "the disk quota is exhausted: free space or choose another output "
                          "directory",
            errno.EROFS: "the file system is read-only: choose a writable output directory",
            errno.EACCES: "no permission to write there: fix its permissions or choose another "
                          "output directory",
            errno.EPERM: "no permission to write there: fix its permissions or choose another "
                         "output directory",
            errno.ENAMETOOLONG: "a name in the path is longer than its file system allows "
                                "(usually 255 bytes): choose a shorter output path",
            }.get(e.errno, "check the output directory")


def output_error(e: OSError, path: str | os.PathLike, doing: str | None = None,
                 then: str = RERUN) -> OutputError:
    """An :class:`OutputError` for ``e`` met while writing ``path``, with what to do about it
    (a full disk and a file-size limit, EFBIG, are told apart) and, ``then``, what to run once
    it is fixed."""
    where = e.filename if e.filename is not None else path
    return OutputError(f"{doing or f'cannot write {path}'}: {e.strerror or e} ({where}); "
                       f"{write_hint(e)}. Nothing was reported as bad input; {then}.")


def written_before(e: OutputError, paths) -> OutputError:
    """``e``, met writing an optional export, saying which results were written before it."""
    names = [str(p) for p in paths]
    listed = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
    return OutputError(f"{e} (The results, {listed}, were written before it and are "
                       "complete.)")
