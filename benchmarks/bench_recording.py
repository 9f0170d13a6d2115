"""Session recording costs, piece by piece (pytest-benchmark; ``make bench``).

* ``test_record_frame``: the event-loop side of a raw recording: one 32 KiB output
  frame copied into the chunk being collected (what the relay pays per frame with
  ``recordings: all``); full chunks are handed straight back, no thread involved.
* ``test_cast_encode``: the writer-thread side of an asciicast recording: 1 MiB of
  terminal text (colour escapes, UTF-8) in 4 KiB frames decoded and turned into
  ``o`` event lines (written to ``/dev/null``).

The gateway-level figure (download CPU with recordings none/pty/all, side by side)
is the audit phase of ``make bench-e2e``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kuberun.audit import Audit, AuditWriter
from kuberun.audit.recording import CastRecording, RawRecording
from kuberun.config import AuditConfig

MiB = 1 << 20


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _make(loop: asyncio.AbstractEventLoop, factory: Any) -> Any:
    async def build() -> Any:
        return factory()

    return loop.run_until_complete(build())


def test_record_frame(benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    audit = Audit(AuditConfig(str(tmp_path), recordings="all"))
    writer = audit.writer
    assert writer is not None

    def recycle(rec: Any, chunk: Any, nbytes: int) -> None:
        for _, view, _ in chunk:
            writer.recycle(view)

    writer.submit = recycle  # type: ignore[method-assign,assignment]
    rec = _make(
        loop, lambda: RawRecording(writer, "b", block=False, on_full=print, on_drained=print)
    )
    frame = memoryview(os.urandom(32768))
    benchmark.extra_info["bytes"] = len(frame)
    benchmark(rec.stdout, frame)
    loop.run_until_complete(audit.close())


def test_cast_encode(benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    writer = AuditWriter(tmp_path)
    rec = _make(
        loop,
        lambda: CastRecording(
            writer,
            "b",
            width=80,
            height=24,
            term="xterm",
            command=None,
            block=False,
            on_full=print,
            on_drained=print,
        ),
    )
    line = "\x1b[32m%06d\x1b[0m naïve café λ→ 🍕 " + "x" * 40 + "\r\n"
    text = "".join(line % i for i in range(20000)).encode()[:MiB]
    items = [(i / 1000, "o", text[i : i + 4096]) for i in range(0, len(text), 4096)]
    writer.close()
    rec._fd = os.open(os.devnull, os.O_WRONLY)
    benchmark.extra_info["bytes"] = len(text)
    benchmark(rec.write_chunks, writer, [items])
    os.close(rec._fd)
