"""asyncio glue for one Kubernetes port-forward: a ``pods/portforward`` WebSocket per
forwarded connection, on the exec stream's machinery.

:class:`PortForwardStream` is an :class:`~kuberun.execstream.ExecStream` with
another channel layout: the same upgrade, TLS connection, BufferedProtocol
receive path into the relay decoder (in its port-forward layout), the same
encoder (the data channel of the one port is channel 0, stdin's channel, and
client data carries no port prefix), pings and flow control coupled both ways.

The protocol has no "connected" signal: after the upgrade the kubelet dials the
port, and a failure arrives as one text message on the error channel. So
:meth:`PortForwardStream.connected` waits for the first of: data from the Pod
(connected), error text (refused), the stream's end (connected, then closed at
once), or a grace period of silence (connected).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncssh

from ._cancel import wait_for
from .errors import ExecStreamLost, ForwardRefused
from .execstream import ExecConnector, ExecListener, ExecResult, ExecStream, make_decoder
from .upgrade import PORTFORWARD_SUBPROTOCOLS, portforward_path

__all__ = ["PortForwardStream", "open_portforward"]

#: Shortest wait for an error after the upgrade before a forward counts as connected.
CONNECT_GRACE_MIN = 0.2
#: Longest such wait.
CONNECT_GRACE_MAX = 2.0

#: After the client's EOF, seconds of silence from the Pod side that end a forward.
EOF_IDLE = 5.0

#: Longest error text quoted to the SSH client.
_MAX_ERROR = 512


class _Sink:
    """Adapter handed to the relay decoder in its port-forward layout."""

    __slots__ = ("on_close", "on_data", "on_error", "on_ping")

    def __init__(self, stream: PortForwardStream) -> None:
        self.on_data = stream._on_data
        self.on_error = stream._on_error
        self.on_ping = stream._on_ping
        self.on_close = stream._on_close


class PortForwardStream(ExecStream):
    """One port-forward WebSocket to one port of a Pod. Open it with :func:`open_portforward`.

    Data from the Pod goes to the callable given to :meth:`attach` (the SSH
    channel's ``write``); until then it is held, and reading stops, so at most
    one read is held. The listener hears flow control and the end as an exec's
    listener does; the end is a result with status 0 when the stream closed
    cleanly (the Pod side closed), an error otherwise.
    """

    subprotocols = PORTFORWARD_SUBPROTOCOLS
    what = "port forward"

    def __init__(self, listener: ExecListener, key: str, ping_interval: float, port: int) -> None:
        super().__init__(listener, key, ping_interval)
        self.port = port
        self._write: Callable[[memoryview], object] = self._hold
        self._held: list[bytes] = []
        self._verdict: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.error_text: str | None = None
        self._close_sent = False
        self._eof_timer: asyncio.TimerHandle | None = None
        self._eof_mark = -1

    def _new_decoder(self, protocol: str) -> Any:
        return make_decoder(_Sink(self), protocol, forward_port=self.port)

    # -- decoder callbacks ------------------------------------------------

    def _on_data(self, data: memoryview) -> None:
        self._write(data)

    def _hold(self, data: memoryview) -> None:
        # Before the SSH channel is open: keep this read's data and stop reading.
        self._held.append(bytes(data))
        if not self._output_paused:
            self.pause_output()
        self._decide()

    def _on_error(self, data: bytes) -> None:
        text = data.decode("utf-8", "replace").strip()[:_MAX_ERROR] or "port forward failed"
        self.error_text = text
        self._decide()
        self._finish(
            ExecResult(None, ForwardRefused(text, asyncssh.OPEN_CONNECT_FAILED, "refused"))
        )
        asyncio.get_running_loop().call_soon(self._close_transport)

    def _on_close(self, code: int | None, reason: str) -> None:
        asyncio.get_running_loop().call_soon(self._close_transport)
        self._decide()
        self._finish(ExecResult(0))

    def _close_transport(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if not self._close_sent:
                self._close_sent = True
                transport.write(self._encoder.close(1000, ""))
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._decoder is not None and not self.finished:
            self._cancel_ping()
            self._transport = None
            self._release_held()
            self._decide()
            detail = f": {exc}" if exc else ""
            self._finish(ExecResult(None, ExecStreamLost(f"port-forward stream lost{detail}")))
            return
        super().connection_lost(exc)

    def _decide(self) -> None:
        if not self._verdict.done():
            self._verdict.set_result(None)

    # -- public API -------------------------------------------------------

    async def connected(self, grace: float) -> None:
        """Wait until the forward is known to be connected (data came, or ``grace``
        seconds passed in silence, or it already ended cleanly).

        :raises ForwardRefused: the kubelet reported an error (a closed port)
        """
        try:
            await wait_for(asyncio.shield(self._verdict), grace)
        except asyncio.TimeoutError:
            pass
        if self.error_text is not None:
            raise ForwardRefused(self.error_text, asyncssh.OPEN_CONNECT_FAILED, "refused")

    def close_write(self, idle: float = EOF_IDLE) -> None:
        """The client will send no more (SSH EOF).

        Port-forward has no half-close, and a WebSocket Close makes the kubelet end
        the stream at once (what the Pod sends after it is lost; checked on a node).
        So the stream stays open while the Pod side sends, and ends once it has sent
        nothing for ``idle`` seconds (a reader that has stopped reading does not
        count as silence).
        """
        if self._eof_timer is None and not self.finished:
            self._eof_mark = self.stdout_bytes
            self._eof_timer = asyncio.get_running_loop().call_later(idle, self._eof_check, idle)

    def _eof_check(self, idle: float) -> None:
        self._eof_timer = None
        if self.finished:
            return
        received = self.stdout_bytes
        if received != self._eof_mark or self._output_paused:
            self._eof_mark = received
            self._eof_timer = asyncio.get_running_loop().call_later(idle, self._eof_check, idle)
            return
        self._close_transport()
        self._finish(ExecResult(0))

    def _finish(self, result: ExecResult) -> None:
        if self._eof_timer is not None:
            self._eof_timer.cancel()
            self._eof_timer = None
        super()._finish(result)

    def attach(self, write: Callable[[memoryview], object]) -> None:
        """Send the Pod's data to ``write`` from now on, starting with what was held."""
        held, self._held = self._held, []
        self._write = write
        for data in held:
            write(memoryview(data))
        if self._output_paused:
            self.resume_output()

    @property
    def data_bytes(self) -> int:
        """Bytes received from the Pod."""
        return self.stdout_bytes


async def open_portforward(
    connector: ExecConnector,
    namespace: str,
    pod: str,
    port: int,
    listener: ExecListener,
    *,
    timeout: float = 30.0,
) -> PortForwardStream:
    """Open a port-forward to ``port`` of ``pod`` and wait until it is connected.

    :raises CommandStartError: the upgrade was refused or did not finish in time
    :raises ForwardRefused: the kubelet could not connect to the port
    """
    started = time.monotonic()
    target = portforward_path(connector.prefix, namespace, pod, port)
    ping = connector.ping_interval
    stream = await connector.open_stream(
        target,
        lambda key: PortForwardStream(listener, key, ping, port),
        f"{namespace}/{pod}:{port}",
        PortForwardStream.subprotocols,
        PortForwardStream.what,
        timeout,
    )
    # The error for a closed port follows the upgrade by about one more round trip
    # inside the node; the upgrade's own duration scales the wait with the path.
    elapsed = time.monotonic() - started
    grace = min(max(CONNECT_GRACE_MIN, 2 * elapsed), CONNECT_GRACE_MAX)
    try:
        await stream.connected(grace)
    except BaseException:
        stream.abort()
        raise
    return stream
