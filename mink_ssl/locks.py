"""One writer per output directory (standard library only: data prep imports it).

:class:`DirLock`: ``<dir>/.mink-ssl.lock`` holds the holder's pid, host and command; the lock
itself is an ``flock`` on that file, so it is held exactly as long as the holder (or a process it
forked) lives, and a lock file left by a killed run is taken over with a notice. The lock file is
never followed when it is a symlink.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from mink_ssl.errors import output_error

LOCK_NAME = ".mink-ssl.lock"


class DirectoryLocked(RuntimeError):
    """Another live process writes into the directory."""


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
