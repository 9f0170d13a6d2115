"""asyncio glue for one Kubernetes exec: the WebSocket upgrade, the relay codec, flow control.

kuberun opens the exec WebSocket itself instead of going through aiohttp: one
TLS connection per exec, an :class:`asyncio.BufferedProtocol` whose receive
buffer belongs to the relay decoder (uvloop decrypts straight into it), and
payload views handed to the SSH channel as they arrive. Nothing here runs per
frame except the decoder's sink calls; there are no per-frame awaits or futures.

Flow control is coupled both ways:

* SSH channel send buffer full → :meth:`ExecStream.pause_output` →
  ``transport.pause_reading()`` → TCP window closes → the API server stops.
* TLS socket write buffer full → ``listener.exec_pause_input()`` → the SSH
  channel stops reading → the SSH window closes → the client stops.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import urlsplit

from . import relay
from ._cancel import wait_for
from .errors import (
    CommandStartError,
    ExecError,
    ExecProtocolError,
    ExecStreamLost,
    KuberunError,
)
from .upgrade import (
    MAX_HEAD,
    SUBPROTOCOLS,
    accept_key,
    build_request,
    error_message,
    exec_path,
    new_key,
    parse_response_head,
)

__all__ = ["ExecConnector", "ExecListener", "ExecResult", "ExecStream"]

_log = logging.getLogger(__name__)

#: Backoff between attempts to open an exec (429, 5xx, dropped connections).
_RETRY_FIRST = 0.1
_RETRY_MAX = 2.0

#: Pause the SSH side once this much stdin waits in the TLS write buffer.
WRITE_HIGH_WATER = 256 * 1024

# Queued stdin goes out in writes of up to this much data (the encoder's frame size).
_STDIN_GROUP = 65536

# A first stdin write of an event-loop iteration below this size (a keystroke, a
# line) goes out at once; a bigger one (bulk data: asyncssh hands over a socket
# read as 32 KiB packets in one go) waits for the rest of the iteration's packets.
_STDIN_IMMEDIATE = 4096

# First size of the response head buffer: with a thousand sessions, a MAX_HEAD
# buffer per exec open is tens of KiB of resident memory per session.
_HEAD_START = 4096
#: How much of what the TLS layer still holds is read at a time when a stream ends.
_DRAIN_READ = 256 * 1024


@dataclass(frozen=True)
class ExecResult:
    """How an exec ended: an exit status, or an error that explains why there is none."""

    exit_status: int | None
    error: KuberunError | None = None


class ExecListener(Protocol):
    """What an :class:`ExecStream` reports to (the SSH session implements it)."""

    # Attributes rather than methods so a session can hand over the SSH
    # channel's own bound ``write``/``write_stderr`` with no wrapper call.
    @property
    def exec_stdout(self) -> Callable[[memoryview], object]: ...
    @property
    def exec_stderr(self) -> Callable[[memoryview], object]: ...

    def exec_pause_input(self) -> None: ...
    def exec_resume_input(self) -> None: ...
    def exec_finished(self, result: ExecResult) -> None: ...


class _Sink:
    """Adapter handed to the relay decoder; output calls go straight to the listener."""

    __slots__ = ("on_close", "on_ping", "on_status", "on_stderr", "on_stdout")

    def __init__(self, stream: ExecStream, listener: ExecListener) -> None:
        self.on_stdout = listener.exec_stdout
        self.on_stderr = listener.exec_stderr
        self.on_status = stream._on_status
        self.on_ping = stream._on_ping
        self.on_close = stream._on_close


_S = TypeVar("_S", bound="ExecStream")


def make_decoder(sink: object, protocol: str, **options: Any) -> Any:
    """A relay decoder of the implementation this module uses (tests switch it)."""
    return relay.ExecDecoder(cast(Any, sink), protocol, **options)


def _consume_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class ExecStream(asyncio.BufferedProtocol):
    """One exec WebSocket. Create it with :meth:`ExecConnector.open`.

    Subclasses serve other Kubernetes channel streams over the same machinery
    (``kuberun.portforward``): they name their subprotocols and build their decoder.
    """

    #: Subprotocols offered, and accepted in the answer.
    subprotocols: tuple[str, ...] = SUBPROTOCOLS
    #: What the stream is, in messages.
    what = "exec"

    def __init__(self, listener: ExecListener, key: str, ping_interval: float) -> None:
        self._listener = listener
        self._key = key
        self._ping_interval = ping_interval
        self._transport: asyncio.Transport | None = None
        # The response head is read into this buffer; a refusal's body reuses it as scratch.
        # It starts small (a 101 head is a few hundred bytes) and grows up to MAX_HEAD.
        self._head = bytearray(_HEAD_START)
        self._head_len = 0
        self._response_body: bytearray | None = None
        self._refused: Any = None
        self._body_left = -1
        self._decoder: Any = None
        self._encoder = relay.ExecEncoder()
        self._upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Its opener may be gone (cancelled: the client left, the open timed out) by the
        # time the upgrade fails; the failure then concerns no one and must not reach
        # the event loop's handler as "Future exception was never retrieved".
        self._upgraded.add_done_callback(_consume_exception)
        self._status: bytes | None = None
        self._finished = False
        self._done: asyncio.Future[ExecResult] = asyncio.get_running_loop().create_future()
        self._ping_handle: asyncio.TimerHandle | None = None
        self._rx_seen = True
        self._ping_sent = False
        self._stdin_closed = False
        # stdin written after the first write of an event-loop iteration waits
        # here and goes out together: fewer, larger frames, one TLS write and one
        # send() instead of one per SSH packet.
        self._stdin_pending: list[bytes] | None = None
        self._output_paused = False
        self._ssl_object: Any = None
        self.protocol = ""

    # -- asyncio protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass; it has
        # the same methods.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._ssl_object = transport.get_extra_info("ssl_object")

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._decoder is not None:
            buf: memoryview = self._decoder.get_buffer(sizehint)
            return buf
        if self._response_body is not None:
            return memoryview(self._head)
        size = len(self._head)
        if self._head_len == size and size < MAX_HEAD + 4:
            # Full but still without its end: a new, bigger buffer (the old one may
            # still be exported to the transport's last read).
            self._head = self._head + bytes(min(2 * size, MAX_HEAD + 4) - size)
        return memoryview(self._head)[self._head_len :]

    def buffer_updated(self, nbytes: int) -> None:
        self._rx_seen = True
        decoder = self._decoder
        if decoder is not None:
            try:
                decoder.buffer_updated(nbytes)
            except ExecProtocolError as exc:
                self._fail(exc)
            except Exception as exc:  # the SSH side went away mid-write, or a bug
                lost = ExecStreamLost(f"relay stopped: {exc!r}")
                self._fail(lost.told("exec stream lost"))
            return
        if self._response_body is not None:
            self._collect_body(nbytes)
            return
        self._head_len += nbytes
        self._try_parse_head()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_ping()
        self._transport = None
        if not self._upgraded.done():
            refused = self._refused
            if refused is not None:
                hint = refused.header("retry-after")
                self._upgraded.set_exception(
                    CommandStartError(
                        error_message(
                            refused,
                            bytes(self._response_body or b""),
                            self.what,
                            self.subprotocols,
                        ),
                        refused.status,
                        retry_after=float(hint) if hint.isascii() and hint.isdigit() else None,
                    )
                )
            else:
                self._upgraded.set_exception(
                    CommandStartError(
                        f"API server closed the connection during the upgrade: {exc}",
                        transient=True,
                    ).told("the cluster closed the connection while the command was starting")
                )
            return
        if self._decoder is None:
            return  # the upgrade failed: the opener has its error, the listener hears nothing
        if self._status is None and exc is None and not self._finished:
            self._drain_tls()
        if self._status is not None:
            self._finish(self._result_from_status())
        else:
            self._release_held()
            detail = f": {exc}" if exc else ""
            lost = ExecStreamLost(f"exec stream lost{detail}").told("exec stream lost")
            self._finish(ExecResult(None, lost))

    def _drain_tls(self) -> None:
        """Parse what the TLS layer decrypted, or still holds, but never handed over.

        An API server ends an exec by closing the connection right after the status,
        without a Close handshake. When its EOF reaches a TLS transport whose reading
        we paused (the SSH client is slow), uvloop shuts the transport down at once
        and asyncio after one more read: the last output and the status stay in the
        TLS object. They are read from it here, at the end (documented
        ``get_extra_info("ssl_object")``), so a clean close loses nothing.
        """
        tls = self._ssl_object
        decoder = self._decoder
        if tls is None or decoder is None:
            return
        try:
            while not self._finished:
                data = tls.read(_DRAIN_READ)
                if not data:
                    break
                decoder.feed(data)
        except (ssl.SSLError, ValueError):
            pass  # nothing more (SSLWantReadError), a close_notify, or a closed object
        except ExecProtocolError as exc:
            self._fail(exc)
        except Exception as exc:  # the SSH side went away mid-write, or a bug
            self._fail(ExecStreamLost(f"relay stopped: {exc!r}"))

    def pause_writing(self) -> None:
        self._listener.exec_pause_input()

    def resume_writing(self) -> None:
        self._listener.exec_resume_input()

    # -- handshake --------------------------------------------------------

    def _try_parse_head(self) -> None:
        view = memoryview(self._head)[: self._head_len]
        end = bytes(view).find(b"\r\n\r\n")
        if end < 0:
            if self._head_len >= MAX_HEAD:
                self._abort_upgrade(CommandStartError("API server sent an oversized response head"))
            return
        try:
            response = parse_response_head(bytes(view[:end]))
        except CommandStartError as exc:
            self._abort_upgrade(exc)
            return
        rest = bytes(view[end + 4 :])
        if response.status != 101:
            self._refused = response
            self._response_body = bytearray(rest)
            length = response.content_length()
            self._body_left = max(length - len(rest), 0) if length is not None else -1
            self._collect_body(0)
            return
        problem = ""
        if response.header("sec-websocket-accept") != accept_key(self._key):
            problem = "bad Sec-WebSocket-Accept"
        elif response.header("upgrade").lower() != "websocket":
            problem = "missing 'Upgrade: websocket'"
        protocol = response.header("sec-websocket-protocol")
        if not problem and protocol not in self.subprotocols:
            problem = f"unexpected subprotocol {protocol!r}"
        if problem:
            self._abort_upgrade(
                CommandStartError(f"invalid WebSocket upgrade from the API server: {problem}")
            )
            return
        if self._upgraded.done():
            # The opener gave up (cancelled: the client left, or the open timed out)
            # and is closing the connection; no one will ever use this stream.
            if self._transport is not None:
                self._transport.abort()
            return
        self.protocol = protocol
        self._decoder = self._new_decoder(protocol)
        self._head = bytearray()
        self._upgraded.set_result(None)
        self._arm_ping()
        if rest:
            try:
                self._decoder.feed(rest)
            except ExecProtocolError as exc:
                self._fail(exc)

    def _new_decoder(self, protocol: str) -> Any:
        return make_decoder(_Sink(self, self._listener), protocol)

    def _collect_body(self, nbytes: int) -> None:
        # Bodies of refusals are small Status objects; keep at most 64 KiB.
        body = self._response_body
        assert body is not None
        if nbytes:
            body += self._head[:nbytes]
            if self._body_left > 0:
                self._body_left -= nbytes
        done = self._body_left == 0 or len(body) > 65536
        if done and self._transport is not None:
            self._transport.close()

    def _abort_upgrade(self, exc: CommandStartError) -> None:
        if not self._upgraded.done():
            self._upgraded.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()

    # -- decoder callbacks ------------------------------------------------

    # The decoder calls these while it parses. Anything that writes to or
    # closes the TLS transport is deferred with call_soon: asyncio's TLS layer
    # may read again from inside write()/close(), re-entering the decoder.

    def _on_status(self, data: bytes) -> None:
        self._status = data
        # Kubernetes sends all output before the status, so the exec is over:
        # report now rather than waiting for the close handshake.
        self._finish(self._result_from_status())
        asyncio.get_running_loop().call_soon(self._close_transport)

    def _on_ping(self, payload: bytes) -> None:
        asyncio.get_running_loop().call_soon(self._send, self._encoder.pong(payload))

    def _on_close(self, code: int | None, reason: str) -> None:
        asyncio.get_running_loop().call_soon(self._close_transport)
        if self._status is None:
            why = f" (code {code}{', ' + reason if reason else ''})" if code is not None else ""
            lost = ExecStreamLost(f"API server closed the exec stream without a status{why}")
            self._finish(ExecResult(None, lost))

    def _close_transport(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(self._encoder.close(1000, ""))
            transport.close()

    def _result_from_status(self) -> ExecResult:
        try:
            return ExecResult(relay.decode_status(self._status or b"", self.protocol))
        except ExecError as exc:
            return ExecResult(None, exc)

    # -- helpers ----------------------------------------------------------

    def _send(self, frame: bytes) -> None:
        if self._stdin_pending:
            self._flush_stdin()  # stdin written earlier goes first
            self._stdin_pending = []
        if frame and self._transport is not None and not self._transport.is_closing():
            self._transport.write(frame)

    def _flush_stdin(self) -> None:
        pending = self._stdin_pending
        self._stdin_pending = None
        transport = self._transport
        if not pending or transport is None or transport.is_closing():
            return
        # One write per 64 KiB (one message): bigger writes mean buffers above
        # malloc's mmap threshold, mapped and unmapped every time, and those page
        # faults cost more than the send() calls saved. stdin_many masks the
        # SSH packets straight into the frame (no join, one copy of the data).
        stdin_many = self._encoder.stdin_many
        group: list[bytes] = []
        size = 0
        for data in pending:
            if group and size + len(data) > _STDIN_GROUP:
                transport.write(stdin_many(group))
                group = []
                size = 0
            group.append(data)
            size += len(data)
        transport.write(stdin_many(group))

    def _release_held(self) -> None:
        """Output the decoder held back for a frame's end that will not come now."""
        decoder = self._decoder
        if decoder is not None and not self._finished:
            try:
                decoder.flush()
            except Exception:  # the SSH side is gone; the result says why
                _log.debug("held exec output could not be delivered", exc_info=True)

    def _fail(self, exc: KuberunError) -> None:
        self._release_held()
        self._finish(ExecResult(None, exc))
        if self._transport is not None:
            asyncio.get_running_loop().call_soon(self._transport.abort)

    def _finish(self, result: ExecResult) -> None:
        if self._finished:
            return
        self._finished = True
        self._cancel_ping()
        if not self._done.done():
            self._done.set_result(result)
        self._listener.exec_finished(result)

    def _arm_ping(self) -> None:
        if self._ping_interval > 0 and not self._finished:
            loop = asyncio.get_running_loop()
            self._ping_handle = loop.call_later(self._ping_interval, self._ping_tick)

    def _ping_tick(self) -> None:
        # A ping goes out only after an interval with nothing received, and never
        # while output is paused. Anything sent towards a node that has finished
        # the exec can cost its output: the kubelet closes the connection right
        # after the status, and a ping reaching it after that (or still unread
        # then) makes its kernel answer with a reset that discards what it had
        # not sent yet, the end of the output and the status. A node's send queue
        # stays full while a slow client holds the output back, so pings sent
        # then (not needed: data arriving proves the connection lives, and while
        # paused we could not read the pong) were what lost those ends.
        self._ping_handle = None
        if self._finished or self._transport is None:
            return
        if self._output_paused:
            self._ping_sent = False  # we are not reading, so silence proves nothing
        elif self._rx_seen:
            self._rx_seen = False
            self._ping_sent = False
        elif self._ping_sent:
            # Nothing at all (not even a pong) for a whole interval after a ping.
            self._fail(ExecStreamLost("API server stopped answering WebSocket pings"))
            return
        else:
            self._ping_sent = True
            self._send(self._encoder.ping(b""))
        self._arm_ping()

    def _cancel_ping(self) -> None:
        if self._ping_handle is not None:
            self._ping_handle.cancel()
            self._ping_handle = None

    # -- public API -------------------------------------------------------

    @property
    def can_close_stdin(self) -> bool:
        """True when the negotiated protocol can deliver stdin EOF (v5)."""
        return bool(self.protocol == relay.PROTOCOL_V5)

    @property
    def stdout_bytes(self) -> int:
        return int(self._decoder.stdout_bytes) if self._decoder is not None else 0

    @property
    def stderr_bytes(self) -> int:
        return int(self._decoder.stderr_bytes) if self._decoder is not None else 0

    @property
    def stdin_bytes(self) -> int:
        return int(self._encoder.stdin_bytes)

    @property
    def finished(self) -> bool:
        return self._finished

    def write_stdin(self, data: bytes) -> None:
        """Send SSH stdin to the process.

        A small first write of an event-loop iteration goes out at once (a
        keystroke waits for nothing); everything else written in the same
        iteration (asyncssh delivers a read's packets one by one) is sent
        together when it ends, in messages of up to 64 KiB.
        """
        transport = self._transport
        if transport is None or self._stdin_closed or self._finished:
            return
        pending = self._stdin_pending
        if pending is not None:
            pending.append(data)
            return
        asyncio.get_running_loop().call_soon(self._flush_stdin)
        if len(data) >= _STDIN_IMMEDIATE:
            self._stdin_pending = [data]
            return
        self._stdin_pending = []
        transport.write(self._encoder.stdin(data))

    def close_stdin(self) -> bool:
        """Deliver stdin EOF. Returns False on a v4 server, where it cannot be delivered."""
        if self._stdin_closed:
            return True
        self._stdin_closed = True
        if not self.can_close_stdin:
            return False
        self._send(self._encoder.close_stdin())
        return True

    def resize(self, width: int, height: int) -> None:
        """Send a terminal size on channel 4."""
        if not self._finished:
            self._send(self._encoder.resize(width, height))

    def drop_stdout(self) -> None:
        """Discard the program's stdout from now on: its reader has gone away. stderr
        and the exit status still arrive; the output is read and dropped, never held."""
        if self._decoder is not None:
            self._decoder.drop_stdout()

    def pause_output(self) -> None:
        """Stop reading from the API server (the SSH side is full)."""
        self._output_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_output(self) -> None:
        self._output_paused = False
        self._rx_seen = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def abort(self) -> None:
        """Drop the stream now; the listener gets a result if it had none."""
        if self._transport is not None:
            self._send(self._encoder.close(1000, ""))
            self._transport.close()
        if not self._finished:
            self._finish(ExecResult(None, ExecStreamLost("exec stream closed by kuberun")))

    async def wait(self) -> ExecResult:
        """Wait until the exec has ended."""
        return await asyncio.shield(self._done)


class ExecConnector:
    """Opens exec streams with the API server address and credentials of a
    kubernetes-asyncio ``Configuration``.

    The TLS context is built once and reused; the bearer token is fetched for
    every exec through the Configuration, so refresh hooks and exec credential
    plugins keep working.
    """

    def __init__(self, configuration: Any, *, ping_interval: float = 30.0) -> None:
        self._conf = configuration
        self._ping_interval = ping_interval
        url = urlsplit(str(configuration.host))
        if url.scheme not in ("https", "http"):
            raise CommandStartError(f"unsupported API server URL {configuration.host!r}")
        self._tls = url.scheme == "https"
        self._host = url.hostname or "localhost"
        self._port = url.port or (443 if self._tls else 80)
        self._prefix = url.path or ""
        host = f"[{self._host}]" if ":" in self._host else self._host
        default_port = 443 if self._tls else 80
        self._host_header = host if self._port == default_port else f"{host}:{self._port}"
        self._ssl: ssl.SSLContext | None = self._make_ssl() if self._tls else None
        self._server_hostname = getattr(configuration, "tls_server_name", None) or self._host

    @property
    def prefix(self) -> str:
        """The API server URL's path prefix (empty for most clusters)."""
        return self._prefix

    @property
    def ping_interval(self) -> float:
        """Seconds between WebSocket pings on the streams this connector opens."""
        return self._ping_interval

    def _make_ssl(self) -> ssl.SSLContext:
        conf = self._conf
        ctx = ssl.create_default_context(cafile=conf.ssl_ca_cert or None)
        if conf.cert_file:
            ctx.load_cert_chain(conf.cert_file, keyfile=conf.key_file)
        if not conf.verify_ssl:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        # The exec stream is HTTP/1.1 only (a WebSocket upgrade cannot ride HTTP/2).
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    async def _auth_headers(self) -> dict[str, str]:
        settings = await self._conf.auth_settings()
        headers: dict[str, str] = {}
        bearer = settings.get("BearerToken")
        if bearer and bearer.get("value"):
            headers["Authorization"] = str(bearer["value"])
        elif getattr(self._conf, "username", None) and getattr(self._conf, "password", None):
            headers["Authorization"] = str(self._conf.get_basic_auth_token())
        return headers

    async def open(
        self,
        namespace: str,
        pod: str,
        container: str,
        command: Sequence[str],
        listener: ExecListener,
        *,
        stdin: bool = True,
        tty: bool = False,
        timeout: float = 30.0,
    ) -> ExecStream:
        """Open an exec stream; returns once the API server has switched protocols.

        :raises CommandStartError: the upgrade was refused (the message carries
            the API server's own explanation) or did not finish in ``timeout``.
        """
        target = exec_path(self._prefix, namespace, pod, container, command, stdin=stdin, tty=tty)
        ping = self._ping_interval
        return await self.open_stream(
            target,
            lambda key: ExecStream(listener, key, ping),
            f"{namespace}/{pod}",
            ExecStream.subprotocols,
            ExecStream.what,
            timeout,
        )

    async def open_stream(
        self,
        target: str,
        make: Callable[[str], _S],
        label: str,
        subprotocols: Sequence[str],
        what: str,
        timeout: float,
    ) -> _S:
        """Open a Kubernetes channel stream at ``target`` (a request path with its
        query), with retries of transient failures until ``timeout``. ``make``
        builds the protocol object from the ``Sec-WebSocket-Key``.

        :raises CommandStartError: as :meth:`open`
        """
        started = time.monotonic()
        deadline = started + timeout
        delay = _RETRY_FIRST
        while True:
            try:
                proto = await self._open_once(
                    target, make, subprotocols, what, deadline - time.monotonic(), timeout
                )
                break
            except CommandStartError as exc:
                # 429, 5xx and dropped connections: the exec did not start, so
                # trying again is safe, as for every other API call.
                wait = random.uniform(delay / 2, delay)
                if exc.retry_after is not None:
                    wait = max(wait, exc.retry_after)
                if not exc.transient or time.monotonic() + wait >= deadline:
                    raise
                _log.debug("%s in %s: %s; retrying in %.2fs", what, label, exc, wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, _RETRY_MAX)
        _log.debug(
            "%s in %s opened with %s in %.1f ms",
            what,
            label,
            proto.protocol,
            (time.monotonic() - started) * 1000,
        )
        return proto

    async def _open_once(
        self,
        target: str,
        make: Callable[[str], _S],
        subprotocols: Sequence[str],
        what: str,
        timeout: float,
        budget: float,
    ) -> _S:
        loop = asyncio.get_running_loop()
        key = new_key()
        headers = await self._auth_headers()
        request = build_request(self._host_header, target, key, headers, subprotocols)
        opened: list[asyncio.Transport] = []

        async def connect() -> _S:
            transport, proto = await loop.create_connection(
                lambda: make(key),
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._server_hostname if self._ssl else None,
            )
            opened.append(transport)
            transport.write(request)
            await proto._upgraded
            return proto

        try:
            proto = await wait_for(connect(), timeout)
        except asyncio.TimeoutError:
            for transport in opened:
                transport.abort()
            raise CommandStartError(
                f"{what} did not start within {budget:.0f}s (API server {self._host}:{self._port})"
            ).told(f"the command did not start within {budget:.0f}s") from None
        except ssl.SSLError as exc:
            told = (
                "the cluster's TLS certificate could not be verified"
                if isinstance(exc, ssl.SSLCertVerificationError)
                else "TLS failure talking to the cluster"
            )
            raise CommandStartError(f"TLS failure talking to the API server: {exc}").told(
                told
            ) from exc
        except OSError as exc:
            raise CommandStartError(f"cannot reach the API server: {exc}", transient=True).told(
                "cannot connect to the cluster"
            ) from exc
        except BaseException:
            for transport in opened:
                transport.abort()
            raise
        return proto
