"""The thread that writes audit files, so no disk write ever runs on the event loop.

:class:`AuditWriter` owns one daemon thread and a queue of jobs, handed over
from the event loop in batches (an event line, a recording chunk of up to
:data:`CHUNK` bytes), never per frame. It writes:

* the events file ``events-<start>-<pid>.<n>.jsonl``: JSON lines, one file per
  gateway process, a new ``<n>`` whenever a file passes ``max_file_bytes``;
  each batch is written with ``os.write`` as soon as it arrives (nothing is
  held in a user-space buffer, so a crash loses at most the batch in hand);
* recordings, through :class:`RecordingFile` objects (see
  :mod:`kuberun.audit.recording`).

Errors never leave the thread: a failed open or write is logged (at most one
line per file and error kind), counted in ``kuberun_audit_write_errors_total``
and, for recordings, in ``kuberun_audit_dropped_bytes_total``; the events file
is reopened on the next batch, so events resume once the disk has room again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .directio import aligned_buffer

__all__ = ["CHUNK", "AuditWriter", "RecordingFile", "check_directory", "write_all"]

_log = logging.getLogger("kuberun.audit")

#: Bytes a recording collects before handing them to the writer thread.
CHUNK = 1024 * 1024

#: Event lines waiting for the thread, at most; more are dropped and counted
#: (an ``audit.dropped`` event says how many once writing works again).
MAX_QUEUED_EVENTS = 100_000

#: After writing recordings the thread looks for more this often (seconds) before it sleeps.
LINGER = 0.02

#: Queued recording bytes that wake the thread at once.
WAKE_BYTES = 4 * CHUNK

#: Recording buffers kept for reuse, at most.
POOL_BUFFERS = 16

#: Size after which the events file is continued in a new one.
DEFAULT_MAX_FILE_BYTES = 100 * 1024 * 1024


def check_directory(directory: str | os.PathLike[str]) -> str | None:
    """Create ``directory`` if needed and try writing a file in it.

    :returns: None if it is usable, else the problem in words.
    """
    path = Path(directory)
    try:
        path.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create {str(path)!r}: {exc.strerror or exc}"
    if not path.is_dir():
        return f"{str(path)!r} is not a directory"
    probe = path / f".kuberun-write-check-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot write in {str(path)!r}: {exc.strerror or exc}"
    return None


class RecordingFile(Protocol):
    """What the writer thread needs of a recording: chunks in, bytes written out."""

    #: Payload bytes handed over and not yet written (changed under the writer's lock).
    queued: int

    def write_chunks(self, writer: AuditWriter, chunks: list[Any]) -> int:
        """Write chunks in order (in the writer thread); returns payload bytes written."""
        ...

    def finish(self, writer: AuditWriter) -> None:
        """Flush what is held and close the files (in the writer thread)."""
        ...

    def written(self, nbytes: int, dropped: int) -> None:
        """Account a chunk of ``nbytes`` payload as done, ``dropped`` of it lost (writer thread)."""
        ...


class AuditWriter:
    """A daemon thread writing events and recordings under ``directory``.

    :param metrics: a :class:`~kuberun.metrics.Metrics` or None
    :param dropped_line: builds the event line that reports a number of events
        dropped because the queue was full
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        metrics: Any = None,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        dropped_line: Callable[[int], bytes] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self._dropped_line = dropped_line
        self.metrics = metrics
        self.max_file_bytes = max_file_bytes
        self._cond = threading.Condition()
        self._jobs: collections.deque[tuple[Any, Any, int]] = collections.deque()
        self._queued_events = 0
        self._dropped_events = 0
        self._closing = False
        self._asleep = False  # waiting with nothing to do: the next job wakes it
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self._stem = f"events-{stamp}-{os.getpid()}"
        self._file_no = 0
        self._fd: int | None = None
        self._size = 0
        self._reported: set[tuple[str, str]] = set()
        self.queued_bytes = 0  # recording bytes handed over and not yet written
        # Written buffers kept for reuse: fresh memory costs a page fault per 4 KiB.
        # (list.append and list.pop are atomic, so both threads use it without a lock.)
        self._pool: list[memoryview] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="kuberun-audit", daemon=True)
        self._thread.start()

    @property
    def events_path(self) -> Path:
        """The events file being written now."""
        return self.directory / f"{self._stem}.{self._file_no}.jsonl"

    # -- the event loop side ----------------------------------------------

    def event(self, line: bytes) -> bool:
        """Queue one event line; False (and counted) if the queue is full."""
        with self._cond:
            if self._queued_events >= MAX_QUEUED_EVENTS:
                self._dropped_events += 1
                if self.metrics is not None:
                    self.metrics.audit_write_errors.inc()
                return False
            self._queued_events += 1
            self._jobs.append((None, line, 0))
            self._cond.notify()
        return True

    def submit(self, recording: RecordingFile, chunk: Any, nbytes: int) -> None:
        """Queue a recording chunk of ``nbytes`` payload bytes (None: finish the recording)."""
        with self._cond:
            self.queued_bytes += nbytes
            recording.queued += nbytes
            self._jobs.append((recording, chunk, nbytes))
            # A full chunk of a busy stream waits for the thread's next round (at most
            # LINGER seconds) unless WAKE_BYTES are waiting: one wake-up, and one GIL
            # handoff, per several MiB instead of per chunk.
            if self._asleep or nbytes < CHUNK or self.queued_bytes >= WAKE_BYTES:
                self._cond.notify()

    def buffer(self) -> memoryview:
        """A page-aligned :data:`CHUNK`-byte buffer for a recording (reused when possible)."""
        pool = self._pool
        return pool.pop() if pool else aligned_buffer(CHUNK)

    def recycle(self, view: memoryview) -> None:
        """Take back a buffer from :meth:`buffer` once written (writer thread)."""
        if len(self._pool) < POOL_BUFFERS and len(view) == CHUNK:
            self._pool.append(view)

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the event loop (from the writer thread)."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(callback)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def close(self, timeout: float = 10.0) -> bool:
        """Write what is queued, then stop the thread (blocking; run it in a thread).

        :returns: False if the thread was still busy after ``timeout`` seconds
            (a disk that does not answer); it is a daemon and goes with the process.
        """
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the thread --------------------------------------------------------

    def _run(self) -> None:
        linger = False
        while True:
            with self._cond:
                if linger and not self._jobs and not self._closing:
                    self._cond.wait(LINGER)
                while not self._jobs and not self._closing:
                    self._asleep = True
                    self._cond.wait()
                self._asleep = False
                if not self._jobs:
                    break
                batch = list(self._jobs)
                self._jobs.clear()
                events = sum(1 for job in batch if job[0] is None)
                self._queued_events -= events
                dropped_events, self._dropped_events = self._dropped_events, 0
            # Events first, then every recording's chunks in one write each: the thread
            # needs the GIL back after each system call, and waits for it while the event
            # loop is busy, so fewer and bigger writes keep up with a fast session.
            lines: list[bytes] = []
            recordings: dict[RecordingFile, list[Any]] = {}
            for recording, chunk, nbytes in batch:
                if recording is None:
                    lines.append(chunk)
                    continue
                entry = recordings.setdefault(recording, [[], 0, False])
                if chunk is None:
                    entry[2] = True
                else:
                    entry[0].append(chunk)
                entry[1] += nbytes
            if dropped_events and self._dropped_line is not None:
                lines.append(self._dropped_line(dropped_events))
            if lines:
                self._write_events(lines)
            for recording, (chunks, nbytes, finish) in recordings.items():
                self._write_recording(recording, chunks, nbytes, finish)
            linger = bool(recordings)
        self._close_events()

    def _write_recording(
        self, recording: RecordingFile, chunks: list[Any], nbytes: int, finish: bool
    ) -> None:
        written = 0
        try:
            if chunks:
                written = recording.write_chunks(self, chunks)
            if finish:
                recording.finish(self)
        except Exception as exc:  # a recording must never stop the thread
            self.report(f"recording {getattr(recording, 'name', '?')}", exc)
        dropped = nbytes - written
        with self._cond:
            self.queued_bytes -= nbytes
        if self.metrics is not None:
            if written:
                self.metrics.audit_recorded_bytes.inc(written)
            if dropped > 0:
                self.metrics.audit_dropped_bytes.inc(dropped)
        recording.written(nbytes, max(dropped, 0))

    def _write_events(self, lines: list[bytes]) -> None:
        data = b"".join(lines)
        try:
            if self._fd is None or (self._size and self._size + len(data) > self.max_file_bytes):
                self._open_events()
            assert self._fd is not None
            write_all(self._fd, data)
            self._size += len(data)
        except OSError as exc:
            self.report(str(self.events_path), exc, count=len(lines))
            self._close_events()

    def _open_events(self) -> None:
        if self._fd is not None:
            self._close_events()
            self._file_no += 1
        self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._fd = os.open(self.events_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._size = os.fstat(self._fd).st_size

    def _close_events(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def report(self, what: str, exc: BaseException, *, count: int = 1) -> None:
        """Count a failed write (thread side) and log it once per file and error kind."""
        if self.metrics is not None:
            self.metrics.audit_write_errors.inc(count)
        kind = type(exc).__name__ + str(getattr(exc, "errno", ""))
        if (what, kind) not in self._reported:
            if len(self._reported) > 10_000:
                self._reported.clear()
            self._reported.add((what, kind))
            _log.error("audit: cannot write %s: %s", what, exc)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``os.write`` until all of ``data`` is written (regular files rarely write short)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
