"""The port-forward WebSocket, byte for byte: negotiation, refusals, headers, the
base64 variant, a Pod-side close, a client close."""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
from collections.abc import AsyncIterator, Callable

import pytest

from kuberun.devcluster import DevCluster

from .conftest import Api, RawWebSocket, pod

PF = "/api/v1/namespaces/default/pods/web/portforward"
V4 = "v4.channel.k8s.io"


@pytest.fixture
async def web(api: Api) -> Api:
    await api.create_pod(pod("web"))
    await api.running("web")
    return api


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A local server (devcluster Pods share the host's network): answers each
    connection with 'hello', records what it reads until EOF, then closes."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        received.append(await reader.read())
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield srv.sockets[0].getsockname()[1], received
    srv.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _until(cond: Callable[[], bool], timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def header(channel: int, port: int) -> tuple[int, bytes]:
    return 0x2, bytes((channel,)) + struct.pack("<H", port)


@pytest.mark.parametrize(
    ("offer", "chosen"),
    [
        (["v5.channel.k8s.io, v4.channel.k8s.io"], V4),
        (["SPDY/3.1+portforward.k8s.io, v4.base64.channel.k8s.io"], "v4.base64.channel.k8s.io"),
        (None, None),
    ],
)
async def test_negotiation(
    web: Api,
    cluster: DevCluster,
    server: tuple[int, list[bytes]],
    offer: list[str] | None,
    chosen: str | None,
) -> None:
    port, _ = server
    ws = await RawWebSocket.connect(cluster, PF, [("ports", str(port))], offer)
    assert ws.status == 101
    assert ws.headers.get("sec-websocket-protocol") == chosen
    await ws.close()


@pytest.mark.parametrize(
    ("params", "protocols", "status", "body"),
    [
        ([], [V4], 400, b'query parameter "port" is required'),
        ([("ports", "0")], [V4], 400, b'port "0" must be > 0'),
        ([("ports", "70000")], [V4], 400, b'unable to parse "70000" as a port: invalid syntax'),
        ([("ports", "80")], ["v5.channel.k8s.io"], 403, b""),
        ([("ports", "80")], ["portforward.k8s.io"], 403, b""),
    ],
)
async def test_refusals(
    web: Api,
    cluster: DevCluster,
    params: list[tuple[str, str]],
    protocols: list[str],
    status: int,
    body: bytes,
) -> None:
    ws = await RawWebSocket.connect(cluster, PF, params, protocols)
    assert (ws.status, ws.body.strip()) == (status, body)
    await ws.close()


async def test_unknown_pod_is_404(web: Api, cluster: DevCluster) -> None:
    ws = await RawWebSocket.connect(
        cluster, "/api/v1/namespaces/default/pods/nope/portforward", [("ports", "80")], [V4]
    )
    assert ws.status == 404
    await ws.close()


async def test_pod_side_close_delivers_everything_then_closes(
    web: Api, cluster: DevCluster, server: tuple[int, list[bytes]]
) -> None:
    port, received = server
    refused = closed_port()
    ws = await RawWebSocket.connect(cluster, PF, [("ports", f"{port},{refused}")], [V4])
    assert ws.status == 101
    # Headers first, in port order, before anything else.
    assert [await ws.frame() for _ in range(4)] == [
        (*header(0, port), b"\x82\x03"),
        (*header(1, port), b"\x82\x03"),
        (*header(2, refused), b"\x82\x03"),
        (*header(3, refused), b"\x82\x03"),
    ]
    # The dials happen at once: the refusal arrives, and the greeting, unasked.
    by_channel: dict[int, bytes] = {}
    while not (by_channel.get(0) == b"hello" and 3 in by_channel):
        opcode, payload, _ = await ws.frame()
        assert opcode == 0x2
        by_channel[payload[0]] = by_channel.get(payload[0], b"") + payload[1:]
    error = by_channel[3].decode()
    assert error.startswith(f"error forwarding port {refused} to pod ")
    assert f"dial tcp4 127.0.0.1:{refused}: connect: connection refused" in error
    ws.send(b"\x00abc")  # no port prefix from the client
    ws.send(b"\x01ignored")  # an error channel: ignored
    ws.send(b"\x09ignored")  # past the ports: ignored
    ws.send(b"\x00")  # empty: ignored
    ws.send(b"", opcode=0x8)  # Close: the connection gets EOF
    messages, _ = await ws.messages_until_close()
    assert messages == []
    # The client's Close is answered at once; the connection is closed a second later.
    await _until(lambda: received == [b"abc"])
    await ws.close()


async def test_base64_variant(
    web: Api, cluster: DevCluster, server: tuple[int, list[bytes]]
) -> None:
    port, received = server
    ws = await RawWebSocket.connect(
        cluster, PF, [("ports", str(port))], ["v4.base64.channel.k8s.io"]
    )
    prefix = base64.b64encode(struct.pack("<H", port))
    assert [await ws.frame() for _ in range(2)] == [
        (0x1, b"0" + prefix, b"\x81\x05"),
        (0x1, b"1" + prefix, b"\x81\x05"),
    ]
    assert await ws.frame() == (0x1, b"0" + base64.b64encode(b"hello"), b"\x81\x09")
    ws.send(b"0" + base64.b64encode(b"xyz"), opcode=0x1)
    ws.send(b"", opcode=0x8)
    messages, _ = await ws.messages_until_close()
    assert messages == []
    await _until(lambda: received == [b"xyz"])
    await ws.close()


async def test_pod_closing_first_ends_the_stream(web: Api, cluster: DevCluster) -> None:
    blob = bytes(range(256)) * 400

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(blob)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        ws = await RawWebSocket.connect(cluster, PF, [("ports", str(port))], [V4])
        loop = asyncio.get_running_loop()
        started = loop.time()
        messages, close = await ws.messages_until_close()
        # Within the second the other direction is given, then Close 1000.
        assert loop.time() - started < 5
        assert close is not None and close[:2] == b"\x03\xe8"
        assert messages[:2] == [header(0, port), header(1, port)]
        assert b"".join(p[1:] for _, p in messages[2:]) == blob
        await ws.close()
    finally:
        srv.close()
