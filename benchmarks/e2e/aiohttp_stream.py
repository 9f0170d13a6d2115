"""Baseline exec stream: what a kubernetes-asyncio user would build today (benchmark only).

kubernetes-asyncio's ``WsApiClient`` opens the exec as an aiohttp WebSocket
(``connect_get_namespaced_pod_exec(..., _preload_content=False)`` hands back
aiohttp's ``ClientWebSocketResponse``). The user then loops on
``await ws.receive()``, demultiplexes in Python (``msg.data[0]`` is the channel,
``msg.data[1:]`` the payload) and sends stdin with
``await ws.send_bytes(b"\\x00" + data)``. It asks for ``v5.channel.k8s.io`` through
``_headers`` (the library's default, v4, cannot deliver stdin EOF, so
``cat >/dev/null`` would never end) and couples flow control the careful way:
SSH output paused → stop calling ``receive()`` (aiohttp then pauses the socket);
stdin queue above 256 KiB → pause the SSH channel.

:func:`install` swaps :meth:`kuberun.execstream.ExecConnector.open` for
:func:`open_baseline` in the calling process; nothing in kuberun imports this.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import aiohttp
from kubernetes_asyncio.client import CoreV1Api
from kubernetes_asyncio.stream import WsApiClient

from kuberun import _relay_common, execstream
from kuberun.errors import CommandStartError, ExecError, ExecStreamLost
from kuberun.execstream import ExecListener, ExecResult

__all__ = ["AiohttpExecStream", "install", "open_baseline"]

V5 = "v5.channel.k8s.io"
STDIN_HIGH_WATER = 256 * 1024

_clients: dict[int, WsApiClient] = {}


def _ws_client(configuration: Any) -> WsApiClient:
    client = _clients.get(id(configuration))
    if client is None:
        client = _clients[id(configuration)] = WsApiClient(configuration=configuration)
    return client


class AiohttpExecStream:
    """The subset of :class:`kuberun.execstream.ExecStream` a session uses, on aiohttp."""

    def __init__(
        self, listener: ExecListener, ws: aiohttp.ClientWebSocketResponse, protocol: str
    ) -> None:
        self._listener = listener
        self._ws = ws
        self.protocol = protocol
        self.stdout_bytes = 0
        self.stderr_bytes = 0
        self.stdin_bytes = 0
        self._finished = False
        self._status = b""
        self._stdin_closed = False
        self._resume = asyncio.Event()
        self._resume.set()
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._input_paused = False
        self._wake = asyncio.Event()
        self._done: asyncio.Future[ExecResult] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.ensure_future(self._read())
        self._writer = asyncio.ensure_future(self._write())
        self._closer: asyncio.Future[Any] | None = None

    # -- output: the receive loop --------------------------------------------

    async def _read(self) -> None:
        ws = self._ws
        listener = self._listener
        error: Exception | None = None
        try:
            while True:
                if not self._resume.is_set():
                    await self._resume.wait()
                msg = await ws.receive()
                if msg.type == aiohttp.WSMsgType.BINARY:
                    data = msg.data
                    if not data:
                        continue
                    channel = data[0]
                    payload = data[1:]
                    if not payload:
                        continue
                    if channel == 1:
                        self.stdout_bytes += len(payload)
                        listener.exec_stdout(payload)
                    elif channel == 2:
                        self.stderr_bytes += len(payload)
                        listener.exec_stderr(payload)
                    elif channel == 3:
                        self._status += payload
                        self._end()
                else:
                    break  # CLOSE, CLOSING, CLOSED, ERROR
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        finally:
            if not self._finished:
                if self._status:
                    self._end()
                else:
                    why = f": {error!r}" if error else ""
                    self._finish(ExecResult(None, ExecStreamLost(f"exec stream lost{why}")))
            self._writer.cancel()
            await ws.close()

    def _end(self) -> None:
        try:
            result = ExecResult(_relay_common.decode_status(self._status, self.protocol))
        except ExecError as exc:
            result = ExecResult(None, exc)
        self._finish(result)

    def _finish(self, result: ExecResult) -> None:
        if self._finished:
            return
        self._finished = True
        if not self._done.done():
            self._done.set_result(result)
        self._listener.exec_finished(result)

    # -- input: a queue drained by one task ------------------------------------

    def _put(self, message: bytes) -> None:
        self._queue.append(message)
        self._queued += len(message)
        self._wake.set()
        if self._queued > STDIN_HIGH_WATER and not self._input_paused:
            self._input_paused = True
            self._listener.exec_pause_input()

    async def _write(self) -> None:
        ws = self._ws
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                while not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                message = self._queue.popleft()
                self._queued -= len(message)
                await ws.send_bytes(message)
                if self._input_paused and self._queued <= STDIN_HIGH_WATER // 2:
                    self._input_paused = False
                    self._listener.exec_resume_input()

    # -- what KuberunSession calls ---------------------------------------------

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def can_close_stdin(self) -> bool:
        return self.protocol == V5

    def write_stdin(self, data: bytes) -> None:
        if not self._stdin_closed and not self._finished and data:
            self.stdin_bytes += len(data)
            self._put(b"\x00" + data)

    def close_stdin(self) -> bool:
        if self._stdin_closed:
            return True
        self._stdin_closed = True
        if not self.can_close_stdin:
            return False
        self._put(b"\xff\x00")
        return True

    def resize(self, width: int, height: int) -> None:
        if not self._finished:
            self._put(b"\x04" + json.dumps({"Width": width, "Height": height}).encode())

    def pause_output(self) -> None:
        self._resume.clear()

    def resume_output(self) -> None:
        self._resume.set()

    def abort(self) -> None:
        self._reader.cancel()
        self._writer.cancel()
        self._closer = asyncio.ensure_future(self._ws.close())
        if not self._finished:
            self._finish(ExecResult(None, ExecStreamLost("exec stream closed by kuberun")))

    async def wait(self) -> ExecResult:
        return await asyncio.shield(self._done)


async def open_baseline(
    self: execstream.ExecConnector,
    namespace: str,
    pod: str,
    container: str,
    command: Sequence[str],
    listener: ExecListener,
    *,
    stdin: bool = True,
    tty: bool = False,
    timeout: float = 30.0,
) -> AiohttpExecStream:
    """Drop-in for ``ExecConnector.open``: the exec through kubernetes-asyncio's WsApiClient."""
    api = CoreV1Api(api_client=_ws_client(self._conf))

    async def connect() -> aiohttp.ClientWebSocketResponse:
        # The stub says ``command: str``, no ``_headers`` and an ``Awaitable[str]`` result;
        # through WsApiClient with _preload_content=False it takes the argv list and extra
        # headers and resolves to an awaitable aiohttp WebSocket.
        connect_exec = cast(
            Callable[..., Awaitable[Awaitable[aiohttp.ClientWebSocketResponse]]],
            api.connect_get_namespaced_pod_exec,
        )
        ctx = await connect_exec(
            pod,
            namespace,
            command=list(command),
            container=container,
            stdin=stdin,
            stdout=True,
            stderr=not tty,
            tty=tty,
            _preload_content=False,
            _headers={"sec-websocket-protocol": V5},
        )
        return await ctx

    try:
        ws = await asyncio.wait_for(connect(), timeout)
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        raise CommandStartError(f"exec failed: {exc!r}") from exc
    # aiohttp fills ``ws.protocol`` only for ``protocols=``; the header was set by hand.
    protocol = ws.protocol
    if not protocol:
        protocol = ws._response.headers.get("Sec-WebSocket-Protocol", V5)
    return AiohttpExecStream(listener, ws, protocol)


def install() -> None:
    """Make every exec in this process go through the baseline stream."""
    execstream.ExecConnector.open = open_baseline  # type: ignore[assignment,method-assign]
