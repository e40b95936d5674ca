"""Per-scene claims: several prep processes, on one machine or many, fill one ``--out``.

A process prepares a scene only while it holds the scene's *claim*, the file
``<out>/.claims/<scene>``; the whole-folder lock (:class:`mink_ssl.locks.DirLock`) is kept for
the steps that write folder-wide files (a single-process run, ``--finalize``).

- **Taking a claim** is atomic on local and network file systems: the claim is written
  completely to a temporary file, then hard-linked to its name (``link`` fails if the name
  exists, whatever it is, and never follows a symbolic link). A claim names its holder: token,
  pid, host, boot id, the process's start time, when it was taken and the command.
- **Heartbeat**: while a claim is held, a thread of the holding process touches the claim file
  every ``timeout / 10`` seconds (its modification time is the heartbeat).
- **Stale claims** (the rule): a claim is stale when its holder is known to be gone:
  on the *same machine* (same host name and boot id), when the holder's process is not running
  (no such pid, or the pid now belongs to a process started at another time); otherwise
  (another host, or this one since rebooted, or a machine of the same name), when its
  heartbeat is older than ``timeout`` seconds (default 600; the machines' clocks must agree
  within a few minutes, as NTP keeps them). Processes in different pid namespaces (containers)
  must have distinct host names. A stale claim is taken over: moved aside by an atomic rename,
  checked to be the very claim judged stale (else put back), then replaced by the new
  holder's.
- **Publishing** a scene (renaming its finished temporary folder into place) happens only while
  the worker's claim is still its own, and the rename cannot replace a complete scene: a scene
  is published once even in the rare race where a claim is taken over from a holder that was
  merely slow.
- Nothing here follows a symbolic link: a link at ``.claims`` or at a claim's name is refused
  with an :class:`~mink_ssl.errors.OutputError` naming it, its target untouched.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mink_ssl.errors import OutputError, output_error

CLAIMS_DIR = ".claims"
CLAIM_TIMEOUT_S = 600.0  # a claim of another host is stale after this long without a heartbeat
HOST = socket.gethostname()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


BOOT_ID = _boot_id()  # tells this machine's boot from another machine of the same name


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot; Linux), None if unknown."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        return int(raw[raw.rindex(")") + 2:].split()[19])  # field 22 of proc(5)
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether process ``pid`` of this machine runs, and is the one started at ``start_ticks``
    when that is given (a reused pid is another process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    if start_ticks is not None:
        now = _start_ticks(pid)
        return now is None or now == start_ticks
    return True


def describe(holder: dict, age: float | None = None) -> str:
    """'pid 12 on host h since <time> (<command>)[, heartbeat N s ago]'."""
    beat = "" if age is None else f", heartbeat {age:.0f} s ago"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since "
            f"{holder.get('claimed', '?')} ({holder.get('command', '?')}){beat}")


class _Heartbeat:
    """One thread per process touching the file of every claim it holds."""

    def __init__(self):
        self.claims: set[Claim] = set()
        self.lock = threading.Lock()
        self.pid: int | None = None  # the process whose thread runs (threads do not survive fork)
        self.wake = threading.Event()
        self.interval = CLAIM_TIMEOUT_S / 10

    def add(self, claim: "Claim", interval: float) -> None:
        if self.pid != os.getpid():  # first claim of this process, or of a forked child:
            # fresh state (a lock copied by fork may be held by a thread the child lacks)
            self.lock, self.wake, self.claims = threading.Lock(), threading.Event(), set()
            self.pid = os.getpid()
            threading.Thread(target=self._run, args=(self.lock, self.wake, self.claims),
                             name="claim-heartbeat", daemon=True).start()
        with self.lock:
            if interval < self.interval:  # a shorter timeout: beat sooner from now on
                self.interval = interval
                self.wake.set()
            self.claims.add(claim)

    def discard(self, claim: "Claim") -> None:
        with self.lock:
            self.claims.discard(claim)

    def _run(self, lock: threading.Lock, wake: threading.Event, claims: set) -> None:
        while True:
            wake.wait(self.interval)
            wake.clear()
            with lock:  # held while touching: a released claim's fd is closed after
                for c in claims:
                    try:
                        os.utime(c.fd)  # the file the claim was taken with, never a path
                    except OSError:
                        pass  # a file system hiccup: the next beat tries again


_HEARTBEAT = _Heartbeat()


@dataclass(eq=False)
class Claim:
    """A held claim; :meth:`release` it when the scene is done (or given up)."""

    scene: str
    path: Path
    token: str  # names the holder's temporary folder
    fd: int  # the claim file, open: the heartbeat touches it
    ino: int
    took_over: dict | None  # the stale claim this one replaced (its holder), if any

    def still_ours(self) -> bool:
        """Whether the claim file at :attr:`path` is still the one we took."""
        try:
            return os.lstat(self.path).st_ino == self.ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        _HEARTBEAT.discard(self)
        try:
            if self.still_ours():
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)


class SceneClaims:
    """The claims of one output folder (``<out>/.claims``)."""

    def __init__(self, out: str | os.PathLike, timeout: float = CLAIM_TIMEOUT_S):
        if not timeout > 0:
            raise ValueError(f"the claim timeout must be positive (seconds), got {timeout!r}")
        self.out, self.timeout = Path(out), float(timeout)
        self.dir = self.out / CLAIMS_DIR

    # -- reading -------------------------------------------------------------------------
    def _check_dir(self, create: bool) -> bool:
        """Whether ``.claims`` exists (created if asked); OutputError if it is not a folder."""
        if os.path.islink(self.dir):
            raise OutputError(f"{self.dir} is a symbolic link (to {os.readlink(self.dir)}), not "
                              "the claims folder of prep; prep follows no link out of --out. "
                              f"Remove the link (rm {self.dir}) and rerun")
        if create:
            try:
                self.dir.mkdir(exist_ok=True)
            except OSError as e:
                raise output_error(e, self.dir, f"cannot create {self.dir}") from None
        if os.path.lexists(self.dir) and not self.dir.is_dir():
            raise OutputError(f"{self.dir} is not a folder; prep keeps its claims there: move it "
                              "out of --out and rerun")
        return self.dir.is_dir()

    def _open(self, path: Path) -> int | None:
        """The claim file open for reading (never through a link); None if it is gone."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as e:
            if os.path.islink(path):
                raise OutputError(
                    f"{path} is a symbolic link (to {os.readlink(path)}), not a claim of prep; "
                    f"prep follows no link out of --out. Remove the link (rm {path}) and rerun"
                ) from None
            raise output_error(e, path, f"cannot read the claim {path}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputError(f"{path} is not a claim file of prep (not a regular file); move "
                              "it out of --out and rerun")
        return fd

    def read(self, scene: str) -> tuple[dict, os.stat_result] | None:
        """The holder of ``scene``'s claim and the claim file's stat, or None if unclaimed."""
        fd = self._open(self.dir / scene)
        if fd is None:
            return None
        try:
            st, raw = os.fstat(fd), os.read(fd, 65536)
        finally:
            os.close(fd)
        try:
            holder = json.loads(raw.decode("utf-8", "replace"))
            holder = holder if isinstance(holder, dict) else {}
        except ValueError:
            holder = {}
        return holder, st

    def stale(self, holder: dict, st: os.stat_result) -> bool:
        """The stale rule (module docstring)."""
        pid, boot = holder.get("pid"), holder.get("boot_id")
        if (holder.get("host") == HOST and isinstance(pid, int)
                and (not boot or not BOOT_ID or boot == BOOT_ID)):  # this machine, this boot
            return not process_alive(pid, holder.get("start_ticks"))
        return time.time() - st.st_mtime > self.timeout

    def live(self) -> dict[str, str]:
        """{scene: its holder, described} of every claim that is not stale."""
        if not self._check_dir(create=False):
            return {}
        found = {}
        for entry in sorted(os.listdir(self.dir)):
            if entry.startswith("."):
                continue  # a claim being written or moved aside
            got = self.read(entry)
            if got is not None and not self.stale(*got):
                found[entry] = describe(got[0], time.time() - got[1].st_mtime)
        return found

    def live_token(self, scene: str) -> str | None:
        """The token of ``scene``'s claim if it is live."""
        got = self.read(scene) if self._check_dir(create=False) else None
        return None if got is None or self.stale(*got) else got[0].get("token")

    # -- taking and clearing ---------------------------------------------------------------
    def claim(self, scene: str) -> Claim | None:
        """Take ``scene``'s claim (over a stale one); None while another live process holds
        it. The caller must :meth:`Claim.release` it."""
        self._check_dir(create=True)
        path, took_over = self.dir / scene, None
        for _ in range(20):
            token = secrets.token_hex(6)
            info = {"token": token, "pid": os.getpid(), "host": HOST, "boot_id": BOOT_ID,
                    "start_ticks": _start_ticks(os.getpid()),
                    "claimed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "command": " ".join(sys.argv)[:300]}
            new = self.dir / f".{scene}.{token}.new"
            try:
                fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except FileNotFoundError:  # the empty folder was removed by a run ending just now
                self._check_dir(create=True)
                continue
            except OSError as e:
                raise output_error(e, new, f"cannot write the claim {new}") from None
            try:
                os.write(fd, json.dumps(info).encode())
                ino = os.fstat(fd).st_ino
            except OSError as e:
                os.close(fd)
                os.unlink(new)
                raise output_error(e, new, f"cannot write the claim {new}") from None
            try:
                os.link(new, path)  # atomic; fails if anything is at ``path``
            except FileExistsError:
                os.close(fd)
                os.unlink(new)
                got = self.read(scene)
                if got is None:
                    continue  # released meanwhile: try again
                if not self.stale(*got):
                    return None
                if self._move_aside(path, got[1], token):
                    took_over = got[0]
                continue
            except OSError as e:
                os.close(fd)
                os.unlink(new)
                raise output_error(e, path, f"cannot take the claim {path}") from None
            os.unlink(new)
            claim = Claim(scene, path, token, fd, ino, took_over)
            if not claim.still_ours():  # moved aside at once by a taker that judged an older one
                claim.release()
                continue
            _HEARTBEAT.add(claim, self.timeout / 10)
            return claim
        raise OutputError(f"could not claim scene {scene}: its claim {path} keeps being replaced "
                          "by other processes")

    def _move_aside(self, path: Path, judged: os.stat_result, token: str) -> bool:
        """Remove the stale claim judged from ``judged``; True if it was that one. A claim
        that replaced it meanwhile is put back (if nothing took its place)."""
        aside = self.dir / f".{path.name}.{token}.stale"
        try:
            os.rename(path, aside)  # atomic: whatever is at ``path`` now
        except FileNotFoundError:
            return False
        try:
            if os.lstat(aside).st_ino == judged.st_ino:
                return True
            try:
                os.link(aside, path)  # not the claim we judged: give it back
            except FileExistsError:
                pass  # a third process claimed meanwhile; the moved claim's holder will find
                # at publishing time that its claim is gone, and discard its work
            return False
        finally:
            os.unlink(aside)

    def drop_dir(self) -> None:
        """Remove the claims folder if it is empty (no process claims a scene)."""
        try:
            self.dir.rmdir()
        except OSError:
            pass

    def remove_stale(self) -> list[str]:
        """Remove the stale claims and the leftovers of interrupted claiming; returns the
        scenes whose claims were removed. The folder goes when it is left empty."""
        if not self._check_dir(create=False):
            return []
        removed = []
        for entry in sorted(os.listdir(self.dir)):
            p = self.dir / entry
            if entry.startswith("."):
                if os.path.islink(p) or time.time() - os.lstat(p).st_mtime > 60:
                    p.unlink(missing_ok=True)  # a claim being written or moved aside, long ago
                continue
            got = self.read(entry)
            if got is not None and self.stale(*got) and self._move_aside(p, got[1], "clear"):
                removed.append(entry)
        self.drop_dir()
        return removed
