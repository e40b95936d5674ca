"""TensorBoard scalars written in the training process itself, so that a write error (disk
full, ``ulimit -f``) is an :class:`~mink_ssl.errors.OutputError` naming the event file at the
step that met it.

``torch.utils.tensorboard.SummaryWriter`` writes from a background thread: a failed write
printed that thread's bare ``OSError`` traceback and surfaced later, at some other call. The
file is the same: ``events.out.tfevents.<time>.<host>.<pid>.<n>`` of TFRecord-framed ``Event``
protocol buffers (TensorBoard's own framing and message classes), read by TensorBoard and
``EventAccumulator`` as before.
"""
from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path

from mink_ssl.errors import RESUME, output_error

_serial = itertools.count()  # the <n> of a process's event files, as SummaryWriter counts


class EventFile:
    """One event file in ``log_dir`` (created), opened for appending, never through a
    symbolic link. :meth:`scalar` queues a value, :meth:`flush` writes them; every I/O error
    is an ``OutputError`` naming the file (``then``: what to run when fixed)."""

    def __init__(self, log_dir: str | os.PathLike, then: str = RESUME):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self.dir, self.then = Path(log_dir), then
        self._event = event_pb2.Event
        self.path = self.dir / (f"events.out.tfevents.{int(time.time()):010d}."
                                f"{socket.gethostname()}.{os.getpid()}.{next(_serial)}")
        self._file = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise output_error(e, self.path, f"cannot create the TensorBoard event file "
                               f"{self.path}", then) from None
        self._file = os.fdopen(fd, "ab")
        self._records = RecordWriter(self._file)
        self._add(self._event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def _add(self, event) -> None:
        try:
            self._records.write(event.SerializeToString())
        except OSError as e:
            raise output_error(e, self.path, f"cannot write TensorBoard events to {self.path}",
                               self.then) from None

    def scalar(self, tag: str, value: float, step: int) -> None:
        """``tag`` = ``value`` at ``step`` (a float scalar, as SummaryWriter.add_scalar)."""
        from torch.utils.tensorboard.summary import scalar

        self._add(self._event(wall_time=time.time(), step=int(step),
                              summary=scalar(tag, float(value))))

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError as e:
            raise output_error(e, self.path, f"cannot write TensorBoard events to {self.path}",
                               self.then) from None

    def close(self) -> None:
        """Flush and close (an error of the final flush is raised once; the file is closed)."""
        if self._file is None or self._file.closed:
            return
        try:
            self.flush()
        finally:
            try:
                self._file.close()
            except OSError:
                pass
