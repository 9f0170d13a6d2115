"""ExecStream without a network: how SSH stdin becomes WebSocket writes (keystrokes at
once, bulk grouped), and what a failed upgrade leaves behind.

A recording transport stands in for the TLS connection, and the writes are parsed
back into client frames.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from kuberun.execstream import ExecStream
from kuberun.session import _Discard  # the project's output-dropping listener
from kuberun.upgrade import accept_key, new_key
from tests.unit.test_relay_encoder import parse_client_frames


class _Transport:
    """Records writes; enough of asyncio.Transport for ExecStream's stdin path."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _stream() -> tuple[ExecStream, _Transport]:
    stream = ExecStream(_Discard(), "key", ping_interval=0)
    transport = _Transport()
    stream.connection_made(transport)  # type: ignore[arg-type]
    stream.protocol = "v5.channel.k8s.io"
    return stream, transport


def _stdin_of(write: bytes) -> list[bytes]:
    """The stdin data of each message in one write (channel byte checked and dropped)."""
    frames = parse_client_frames(write)
    assert all(op == 0x2 and p[:1] == b"\x00" for op, _, p in frames)
    return [p[1:] for _, _, p in frames]


async def _next_iteration() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_a_keystroke_goes_out_at_once() -> None:
    stream, transport = _stream()
    stream.write_stdin(b"x")
    assert [_stdin_of(w) for w in transport.writes] == [[b"x"]]  # before the loop runs again
    stream.write_stdin(b"y")
    stream.write_stdin(b"z")
    assert len(transport.writes) == 1  # the rest of the iteration waits ...
    await _next_iteration()
    assert [_stdin_of(w) for w in transport.writes] == [[b"x"], [b"yz"]]  # ... and goes together


async def test_bulk_packets_of_one_read_go_out_in_64k_messages() -> None:
    stream, transport = _stream()
    packets = [bytes([i]) * 32768 for i in range(8)]  # one 256 KiB read as asyncssh hands it over
    for packet in packets:
        stream.write_stdin(packet)
    assert transport.writes == []  # a big first write waits for the others
    await _next_iteration()
    messages = [_stdin_of(w) for w in transport.writes]
    assert messages == [[packets[i] + packets[i + 1]] for i in range(0, 8, 2)]
    assert stream.stdin_bytes == 8 * 32768


async def test_order_holds_with_control_messages() -> None:
    stream, transport = _stream()
    stream.write_stdin(b"a" * 5000)  # held
    stream.write_stdin(b"b")
    stream.resize(100, 40)  # sends the held stdin first
    stream.write_stdin(b"c")
    stream.close_stdin()
    stream.write_stdin(b"ignored after EOF")
    await _next_iteration()
    frames = [f for w in transport.writes for f in parse_client_frames(w)]
    payloads = [p for _, _, p in frames]
    assert payloads == [
        b"\x00" + b"a" * 5000 + b"b",
        b'\x04{"Width":100,"Height":40}\n',
        b"\x00c",
        b"\xff\x00",
    ]


async def test_a_failed_upgrade_nobody_awaits_stays_quiet() -> None:
    """The opener was cancelled (client gone, timeout) before the API server hung up:
    the upgrade's failure must not reach the loop's exception handler."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        stream, _transport = _stream()
        stream.connection_lost(None)  # closed during the upgrade, no one waiting
        del stream, _transport
        await _next_iteration()
        gc.collect()
        await _next_iteration()
    finally:
        loop.set_exception_handler(None)
    assert seen == []


async def test_an_upgrade_arriving_after_the_opener_gave_up_is_dropped() -> None:
    """The 101 comes just after the opener was cancelled (which cancels the future it
    awaited): the stream must neither raise inside the protocol callback nor start."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    aborted: list[bool] = []
    try:
        stream = ExecStream(_Discard(), new_key(), ping_interval=0)
        transport = _Transport()
        transport.abort = lambda: aborted.append(True)  # type: ignore[attr-defined]
        stream.connection_made(transport)  # type: ignore[arg-type]
        stream._upgraded.cancel()
        head = (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(stream._key)}\r\n"
            "Sec-WebSocket-Protocol: v5.channel.k8s.io\r\n\r\n"
        ).encode()
        buf = stream.get_buffer(-1)
        buf[: len(head)] = head
        stream.buffer_updated(len(head))
        await _next_iteration()
    finally:
        loop.set_exception_handler(None)
    assert seen == [] and aborted == [True]
    assert stream.protocol == "" and not stream.finished


class _Closable(_Transport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _pings(transport: _Transport) -> int:
    return sum(op == 0x9 for w in transport.writes for op, _, _ in parse_client_frames(w))


async def test_pings_only_after_a_silent_interval_and_never_while_paused() -> None:
    # Anything sent to a node that has just ended the exec can make it reset the
    # connection and lose the end of the output: no ping while output arrives (it
    # proves the connection lives) or while it is paused (a backed-up node).
    stream = ExecStream(_Discard(), "key", ping_interval=3600)
    transport = _Closable()
    stream.connection_made(transport)  # type: ignore[arg-type]
    stream.protocol = "v5.channel.k8s.io"
    stream._decoder = stream._new_decoder(stream.protocol)
    frame = bytes([0x82, 4]) + b"\x01out"  # a server's stdout message

    def receive() -> None:
        buf = stream.get_buffer(len(frame))
        buf[: len(frame)] = frame
        stream.buffer_updated(len(frame))

    try:
        for _ in range(3):  # output flows: no pings
            receive()
            stream._ping_tick()
        assert _pings(transport) == 0
        stream.pause_output()
        for _ in range(3):  # paused for several intervals: still none, and no failure
            stream._ping_tick()
        assert _pings(transport) == 0 and not stream.finished
        stream.resume_output()
        stream._ping_tick()  # the interval after resuming counts as heard from
        stream._ping_tick()  # a silent interval: one ping
        assert _pings(transport) == 1
        receive()  # the pong (or anything) answers it
        stream._ping_tick()
        stream._ping_tick()  # silent again: a second ping
        assert _pings(transport) == 2 and not stream.finished
        stream._ping_tick()  # nothing for a whole interval after it: the stream is lost
        assert stream.finished
        result = await stream.wait()
        assert result.error is not None and "stopped answering" in str(result.error)
    finally:
        stream._cancel_ping()
