"""The exit status comes after the output: never a status for output the client lacks.

asyncssh sends an exit status at once, ahead of output still queued for a client
whose window is closed. A client that then loses the connection (the gateway
stopping, say) would hold a status of success for output it never got. kuberun
holds the status until the queued output is out, and a gateway that stops before
then reports its shutdown status instead.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from kuberun import server

from .conftest import Gateway, wait_for

SIZE = 100_000  # more than the client's window, less than window + the gateway's buffers
WINDOW = 65536


class _Recorder(asyncssh.SSHClientSession[bytes]):
    """Records output sizes and the exit status in the order the client gets them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.chan: Any = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, chan: Any) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype: Any) -> None:
        if datatype is None:  # stdout; stderr may carry the Pod's start-up progress
            self.events.append(("data", len(data)))

    def exit_status_received(self, status: int) -> None:
        self.events.append(("exit", status))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def _stalled_session(gateway: Gateway, conn: Any, marker: Path) -> _Recorder:
    """A session whose program has written SIZE bytes and exited, with the client
    not reading: the output is partly in the client's window, partly queued."""
    chan, session = await conn.create_session(
        _Recorder,
        f"head -c {SIZE} /dev/zero; echo done > {marker}",
        encoding=None,
        window=WINDOW,
    )
    chan.pause_reading()
    await wait_for(marker.exists, 60, "the program to finish")
    # The exit status frame follows the output on the exec stream; let it arrive.
    await asyncio.sleep(0.5)
    assert isinstance(session, _Recorder)
    return session


async def test_exit_status_waits_for_the_output(gateway: Gateway, tmp_path: Path) -> None:
    async with gateway.asyncssh_connect() as conn:
        session = await _stalled_session(gateway, conn, tmp_path / "done")
        assert ("exit", 0) not in session.events  # output is still queued at the gateway
        session.chan.resume_reading()
        await asyncio.wait_for(session.closed, 30)
    data = [n for kind, n in session.events if kind == "data"]
    assert sum(data) == SIZE
    assert session.events[-1] == ("exit", 0)  # after every byte of output


async def test_gateway_stopping_reports_shutdown_not_success(
    gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "_DRAIN_GRACE", 0.5)  # the client never reads again
    async with gateway.asyncssh_connect() as conn:
        session = await _stalled_session(gateway, conn, tmp_path / "done")
        await gateway.runner.close()
        await asyncio.wait_for(session.closed, 30)
    statuses = [n for kind, n in session.events if kind == "exit"]
    assert statuses == [254]  # the shutdown status, not the program's 0
    await gateway.wait_no_pods()


async def test_gateway_stopping_lets_clients_read_what_they_were_sent(
    gateway: Gateway, tmp_path: Path
) -> None:
    """All output sent and the session over, but still unread in the client's own
    buffers when the gateway is told to stop: the gateway leaves the client time to
    read it and disconnect by itself (an asyncssh client drops what it has not
    delivered when the server disconnects)."""
    async with gateway.asyncssh_connect() as conn:
        chan, session = await conn.create_session(
            _Recorder, f"head -c {WINDOW // 2} /dev/zero", encoding=None, window=WINDOW
        )
        assert isinstance(session, _Recorder)
        chan.pause_reading()
        # Everything fits the window: the session ends with the bytes queued in the client.
        await wait_for(lambda: ("exit", 0) in session.events, 60, "the exit status")
        closing = asyncio.ensure_future(gateway.runner.close())
        await asyncio.sleep(0.3)
        chan.resume_reading()
        await asyncio.wait_for(session.closed, 30)
    await asyncio.wait_for(closing, 30)
    assert sum(n for kind, n in session.events if kind == "data") == WINDOW // 2
