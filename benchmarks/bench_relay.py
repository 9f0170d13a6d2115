"""Relay codec benchmarks: parse + demultiplex exec output, and stdin encode + mask.

``test_demux`` parses a stream of stdout frames (``size`` payload bytes each,
channel byte included), cut into 64 KiB reads as a socket would deliver them,
into a sink that copies every payload once, as asyncssh's ``SSHServerChannel.write``
does (``bytearray(data)``). Implementations (``impl``):

* ``cython`` / ``python``: kuberun's ``ExecDecoder.feed``.
* ``aiohttp``: the baseline a kubernetes-asyncio user gets, minus the event loop:
  aiohttp's compiled ``WebSocketReader`` fed with ``feed_data``, messages taken
  straight off its queue's deque (no ``await ws.receive()``, so the baseline is
  flattered), then ``msg.data[0]`` / ``msg.data[1:]`` into the same sink.

Run: ``make bench`` (see benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

STREAM_BYTES = 4 * 1024 * 1024
READ_SIZE = 65536


class CopySink:
    """Copies each payload once and drops it, like asyncssh's ``write`` (minus the send)."""

    __slots__ = ()

    def on_stdout(self, data: Any) -> None:
        bytearray(data)

    def on_stderr(self, data: Any) -> None:
        bytearray(data)

    def on_status(self, data: bytes) -> None:
        pass

    def on_ping(self, payload: bytes) -> None:
        pass

    def on_close(self, code: int | None, reason: str) -> None:
        pass


def _frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x82, n))
    elif n < 0x10000:
        head = bytes((0x82, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x82, 127)) + n.to_bytes(8, "big")
    return head + payload


def _reads(size: int) -> tuple[list[bytes], int]:
    """The stream for ``size``-byte frames, cut into READ_SIZE reads, and its payload bytes."""
    body = bytes(i * 31 & 0xFF for i in range(size - 1))
    count = max(1, STREAM_BYTES // size)
    stream = _frame(b"\x01" + body) * count
    return [stream[i : i + READ_SIZE] for i in range(0, len(stream), READ_SIZE)], count * (size - 1)


def _load(impl: str) -> ModuleType:
    name = {"cython": "kuberun._relay", "python": "kuberun._relay_py"}[impl]
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if os.environ.get("KUBERUN_REQUIRE_EXTENSIONS", "") not in ("", "0"):
            raise
        pytest.skip(f"{name} not built: {exc}")


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _aiohttp_runner(loop: asyncio.AbstractEventLoop) -> tuple[Callable[..., None], Any]:
    from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
    from aiohttp.base_protocol import BaseProtocol

    if WebSocketReader.__module__.endswith("reader_py"):
        pytest.skip("aiohttp's compiled WebSocket reader is not available")

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        # A limit far above the stream size: the reader never stalls, the loop never runs.
        queue = WebSocketDataQueue(BaseProtocol(loop), 2**30, loop=loop)
        reader = WebSocketReader(queue, max_msg_size=2**24, compress=False, decode_text=False)
        return (reader, queue), {}

    def run(reader: Any, queue: Any, chunks: list[bytes], sink: CopySink) -> None:
        feed = reader.feed_data
        pending = queue._buffer
        popleft = pending.popleft
        on_stdout = sink.on_stdout
        on_stderr = sink.on_stderr
        for chunk in chunks:
            feed(chunk)
            while pending:
                msg, _ = popleft()
                data = msg.data
                if len(data) > 1:
                    chan = data[0]
                    if chan == 1:
                        on_stdout(data[1:])
                    elif chan == 2:
                        on_stderr(data[1:])

    return run, setup


@pytest.mark.parametrize("size", [64, 4096, 65536])
@pytest.mark.parametrize("impl", ["cython", "python", "aiohttp"])
def test_demux(benchmark: Any, impl: str, size: int, loop: asyncio.AbstractEventLoop) -> None:
    chunks, payload = _reads(size)
    sink = CopySink()
    benchmark.group = f"demux-{size}"
    benchmark.extra_info["stream_bytes"] = sum(map(len, chunks))
    benchmark.extra_info["payload_bytes"] = payload
    rounds = 5 if impl == "python" else 20

    if impl == "aiohttp":
        run_aiohttp, setup = _aiohttp_runner(loop)

        def target(reader: Any, queue: Any) -> None:
            run_aiohttp(reader, queue, chunks, sink)

        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1)
        return

    relay = _load(impl)

    def setup_decoder() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (relay.ExecDecoder(sink).feed,), {}

    def run(feed: Callable[[bytes], None]) -> None:
        for chunk in chunks:
            feed(chunk)

    benchmark.pedantic(run, setup=setup_decoder, rounds=rounds, warmup_rounds=1)


# ``size`` is a parameter so ``--benchmark-group-by=param:size`` (``make bench``) works.
@pytest.mark.parametrize("size", [65536])
@pytest.mark.parametrize("impl", ["cython", "python"])
def test_stdin_encode(benchmark: Any, impl: str, size: int) -> None:
    relay = _load(impl)
    enc = relay.ExecEncoder()
    data = os.urandom(size)
    benchmark.group = "stdin-encode-64KiB"
    benchmark.extra_info["bytes"] = len(data)
    out = benchmark(enc.stdin, data)
    assert len(out) == size + 1 + 14


# What the exec stream does with the SSH packets of one read (asyncssh delivers
# 32 KiB packets one by one): frame two of them as one 64 KiB message. `join`
# is the copy-then-mask way; `gather` masks each packet straight into the frame.
@pytest.mark.parametrize("size", [65536])
@pytest.mark.parametrize("way", ["join", "gather"])
def test_stdin_two_packets(benchmark: Any, way: str, size: int) -> None:
    enc = _load("cython").ExecEncoder()
    packets = [os.urandom(size // 2), os.urandom(size // 2)]
    benchmark.group = "stdin-two-packets-64KiB"
    benchmark.extra_info["bytes"] = size
    if way == "join":
        out = benchmark(lambda: enc.stdin(b"".join(packets)))
    else:
        out = benchmark(enc.stdin_many, packets)
    assert len(out) == size + 1 + 14
