"""``pods/exec`` over WebSocket, as kube-apiserver (v5) and the CRI server (v1-v4) serve it.

devcluster is a test double, not a production runtime. The WebSocket layer is
aiohttp's server, an RFC 6455 implementation independent of kuberun's own
relay codec, so a framing bug on one side cannot hide the same bug on the
other. Behaviour follows the exec protocol spec: negotiation (§0, §1.5), errors
before the upgrade (§1.7), the initial empty message (§2.5), channel-3 statuses
byte for byte (§2.6.2), resize (§2.7), the v5 CLOSE signal (§2.8) and the end
of a session (§2.10): outputs, status, Close 1000, TCP close.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import pty
import secrets
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from aiohttp import WSMsgType, web

from .apierrors import bad_request, go_json, not_found
from .containers import Container
from .kubelet import PodWorker, exec_failure
from .runtime import FdReader, FdWriter, Proc, Runtime, make_pipe, set_winsize
from .selectors import parse_bool


class _Abortable(Protocol):
    def abort(self) -> None: ...


_Session = TypeVar("_Session", bound=_Abortable)

__all__ = ["ExecHandler", "negotiate"]

log = logging.getLogger("kuberun.devcluster")

V5 = "v5.channel.k8s.io"
# What the CRI streaming server accepts (the v1-v4 path), in no particular order:
# the client's order decides.
LEGACY = (
    "channel.k8s.io",
    "base64.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
)
BASE64 = ("base64.channel.k8s.io", "v4.base64.channel.k8s.io")
BEARER_PROTOCOL = "base64url.bearer.authorization.k8s.io."
MAX_DATA = 32 * 1024  # io.Copy's buffer: at most 32 KiB of data per message
# Bulk messages carry a little less so that header + channel + data is exactly two
# TLS records (16 KiB each): a client then never reads a record split across messages.
SLOT = 2 * 16384
BULK_DATA = SLOT - 5
SLOTS = 8
READ_SIZE = 256 * 1024
TTY_SIZE_WAIT = 0.1  # seconds a tty exec waits for the client's first resize
_HEAD7 = struct.Struct("!BBB")
_HEAD16 = struct.Struct("!BBHB")
MAX_MESSAGE = 32 << 20  # x/net/websocket's DefaultMaxPayloadBytes

STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255


def offered_protocols(header: str | None) -> list[str]:
    """Subprotocols in one header line, without the bearer-token pseudo-protocol."""
    if header is None:
        return []
    return [
        p.strip()
        for p in header.split(",")
        if p.strip() and not p.strip().startswith(BEARER_PROTOCOL)
    ]


def negotiate(header: str | None) -> str | None:
    """The chosen subprotocol; ``""`` for none offered; None when nothing fits (403).

    v5 anywhere in the list wins (the API server's translator only speaks v5);
    otherwise the first offer the CRI server knows, in the client's order.
    """
    offered = offered_protocols(header)
    if not offered:
        return ""
    if V5 in offered:
        return V5
    for proto in offered:
        if proto in LEGACY:
            return proto
    return None


def bearer_from_protocols(header: str | None) -> str | None:
    """The token a browser-style client put into ``Sec-WebSocket-Protocol``."""
    if header is None:
        return None
    for proto in header.split(","):
        proto = proto.strip()
        if proto.startswith(BEARER_PROTOCOL):
            raw = proto[len(BEARER_PROTOCOL) :]
            try:
                return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None
    return None


def status_json(status: dict[str, Any]) -> bytes:
    """Channel-3 form: compact, no kind/apiVersion, no trailing newline."""
    return go_json(status)


# The API server's translator (v5) encodes Statuses with ``"metadata":{}``; the kubelet's
# own WebSocket server (v1-v4, proxied as they are) without it, and its InternalError
# without details. Observed on Kubernetes v1.37 (tests/integration/test_fidelity.py).


def success_status(v5: bool = True) -> dict[str, Any]:
    return {"metadata": {}, "status": "Success"} if v5 else {"status": "Success"}


def exit_status(code: int, argv: list[str], v5: bool) -> dict[str, Any]:
    """NonZeroExitCode as the translator (v5) or the kubelet (v4) words it."""
    inner = (
        f"command terminated with exit code {code}"
        if v5
        else f"error executing command [{' '.join(argv)}], exit code {code}"
    )
    status: dict[str, Any] = {"metadata": {}} if v5 else {}
    status.update(
        status="Failure",
        message=f"command terminated with non-zero exit code: {inner}",
        reason="NonZeroExitCode",
        details={"causes": [{"reason": "ExitCode", "message": str(code)}]},
    )
    return status


def internal_status(message: str, v5: bool = True) -> dict[str, Any]:
    """InternalError: with one cause (``apierrors.NewInternalError``) from the
    translator (v5), without details from the kubelet (v4)."""
    if not v5:
        return {
            "status": "Failure",
            "message": f"Internal error occurred: {message}",
            "reason": "InternalError",
            "code": 500,
        }
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"Internal error occurred: {message}",
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    }


@dataclass
class ExecOptions:
    """``PodExecOptions`` from the query string."""

    command: list[str]
    container: str | None
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool

    @classmethod
    def from_query(cls, query: Any) -> ExecOptions:
        return cls(
            command=list(query.getall("command", [])),
            container=query.get("container") or None,
            stdin=parse_bool(query.get("stdin")),
            stdout=parse_bool(query.get("stdout")),
            stderr=parse_bool(query.get("stderr")),
            tty=parse_bool(query.get("tty")),
        )


def _text(status: int, body: str, headers: dict[str, str] | None = None) -> web.Response:
    resp = web.Response(status=status, text=body, headers=headers)
    resp.content_type = "text/plain"
    resp.charset = "utf-8"
    return resp


async def accept_websocket(request: web.Request, protocol: str) -> web.WebSocketResponse:
    """Switch protocols to ``protocol`` (``""``: none), as the CRI streaming server does."""
    ws = web.WebSocketResponse(
        protocols=(protocol,) if protocol else (),
        timeout=0,  # never wait for the client's Close reply (spec §2.1)
        autoclose=True,
        autoping=True,
        compress=False,
        max_msg_size=MAX_MESSAGE,
        decode_text=False,
    )
    await ws.prepare(request)
    return ws


async def close_websocket(request: web.Request, ws: web.WebSocketResponse) -> None:
    """Close 1000, then TCP close without waiting for the client's Close."""
    with contextlib.suppress(Exception):
        await ws.close(code=1000)
    transport = request.transport
    if transport is not None:
        transport.close()


def upgrade_refusal(request: web.Request) -> web.Response | None:
    """The kubelet's answer to a streaming request that is no valid WebSocket
    upgrade (None: it is one). Not an upgrade at all raises 400."""
    headers = request.headers
    upgrade = headers.get("Upgrade", "").lower()
    is_ws = upgrade == "websocket" and "upgrade" in headers.get("Connection", "").lower()
    if not is_ws:
        raise bad_request("Upgrade request required")
    if request.method != "GET":
        return _text(405, "bad method")
    if headers.get("Sec-WebSocket-Version") != "13":
        return _text(400, "missing or bad WebSocket Version", {"Sec-WebSocket-Version": "13"})
    key = headers.get("Sec-WebSocket-Key", "")
    try:
        key_ok = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        key_ok = False
    if not key_ok:
        return _text(400, "mismatch challenge/response")
    return None


def resolve_container(pod: dict[str, Any], wanted: str | None) -> str:
    """The container name the request targets (the API server's ``validateContainer``)."""
    spec = pod.get("spec") or {}
    name = pod["metadata"]["name"]
    mains = [str(c.get("name", "")) for c in spec.get("containers") or []]
    others = [
        str(c.get("name", ""))
        for c in (spec.get("initContainers") or []) + (spec.get("ephemeralContainers") or [])
    ]
    if wanted:
        if wanted not in mains + others:
            raise bad_request(f"container {wanted} is not valid for pod {name}")
        return str(wanted)
    if len(mains) == 1:
        return mains[0]
    raise bad_request(
        f"a container name must be specified for pod {name}, "
        f"choose one of: [{' '.join(mains + others)}]"
    )


class RunningSessions(Generic[_Session]):
    """The streams a handler is serving, so that a stopping server can cut them all."""

    def __init__(self) -> None:
        self._running: set[_Session] = set()

    def __len__(self) -> int:
        return len(self._running)

    @contextlib.contextmanager
    def running(self, session: _Session) -> Iterator[None]:
        """Count ``session`` as running for the duration of the ``with`` block."""
        self._running.add(session)
        try:
            yield
        finally:
            self._running.discard(session)

    def abort_all(self) -> None:
        """Cut every running session (server shutdown)."""
        for session in list(self._running):
            session.abort()


class ExecHandler:
    """Serves the exec subresource for a cluster (see :meth:`handle`)."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.sessions = RunningSessions["ExecSession"]()

    async def handle(self, request: web.Request, namespace: str, name: str) -> web.StreamResponse:
        store = self.cluster.store
        pod = store.get("pods", namespace, name)
        if pod is None:
            raise not_found("pods", name)
        opts = ExecOptions.from_query(request.query)
        container = resolve_container(pod, opts.container)
        if not (pod.get("spec") or {}).get("nodeName"):
            raise bad_request(f"pod {name} does not have a host assigned")
        refusal = upgrade_refusal(request)
        if refusal is not None:
            return refusal
        # Only the first header line counts, as with Go's Header.Get.
        protocol = negotiate(request.headers.getone("Sec-WebSocket-Protocol", None))
        if protocol is None:
            return web.Response(status=403)
        v5 = protocol == V5
        worker: PodWorker | None = self.cluster.kubelet.worker_for(pod)
        ctr = worker.container(container) if worker is not None else None
        problem: tuple[int, str] | None = None
        if not opts.command:
            problem = (400, "you must provide at least one command")
        elif not (opts.stdin or opts.stdout or opts.stderr):
            problem = (400, "you must specify at least 1 of stdin, stdout, stderr")
        elif worker is None:
            problem = (404, "pod does not exist")
        elif ctr is None or not ctr.running:
            problem = (500, f'container not found ("{container}")')
        if problem is not None and not v5:
            # The CRI server refuses before upgrading, in plain text.
            return _text(problem[0], problem[1])
        ws = await accept_websocket(request, protocol)
        session = ExecSession(self, request, ws, protocol, opts, namespace, name)
        with self.sessions.running(session):
            if problem is not None or ctr is None:
                text = problem[1] if problem else f'container not found ("{container}")'
                await session.fail(f"unable to upgrade connection: {text}", wrap=False)
            else:
                await session.run(ctr)
        return ws


class ExecSession:
    """One exec stream between a WebSocket and a process group."""

    def __init__(
        self,
        handler: ExecHandler,
        request: web.Request,
        ws: web.WebSocketResponse,
        protocol: str,
        opts: ExecOptions,
        namespace: str,
        name: str,
    ) -> None:
        self.handler = handler
        self.request = request
        self.ws = ws
        self.protocol = protocol
        self.v5 = protocol == V5
        self.base64 = protocol in BASE64
        self.json_status = protocol.startswith(("v4.", "v5."))
        self.opts = opts
        self.tty = opts.tty
        self.runtime: Runtime = handler.cluster.runtime
        self.drop_after: int | None = handler.cluster.faults.exec_drop_after(namespace, name)
        self.hostile: bytes | None = handler.cluster.faults.exec_hostile(
            namespace, name, opts.command
        )
        self.sent = 0
        self.dropped = False
        self.stdin: FdWriter | None = None
        self.stdin_open = False
        self.master: int | None = None
        self.fds: list[int] = []
        self.resize_buffer = ""
        self.resize_ok = True
        self.exec_id = secrets.token_hex(32)
        self.stdout_fd = -1
        self.stderr_fd = -1

    # ---- output -----------------------------------------------------------------
    async def send(self, channel: int, data: bytes | memoryview) -> None:
        if self.drop_after is not None:
            room = self.drop_after - self.sent
            if len(data) >= room:
                if room > 0:
                    await self._send_frame(channel, data[:room])
                self.sent += max(room, 0)
                self.abort()
                raise ConnectionResetError("exec stream dropped by fault injection")
        self.sent += len(data)
        await self._send_frame(channel, data)

    async def _send_frame(self, channel: int, data: bytes | memoryview) -> None:
        if self.base64:
            await self.ws.send_frame(str(channel).encode() + base64.b64encode(data), WSMsgType.TEXT)
        else:
            await self.ws.send_bytes(bytes((channel,)) + data)

    def initial_channel(self) -> int:
        if self.opts.stdout:
            return STDOUT
        # The v5 translator opens stderr even with a tty; the kubelet forces it off.
        if self.opts.stderr and (self.v5 or not self.tty):
            return STDERR
        return ERROR

    async def send_status(self, status: dict[str, Any] | None, text: str | None) -> None:
        """Channel 3: JSON for v4/v5, the bare message for v1 (nothing on success)."""
        if self.json_status:
            if status is not None:
                await self._send_frame(ERROR, status_json(status))
        elif text:
            await self._send_frame(ERROR, text.encode())

    async def finish(self) -> None:
        """Close 1000, then TCP close without waiting for the client's Close."""
        await close_websocket(self.request, self.ws)

    def abort(self) -> None:
        """Drop the connection without a Close frame (a lost stream)."""
        self.dropped = True
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    async def fail(self, message: str, wrap: bool = True) -> None:
        """Report a failure that happened after the upgrade, then end the session."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._send_frame(self.initial_channel(), b"")
            if self.v5 and wrap:
                # The translator re-wraps the runtime's InternalError (doubled prefix).
                status = internal_status(f"Internal error occurred: {message}")
            else:
                status = internal_status(message, self.v5)
            await self.send_status(status, status["message"])
        await self.finish()

    # ---- the session ----------------------------------------------------------------
    def _open_streams(self) -> tuple[int, int, int, list[int]]:
        """Pipes or a pty for the process: (stdin, stdout, stderr, fds to close after fork)."""
        stdin: int = subprocess.DEVNULL
        stdout: int = subprocess.DEVNULL
        stderr: int = subprocess.DEVNULL
        child_fds: list[int] = []
        if self.tty:
            master, slave = pty.openpty()
            self.master = master
            self.fds.append(master)
            child_fds.append(slave)
            if self.opts.stdin:
                self.stdin = FdWriter(master)
                self.stdin_open = True
            return slave, slave, slave, child_fds
        if self.opts.stdin:
            r, w = make_pipe()
            stdin = r
            child_fds.append(r)
            self.fds.append(w)
            self.stdin = FdWriter(w)
            self.stdin_open = True
        if self.opts.stdout:
            r, w = make_pipe()
            stdout = w
            child_fds.append(w)
            self.fds.append(r)
            self.stdout_fd = r
        if self.opts.stderr:
            r, w = make_pipe()
            stderr = w
            child_fds.append(w)
            self.fds.append(r)
            self.stderr_fd = r
        return stdin, stdout, stderr, child_fds

    def _spawn(self, ctr: Container, streams: tuple[int, int, int, list[int]]) -> Proc:
        stdin, stdout, stderr, child_fds = streams
        env = dict(ctr.env)
        if self.tty and "TERM" not in env:
            env["TERM"] = "xterm"
        try:
            return self.runtime.spawn(
                self.opts.command,
                env,
                ctr.cwd,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                tty=self.tty,
            )
        finally:
            for fd in child_fds:
                os.close(fd)

    async def _early_messages(self) -> list[Any] | None:
        """With a tty, what the client sends before its first resize (bounded wait).

        On a node, exec setup takes longer than a client needs to send its terminal
        size, so programs start with the right size; devcluster starts processes in
        a millisecond, so it waits for that first resize (at most TTY_SIZE_WAIT).
        None when the client went away meanwhile.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TTY_SIZE_WAIT
        early: list[Any] = []
        while (remaining := deadline - loop.time()) > 0:
            try:
                msg = await self.ws.receive(timeout=remaining)
            except asyncio.TimeoutError:
                break
            if msg.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                return None
            early.append(msg)
            if self._channel_of(msg.data) == RESIZE:
                break
        return early

    def _channel_of(self, data: bytes) -> int | None:
        if not data:
            return None
        return data[0] - 0x30 if self.base64 else data[0]

    async def run(self, ctr: Container) -> None:
        try:
            await self._send_frame(self.initial_channel(), b"")
        except (ConnectionError, RuntimeError):
            await self.finish()
            return
        if self.hostile is not None:
            # Fault injection: raw bytes that break the protocol, then TCP close.
            transport = self.request.transport
            if transport is not None:
                transport.write(self.hostile)
                transport.close()
            return
        early: list[Any] = []
        if self.tty:
            waited = await self._early_messages()
            if waited is None:
                await self.finish()
                return
            early = waited
        streams = self._open_streams()
        # Sizes first (the process must start with them); input once it runs.
        for msg in early:
            if self._channel_of(msg.data) == RESIZE:
                await self._handle(msg)
        try:
            proc = self._spawn(ctr, streams)
        except OSError as exc:
            self._close_fds()
            await self._start_failed(ctr, exc)
            return
        ctr.execs.add(proc)
        proc.exited.add_done_callback(lambda _f: ctr.execs.discard(proc))
        for msg in early:
            if self._channel_of(msg.data) != RESIZE and not await self._handle(msg):
                break
        if self.tty:
            assert self.master is not None
            outputs = [self._pump(FdReader(self.master), STDOUT if self.opts.stdout else None)]
        else:
            outputs = []
            if self.opts.stdout:
                outputs.append(self._pump(FdReader(self.stdout_fd), STDOUT))
            if self.opts.stderr:
                outputs.append(self._pump(FdReader(self.stderr_fd), STDERR))
        # The pump tasks are kept: when one fails, gather() leaves the others running,
        # and they must stop (and unregister their fds) before the fds are closed.
        pump_tasks = [asyncio.ensure_future(output) for output in outputs]
        pumps = asyncio.ensure_future(asyncio.gather(*pump_tasks))
        reader = asyncio.ensure_future(self._input())
        ended = asyncio.ensure_future(_both(pumps, proc.exited))
        try:
            done, _ = await asyncio.wait({ended, reader}, return_when=asyncio.FIRST_COMPLETED)
            if ended in done and ended.exception() is None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
                code = proc.exited.result()
                if code == 0:
                    await self.send_status(success_status(self.v5), None)
                else:
                    status = exit_status(code, self.opts.command, self.v5)
                    await self.send_status(
                        status, exit_status(code, self.opts.command, False)["message"]
                    )
                await self.finish()
            else:
                # The client went away (Close, TCP drop) or the output side failed.
                # The process is not killed: it runs on without its streams, as on a node.
                if not self.dropped:
                    await self.finish()
        except (ConnectionError, RuntimeError):
            pass
        finally:
            tasks: list[asyncio.Future[Any]] = [reader, pumps, ended, *pump_tasks]
            for task in tasks:
                task.cancel()
            await asyncio.gather(reader, pumps, ended, *pump_tasks, return_exceptions=True)
            self._close_fds()

    async def _start_failed(self, ctr: Container, exc: OSError) -> None:
        cause = _start_cause(self.opts.command[0], ctr.cwd, exc)
        inner = (
            "error executing command in container: failed to exec in container: failed to start "
            f'exec "{self.exec_id}": OCI runtime exec failed: exec failed: unable to start '
            f"container process: {cause}"
        )
        with contextlib.suppress(ConnectionError, RuntimeError):
            v4_status = internal_status(inner, v5=False)
            status = internal_status(v4_status["message"]) if self.v5 else v4_status
            await self.send_status(status, v4_status["message"])
        await self.finish()

    async def _pump(self, reader: FdReader, channel: int | None) -> None:
        if channel is not None and not self.base64 and self.drop_after is None:
            await self._pump_bulk(reader, channel)
            return
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                return
            if channel is None:
                continue
            view = memoryview(data)
            for offset in range(0, len(data), MAX_DATA):
                await self.send(channel, view[offset : offset + MAX_DATA])

    async def _pump_bulk(self, reader: FdReader, channel: int) -> None:
        def count(n: int) -> None:
            self.sent += n

        await pump_bulk(self.request, self.ws, reader, channel, count)

    async def _input(self) -> None:
        while True:
            msg = await self.ws.receive()
            if msg.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                return  # CLOSE (aiohttp already answered 1000), CLOSED, ERROR
            if not await self._handle(msg):
                return

    async def _handle(self, msg: Any) -> bool:
        """Act on one client message; False once the connection must end."""
        data: bytes = msg.data
        if not data:
            return True
        if self.v5 and data[0] == CLOSE and msg.type == WSMsgType.BINARY:
            if len(data) != 2 or data[1] >= 5:
                await self.finish()
                return False
            if data[1] == STDIN:
                self._close_stdin()
            elif data[1] == RESIZE:
                self.resize_ok = False
            return True
        if self.base64:
            channel = data[0] - 0x30
            try:
                payload = base64.b64decode(data[1:], validate=True)
            except (binascii.Error, ValueError):
                return True
        else:
            channel = data[0]
            payload = data[1:]
        if channel == STDIN:
            await self._write_stdin(payload)
        elif channel == RESIZE:
            self._resize(payload)
        return True

    async def _write_stdin(self, payload: bytes) -> None:
        if not self.stdin_open or self.stdin is None or not payload:
            return
        try:
            await self.stdin.write(payload)
        except OSError:
            # The process closed its stdin or exited; later input is dropped.
            self.stdin_open = False

    def _close_stdin(self) -> None:
        if not self.stdin_open:
            return
        self.stdin_open = False
        if self.tty or self.stdin is None:
            return  # a pty is not hung up by a stdin close (containerd/runc behaviour)
        fd = self.stdin.fd
        if fd in self.fds:
            self.fds.remove(fd)
            os.close(fd)

    def _resize(self, payload: bytes) -> None:
        """Decode concatenated ``{"Width":W,"Height":H}`` objects; a bad one ends resizing."""
        if not self.resize_ok:
            return
        try:
            self.resize_buffer += payload.decode("utf-8")
        except UnicodeDecodeError:
            self.resize_ok = False
            return
        decoder = json.JSONDecoder()
        while True:
            text = self.resize_buffer.lstrip()
            if not text:
                self.resize_buffer = ""
                return
            try:
                obj, end = decoder.raw_decode(text)
            except json.JSONDecodeError as exc:
                if exc.pos >= len(text) or "Unterminated" in exc.msg:
                    self.resize_buffer = text  # incomplete: wait for more bytes
                else:
                    self.resize_ok = False
                return
            self.resize_buffer = text[end:]
            size = _terminal_size(obj)
            if size is None:
                self.resize_ok = False
                return
            if self.tty and self.master is not None:
                with contextlib.suppress(OSError):
                    set_winsize(self.master, size[1], size[0])

    def _close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


async def pump_bulk(
    request: web.Request,
    ws: web.WebSocketResponse,
    reader: FdReader,
    channel: int,
    count: Callable[[int], None],
) -> None:
    """Bulk output: ``reader``'s bytes go straight into ready-made binary messages on
    ``channel`` until EOF (``count`` hears each batch's size).

    A scatter read fills up to :data:`SLOTS` message slots at once (a pipe holds
    up to 1 MiB); each slot is header + channel byte + data, exactly two TLS
    records long, so a client decrypts whole records per message. The batch goes
    out in one transport write (aiohttp's writer would make two TLS writes per
    message). Handshake, input, pings and close stay with aiohttp's server.
    """
    protocol = request.protocol
    assert protocol is not None
    while True:
        buf = bytearray(SLOT * SLOTS)  # fresh each time: the transport may keep views
        view = memoryview(buf)
        n = await reader.readv([view[i * SLOT + 5 : (i + 1) * SLOT] for i in range(SLOTS)])
        if n == 0:
            return
        transport = request.transport
        if transport is None or transport.is_closing() or ws.closed:
            raise ConnectionResetError("the WebSocket client went away")
        count(n)
        # Full slots are back-to-back messages; a short last one follows them
        # directly when it needs the 16-bit length form, so one write usually does.
        full, rest = divmod(n, BULK_DATA)
        for i in range(full):
            _HEAD16.pack_into(buf, i * SLOT, 0x82, 126, SLOT - 4, channel)
        end = full * SLOT
        if rest + 1 >= 126:
            _HEAD16.pack_into(buf, end, 0x82, 126, rest + 1, channel)
            transport.write(view[: end + 5 + rest])
        elif rest:
            _HEAD7.pack_into(buf, end + 2, 0x82, rest + 1, channel)
            transport.writelines([view[:end], view[end + 2 : end + 5 + rest]])
        else:
            transport.write(view[:end])
        if protocol.writing_paused:
            # Wait until the socket drains: a slow reader slows the writer down
            # instead of growing our buffers.
            await protocol._drain_helper()


def _start_cause(program: str, cwd: str | None, exc: OSError) -> str:
    """runc's reason for an exec that could not start."""
    if cwd and not os.path.isdir(cwd):
        return f'chdir to cwd ("{cwd}") set in config.json failed: no such file or directory'
    return exec_failure(program, exc)


def _terminal_size(obj: Any) -> tuple[int, int] | None:
    """(width, height) from a decoded TerminalSize, or None when Go would reject it."""
    if not isinstance(obj, dict):
        return None
    width = height = 0
    for key, value in obj.items():
        field = key.lower()
        if field not in ("width", "height"):
            continue
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
            return None
        if field == "width":
            width = value
        else:
            height = value
    return width, height


async def _both(pumps: asyncio.Future[Any], exited: asyncio.Future[int]) -> None:
    await pumps
    await exited
