"""The SSH side of port forwarding: ``direct-tcpip`` channels (``ssh -L``, ``-D``, ``-W``)
into the connection's Pod, and the refusals of everything else.

A ``direct-tcpip`` channel becomes one ``pods/portforward`` WebSocket
(:mod:`kuberun.portforward`) to the requested port of the connection's Pod:

1. ``ssh.allow_tcp_forwarding`` and ``ssh.permit_open`` (as the client wrote
   the destination) decide first; then the host must name the Pod:
   ``localhost``, ``127.0.0.1``, ``::1``, ``0.0.0.0``, the Pod's name or one of
   its IPs. Refusals are ``administratively prohibited`` with a reason the
   client prints.
2. The Pod is the connection's (started by the first forward if no session
   started it); in ``session`` mode there is no such Pod and forwards are
   refused.
3. The channel is confirmed once the stream is connected; a closed port is
   ``connect failed`` with the kubelet's message.

Port-forward has no half-close. The Pod's server cannot be told about an EOF
from the client, and a WebSocket Close makes the kubelet end the stream at
once, losing the reply (checked on a node). So after the client's EOF the
forward stays open while the Pod side sends, and ends once it has been silent
for ``EOF_IDLE`` seconds: replies arrive, and channels whose client has gone
do not stay open forever when the Pod's server waits for an EOF. The channel
also ends when the Pod side closes or the client closes the channel; the
client vanishing closes the Pod-side connection.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, cast

import asyncssh

from .errors import CommandStartError, ForwardRefused, KuberunError
from .execstream import ExecResult
from .permitopen import is_local_host, names_the_pod
from .portforward import PortForwardStream, open_portforward

if TYPE_CHECKING:
    from .handler import SSHConnectionHandler

__all__ = ["ForwardChannel", "open_forward", "refuse_listener", "refuse_unix"]

#: What a client hears for a destination outside the Pod.
NOT_THE_POD = "kuberun forwards only to the Pod's own ports"

_PROHIBITED = asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
_CONNECT_FAILED = asyncssh.OPEN_CONNECT_FAILED


def _ignore_progress(line: str) -> None:
    """Pod start progress has nowhere to go on a forwarding channel."""


class ForwardChannel(asyncssh.SSHTCPSession[bytes]):
    """One forwarding channel relayed to a port-forward stream (its listener too)."""

    def __init__(self, conn: SSHConnectionHandler, forward_id: str, host: str, port: int) -> None:
        self._conn = conn
        self.id = forward_id
        self.host = host
        self.port = port
        self._chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self.stream: PortForwardStream | None = None
        self._closed = False
        self._published = False
        #: Why the forward ended, for the audit trail (None: the client closed it).
        self.ended_by: str | None = None

    # -- asyncssh callbacks -------------------------------------------------

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._chan = chan
        stream = self.stream
        assert stream is not None
        self._conn.forward_opened(self)
        stream.attach(cast(Any, chan.write))
        if stream.finished:
            # The Pod side ended while the channel was being confirmed.
            self._end(stream_result(stream))

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        stream = self.stream
        if stream is not None:
            stream.write_stdin(data)

    def eof_received(self) -> bool:
        # Port-forward has no half-close: the forward ends once the Pod side is quiet.
        if self.stream is not None:
            self.stream.close_write()
        return True

    def pause_writing(self) -> None:
        if self.stream is not None:
            self.stream.pause_output()

    def resume_writing(self) -> None:
        if self.stream is not None:
            self.stream.resume_output()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        stream = self.stream
        if stream is not None and not stream.finished:
            stream.abort()  # closes the Pod-side connection
        self._publish_bytes()
        self._conn.forward_closed(self)

    # -- the stream's listener ---------------------------------------------

    # Output from the stream goes through PortForwardStream.attach, not these.
    exec_stdout = exec_stderr = staticmethod(lambda data: None)

    def exec_pause_input(self) -> None:
        if self._chan is not None:
            self._chan.pause_reading()

    def exec_resume_input(self) -> None:
        if self._chan is not None and not self._closed:
            self._chan.resume_reading()

    def exec_finished(self, result: ExecResult) -> None:
        if self._chan is not None:
            self._end(result)

    # -- endings ------------------------------------------------------------

    def _end(self, result: ExecResult) -> None:
        chan = self._chan
        if chan is None or self._closed:
            return
        self.ended_by = str(result.error) if result.error is not None else "pod closed"
        if result.error is not None:
            reason = getattr(result.error, "reason", "") or "lost"
            self._conn.count_forward_failure(reason if reason == "refused" else "lost")
            self._conn.logger.info("forward %s to port %d: %s", self.id, self.port, result.error)
        try:
            # Everything received goes out first: close() flushes, then closes.
            chan.write_eof()
            chan.close()
        except OSError:
            pass

    def close(self) -> None:
        """End the forward now (gateway shutdown)."""
        self.ended_by = self.ended_by or "gateway shutdown"
        if self.stream is not None and not self.stream.finished:
            self.stream.abort()
        if self._chan is not None and not self._closed:
            self._chan.close()

    def _publish_bytes(self) -> None:
        stream = self.stream
        metrics = self._conn.metrics
        if stream is None or metrics is None or self._published:
            return
        self._published = True
        metrics.forwarded_bytes.labels(direction="to_pod").inc(stream.stdin_bytes)
        metrics.forwarded_bytes.labels(direction="from_pod").inc(stream.data_bytes)


def stream_result(stream: PortForwardStream) -> ExecResult:
    """How an already finished stream ended (for a channel confirmed after its end)."""
    if stream.error_text is not None:
        return ExecResult(None, ForwardRefused(stream.error_text, _CONNECT_FAILED, "refused"))
    return ExecResult(0)


def _refuse(conn: SSHConnectionHandler, message: str, code: int, reason: str) -> ForwardRefused:
    conn.count_forward_failure(reason)
    return ForwardRefused(message, code, reason)


def check_destination(conn: SSHConnectionHandler, host: str, port: int) -> None:
    """The checks that need no Pod: the switch, ``permit_open``, the mode.

    :raises ForwardRefused: administratively prohibited, with the reason
    """
    ssh = conn.config.ssh
    if not ssh.allow_tcp_forwarding:
        raise _refuse(conn, "port forwarding is disabled on this server", _PROHIBITED, "disabled")
    if not ssh.permitted_opens.allows(host, port):
        raise _refuse(
            conn, f"forwarding to {host} port {port} is not permitted", _PROHIBITED, "permit_open"
        )
    if conn.config.pod.mode == "session":
        raise _refuse(
            conn,
            "kuberun forwards only in pod.mode connection: in session mode each session "
            "has a Pod of its own and a forward has none",
            _PROHIBITED,
            "session_mode",
        )
    if not (0 < port <= 0xFFFF):
        raise _refuse(conn, f"port {port} is not a TCP port", _PROHIBITED, "not_the_pod")


async def _open(channel: ForwardChannel) -> ForwardChannel:
    conn = channel._conn
    started = time.monotonic()
    try:
        pod = await conn.acquire_pod(channel.id, _ignore_progress)
    except KuberunError as exc:
        raise _refuse(conn, f"kuberun: {exc}", _CONNECT_FAILED, "pod") from None
    if not is_local_host(channel.host) and not names_the_pod(channel.host, pod.name, pod.ips):
        raise _refuse(conn, NOT_THE_POD, _PROHIBITED, "not_the_pod")
    try:
        stream = await open_portforward(
            conn.connector,
            pod.namespace,
            pod.name,
            channel.port,
            channel,
            timeout=conn.config.timeouts.command_start,
        )
    except CommandStartError as exc:
        raise _refuse(conn, f"kuberun: {exc}", _CONNECT_FAILED, "open") from None
    except ForwardRefused as exc:
        conn.count_forward_failure(exc.reason)
        raise
    if not conn.forward_ready(channel):
        # The connection closed while the stream opened.
        stream.abort()
        raise ForwardRefused("the connection is closing", _CONNECT_FAILED, "closed")
    channel.stream = stream
    if conn.metrics is not None:
        conn.metrics.forward_open_seconds.observe(time.monotonic() - started)
    conn.logger.info(
        "forward %s to %s port %d opened in Pod %s",
        channel.id,
        channel.host,
        channel.port,
        pod.name,
    )
    return channel


async def _open_or_refuse(channel: ForwardChannel) -> ForwardChannel:
    try:
        return await _open(channel)
    except ForwardRefused as exc:
        channel._conn.logger.info(
            "forward %s to %s port %d refused: %s", channel.id, channel.host, channel.port, exc
        )
        raise asyncssh.ChannelOpenError(exc.code, str(exc)) from None
    finally:
        channel._conn.forward_pending_done(channel)


def open_forward(
    ssh_conn: asyncssh.SSHServerConnection, conn: SSHConnectionHandler, host: str, port: int
) -> tuple[asyncssh.SSHTCPChannel[bytes], Awaitable[ForwardChannel]]:
    """Answer a ``direct-tcpip`` open on ``ssh_conn``: the channel and the session to come.

    :raises asyncssh.ChannelOpenError: refused at once (switch, ``permit_open``, mode)
    """
    try:
        check_destination(conn, host, port)
    except ForwardRefused as exc:
        conn.logger.info("forward to %s port %d refused: %s", host, port, exc)
        raise asyncssh.ChannelOpenError(exc.code, str(exc)) from None
    channel = conn.new_forward(host, port)
    return ssh_conn.create_tcp_channel(), _open_or_refuse(channel)


def refuse_unix(conn: SSHConnectionHandler | None, path: str) -> None:
    """``direct-streamlocal@openssh.com`` (``ssh -L port:/path``): always refused."""
    if conn is not None:
        conn.count_forward_failure("unix")
        conn.logger.info("forward to Unix socket %r refused", path)
    raise asyncssh.ChannelOpenError(
        _PROHIBITED, "kuberun forwards only to TCP ports of the Pod, not to Unix sockets"
    )


def refuse_listener(conn: SSHConnectionHandler | None, what: str) -> bool:
    """``tcpip-forward`` / ``streamlocal-forward@openssh.com`` (``ssh -R``): refused.

    A global request failure carries no text, so the reason goes to the log.
    """
    if conn is not None:
        conn.count_forward_failure("remote")
        conn.logger.info(
            "remote forwarding of %s refused: kuberun forwards only into the Pod (ssh -L, -D, -W)",
            what,
        )
    return False
