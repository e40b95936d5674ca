"""Run safety shared by data prep and training (standard library only: data prep imports it).

- :class:`DirLock`: one writer per output directory. ``<dir>/.mink-ssl.lock`` holds the
  holder's pid, host and command; the lock itself is an ``flock`` on that file, so it is held
  exactly as long as the holder (or a process it forked) lives, and a lock file left by a
  killed run is taken over with a notice.
- :class:`StopSignals`: SIGINT / SIGTERM ask the run to stop at its next safe point instead of
  killing it; a second signal interrupts at once (under torchrun, not a repeat within 2 s:
  torchrun forwards the signal a scheduler sent to every process).
- :func:`output_error`: an ``OSError`` met while writing the output (disk full, read-only,
  no permission, the file-size limit ``ulimit -f``, told apart from a full disk) becomes an
  :class:`OutputError` that names the path and what to do: it aborts the run and is never
  reported as bad input; :func:`written_before` adds which results an optional export came
  after.
- :func:`worker_init`: pool workers die with their parent and leave signals to it.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_NAME = ".mink-ssl.lock"
#: errors that only writing produces: always about the output side
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


class DirectoryLocked(RuntimeError):
    """Another live process writes into the directory."""


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


# -- lock -------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since "
            f"{holder.get('started', '?')} ({holder.get('what', '?')}: "
            f"{holder.get('command', '?')})")


class DirLock:
    """Exclusive lock of ``directory`` for one run (a context manager)::

        with DirLock(out, "prep scannet"):
            ...  # nobody else writes into out

    A second writer gets :class:`DirectoryLocked` naming the holder. The directory is created
    if needed and, when the lock is released, removed again if the run left it empty.
    """

    def __init__(self, directory: str | os.PathLike, what: str, notice=print):
        self.dir, self.what, self.notice = Path(directory), what, notice
        self.path = self.dir / LOCK_NAME
        self._fd: int | None = None
        self._created_dir = False

    def __enter__(self) -> "DirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join(sys.argv)[:500]}

    @staticmethod
    def _read(fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 65536)
        try:
            return json.loads(raw.decode("utf-8", "replace")) if raw.strip() else {}
        except ValueError:
            return {"pid": "?", "command": f"unreadable lock file ({raw[:80]!r})"}

    def acquire(self) -> None:
        import fcntl

        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this DirLock")
        try:
            self._created_dir = not self.dir.exists()
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise output_error(e, self.dir, f"cannot create the output directory {self.dir}")
        for _ in range(10):
            try:  # never through a symbolic link: it would write our lock into its target
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                if os.path.islink(self.path):
                    raise DirectoryLocked(
                        f"{self.path} is a symbolic link (to {os.readlink(self.path)}), not a lock "
                        f"file of ours; mink-ssl follows no link out of its output directory. "
                        f"Remove the link (rm {self.path}) or use another directory") from None
                raise output_error(e, self.path, f"cannot create the lock file {self.path}")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                dead = (isinstance(holder.get("pid"), int)
                        and holder.get("host") == socket.gethostname()
                        and not _pid_alive(holder["pid"]))
                extra = (" That process has ended but processes it started (pool or loader "
                         "workers) still hold the lock; wait for them to exit or end them."
                         if dead else "")
                raise DirectoryLocked(
                    f"{self.dir} is in use by another run: {_describe(holder)}.{extra} Two "
                    f"runs writing into one directory corrupt it; wait for it to finish, or use "
                    f"another directory. (Lock file: {self.path})") from None
            except OSError:  # a file system without flock: fall back on the recorded pid
                flocked = False
            try:
                same = os.lstat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released (unlinked) between our open and flock: take the new file
                os.close(fd)
                continue
            previous = self._read(fd)
            if previous and not flocked and isinstance(previous.get("pid"), int) and (
                    previous.get("host") != socket.gethostname() or _pid_alive(previous["pid"])):
                os.close(fd)
                raise DirectoryLocked(f"{self.dir} is in use by another run: "
                                      f"{_describe(previous)}; if that run is gone, delete "
                                      f"{self.path}")
            if previous:
                self.notice(f"note: taking over the lock of {self.dir} left by a run that is no "
                            f"longer running ({_describe(previous)})")
            try:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, json.dumps(self._info()).encode())
                os.fsync(fd)
            except OSError as e:
                os.close(fd)
                raise output_error(e, self.path, f"cannot write the lock file {self.path}")
            self._fd = fd
            return
        raise DirectoryLocked(f"could not lock {self.dir}: its lock file {self.path} keeps "
                              "being replaced by other processes")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: a waiter re-checks the inode
        finally:
            os.close(self._fd)
            self._fd = None
        if self._created_dir:
            try:
                self.dir.rmdir()  # only if the run left it empty
            except OSError:
                pass


# -- output errors ----------------------------------------------------------------------------
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


# -- signals ----------------------------------------------------------------------------------
def under_torchrun(environ=os.environ) -> bool:
    """Whether torchrun (torch.distributed's elastic agent) started this process."""
    return "TORCHELASTIC_RUN_ID" in environ


class StopSignals:
    """Within the block, SIGINT / SIGTERM set :attr:`signum` (the run stops at its next safe
    point) and print ``message``; a second signal raises KeyboardInterrupt at once. Only the
    main thread can install signal handlers; elsewhere this does nothing.

    Under torchrun, the same signal again within :attr:`REPEAT_WINDOW` seconds of the first is
    the same request, not the second one: a scheduler (SLURM) signals every process of the job,
    torchrun included, and torchrun forwards the signal to its workers, so a worker receives it
    twice within milliseconds (which used to abort the checkpoint)."""

    REPEAT_WINDOW = 2.0

    def __init__(self, message: str = "", print_fn=None):
        self.message = message
        self.print_fn = print_fn or (lambda s: print(s, file=sys.stderr, flush=True))
        self.signum: int | None = None
        self._at = 0.0  # time.monotonic() of the first signal
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            if (signum == self.signum and under_torchrun()
                    and time.monotonic() - self._at < self.REPEAT_WINDOW):
                self.print_fn(f"{name} again within {self.REPEAT_WINDOW:g} s (torchrun forwards "
                              "the signal it got too): the same stop request; send it again "
                              "later to abort at once")
                return
            raise KeyboardInterrupt(f"second {name}")
        self.signum, self._at = signum, time.monotonic()
        self.print_fn(f"\n{name} received: {self.message} "
                      "(send it again to abort at once)")

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


def ignore_stop_signals(*_args) -> None:
    """In a worker process: SIGINT / SIGTERM are its parent's to handle (a Ctrl-C reaches the
    whole process group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def die_with_parent(parent_pid: int) -> None:
    """Linux: this process gets SIGKILL when its parent dies (no orphaned workers)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)


def worker_init(parent_pid: int) -> None:
    """Initializer of pool workers: die with the parent, leave SIGINT / SIGTERM to it."""
    die_with_parent(parent_pid)
    ignore_stop_signals()
