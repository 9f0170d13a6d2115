"""Session recordings: asciicast v2 for pty sessions, raw byte streams for the others.

A recording object has two sides, kept apart:

* the **event-loop side** is handed each output frame by the relay (the
  session's ``exec_stdout``/``exec_stderr`` become :meth:`Recording.stdout` /
  :meth:`Recording.stderr`, which write to the SSH channel first). Per frame it
  only copies the bytes into the chunk being collected and counts them: no
  await, no lock, no logging, no system call. A chunk goes to the writer thread
  when it reaches :data:`~kuberun.audit.writer.CHUNK` bytes, or once its oldest
  byte has waited :data:`FLUSH_DELAY` seconds (a stream that keeps filling its
  chunks is never cut short, so raw files stay block-aligned);
* the **writer-thread side** (:meth:`write_chunks`, :meth:`finish`) turns chunks
  into file contents and writes them.

Memory is bounded: at most :data:`MAX_QUEUED` bytes of one recording wait for
the disk (and :data:`MAX_QUEUED_TOTAL` for all of them). Past that,
``audit.on_overflow: drop`` leaves output out of the recording and counts it
(asciicast: an ``m`` marker event says how many bytes are missing), while
``block`` pauses the session (its exec output and SSH input) until the writer
has caught up with half of it.

Formats:

* **asciicast v2** (``<connection>.<session>.cast``): the header carries the
  pty's width and height, the start time and ``env.TERM``; output is ``o``
  events, resizes ``r`` events (``COLSxROWS``), input ``i`` events when
  ``audit.record_input`` is on, gaps ``m`` events. Text is decoded with one
  incremental UTF-8 decoder per direction (``errors="replace"``), so characters
  split between frames stay whole and ``asciinema cat`` gives back the bytes of
  any valid UTF-8 output exactly.
* **raw** (``<connection>.<session>.stdout``, ``.stderr``, ``.stdin``): the
  bytes of each stream as they were, one file per stream that carried any:
  byte-exact for binary protocols (sftp, scp, tar), which asciicast's UTF-8
  text cannot hold, and far cheaper to write: the loop copies frames into
  page-aligned buffers (reused) which the writer hands to the disk with
  ``O_DIRECT`` (:mod:`kuberun.audit.directio`), past the page cache.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

from .directio import AppendFile
from .writer import CHUNK, AuditWriter, write_all

__all__ = [
    "FLUSH_DELAY",
    "MAX_QUEUED",
    "MAX_QUEUED_TOTAL",
    "CastRecording",
    "RawRecording",
    "Recording",
    "recording_stem",
]

#: Seconds after its first byte a partial chunk goes to the writer anyway.
FLUSH_DELAY = 0.2

#: Output (or input) of a pty session this close in time (seconds) becomes one event.
COALESCE = 0.005

#: Bytes of one recording that may wait for the disk.
MAX_QUEUED = 16 * 1024 * 1024

#: Bytes of all recordings together that may wait for the disk.
MAX_QUEUED_TOTAL = 128 * 1024 * 1024

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

_STREAMS = ("stdout", "stderr", "stdin")


def recording_stem(connection_id: str, session_id: str) -> str:
    """The file name stem of a session's recording: ``<connection>.<session>``, file-name safe."""
    return f"{_UNSAFE.sub('_', connection_id)}.{_UNSAFE.sub('_', session_id)}"


class Recording:
    """One session's recording (base of the two formats).

    :param on_full: called (on the loop) when ``block`` must pause the session
    :param on_drained: called (on the loop) when the session may go on
    """

    format = ""

    def __init__(
        self,
        writer: AuditWriter,
        stem: str,
        *,
        block: bool,
        on_full: Callable[[], None],
        on_drained: Callable[[], None],
    ) -> None:
        self.writer = writer
        self.name = stem
        self.block = block
        self._on_full = on_full
        self._on_drained = on_drained
        self.loop = asyncio.get_running_loop()
        writer.loop = self.loop
        # Loop side.
        self.queued = 0  # handed to the writer and not yet written (changed under its lock)
        self._held = 0  # payload bytes collected and not yet handed over
        self._started_at = 0.0  # when the oldest of them arrived (loop time)
        self._timer: asyncio.TimerHandle | None = None
        self.blocked = False
        self.closed = False
        self.bytes = 0  # payload bytes accepted
        self.dropped = 0  # payload bytes left out (writer behind, on_overflow: drop)
        self._gap = 0  # dropped since the last accepted frame
        # Set by the session: where output goes before it is recorded.
        self.write_stdout: Callable[[memoryview], object] = _ignore
        self.write_stderr: Callable[[memoryview], object] = _ignore
        self._prepare()

    def _prepare(self) -> None:
        """Set up the format's own state (called at the end of ``__init__``)."""

    # -- loop side: the per-frame entry points ----------------------------

    def stdout(self, data: memoryview) -> None:
        """Output frame: to the client first, then into the recording."""
        self.write_stdout(data)
        self._take(0, data)

    def stderr(self, data: memoryview) -> None:
        self.write_stderr(data)
        self._take(1, data)

    def stdin(self, data: bytes) -> None:
        """Input from the client (only called with ``audit.record_input``)."""
        self._take(2, data)

    def _take(self, stream: int, data: Any) -> None:
        n = len(data)
        if self.queued + self._held + n > MAX_QUEUED or self.writer.queued_bytes > MAX_QUEUED_TOTAL:
            if not self.block:
                self.dropped += n
                self._gap += n
                return
            if not self.blocked:
                self._full()
        if self._held == 0:
            self._started_at = self.loop.time()
            if self._timer is None:
                self._timer = self.loop.call_later(FLUSH_DELAY, self._flush_due)
        if self._gap:
            self._note_gap()
        self._add(stream, data)
        self._held += n
        self.bytes += n
        if self._held >= CHUNK:
            self._flush(False)

    def resize(self, width: int, height: int) -> None:
        """The client's terminal changed size."""

    # -- loop side: chunks and backpressure -------------------------------

    def _add(self, stream: int, data: Any) -> None:
        raise NotImplementedError

    def _take_chunk(self, everything: bool) -> tuple[Any, int]:
        """What to hand to the writer, and its payload bytes: the full chunks, or
        (``everything``) all that is held. (None, 0) if there is nothing."""
        raise NotImplementedError

    def _note_gap(self) -> None:
        # Counted once per gap, not per dropped frame.
        metrics = self.writer.metrics
        if metrics is not None:
            metrics.audit_dropped_bytes.inc(self._gap)
        self._gap = 0

    def _flush_due(self) -> None:
        self._timer = None
        age = self.loop.time() - self._started_at
        if self._held and age < FLUSH_DELAY:
            # A busy stream fills its chunks by itself; handing over a part would cost
            # the writer an unaligned copy. Look again when the oldest byte is due.
            self._timer = self.loop.call_later(FLUSH_DELAY - age, self._flush_due)
            return
        self._flush(True)

    def _flush(self, everything: bool) -> None:
        if everything and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        chunk, nbytes = self._take_chunk(everything)
        self._held -= nbytes
        if self._held:
            self._started_at = self.loop.time()
        if chunk is not None:
            self.writer.submit(self, chunk, nbytes)

    def _full(self) -> None:
        # Pause first, then hand over what is held: the writer then has a job whose
        # completion sees ``blocked`` and wakes the session up once it has caught up.
        self.blocked = True
        self._on_full()
        self._flush(False)
        self.writer.submit(self, self._empty_chunk(), 0)

    def _empty_chunk(self) -> Any:
        raise NotImplementedError

    def _drained(self) -> None:
        if self.blocked:
            self.blocked = False
            if not self.closed:
                self._on_drained()

    def close(self) -> None:
        """The session ended: hand over the rest and finish the files."""
        if self.closed:
            return
        self.closed = True
        # Frames that still come (the stream is being aborted) reach the client only.
        self._take = _ignore_take  # type: ignore[method-assign]
        if self._gap:
            self._note_gap()
        self._flush(True)
        self.writer.submit(self, None, 0)
        self.blocked = False

    @property
    def files(self) -> list[str]:
        """The recording's file names (in the audit directory)."""
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """The ``recording`` field of the ``session.ended`` event."""
        return {
            "format": self.format,
            "files": self.files,
            "bytes": self.bytes,
            "dropped_bytes": self.dropped,
        }

    # -- writer thread side -----------------------------------------------

    def written(self, nbytes: int, dropped: int) -> None:
        with self.writer._cond:
            self.queued -= nbytes
            wake = self.blocked and self.queued <= MAX_QUEUED // 2
        if wake:
            self.writer.call_soon(self._drained)

    def write_chunks(self, writer: AuditWriter, chunks: list[Any]) -> int:
        raise NotImplementedError

    def finish(self, writer: AuditWriter) -> None:
        raise NotImplementedError

    def _open(self, writer: AuditWriter, suffix: str) -> int | None:
        path = writer.directory / f"{self.name}{suffix}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        except OSError as exc:
            writer.report(str(path), exc)
            return None


class CastRecording(Recording):
    """asciicast v2 of a pty session."""

    format = "asciicast-v2"

    def __init__(
        self,
        writer: AuditWriter,
        stem: str,
        *,
        width: int,
        height: int,
        term: str,
        command: str | None,
        block: bool,
        on_full: Callable[[], None],
        on_drained: Callable[[], None],
    ) -> None:
        super().__init__(writer, stem, block=block, on_full=on_full, on_drained=on_drained)
        self._start = self.loop.time()
        header: dict[str, Any] = {
            "version": 2,
            "width": width,
            "height": height,
            "timestamp": int(time.time()),
            "env": {"TERM": term},
        }
        if command is not None:
            header["command"] = command
        self._items: list[tuple[float, str, Any]] = []
        # Writer side.
        self._header = json.dumps(header).encode() + b"\n"
        self._fd: int | None = None
        self._failed = False
        self._decoders = {
            "o": codecs.getincrementaldecoder("utf-8")(errors="replace"),
            "i": codecs.getincrementaldecoder("utf-8")(errors="replace"),
        }
        self._last = 0.0
        self.writer.submit(self, [], 0)  # the header goes out at once

    def _add(self, stream: int, data: Any) -> None:
        self._items.append(
            (self.loop.time() - self._start, "i" if stream == 2 else "o", bytes(data))
        )

    def _take_chunk(self, everything: bool) -> tuple[Any, int]:
        items, self._items = self._items, []
        return (items, self._held) if items else (None, 0)

    def _empty_chunk(self) -> Any:
        return []

    def _note_gap(self) -> None:
        text = f"kuberun: {self._gap} bytes of this session were not recorded (disk too slow)"
        self._items.append((self.loop.time() - self._start, "m", text))
        super()._note_gap()

    def resize(self, width: int, height: int) -> None:
        if self.closed:
            return
        if self._timer is None:
            self._timer = self.loop.call_later(FLUSH_DELAY, self._flush_due)
        self._items.append((self.loop.time() - self._start, "r", f"{width}x{height}"))

    @property
    def files(self) -> list[str]:
        return [f"{self.name}.cast"]

    # -- writer thread side -----------------------------------------------

    def write_chunks(self, writer: AuditWriter, chunks: list[Any]) -> int:
        if self._failed:
            return 0
        lines = []
        if self._fd is None:
            self._fd = self._open(writer, ".cast")
            if self._fd is None:
                self._failed = True
                return 0
            lines.append(self._header)
        payload = 0
        # Output that arrives within COALESCE seconds goes into one event: a terminal
        # flooded with output would otherwise cost an event (decode, JSON) per frame.
        run: list[bytes] = []
        run_code, run_t = "", 0.0

        def end_run() -> None:
            if run:
                text = self._decoders[run_code].decode(b"".join(run))
                if text:
                    lines.append(_event_line(run_t, run_code, text))
                run.clear()

        for chunk in chunks:
            for t, code, data in chunk:
                self._last = t
                if code in self._decoders:
                    payload += len(data)
                    if run and code == run_code and t - run_t < COALESCE:
                        run.append(data)
                        continue
                    end_run()
                    run_code, run_t = code, t
                    run.append(data)
                else:
                    end_run()
                    lines.append(_event_line(t, code, data))
        end_run()
        try:
            write_all(self._fd, b"".join(lines))
        except OSError as exc:
            writer.report(str(writer.directory / self.files[0]), exc)
            return 0
        return payload

    def finish(self, writer: AuditWriter) -> None:
        if self._fd is None and not self._failed:
            self.write_chunks(writer, [])
        if self._fd is None:
            return
        try:
            tail = [
                _event_line(self._last, code, text)
                for code, decoder in self._decoders.items()
                if (text := decoder.decode(b"", final=True))
            ]
            if tail:
                write_all(self._fd, b"".join(tail))
        except OSError as exc:
            writer.report(str(writer.directory / self.files[0]), exc)
        finally:
            os.close(self._fd)
            self._fd = None


def _event_line(t: float, code: str, text: str) -> bytes:
    # ensure_ascii=False as asciinema writes; the decoders never yield lone surrogates.
    return f"[{t:.6f}, {json.dumps(code)}, {json.dumps(text, ensure_ascii=False)}]\n".encode()


class RawRecording(Recording):
    """The raw bytes of a non-pty session: one file per stream that carried any."""

    format = "raw"

    def _prepare(self) -> None:
        # Per stream: the page-aligned buffer being filled and how far; full buffers
        # wait in _ready. The writer writes them with O_DIRECT and gives them back.
        self._views: list[memoryview | None] = [None, None, None]
        self._pos = [0, 0, 0]
        self._ready: list[tuple[int, memoryview, int]] = []
        self._seen = [False, False, False]
        # Writer side.
        self._files: list[AppendFile | None] = [None, None, None]
        self._failed = [False, False, False]

    def _add(self, stream: int, data: Any) -> None:
        self._seen[stream] = True
        while True:
            view = self._views[stream]
            if view is None:
                view = self._views[stream] = self.writer.buffer()
            pos = self._pos[stream]
            n = len(data)
            end = pos + n
            if end < CHUNK:
                view[pos:end] = data
                self._pos[stream] = end
                return
            k = CHUNK - pos
            view[pos:] = data[:k]
            self._ready.append((stream, view, CHUNK))
            self._views[stream] = None
            self._pos[stream] = 0
            if k == n:
                return
            data = data[k:]

    def _take_chunk(self, everything: bool) -> tuple[Any, int]:
        chunk, self._ready = self._ready, []
        if everything:
            for stream in range(3):
                view, pos = self._views[stream], self._pos[stream]
                if view is not None and pos:
                    chunk.append((stream, view, pos))
                    self._views[stream] = None
                    self._pos[stream] = 0
        if not chunk:
            return None, 0
        return chunk, sum(length for _, _, length in chunk)

    def _empty_chunk(self) -> Any:
        return []

    @property
    def files(self) -> list[str]:
        return [f"{self.name}.{_STREAMS[i]}" for i in range(3) if self._seen[i]]

    # -- writer thread side -----------------------------------------------

    def write_chunks(self, writer: AuditWriter, chunks: list[Any]) -> int:
        streams: list[list[tuple[memoryview, int]]] = [[], [], []]
        for chunk in chunks:
            for stream, view, length in chunk:
                streams[stream].append((view, length))
        written = 0
        for stream, pieces in enumerate(streams):
            if not pieces:
                continue
            try:
                written += self._write_stream(writer, stream, pieces)
            finally:
                for view, _ in pieces:
                    writer.recycle(view)
        return written

    def _write_stream(
        self, writer: AuditWriter, stream: int, pieces: list[tuple[memoryview, int]]
    ) -> int:
        if self._failed[stream]:
            return 0
        path = writer.directory / f"{self.name}.{_STREAMS[stream]}"
        try:
            file = self._files[stream]
            if file is None:
                file = self._files[stream] = AppendFile(path)
            file.write([view[:length] for view, length in pieces])
        except OSError as exc:
            writer.report(str(path), exc)
            if self._files[stream] is None:
                self._failed[stream] = True
            return 0
        return sum(length for _, length in pieces)

    def finish(self, writer: AuditWriter) -> None:
        for i, file in enumerate(self._files):
            if file is not None:
                self._files[i] = None
                file.close()


def _ignore(data: memoryview) -> None:
    pass


def _ignore_take(stream: int, data: Any) -> None:
    pass
