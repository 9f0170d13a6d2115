"""kuberun.sshpackets against a real asyncssh server and client (on both event loops),
and the slicing itself against a stand-in connection.

The hooks use asyncssh's private ``SSHConnection._transport`` and the ``send_packet``
recursion that inserts an empty ``MSG_IGNORE``; if an asyncssh release changes either,
the tests with a real connection fail here.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

import asyncssh
import pytest
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_IGNORE

from kuberun.sshpackets import READ_SLICE, skip_ignore_padding, slice_reads, tune_connection


class _FakeTransport:
    def __init__(self) -> None:
        self.protocol: Any = None
        self.closing = False

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def is_closing(self) -> bool:
        return self.closing


class _FakeConn:
    def __init__(self, transport: _FakeTransport | None) -> None:
        self._transport = transport
        self.fed: list[bytes] = []

    def data_received(self, data: bytes, datatype: Any = None) -> None:
        self.fed.append(bytes(data))


def test_a_big_read_is_fed_in_order_in_slices() -> None:
    transport = _FakeTransport()
    conn = _FakeConn(transport)
    assert slice_reads(conn)
    assert transport.protocol is conn
    data = os.urandom(5 * READ_SLICE + 123)
    conn.data_received(data)
    assert [len(p) for p in conn.fed] == [READ_SLICE] * 5 + [123]
    assert b"".join(conn.fed) == data
    conn.fed.clear()
    small = b"x" * READ_SLICE
    conn.data_received(small)
    assert conn.fed == [small]


def test_slicing_stops_once_the_connection_closes() -> None:
    transport = _FakeTransport()
    conn = _FakeConn(transport)
    calls: list[int] = []

    def parse(data: Any, datatype: Any = None) -> None:
        # The parser closes the connection on the first slice (a bad MAC, a disconnect).
        calls.append(len(data))
        transport.closing = True

    conn.data_received = parse  # type: ignore[method-assign]
    assert slice_reads(conn)
    conn.data_received(b"y" * (3 * READ_SLICE))
    assert calls == [READ_SLICE]


def test_no_transport_changes_nothing() -> None:
    conn = _FakeConn(None)
    method = conn.data_received
    assert not slice_reads(conn)
    assert conn.data_received == method


class _Sink(asyncssh.SSHServerSession[bytes]):
    """Hashes what the client sends; answers with ``reply`` bytes of its own."""

    def __init__(self, done: asyncio.Future[bytes], reply: int) -> None:
        self.hash = hashlib.sha256()
        self.done = done
        self.reply = reply

    def connection_made(self, chan: Any) -> None:
        self.chan = chan

    def exec_requested(self, command: str) -> bool:
        return True

    def session_started(self) -> None:
        if self.reply:
            self.chan.write(b"r" * self.reply)

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.hash.update(data)

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_result(self.hash.digest())
        return False


class _Server(asyncssh.SSHServer):
    """Records what reaches asyncssh's parser and what leaves by send_packet, below
    the hooks (``hooks``: what to install on each connection)."""

    def __init__(self, done: asyncio.Future[bytes], hooks: str, reply: int) -> None:
        self.done = done
        self.hooks = hooks
        self.reply = reply
        self.fed: list[int] = []
        self.sent: list[int] = []

    def connection_made(self, conn: Any) -> None:
        parse = conn.data_received
        send = conn.send_packet

        def recorded(data: Any, datatype: Any = None) -> None:
            self.fed.append(len(data))
            parse(data, datatype)

        def sent(pkttype: int, *args: bytes, handler: Any = None) -> None:
            self.sent.append(pkttype)
            send(pkttype, *args, handler=handler)

        # Seen only if the transport calls what slice_reads installed.
        conn.data_received = recorded
        conn.send_packet = sent
        if self.hooks == "all":
            tune_connection(conn)
        elif self.hooks == "slice":
            assert slice_reads(conn)
        elif self.hooks == "ignore":
            skip_ignore_padding(conn)

    def begin_auth(self, username: str) -> bool:
        return False

    def session_requested(self) -> Any:
        return _Sink(self.done, self.reply)


async def _transfer(
    hooks: str, size: int, *, reply: int = 0, cipher: str = "aes128-gcm@openssh.com"
) -> _Server:
    """``size`` random bytes from an asyncssh client to a server with ``hooks``; the
    server sends ``reply`` bytes back. Checks the bytes arrived; returns the server."""
    done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    server_obj = _Server(done, hooks, reply)
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(
        lambda: server_obj,
        "127.0.0.1",
        0,
        server_host_keys=[key],
        encoding=None,
        encryption_algs=[cipher],
    )
    port = server.sockets[0].getsockname()[1]
    data = os.urandom(size)
    received = bytearray()

    class Client(asyncssh.SSHClientSession[bytes]):
        def data_received(self, data: bytes, datatype: Any) -> None:
            received.extend(data)

    try:
        async with asyncssh.connect(
            "127.0.0.1",
            port,
            known_hosts=None,
            username="u",
            client_keys=None,
            encryption_algs=[cipher],
        ) as conn:
            chan, _ = await conn.create_session(Client, "sink", encoding=None)
            chan.write(data)  # queued in asyncssh, sent as the window allows
            chan.write_eof()
            assert await asyncio.wait_for(done, 30) == hashlib.sha256(data).digest()
            while len(received) < reply:
                await asyncio.sleep(0.01)
            assert bytes(received) == b"r" * reply
            chan.close()
    finally:
        server.close()
        await server.wait_closed()
    return server_obj


@pytest.mark.parametrize("size", [1, 8 << 20])
async def test_slices_reach_the_parser_of_a_real_connection(size: int) -> None:
    server = await _transfer("slice", size)
    assert sum(server.fed) > size and max(server.fed) <= READ_SLICE


async def test_asyncssh_still_pads_every_packet_with_an_ignore() -> None:
    # What skip_ignore_padding is for: without it, asyncssh sends an empty
    # MSG_IGNORE ahead of each data packet.
    server = await _transfer("none", 1, reply=1 << 20)
    data = server.sent.count(MSG_CHANNEL_DATA)
    assert data >= 32 and server.sent.count(MSG_IGNORE) >= data


async def test_no_ignore_padding_with_gcm() -> None:
    server = await _transfer("all", 1 << 20, reply=1 << 20)
    assert server.sent.count(MSG_CHANNEL_DATA) >= 32
    assert MSG_IGNORE not in server.sent
    assert max(server.fed) <= READ_SLICE


async def test_ignore_padding_kept_with_cbc() -> None:
    server = await _transfer("ignore", 1, reply=1 << 20, cipher="aes128-cbc")
    data = server.sent.count(MSG_CHANNEL_DATA)
    assert data >= 32 and server.sent.count(MSG_IGNORE) >= data
