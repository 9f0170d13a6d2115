"""The ``pods/portforward`` subresource over WebSocket, as a kubelet's CRI streaming
server and containerd serve it.

The protocol (``v4.channel.k8s.io``, or none, which means the same binary
framing; ``v4.base64.channel.k8s.io`` for text frames):

* ``?ports=P1,P2`` (or repeated ``ports=``): port *i* gets data channel ``2i``
  and error channel ``2i+1``.
* Right after the upgrade, for each port, one message ``[2i, lo, hi]`` and one
  ``[2i+1, lo, hi]`` (the port, uint16 little-endian).
* Then each port's connection is dialled at once; Pods here share the host's
  network, so that is ``127.0.0.1:P`` (then ``[::1]:P``). A failure becomes one
  text message on ``2i+1``; the other ports go on.
* Client messages on ``2i`` go to the connection as they are (no port prefix);
  empty messages, messages on error channels and on channels past the ports are
  ignored. There is no half-close.
* A port ends when its connection closes (the Pod's server closed), and for all
  ports when the client sends its Close: that is answered at once and nothing
  more is sent, as the kubelet's wsstream does; each connection gets no EOF and is
  closed a second later (containerd). Once every port has ended the WebSocket is
  closed (1000).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import socket
from typing import Any

from aiohttp import WSMsgType, web

from .apierrors import not_found
from .execws import (
    MAX_DATA,
    READ_SIZE,
    RunningSessions,
    _text,
    accept_websocket,
    close_websocket,
    offered_protocols,
    pump_bulk,
    upgrade_refusal,
)
from .runtime import FdReader, FdWriter

__all__ = ["PROTOCOLS", "PortForwardHandler", "negotiate", "parse_ports"]

log = logging.getLogger("kuberun.devcluster")

V4 = "v4.channel.k8s.io"
V4_BASE64 = "v4.base64.channel.k8s.io"
#: What the CRI streaming server's port-forward WebSocket accepts.
PROTOCOLS = ("", V4, V4_BASE64)
#: Seconds a port's connection may go on sending after the client's side ended.
LINGER = 1.0
#: Seconds to wait for a dial, as containerd does.
DIAL_TIMEOUT = 5.0


def negotiate(header: str | None) -> str | None:
    """The first offered protocol the server speaks; ``""`` for none offered; None
    when nothing fits (403, empty body, as x/net/websocket refuses)."""
    offered = offered_protocols(header)
    if not offered:
        return ""
    for proto in offered:
        if proto in PROTOCOLS:
            return proto
    return None


def parse_ports(values: list[str]) -> list[int]:
    """The ports of a request (``ports`` values, each possibly comma-separated).

    :raises ValueError: with the kubelet's message for a missing or bad port
    """
    raw = [p.strip() for value in values for p in value.split(",")]
    if not raw or raw == [""]:
        raise ValueError('query parameter "port" is required')
    ports = []
    for text in raw:
        if not (text.isascii() and text.isdigit()) or int(text) > 0xFFFF:
            raise ValueError(f'unable to parse "{text}" as a port: invalid syntax')
        port = int(text)
        if port < 1:
            raise ValueError(f'port "{text}" must be > 0')
        ports.append(port)
    return ports


class PortForwardHandler:
    """Serves the portforward subresource for a cluster (see :meth:`handle`)."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.sessions = RunningSessions["PortForwardSession"]()

    async def handle(self, request: web.Request, namespace: str, name: str) -> web.StreamResponse:
        pod = self.cluster.store.get("pods", namespace, name)
        if pod is None:
            raise not_found("pods", name)
        refusal = upgrade_refusal(request)
        if refusal is not None:
            return refusal
        try:
            ports = parse_ports(request.query.getall("ports", []))
        except ValueError as exc:
            return _text(400, str(exc))
        protocol = negotiate(request.headers.getone("Sec-WebSocket-Protocol", None))
        if protocol is None:
            return web.Response(status=403)
        if self.cluster.kubelet.worker_for(pod) is None:
            return _text(404, "pod does not exist")
        # A client's Close ends the stream at once, as the kubelet's wsstream does
        # (its handler returns and closes the connection).
        ws = await accept_websocket(request, protocol)
        uid = str(pod["metadata"].get("uid") or "")
        session = PortForwardSession(request, ws, protocol, ports, uid)
        with self.sessions.running(session):
            await session.run()
        return ws


class PortForwardSession:
    """One port-forward WebSocket and the connections of its ports."""

    def __init__(
        self,
        request: web.Request,
        ws: web.WebSocketResponse,
        protocol: str,
        ports: list[int],
        sandbox: str,
    ) -> None:
        self.request = request
        self.ws = ws
        self.base64 = protocol == V4_BASE64
        self.ports = ports
        self.sandbox = sandbox
        loop = asyncio.get_running_loop()
        # Each port's connection once dialled (None: the dial failed).
        self.dialled: list[asyncio.Future[socket.socket | None]] = [
            loop.create_future() for _ in ports
        ]
        self.writers: dict[int, FdWriter] = {}
        self.client_done = asyncio.Event()

    async def _send(self, channel: int, data: bytes | memoryview) -> None:
        if self.base64:
            text = str(channel).encode() + base64.b64encode(data)
            await self.ws.send_frame(text, WSMsgType.TEXT)
        else:
            await self.ws.send_bytes(bytes((channel,)) + data)

    async def run(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            for i, port in enumerate(self.ports):
                header = port.to_bytes(2, "little")
                await self._send(2 * i, header)
                await self._send(2 * i + 1, header)
        forwards = [asyncio.ensure_future(self._forward(i)) for i in range(len(self.ports))]
        reader = asyncio.ensure_future(self._input())
        try:
            await asyncio.gather(*forwards, return_exceptions=True)
        finally:
            for task in (*forwards, reader):
                task.cancel()
            await asyncio.gather(*forwards, reader, return_exceptions=True)
            for future in self.dialled:
                sock = future.result() if future.done() and not future.cancelled() else None
                if sock is not None:
                    sock.close()
        await close_websocket(self.request, self.ws)

    def abort(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    async def _dial(self, port: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        errors = []
        for family, address, label in (
            (socket.AF_INET, "127.0.0.1", "IPv4: dial tcp4 127.0.0.1"),
            (socket.AF_INET6, "::1", "IPv6 dial tcp6 [::1]"),
        ):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (address, port)), DIAL_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as exc:
                sock.close()
                code = exc.errno if isinstance(exc, OSError) else None
                why = os.strerror(code).lower() if code else "i/o timeout"
                errors.append(f"{label}:{port}: connect: {why}")
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        raise ConnectionRefusedError(
            f"failed to connect to localhost:{port} inside namespace "
            f'"{self.sandbox}", ' + " ".join(errors) + " "
        )

    async def _forward(self, index: int) -> None:
        port = self.ports[index]
        try:
            sock = await self._dial(port)
        except OSError as exc:
            self.dialled[index].set_result(None)
            message = f"error forwarding port {port} to pod {self.sandbox}, uid : {exc}"
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._send(2 * index + 1, message.encode())
            return
        self.writers[index] = FdWriter(sock.fileno())
        self.dialled[index].set_result(sock)
        output = asyncio.ensure_future(self._output(index, sock))
        client = asyncio.ensure_future(self.client_done.wait())
        try:
            await asyncio.wait({output, client}, return_when=asyncio.FIRST_COMPLETED)
            # Whichever direction ended first, the other gets at most LINGER more. The
            # connection gets no EOF when the client's side ends (containerd's
            # behaviour, seen on a node): it is closed after that second.
            await asyncio.wait({output, client}, timeout=LINGER)
        finally:
            output.cancel()
            client.cancel()
            await asyncio.gather(output, client, return_exceptions=True)

    async def _output(self, index: int, sock: socket.socket) -> None:
        """The Pod's bytes to the client, until the Pod closes its side."""
        reader = FdReader(sock.fileno())
        channel = 2 * index
        try:
            if not self.base64:
                await pump_bulk(self.request, self.ws, reader, channel, _ignore)
                return
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    return
                view = memoryview(data)
                for offset in range(0, len(data), MAX_DATA):
                    await self._send(channel, view[offset : offset + MAX_DATA])
        except (ConnectionError, RuntimeError, OSError) as exc:
            log.debug("port-forward to %d: output ended: %s", self.ports[index], exc)

    async def _input(self) -> None:
        """The client's messages to their ports' connections, in order; a slow Pod-side
        reader slows the client down (nothing is queued here)."""
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                    return  # CLOSE (aiohttp answered it), CLOSED, ERROR
                data: bytes = msg.data
                payload: bytes | memoryview
                if not data:
                    continue
                if self.base64:
                    channel = data[0] - 0x30
                    try:
                        payload = base64.b64decode(data[1:], validate=True)
                    except (binascii.Error, ValueError):
                        continue
                else:
                    channel = data[0]
                    # A view, not data[1:]: that would copy every message once more.
                    payload = memoryview(data)[1:]
                index, odd = divmod(channel, 2)
                if odd or not 0 <= index < len(self.ports) or not payload:
                    continue
                if await self.dialled[index] is None:
                    continue
                writer = self.writers.get(index)
                if writer is not None:
                    try:
                        await writer.write(payload)
                    except OSError:
                        del self.writers[index]  # the Pod side is gone: drop the rest
        finally:
            self.client_done.set()


def _ignore(n: int) -> None:
    pass
