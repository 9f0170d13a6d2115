"""The audit trail: who connected, how they authenticated, which Pod, what ran, how it ended.

:class:`Audit` is the gateway's (one per :class:`~kuberun.Gateway`);
:meth:`Audit.connection` gives a :class:`ConnectionAudit` per SSH connection,
which gives a :class:`SessionAudit` per session channel, a :class:`PodAudit`
per Pod lease and a :class:`ForwardAudit` per forwarded channel. They turn
what the SSH and Kubernetes sides tell them into events (see
:mod:`kuberun.audit.schema`) and hand each event to the sink: the events file
in ``audit.directory``, or the embedding server's own :class:`AuditSink`.

With auditing off (no directory, no sink) every method returns at once.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ..config import AuditConfig
from ..errors import CommandStartError, ExecError, KubernetesAPIError, PodStartError
from ..manifests import env_allowed, valid_env_name
from .recording import CastRecording, RawRecording, Recording, recording_stem
from .writer import AuditWriter, check_directory

__all__ = [
    "Audit",
    "AuditSink",
    "ConnectionAudit",
    "ForwardAudit",
    "PodAudit",
    "SessionAudit",
    "utc_timestamp",
]

_log = logging.getLogger("kuberun.audit")


@runtime_checkable
class AuditSink(Protocol):
    """Where an embedding server wants audit events to go, instead of files.

    ``emit`` is called on the event loop with each event (a fresh ``dict`` of
    JSON-ready values, see :data:`~kuberun.audit.EVENT_SCHEMA`) and must not
    block: put the event on a queue, or start a task. An exception it raises is
    logged and counted in ``kuberun_audit_write_errors_total``, never passed on.
    ``close`` (optional, may be a coroutine function) is called once when the
    gateway has stopped.
    """

    def emit(self, event: dict[str, Any]) -> None: ...


class _CallableSink:
    def __init__(self, fn: Callable[[dict[str, Any]], object]) -> None:
        self._fn = fn

    def emit(self, event: dict[str, Any]) -> None:
        self._fn(event)


def utc_timestamp() -> str:
    """Now, as the ``time`` field of an event: RFC 3339, UTC, microseconds."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Audit:
    """The audit trail of one gateway.

    :param config: the ``audit`` section; ``directory`` None means no files
    :param instance: the gateway instance named in every event (default:
        ``<hostname>/<pid>``)
    :param sink: an :class:`AuditSink` or a callable taking the event dict;
        events go there instead of the events file (recordings still need
        ``audit.directory``)
    :param metrics: a :class:`~kuberun.metrics.Metrics`, or None
    """

    def __init__(
        self,
        config: AuditConfig | None = None,
        *,
        instance: str | None = None,
        sink: AuditSink | Callable[[dict[str, Any]], object] | None = None,
        metrics: Any = None,
        max_file_bytes: int | None = None,
    ) -> None:
        self.config = config if config is not None else AuditConfig()
        self.instance = instance or f"{socket.gethostname()}/{os.getpid()}"
        self.metrics = metrics
        self.writer: AuditWriter | None = None
        directory = self.config.directory
        if directory is not None:
            problem = check_directory(directory)
            if problem is not None:
                # Not fatal: the writer retries, and `kuberun check` refuses such a directory.
                _log.error(
                    "audit.directory: %s; events and recordings are lost until it works", problem
                )
                if metrics is not None:
                    metrics.audit_write_errors.inc()
            options = {} if max_file_bytes is None else {"max_file_bytes": max_file_bytes}
            self.writer = AuditWriter(
                directory, metrics=metrics, dropped_line=self._dropped_line, **options
            )
        self._sink: AuditSink | None = None
        if sink is not None:
            self._sink = sink if isinstance(sink, AuditSink) else _CallableSink(sink)
        #: Whether events are emitted at all.
        self.enabled = self._sink is not None or self.writer is not None
        #: Which sessions are recorded: "none", "pty" or "all".
        self.recordings = self.config.recordings if self.writer is not None else "none"

    @classmethod
    def disabled(cls) -> Audit:
        """An audit trail that records nothing."""
        return cls(AuditConfig())

    def connection(self, connection_id: str) -> ConnectionAudit:
        """The audit of one SSH connection."""
        return ConnectionAudit(self, connection_id)

    def emit(self, kind: str, connection: str, fields: Mapping[str, Any]) -> None:
        """Hand one event to the sink (on the event loop; never blocks, never raises)."""
        if not self.enabled:
            return
        event = {
            "time": utc_timestamp(),
            "event": kind,
            "gateway": self.instance,
            "connection": connection,
            **fields,
        }
        if self.metrics is not None:
            self.metrics.audit_events.labels(event=kind).inc()
        if self._sink is not None:
            try:
                self._sink.emit(event)
            except Exception:
                _log.exception("audit sink failed on a %s event", kind)
                if self.metrics is not None:
                    self.metrics.audit_write_errors.inc()
            return
        assert self.writer is not None
        self.writer.event(json.dumps(event, separators=(",", ":")).encode() + b"\n")

    def _dropped_line(self, count: int) -> bytes:
        # Built in the writer thread: no metrics, no sink, just the line.
        event = {
            "time": utc_timestamp(),
            "event": "audit.dropped",
            "gateway": self.instance,
            "connection": "",
            "events": count,
        }
        return json.dumps(event, separators=(",", ":")).encode() + b"\n"

    async def close(self) -> None:
        """Write what is queued and stop (the gateway calls it once it has stopped)."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            if not await asyncio.to_thread(writer.close):
                _log.error("audit: the disk did not take the last events within 10 s")
        close = getattr(self._sink, "close", None)
        if close is not None:
            result = close()
            if inspect.isawaitable(result):
                await result


def _address(sockname: Any) -> dict[str, Any] | None:
    if isinstance(sockname, (tuple, list)) and len(sockname) >= 2:
        return {"address": str(sockname[0]), "port": int(sockname[1])}
    return None


class ConnectionAudit:
    """The audit of one SSH connection (create it with :meth:`Audit.connection`)."""

    def __init__(self, audit: Audit, connection_id: str) -> None:
        self.audit = audit
        self.connection_id = connection_id
        self.enabled = audit.enabled
        self.username: str | None = None
        self._started = time.monotonic()
        self._sessions = 0
        self._forwards = 0
        self._closed = False

    def emit(self, kind: str, /, **fields: Any) -> None:
        """Emit one event of this connection."""
        self.audit.emit(kind, self.connection_id, fields)

    def opened(self, peername: Any, sockname: Any) -> None:
        """``connection.opened``: the client's and the server's address."""
        self.emit("connection.opened", client=_address(peername), server=_address(sockname))

    def auth(
        self,
        username: str,
        method: str,
        success: bool,
        key: tuple[str, str] | None = None,
    ) -> None:
        """``auth``: one completed attempt; ``key`` is (type, SHA256 fingerprint)."""
        if success:
            self.username = username
        self.emit(
            "auth",
            username=username,
            method=method,
            result="success" if success else "failure",
            key={"type": key[0], "fingerprint": key[1]} if key is not None else None,
        )

    def closed(self, reason: str) -> None:
        """``connection.closed`` (once)."""
        if self._closed:
            return
        self._closed = True
        self.emit(
            "connection.closed",
            username=self.username,
            reason=reason,
            seconds=round(time.monotonic() - self._started, 6),
            sessions=self._sessions,
        )

    def pods(self, session_id: str | None = None) -> PodAudit:
        """Events of the Pod a lease holds (``session_id`` in session mode)."""
        return PodAudit(self, session_id)

    def session(self, session_id: str) -> SessionAudit:
        """The audit of one session channel."""
        self._sessions += 1
        return SessionAudit(self, session_id)

    def forward(
        self, host: str, port: int, originator: Any = None, forward_id: str | None = None
    ) -> ForwardAudit:
        """``forward.opened`` for a forwarded channel (``originator``: the client's
        ``(address, port)`` as the channel open names it; ``forward_id``: the caller's
        own id, else ``f1``, ``f2``, ...); its :meth:`ForwardAudit.closed` ends it."""
        self._forwards += 1
        forward = ForwardAudit(self, forward_id or f"f{self._forwards}", host, port)
        self.emit(
            "forward.opened",
            forward=forward.forward_id,
            host=host,
            port=port,
            originator=_address(originator),
        )
        return forward


def _pod(ref: Any) -> dict[str, str]:
    return {"namespace": ref.namespace, "name": ref.name, "uid": ref.uid}


class PodAudit:
    """Pod events of one lease: created, reused, failed, deleted."""

    def __init__(self, conn: ConnectionAudit, session_id: str | None) -> None:
        self._conn = conn
        self._session = session_id

    def created(self, ref: Any, seconds: float) -> None:
        """The Pod is ready, ``seconds`` after its creation was asked for."""
        self._conn.emit(
            "pod.created", pod=_pod(ref), session=self._session, seconds=round(seconds, 6)
        )

    def reused(self, ref: Any, session_id: str | None, seconds: float = 0.0) -> None:
        """A session was given a Pod that was ready before it asked."""
        self._conn.emit("pod.reused", pod=_pod(ref), session=session_id, seconds=round(seconds, 6))

    def failed(self, reason: str, message: str, seconds: float, ref: Any = None) -> None:
        """The Pod did not become ready (``ref``: the Pod, if it was created)."""
        self._conn.emit(
            "pod.failed",
            pod=_pod(ref) if ref is not None else None,
            session=self._session,
            reason=reason or "Error",
            message=message,
            seconds=round(seconds, 6),
        )

    def deleted(self, ref: Any, seconds: float) -> None:
        """The Pod is deleted; ``seconds`` is how long the deletion took."""
        self._conn.emit("pod.deleted", pod=_pod(ref), seconds=round(seconds, 6))


class ForwardAudit:
    """One forwarded TCP channel: :meth:`closed` emits ``forward.closed``."""

    def __init__(self, conn: ConnectionAudit, forward_id: str, host: str, port: int) -> None:
        self._conn = conn
        self.forward_id = forward_id
        self._host = host
        self._port = port
        self._started = time.monotonic()
        self._closed = False

    def closed(self, to_pod: int, from_pod: int, reason: str) -> None:
        """The channel closed after ``to_pod``/``from_pod`` bytes; ``reason`` in words."""
        if self._closed:
            return
        self._closed = True
        self._conn.emit(
            "forward.closed",
            forward=self.forward_id,
            host=self._host,
            port=self._port,
            bytes={"to_pod": to_pod, "from_pod": from_pod},
            seconds=round(time.monotonic() - self._started, 6),
            reason=reason,
        )


class SessionAudit:
    """The audit of one session channel: opened, signals, resizes, how it ended; and its
    recording, when there is one."""

    def __init__(self, conn: ConnectionAudit, session_id: str) -> None:
        self._conn = conn
        self.session_id = session_id
        self.enabled = conn.enabled
        self._started = time.monotonic()
        self._how: str | None = None
        self._status: int | None = None
        self._signal: str | None = None
        self._window_changes = 0
        self._ended = False
        self.recording: Recording | None = None

    def opened(
        self,
        kind: str,
        argv: Sequence[str],
        term: str | None,
        size: tuple[int, int] | None,
        environment: Mapping[str, str],
        accept_env: Sequence[str],
    ) -> None:
        """``session.opened``: ``kind`` as the session names it ("shell", "exec",
        "subsystem NAME"), the program's argv, the pty, and the env the client sent."""
        if not self.enabled:
            return
        base, _, subsystem = kind.partition(" ")
        env = [n for n in environment if n != "TERM"]
        passed = [n for n in env if valid_env_name(n) and env_allowed(n, accept_env)]
        pty = None
        if term is not None:
            width, height = size or (80, 24)
            pty = {"term": term, "width": width, "height": height}
        self._conn.emit(
            "session.opened",
            session=self.session_id,
            kind=base,
            command=argv[-1] if base == "exec" and argv else None,
            subsystem=subsystem or None,
            pty=pty,
            env=passed,
            env_refused=[n[:64] for n in env if n not in passed],
        )

    def record(
        self,
        kind: str,
        argv: Sequence[str],
        term: str | None,
        size: tuple[int, int] | None,
        *,
        on_full: Callable[[], None],
        on_drained: Callable[[], None],
    ) -> Recording | None:
        """Start the session's recording if ``audit.recordings`` covers it (None otherwise)."""
        audit = self._conn.audit
        writer = audit.writer
        if writer is None or audit.recordings == "none":
            return None
        if term is None and audit.recordings != "all":
            return None
        stem = recording_stem(self._conn.connection_id, self.session_id)
        block = audit.config.on_overflow == "block"
        recording: Recording
        if term is not None:
            width, height = size or (80, 24)
            recording = CastRecording(
                writer,
                stem,
                width=width,
                height=height,
                term=term,
                command=argv[-1] if kind == "exec" and argv else None,
                block=block,
                on_full=on_full,
                on_drained=on_drained,
            )
        else:
            recording = RawRecording(
                writer, stem, block=block, on_full=on_full, on_drained=on_drained
            )
        self.recording = recording
        return recording

    @property
    def record_input(self) -> bool:
        """Whether the client's input goes into the recording too."""
        return self.recording is not None and self._conn.audit.config.record_input

    def signal(self, name: str, delivered: bool) -> None:
        self._conn.emit("session.signal", session=self.session_id, signal=name, delivered=delivered)

    def resized(self, width: int, height: int) -> None:
        self._window_changes += 1
        if self.recording is not None:
            self.recording.resize(width, height)

    def ending(self, how: str, *, replace: bool = False) -> None:
        """Say how the session ends (the first call wins unless ``replace``)."""
        if self._how is None or replace:
            self._how = how

    def ending_with(self, exc: BaseException) -> None:
        """The session ends because of ``exc``: it never started, or its stream broke."""
        failed = isinstance(exc, (PodStartError, CommandStartError, ExecError, KubernetesAPIError))
        self.ending("failed" if failed else "stream_lost")

    def exit(self, status: int, signal: str | None) -> None:
        """The exit status (or signal) sent to the client."""
        if signal is not None:
            self._status, self._signal = None, signal
        else:
            self._status, self._signal = status, None

    def ended(self, stream: Any) -> None:
        """``session.ended`` (once), with the bytes ``stream`` (an
        :class:`~kuberun.execstream.ExecStream`, or None) moved."""
        if self._ended:
            return
        self._ended = True
        recording = self.recording
        if recording is not None:
            recording.close()
        if not self.enabled:
            return
        self._conn.emit(
            "session.ended",
            session=self.session_id,
            how=self._how or "client_closed",
            exit_status=self._status,
            exit_signal=self._signal,
            bytes={
                "stdin": stream.stdin_bytes if stream is not None else 0,
                "stdout": stream.stdout_bytes if stream is not None else 0,
                "stderr": stream.stderr_bytes if stream is not None else 0,
            },
            seconds=round(time.monotonic() - self._started, 6),
            window_changes=self._window_changes,
            recording=recording.summary() if recording is not None else None,
        )
