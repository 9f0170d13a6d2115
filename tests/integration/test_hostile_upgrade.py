"""A hostile API server during the exec upgrade: crafted HTTP response heads.

A plain TCP server answers kuberun's upgrade request with scripted bytes. Every
answer must end in a :class:`CommandStartError` with a message (or, after a
valid 101, in an exec result with an error), within the open timeout, and
nothing may reach the event loop's exception handler.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from kubernetes_asyncio.client import Configuration

from kuberun.errors import CommandStartError, ExecProtocolError
from kuberun.execstream import ExecConnector, ExecResult

Script = Callable[[bytes], list[bytes]]


def _accept(request: bytes) -> str:
    for line in request.split(b"\r\n"):
        if line.lower().startswith(b"sec-websocket-key:"):
            key = line.split(b":", 1)[1].strip()
            digest = hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
            return base64.b64encode(digest).decode()
    raise AssertionError("no Sec-WebSocket-Key")


def _switch(
    request: bytes, protocol: str = "v5.channel.k8s.io", accept: str | None = None
) -> bytes:
    return (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept or _accept(request)}\r\n"
        f"Sec-WebSocket-Protocol: {protocol}\r\n\r\n"
    ).encode()


def _frame(payload: bytes, first: int = 0x82) -> bytes:
    assert len(payload) < 126
    return bytes((first, len(payload))) + payload


SUCCESS = _frame(b'\x03{"metadata":{},"status":"Success"}')

#: name -> (script: request -> chunks to send, then close; expected words in the error)
CASES: dict[str, tuple[Script, str]] = {
    "unicode_content_length": (
        lambda r: [b"HTTP/1.1 500 Oops\r\nContent-Length: \xb2\r\n\r\nshort body"],
        "short body",
    ),
    "endless_content_length": (
        lambda r: [b"HTTP/1.1 500 Oops\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\nbody"],
        "(500)",
    ),
    "nested_json_body": (
        lambda r: [b"HTTP/1.1 400 Bad\r\nContent-Length: 60000\r\n\r\n" + b"[" * 60000],
        "(400)",
    ),
    "unicode_status_code": (lambda r: [b"HTTP/1.1 \xb2\xb2\xb2 Odd\r\n\r\n"], "status code"),
    "not_http": (lambda r: [b"SSH-2.0-OpenSSH_9.6\r\n\r\n"], "status line"),
    "bad_header_line": (lambda r: [b"HTTP/1.1 101 X\r\nno colon here\r\n\r\n"], "header"),
    "oversized_head": (
        lambda r: [b"HTTP/1.1 101 X\r\n"] + [b"X-Pad: " + b"a" * 1000 + b"\r\n"] * 80,
        "oversized",
    ),
    "bad_accept": (lambda r: [_switch(r, accept="AAAA")], "Sec-WebSocket-Accept"),
    "wrong_subprotocol": (lambda r: [_switch(r, protocol="v9.evil")], "subprotocol"),
    "closed_at_once": (lambda r: [], "closed the connection during the upgrade"),
    "closed_mid_head": (lambda r: [b"HTTP/1.1 101 Swi"], "during the upgrade"),
    "endless_body": (
        lambda r: [b"HTTP/1.1 500 Oops\r\n\r\n"] + [b"z" * 8192] * 20,
        "(500)",
    ),
    "json_message": (
        lambda r: [
            b'HTTP/1.1 403 Forbidden\r\nContent-Length: 37\r\n\r\n{"message":"' + b"m" * 23 + b'"}'
        ],
        "m" * 23,
    ),
}


class Recorder:
    """An ExecListener that keeps everything."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.results: list[ExecResult] = []
        self.exec_stdout = self.out.extend
        self.exec_stderr = self.out.extend

    def exec_pause_input(self) -> None:
        pass

    def exec_resume_input(self) -> None:
        pass

    def exec_finished(self, result: ExecResult) -> None:
        self.results.append(result)


class FakeServer:
    def __init__(self) -> None:
        self.script: Script = lambda r: []
        self.drip = False
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            for chunk in self.script(request):
                if self.drip:
                    for i in range(len(chunk)):
                        writer.write(chunk[i : i + 1])
                        await writer.drain()
                else:
                    writer.write(chunk)
                    await writer.drain()
            await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeServer, ExecConnector, list[dict[str, Any]]]]:
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    server = FakeServer()
    await server.start()
    conf = Configuration(host=f"http://127.0.0.1:{server.port}")
    conf.api_key = {"BearerToken": "secret-token"}
    conf.api_key_prefix = {"BearerToken": "Bearer"}
    try:
        yield server, ExecConnector(conf, ping_interval=0), seen
    finally:
        assert server.server is not None
        server.server.close()
        await server.server.wait_closed()
        loop.set_exception_handler(previous)


async def _open(connector: ExecConnector, listener: Recorder, timeout: float = 1.0) -> Any:
    # Refusals with 429/5xx are retried until the timeout: keep it short.
    return await connector.open("ns", "pod", "c", ["sh"], listener, timeout=timeout)


@pytest.mark.parametrize("case", sorted(CASES))
async def test_refused_upgrades_end_with_a_message(
    fake: tuple[FakeServer, ExecConnector, list[dict[str, Any]]], case: str
) -> None:
    server, connector, seen = fake
    server.script, words = CASES[case]
    listener = Recorder()
    with pytest.raises(CommandStartError) as info:
        await _open(connector, listener)
    assert words in str(info.value)
    # The opener alone hears of it: a session must not also be told "stream lost".
    await asyncio.sleep(0.05)
    assert not listener.results
    assert "did not start within" not in str(info.value)
    await asyncio.sleep(0.1)
    assert not seen, seen


async def test_head_dripped_byte_by_byte(
    fake: tuple[FakeServer, ExecConnector, list[dict[str, Any]]],
) -> None:
    server, connector, seen = fake
    server.script = lambda r: [_switch(r) + _frame(b"\x01hello") + SUCCESS]
    server.drip = True
    listener = Recorder()
    stream = await _open(connector, listener)
    result = await asyncio.wait_for(stream.wait(), 10)
    assert result == ExecResult(0)
    assert bytes(listener.out) == b"hello"
    assert not seen, seen


async def test_violation_in_the_same_packet_as_the_101(
    fake: tuple[FakeServer, ExecConnector, list[dict[str, Any]]],
) -> None:
    server, connector, seen = fake
    masked = bytes((0x82, 0x86)) + b"\0\0\0\0" + b"\x01hello"
    server.script = lambda r: [_switch(r) + _frame(b"\x01ok") + masked]
    listener = Recorder()
    stream = await _open(connector, listener)
    result = await asyncio.wait_for(stream.wait(), 10)
    assert isinstance(result.error, ExecProtocolError), result
    assert bytes(listener.out) == b"ok"
    assert listener.results == [result]
    await asyncio.sleep(0.1)
    assert not seen, seen


async def test_never_answers_times_out(
    fake: tuple[FakeServer, ExecConnector, list[dict[str, Any]]],
) -> None:
    _, _, seen = fake
    never = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await never.wait()
        writer.close()

    quiet = await asyncio.start_server(silent, "127.0.0.1", 0)
    conf = Configuration(host=f"http://127.0.0.1:{quiet.sockets[0].getsockname()[1]}")
    try:
        with pytest.raises(CommandStartError, match="did not start within"):
            await ExecConnector(conf, ping_interval=0).open(
                "ns", "pod", "c", ["sh"], Recorder(), timeout=0.5
            )
    finally:
        never.set()
        quiet.close()
        await quiet.wait_closed()
    assert not seen, seen


async def test_transient_refusals_are_retried(
    fake: tuple[FakeServer, ExecConnector, list[dict[str, Any]]],
) -> None:
    server, connector, seen = fake
    answers = [
        [b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n"],
        [b"HTTP/1.1 503 Unavailable\r\nContent-Length: 4\r\n\r\nbusy"],
        [],  # closed during the upgrade
    ]
    calls = 0

    def script(request: bytes) -> list[bytes]:
        nonlocal calls
        calls += 1
        if answers:
            return answers.pop(0)
        return [_switch(request) + _frame(b"\x01third time lucky") + SUCCESS]

    server.script = script
    listener = Recorder()
    stream = await _open(connector, listener, timeout=20)
    assert (await asyncio.wait_for(stream.wait(), 10)) == ExecResult(0)
    assert bytes(listener.out) == b"third time lucky" and calls == 4
    assert not seen, seen


async def test_permanent_refusals_are_not_retried(
    fake: tuple[FakeServer, ExecConnector, list[dict[str, Any]]],
) -> None:
    server, connector, _ = fake
    calls = 0

    def script(request: bytes) -> list[bytes]:
        nonlocal calls
        calls += 1
        return [b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"]

    server.script = script
    with pytest.raises(CommandStartError, match=r"\(404\)") as info:
        await _open(connector, Recorder(), timeout=20)
    assert calls == 1 and info.value.status == 404 and not info.value.transient
