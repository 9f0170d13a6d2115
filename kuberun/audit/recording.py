"""Session recordings: asciicast v2 for pty sessions, raw byte streams for the others.

A recording object has two sides, kept apart:

* the **event-loop side** is handed each output frame by the relay (the
  session's ``exec_stdout``/``exec_stderr`` become :meth:`Recording.stdout` /
  :meth:`Recording.stderr`, which write to the SSH channel first). Per frame it
  only copies the bytes into the chunk being collected and counts them: no
  await, no lock, no logging, no system call. A chunk goes to the writer thread
  when it reaches :data:`~kuberun.audit.writer.CHUNK` bytes or
  :data:`FLUSH_DELAY` seconds after its first byte;
* the **writer-thread side** (:meth:`write_chunk`, :meth:`finish`) turns chunks
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
  text cannot hold, and far cheaper to write.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .writer import CHUNK, AuditWriter, write_all, writev_all

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
        self._held = 0  # payload bytes in the chunk being collected
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
            self._timer = self.loop.call_later(FLUSH_DELAY, self._flush)
        if self._gap:
            self._note_gap()
        self._add(stream, data)
        self._held += n
        self.bytes += n
        if self._held >= CHUNK:
            self._flush()

    def resize(self, width: int, height: int) -> None:
        """The client's terminal changed size."""

    # -- loop side: chunks and backpressure -------------------------------

    def _add(self, stream: int, data: Any) -> None:
        raise NotImplementedError

    def _take_chunk(self) -> Any:
        """The chunk collected so far (and start a new one)."""
        raise NotImplementedError

    def _note_gap(self) -> None:
        # Counted once per gap, not per dropped frame.
        metrics = self.writer.metrics
        if metrics is not None:
            metrics.audit_dropped_bytes.inc(self._gap)
        self._gap = 0

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        chunk = self._take_chunk()
        nbytes, self._held = self._held, 0
        if chunk is not None:
            self.writer.submit(self, chunk, nbytes)

    def _full(self) -> None:
        # Pause first, then hand over what is held: the writer then has a job whose
        # completion sees ``blocked`` and wakes the session up once it has caught up.
        self.blocked = True
        self._on_full()
        self._flush()
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
        self._flush()
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

    def _take_chunk(self) -> Any:
        items, self._items = self._items, []
        return items if items else None

    def _empty_chunk(self) -> Any:
        return []

    def _note_gap(self) -> None:
        text = f"kuberun: {self._gap} bytes of this session were not recorded (disk too slow)"
        self._items.append((self.loop.time() - self._start, "m", text))
        super()._note_gap()

    def resize(self, width: int, height: int) -> None:
        if self.closed:
            return
        if self._held == 0 and self._timer is None:
            self._timer = self.loop.call_later(FLUSH_DELAY, self._flush)
        self._items.append((self.loop.time() - self._start, "r", f"{width}x{height}"))

    def _flush(self) -> None:
        if self._held == 0 and self._items:
            # Only resizes or markers: no payload, but they must still go out.
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            items, self._items = self._items, []
            self.writer.submit(self, items, 0)
            return
        super()._flush()

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
        for chunk in chunks:
            for t, code, data in chunk:
                self._last = t
                if code in self._decoders:
                    payload += len(data)
                    data = self._decoders[code].decode(data)
                    if not data:
                        continue
                lines.append(_event_line(t, code, data))
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
        self._bufs = [bytearray(), bytearray(), bytearray()]
        self._seen = [False, False, False]
        # Writer side.
        self._fds: list[int | None] = [None, None, None]
        self._failed = [False, False, False]

    def _add(self, stream: int, data: Any) -> None:
        self._bufs[stream] += data
        self._seen[stream] = True

    def _take_chunk(self) -> Any:
        bufs = self._bufs
        if not (bufs[0] or bufs[1] or bufs[2]):
            return None
        chunk = [(i, buf) for i, buf in enumerate(bufs) if buf]
        self._bufs = [bytearray() if buf else buf for buf in bufs]
        return chunk

    def _empty_chunk(self) -> Any:
        return []

    @property
    def files(self) -> list[str]:
        return [f"{self.name}.{_STREAMS[i]}" for i in range(3) if self._seen[i]]

    # -- writer thread side -----------------------------------------------

    def write_chunks(self, writer: AuditWriter, chunks: list[Any]) -> int:
        streams: list[list[bytearray]] = [[], [], []]
        for chunk in chunks:
            for stream, data in chunk:
                streams[stream].append(data)
        written = 0
        for stream, buffers in enumerate(streams):
            if not buffers or self._failed[stream]:
                continue
            fd = self._fds[stream]
            if fd is None:
                fd = self._fds[stream] = self._open(writer, "." + _STREAMS[stream])
                if fd is None:
                    self._failed[stream] = True
                    continue
            try:
                writev_all(fd, buffers)
            except OSError as exc:
                writer.report(str(Path(writer.directory) / f"{self.name}.{_STREAMS[stream]}"), exc)
                continue
            written += sum(len(b) for b in buffers)
        return written

    def finish(self, writer: AuditWriter) -> None:
        for i, fd in enumerate(self._fds):
            if fd is not None:
                self._fds[i] = None
                try:
                    os.close(fd)
                except OSError:
                    pass


def _ignore(data: memoryview) -> None:
    pass


def _ignore_take(stream: int, data: Any) -> None:
    pass
