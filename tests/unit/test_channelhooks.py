"""kuberun.channelhooks against a real asyncssh server and client, in one process.

These hooks use asyncssh's private dispatch (handler names, the global request queue,
the channel's send buffer). If an asyncssh release changes any of it, these tests fail
here, loudly, rather than eow or no-more-sessions silently doing nothing.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from kuberun.channelhooks import (
    EOW_REQUEST,
    NO_MORE_SESSIONS_REQUEST,
    drop_queued,
    on_channel_request,
    on_global_request,
)

ROOT = Path(__file__).resolve().parents[2]


def test_asyncssh_is_a_version_the_hooks_were_checked_with() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"(asyncssh>=([\d.]+),<([\d.]+))"', pyproject)
    assert pin is not None, "asyncssh is not pinned to a range in pyproject.toml"
    spec, low, high = pin.groups()
    version = tuple(int(p) for p in asyncssh.__version__.split("."))
    assert (
        tuple(int(p) for p in low.split(".")) <= version < tuple(int(p) for p in high.split("."))
    ), f"asyncssh {asyncssh.__version__} is outside the checked range {spec}"


class _Session(asyncssh.SSHServerSession[bytes]):
    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.chan: Any = None
        self.paused = False

    def connection_made(self, chan: Any) -> None:
        self.chan = chan

    def exec_requested(self, command: str) -> bool:
        return True

    def session_started(self) -> None:
        self.events.append("started")

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.events.append("resumed")


class _Server(asyncssh.SSHServer):
    def __init__(self, events: list[str], sessions: list[_Session]) -> None:
        self.events = events
        self.sessions = sessions
        self.conn: Any = None

    def connection_made(self, conn: Any) -> None:
        self.conn = conn
        on_global_request(conn, NO_MORE_SESSIONS_REQUEST, self._no_more)

    def _no_more(self) -> bool:
        self.events.append("no-more-sessions")
        return True

    def begin_auth(self, username: str) -> bool:
        return False

    def session_requested(self) -> Any:
        session = _Session(self.events)
        self.sessions.append(session)
        chan = self.conn.create_server_channel(encoding=None)
        on_channel_request(chan, EOW_REQUEST, self._eow)
        return chan, session

    def _eow(self) -> bool:
        self.events.append("eow")
        return True


Pair = tuple[Any, list[str], list[_Session]]


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    events: list[str] = []
    sessions: list[_Session] = []
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(
        lambda: _Server(events, sessions),
        "127.0.0.1",
        0,
        server_host_keys=[key],
        line_editor=False,
    )
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncssh.connect(
            "127.0.0.1", port, known_hosts=None, username="u", client_keys=None
        ) as conn:
            yield conn, events, sessions
    finally:
        server.close()
        await server.wait_closed()


async def _until(cond: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), 10)


async def test_eow_reaches_the_handler_on_the_channel(pair: Pair) -> None:
    conn, events, _ = pair
    chan, _ = await conn.create_session(asyncssh.SSHClientSession, "cmd")
    await _until(lambda: "started" in events)
    chan._send_request(EOW_REQUEST.encode())  # as OpenSSH sends it: no reply wanted
    await _until(lambda: "eow" in events)
    # With a reply wanted, the handler's result is the reply.
    assert await chan._make_request(EOW_REQUEST.encode()) is True
    assert events.count("eow") == 2


async def test_no_more_sessions_is_answered_and_the_queue_moves_on(pair: Pair) -> None:
    conn, events, _ = pair
    conn._send_global_request(NO_MORE_SESSIONS_REQUEST.encode())
    # A later global request is served: the hook reported its reply.
    await asyncio.wait_for(conn._make_global_request(b"keepalive@openssh.com"), 10)
    assert events == ["no-more-sessions"]
    # With a reply wanted, the handler's result is the reply.
    pkttype, _ = await asyncio.wait_for(
        conn._make_global_request(NO_MORE_SESSIONS_REQUEST.encode()), 10
    )
    assert pkttype == asyncssh.constants.MSG_REQUEST_SUCCESS
    assert events == ["no-more-sessions"] * 2


class _Received(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.data: list[tuple[bytes, Any]] = []

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.data.append((data, datatype))


async def _shut_window(pair: Pair) -> tuple[Any, Any, _Received]:
    """A session whose client keeps its 1000-byte window shut: its client channel,
    the server's channel and what the client received."""
    conn, events, sessions = pair
    chan, client = await conn.create_session(_Received, "cmd", encoding=None, window=1000)
    await _until(lambda: "started" in events)
    chan.pause_reading()  # the client's window stays closed
    return chan, sessions[0].chan, client


async def test_drop_queued_keeps_stderr(pair: Pair) -> None:
    chan, server_chan, client = await _shut_window(pair)
    received = client.data
    server_chan.write(b"o" * 5000)
    server_chan.write_stderr(b"e1")
    server_chan.write(b"o" * 5000)
    server_chan.write_stderr(b"e2")
    await asyncio.sleep(0.2)
    queued = server_chan.get_write_buffer_size()
    assert queued > 0
    dropped = drop_queued(server_chan)
    assert server_chan.get_write_buffer_size() == 4 and dropped == queued - 4
    assert drop_queued(server_chan) == 0
    chan.resume_reading()
    await _until(lambda: b"e2" in [d for d, _ in received])
    stderr = b"".join(d for d, t in received if t == asyncssh.EXTENDED_DATA_STDERR)
    stdout = b"".join(d for d, t in received if t is None)
    assert stderr == b"e1e2"
    assert stdout == b"o" * len(stdout) and len(stdout) <= 1000  # what the window let out


async def test_drop_queued_with_stderr_drops_all_and_lets_the_close_out(pair: Pair) -> None:
    chan, server_chan, client = await _shut_window(pair)
    server_chan.write(b"o" * 5000)
    server_chan.write_stderr(b"e1")
    server_chan.exit(0)  # the close waits behind the queued output
    await asyncio.sleep(0.2)
    assert server_chan._send_state == "close_pending"
    assert drop_queued(server_chan, stderr=True) == 5002 - 1000
    assert server_chan.get_write_buffer_size() == 0
    assert server_chan._send_state == "closed"  # the close went out with the drop
    chan.resume_reading()
    await asyncio.wait_for(chan.wait_closed(), 10)
    assert chan.get_exit_status() == 0
    assert b"".join(d for d, _ in client.data) == b"o" * 1000  # what the window let out
