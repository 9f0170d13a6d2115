"""The library API: a handler per SSH connection, sessions per channel.

The shape follows the original kuberun library::

    handler = kuberun.new(client, connection_id, config, logger,
                          backend_requests_counter, backend_failures_counter)
    conn_handler = await handler.on_handshake_success(username)   # Pod is ready
    session = conn_handler.new_session()                          # per session channel
    ...
    await handler.on_disconnect()                                 # Pod is deleted

:class:`kuberun.SSHServer` drives these hooks for an asyncssh server; call
them yourself to embed kuberun elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from kubernetes_asyncio import client as k8s

from .audit import Audit, ConnectionAudit, ForwardAudit
from .config import Config
from .errors import PodStartError
from .execstream import ExecConnector
from .forward import ForwardChannel
from .janitor import gateway_id
from .lease import PodLease
from .manifests import LABEL_SESSION_ID, build_pod, id_label_value, managed_selector
from .pods import PodController, PodRef
from .reaper import Reaper
from .session import KuberunSession
from .workspace import WorkspaceClaim, WorkspaceManager

__all__ = ["NetworkHandler", "SSHConnectionHandler", "new"]

_connectors: weakref.WeakKeyDictionary[Any, dict[float, ExecConnector]] = (
    weakref.WeakKeyDictionary()
)


def _connector_for(client: k8s.ApiClient, ping_interval: float) -> ExecConnector:
    """One :class:`ExecConnector` (and so one TLS context) per client configuration."""
    conf = client.configuration
    by_interval = _connectors.setdefault(conf, {})
    connector = by_interval.get(ping_interval)
    if connector is None:
        connector = by_interval[ping_interval] = ExecConnector(conf, ping_interval=ping_interval)
    return connector


_reapers: weakref.WeakKeyDictionary[Any, Reaper] = weakref.WeakKeyDictionary()


def _reaper_for(client: k8s.ApiClient, config: Config, logger: Any, metrics: Any) -> Reaper:
    """The to-delete list of Pods made through ``client`` when no gateway supplies one."""
    reaper = _reapers.get(client)
    if reaper is None:
        controller = PodController(client, logger=logger)
        reaper = Reaper(controller, attempt_timeout=config.timeouts.pod_stop, metrics=metrics)
        _reapers[client] = reaper
    return reaper


def new(
    client: k8s.ApiClient,
    connection_id: str,
    config: Config,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
    backend_requests_counter: Any = None,
    backend_failures_counter: Any = None,
    *,
    metrics: Any = None,
    client_address: str | None = None,
    gateway: str | None = None,
    owner: Mapping[str, str] | None = None,
    track: Callable[[asyncio.Task[Any]], None] | None = None,
    audit: ConnectionAudit | None = None,
    workspaces: WorkspaceManager | None = None,
    reaper: Reaper | None = None,
) -> NetworkHandler:
    """Create the handler for one SSH connection.

    :param client: a kubernetes-asyncio ``ApiClient``; its Configuration also
        supplies the address and credentials for exec streams
    :param connection_id: unique id of the connection; it labels the Pod
        (``kuberun.io/connection-id``) and must be a valid label value
    :param config: the gateway :class:`~kuberun.config.Config`
    :param logger: where to log; a ``LoggerAdapter`` carrying the connection id
        is a good choice
    :param backend_requests_counter: incremented on every Kubernetes API call
        (anything with ``inc()``, e.g. a prometheus-client Counter)
    :param backend_failures_counter: incremented on every failed API call
    :param metrics: optional :class:`~kuberun.metrics.Metrics` for the rest
    :param client_address: recorded in a Pod annotation
    :param gateway: gateway instance id, recorded in the ``kuberun.io/gateway``
        label (default: :func:`kuberun.janitor.gateway_id` of ``config``)
    :param owner: ``ownerReference`` fields (apiVersion, kind, name, uid) for the Pod
    :param track: receives background tasks (Pod deletions, signal execs) so
        the caller can wait for them on shutdown
    :param audit: the connection's :class:`~kuberun.audit.ConnectionAudit`
        (from :meth:`kuberun.audit.Audit.connection`); None records nothing
    :param workspaces: the gateway's :class:`~kuberun.workspace.WorkspaceManager`,
        required in user mode (``pod.mode: user``); one per gateway process
    :param reaper: the to-delete list Pods are owed to (a :class:`Gateway`
        passes its own); by default one shared by every handler of ``client``
    """
    if config.pod.mode == "user" and workspaces is None:
        raise ValueError("pod.mode 'user' needs the gateway's WorkspaceManager (workspaces=)")
    if metrics is not None:
        backend_requests_counter = backend_requests_counter or metrics.backend_requests
        backend_failures_counter = backend_failures_counter or metrics.backend_failures
    controller = PodController(
        client,
        logger=logger,
        requests_counter=backend_requests_counter,
        failures_counter=backend_failures_counter,
    )
    connector = _connector_for(client, config.kubernetes.ping_interval)
    if reaper is None:
        reaper = _reaper_for(client, config, logger, metrics)
    return NetworkHandler(
        controller,
        connector,
        connection_id,
        config,
        logger,
        metrics=metrics,
        client_address=client_address,
        gateway=gateway,
        owner=owner,
        track=track,
        audit=audit,
        workspaces=workspaces,
        reaper=reaper,
    )


class NetworkHandler:
    """Pod lifecycle of one SSH connection. Create it with :func:`new`."""

    def __init__(
        self,
        controller: PodController,
        connector: ExecConnector,
        connection_id: str,
        config: Config,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
        *,
        metrics: Any = None,
        client_address: str | None = None,
        gateway: str | None = None,
        owner: Mapping[str, str] | None = None,
        track: Callable[[asyncio.Task[Any]], None] | None = None,
        audit: ConnectionAudit | None = None,
        workspaces: WorkspaceManager | None = None,
        reaper: Reaper | None = None,
    ) -> None:
        self.controller = controller
        self.connector = connector
        self.connection_id = connection_id
        self.config = config
        self.logger = logger
        self.metrics = metrics
        self.client_address = client_address
        self.gateway = gateway or gateway_id(config)
        self.owner = owner
        self.reaper = (
            reaper
            if reaper is not None
            else Reaper(controller, attempt_timeout=config.timeouts.pod_stop)
        )
        self._track = track
        self.audit = audit if audit is not None else _NO_AUDIT.connection(connection_id)
        self.workspaces = workspaces
        self._handler: SSHConnectionHandler | None = None
        self._disconnected = False

    def connection_handler(self, username: str) -> SSHConnectionHandler:
        """The connection handler, created on first call; in connection and user
        mode this starts the Pod (or the claim on it) without waiting for it."""
        if self._handler is None:
            self._handler = SSHConnectionHandler(self, username)
            if self.config.pod.mode != "session" and not self._disconnected:
                self._handler.start_connection_pod()
        return self._handler

    async def on_handshake_success(self, username: str) -> SSHConnectionHandler:
        """Create the Pod (connection mode) or join the user's (user mode) and wait
        until it is ready.

        :raises PodStartError: the Pod cannot start (it has been deleted already)
        """
        handler = self.connection_handler(username)
        if self.config.pod.mode != "session":
            await handler.wait_connection_pod()
        return handler

    async def on_disconnect(self) -> None:
        """Cancel a pending Pod start and delete every Pod of this connection."""
        self._disconnected = True
        if self._handler is not None:
            await self._handler.close()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a background task the gateway will wait for at shutdown."""
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_log_failure(self.logger))
        if self._track is not None:
            self._track(task)
        return task

    def _lease(
        self, manifest: Mapping[str, Any], selector: str, session_id: str | None = None
    ) -> PodLease:
        return PodLease(
            self.controller,
            self.config.kubernetes.namespace,
            manifest,
            selector,
            start_timeout=self.config.timeouts.pod_start,
            stop_timeout=self.config.timeouts.pod_stop,
            reaper=self.reaper,
            logger=self.logger,
            metrics=self.metrics,
            track=self._track,
            audit=self.audit.pods(session_id),
        )


class SSHConnectionHandler:
    """Session channels of one authenticated connection, and the Pod(s) they run in."""

    def __init__(self, network: NetworkHandler, username: str) -> None:
        self.network = network
        self.username = username
        self.config = network.config
        self.logger = network.logger
        self.metrics = network.metrics
        self.connector = network.connector
        self.connection_id = network.connection_id
        self.audit = network.audit
        self._lease: PodLease | WorkspaceClaim | None = None
        self._session_leases: dict[str, PodLease] = {}
        self._sessions: set[KuberunSession] = set()
        self._next_session = 0
        # Forwarding channels being opened or open, and those of them that are open.
        self._forwards: set[ForwardChannel] = set()
        self._open_forwards: dict[ForwardChannel, ForwardAudit] = {}
        self._next_forward = 0
        self._closing = False

    # -- Pods ---------------------------------------------------------------

    def _manifest(self, session_id: str | None) -> tuple[dict[str, Any], str]:
        net = self.network
        manifest = build_pod(
            self.config.pod,
            connection_id=self.connection_id,
            username=self.username,
            client_address=net.client_address,
            gateway=net.gateway,
            owner=net.owner,
            session_id=session_id,
        )
        selector = managed_selector(connection_id=self.connection_id)
        if session_id is not None:
            selector += f",{LABEL_SESSION_ID}={id_label_value(session_id)}"
        return manifest, selector

    def start_connection_pod(self) -> PodLease | WorkspaceClaim:
        if self._lease is None:
            workspaces = self.network.workspaces
            if self.config.pod.mode == "user" and workspaces is not None:
                # The user's shared Pod: closing this connection never deletes it.
                self._lease = workspaces.claim(
                    self.username,
                    connection_id=self.connection_id,
                    client_address=self.network.client_address,
                    on_lost=self.shutdown,
                    audit=self.audit.pods(),
                )
            else:
                manifest, selector = self._manifest(None)
                self._lease = self.network._lease(manifest, selector)
            self._lease.start()
        return self._lease

    async def wait_connection_pod(self) -> PodRef:
        return await self.start_connection_pod().wait()

    async def acquire_pod(self, session_id: str, progress: Callable[[str], None]) -> PodRef:
        """The Pod a session runs in: the connection's, the user's (user mode), or
        (session mode) its own."""
        if self._closing:
            raise PodStartError("the connection is closing", "Closed")
        lease: PodLease | WorkspaceClaim
        if self.config.pod.mode != "session":
            lease = self.start_connection_pod()
        else:
            existing = self._session_leases.get(session_id)
            if existing is None:
                manifest, selector = self._manifest(session_id)
                existing = self.network._lease(manifest, selector, session_id)
                self._session_leases[session_id] = existing
            lease = existing
        reused = lease.ready
        lease.subscribe(progress)
        try:
            ref = await lease.wait()
        finally:
            lease.unsubscribe(progress)
        if reused:
            self.audit.pods().reused(ref, session_id)
        return ref

    # -- sessions -----------------------------------------------------------

    def new_session(self) -> KuberunSession:
        """A session object for one new SSH session channel."""
        self._next_session += 1
        return KuberunSession(self, f"s{self._next_session}")

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def session_opened(self, session: KuberunSession) -> None:
        self._sessions.add(session)
        if self.metrics is not None:
            self.metrics.sessions.inc()

    def session_closed(self, session: KuberunSession) -> None:
        if session in self._sessions:
            self._sessions.discard(session)
            if self.metrics is not None:
                self.metrics.sessions.dec()
        lease = self._session_leases.pop(session._id, None)
        if lease is not None:
            self.spawn(lease.release())

    # -- forwarding channels ---------------------------------------------------

    def new_forward(self, host: str, port: int) -> ForwardChannel:
        """A forwarding channel to ``host``:``port`` being opened."""
        self._next_forward += 1
        channel = ForwardChannel(self, f"f{self._next_forward}", host, port)
        self._forwards.add(channel)
        return channel

    def forward_ready(self, channel: ForwardChannel) -> bool:
        """Whether a forward whose stream just opened may go on (the connection is open)."""
        return not self._closing and channel in self._forwards

    def forward_pending_done(self, channel: ForwardChannel) -> None:
        """The open of ``channel`` is over; a failed one is forgotten."""
        if channel.stream is None:
            self._forwards.discard(channel)

    def forward_opened(self, channel: ForwardChannel) -> None:
        self._open_forwards[channel] = self.audit.forward(
            channel.host, channel.port, None, channel.id
        )
        if self.metrics is not None:
            self.metrics.forward_channels.inc()

    def forward_closed(self, channel: ForwardChannel) -> None:
        self._forwards.discard(channel)
        audit = self._open_forwards.pop(channel, None)
        if audit is not None:
            stream = channel.stream
            audit.closed(
                stream.stdin_bytes if stream is not None else 0,
                stream.data_bytes if stream is not None else 0,
                channel.ended_by or "client closed",
            )
            if self.metrics is not None:
                self.metrics.forward_channels.dec()

    @property
    def forward_count(self) -> int:
        """Forwarding channels open or opening: activity in the connection's Pod."""
        return len(self._forwards)

    def count_forward_failure(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.forward_failures.labels(reason=reason).inc()

    def count_exec_failure(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.exec_failures.labels(reason=reason).inc()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        return self.network.spawn(coro)

    def shutdown(self, message: str) -> None:
        """End every session with ``message`` on its stderr (gateway shutdown), and
        every forwarding channel."""
        for session in list(self._sessions):
            session.shutdown(message)
        for channel in list(self._forwards):
            channel.close()

    def abandon(self) -> None:
        """The connection closes now: sessions still flushing output before their exit
        status end with the shutdown status instead (the output is lost)."""
        for session in list(self._sessions):
            session.abandon()

    async def close(self) -> None:
        """Delete every Pod of this connection (waits for the deletions); in user mode,
        give up this connection's share of the user's Pod instead."""
        self._closing = True
        for channel in list(self._forwards):
            channel.close()
        leases: list[PodLease | WorkspaceClaim] = list(self._session_leases.values())
        self._session_leases.clear()
        if self._lease is not None:
            leases.append(self._lease)
        if leases:
            await asyncio.gather(*(lease.release() for lease in leases), return_exceptions=True)


_NO_AUDIT = Audit.disabled()


def _log_failure(
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task failed", exc_info=task.exception())

    return done
