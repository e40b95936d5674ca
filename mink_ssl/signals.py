"""Stop signals (standard library only: data prep imports it).

- :class:`StopSignals`: SIGINT / SIGTERM ask the run to stop at its next safe point instead of
  killing it; a second signal interrupts at once (under torchrun, not a repeat within 2 s:
  torchrun forwards the signal a scheduler sent to every process).
- :func:`worker_init`: pool workers die with their parent and leave signals to it.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time


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
