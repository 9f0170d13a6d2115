"""kuberun.sshreads: asyncssh's parser fed in slices, against a real asyncssh server and
client (on both event loops), and the slicing itself against a stand-in connection.

The hook uses asyncssh's private ``SSHConnection._transport``; if an asyncssh release
drops it, ``test_slices_reach_the_parser_of_a_real_connection`` fails here.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

import asyncssh
import pytest

from kuberun.sshreads import READ_SLICE, slice_reads


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
    def __init__(self, done: asyncio.Future[bytes]) -> None:
        self.hash = hashlib.sha256()
        self.done = done

    def exec_requested(self, command: str) -> bool:
        return True

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.hash.update(data)

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_result(self.hash.digest())
        return False


class _Server(asyncssh.SSHServer):
    def __init__(self, done: asyncio.Future[bytes], fed: list[int]) -> None:
        self.done = done
        self.fed = fed

    def connection_made(self, conn: Any) -> None:
        parse = conn.data_received

        def recorded(data: Any, datatype: Any = None) -> None:
            self.fed.append(len(data))
            parse(data, datatype)

        # Seen only if the transport calls what slice_reads installed.
        conn.data_received = recorded
        assert slice_reads(conn)

    def begin_auth(self, username: str) -> bool:
        return False

    def session_requested(self) -> Any:
        return _Sink(self.done)


@pytest.mark.parametrize("size", [1, 8 << 20])
async def test_slices_reach_the_parser_of_a_real_connection(size: int) -> None:
    done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    fed: list[int] = []
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(
        lambda: _Server(done, fed), "127.0.0.1", 0, server_host_keys=[key], encoding=None
    )
    port = server.sockets[0].getsockname()[1]
    data = os.urandom(size)
    try:
        async with asyncssh.connect(
            "127.0.0.1", port, known_hosts=None, username="u", client_keys=None
        ) as conn:
            chan, _ = await conn.create_session(asyncssh.SSHClientSession, "sink", encoding=None)
            chan.write(data)  # queued in asyncssh, sent as the window allows
            chan.write_eof()
            assert await asyncio.wait_for(done, 30) == hashlib.sha256(data).digest()
            chan.close()
    finally:
        server.close()
        await server.wait_closed()
    assert sum(fed) > size and max(fed) <= READ_SLICE
