"""asyncssh wiring: :class:`Gateway` (shared state) and :class:`SSHServer` (per connection).

Subclass :class:`SSHServer` to add authentication and pass it to
``asyncssh.create_server`` with :func:`server_options`::

    gateway = kuberun.Gateway(config, api_client)

    class MyServer(kuberun.SSHServer):
        def begin_auth(self, username):
            return True
        def validate_password(self, username, password):
            return check(username, password)

    await asyncssh.create_server(lambda: MyServer(gateway), "", 2222,
                                 server_host_keys=[...], **kuberun.server_options(config))

Pod creation starts as a task in ``auth_completed`` (never before
authentication); sessions wait for it and show its progress; ``connection_lost``
cancels a pending creation and deletes the Pod.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import asyncssh
from kubernetes_asyncio import client as k8s

from .audit import Audit, AuditSink, ConnectionAudit, watch_auth
from .channelhooks import (
    EOW_REQUEST,
    NO_MORE_SESSIONS_REQUEST,
    on_channel_request,
    on_global_request,
)
from .config import Config
from .errors import KuberunError
from .forward import open_forward, refuse_listener, refuse_unix
from .handler import NetworkHandler, SSHConnectionHandler, new
from .janitor import JANITOR_INTERVAL, Janitor, PodOwnership, gateway_id
from .pods import PodController, PodRef
from .reaper import Reaper
from .session import KuberunSession
from .sshpackets import tune_connection
from .workspace import WorkspaceManager

__all__ = ["Gateway", "SSHServer", "server_options"]

_log = logging.getLogger("kuberun")

#: Seconds a stopping gateway waits for sessions to flush their output to clients.
_DRAIN_GRACE = 5.0
_DRAIN_POLL = 0.02

#: Seconds the last look for this gateway's Pods at shutdown may take, and the deletions
#: it starts get at least (even when the deletions before it used up ``timeouts.pod_stop``).
#: Short: a listing takes milliseconds, and an unreachable API server must not hold up
#: the exit for long (the janitor of the next run looks again).
_LAST_LOOK = 3.0

#: Seconds the start-up check of the API server (the janitor's first round) may take.
_START_CHECK = 5.0

#: Seconds between two log lines about connections refused by ``ssh.max_startups``.
_REFUSAL_LOG_INTERVAL = 10.0

#: ``env`` requests accepted on one channel; later ones are refused, as OpenSSH's
#: sshd does past 128. (asyncssh keeps every accepted one until the channel closes.)
MAX_ENV_REQUESTS = 128


def _limit_env_requests(chan: Any) -> None:
    """Refuse ``env`` requests past :data:`MAX_ENV_REQUESTS` on ``chan``.

    asyncssh has no hook for env requests, so this wraps its handler on the
    channel instance; with an asyncssh that lacks it, nothing is bounded and
    nothing breaks.
    """
    process = getattr(chan, "_process_env_request", None)
    if process is None:
        return
    count = 0

    def bounded(packet: Any) -> bool:
        nonlocal count
        count += 1
        return count <= MAX_ENV_REQUESTS and bool(process(packet))

    chan._process_env_request = bounded


class ConnectionLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every line with the connection id (and carries it as ``extra``)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(kwargs.get("extra") or {})
        extra.setdefault("connection_id", (self.extra or {}).get("connection_id"))
        kwargs["extra"] = extra
        return f"[{extra['connection_id']}] {msg}", kwargs


def server_options(config: Config) -> dict[str, Any]:
    """``asyncssh.create_server`` options kuberun needs: raw bytes, no line
    editor (the Pod's pty does line editing), AES-GCM preferred."""
    options: dict[str, Any] = {
        "encoding": None,
        "line_editor": False,
        "allow_scp": False,
        "agent_forwarding": False,
        "x11_forwarding": False,
        "login_timeout": config.ssh.login_grace_time,
    }
    options["encryption_algs"] = list(config.ssh.effective_ciphers)
    if config.ssh.server_version is not None:
        options["server_version"] = config.ssh.server_version
    return options


class Gateway:
    """State shared by all connections of one gateway: config, API client, metrics,
    background tasks, live connections, and the to-delete list of its Pods.

    Call :meth:`start` once the event loop runs (it starts the janitor) and
    :meth:`drain` before the program exits: it ends the sessions and waits for
    every Pod's deletion. A program that exits without it, with connections
    open or deletions owed, gets a warning in the log at exit.

    :param name: the gateway instance id in the ``kuberun.io/gateway`` label
        (default: ``kubernetes.gateway_id``, see :func:`kuberun.janitor.gateway_id`)
    :param owner: ``ownerReference`` for user Pods (the gateway's own Pod when
        it runs in a cluster), so Kubernetes collects them if the gateway dies
        (default: that of ``ownership``)
    :param ownership: how user Pods are tied to the gateway's own Pod, when it runs in
        one (:class:`~kuberun.janitor.PodOwnership`); in the cross-namespace layout the
        janitor also deletes the Pods of vanished gateway Pods
    :param audit: an :class:`~kuberun.audit.Audit`, or a sink for the audit events
        (an :class:`~kuberun.audit.AuditSink` or a callable taking the event dict)
        in place of the events file; by default the ``audit`` config section decides
    """

    def __init__(
        self,
        config: Config,
        api_client: k8s.ApiClient,
        *,
        metrics: Any = None,
        logger: logging.Logger | None = None,
        name: str | None = None,
        owner: Mapping[str, str] | None = None,
        ownership: PodOwnership | None = None,
        audit: Audit | AuditSink | Callable[[dict[str, Any]], object] | None = None,
    ) -> None:
        self.config = config
        self.api_client = api_client
        self.metrics = metrics
        self.logger = logger or _log
        self.name = name or gateway_id(config)
        self.owner = owner if owner is not None or ownership is None else ownership.owner
        self.audit = (
            audit
            if isinstance(audit, Audit)
            else Audit(config.audit, instance=name, sink=audit, metrics=metrics)
        )
        controller = PodController(
            api_client,
            logger=self.logger,
            requests_counter=metrics.backend_requests if metrics is not None else None,
            failures_counter=metrics.backend_failures if metrics is not None else None,
        )
        #: Pods owed a deletion (see :class:`kuberun.reaper.Reaper`).
        self.reaper = Reaper(
            controller,
            attempt_timeout=config.timeouts.pod_stop,
            logger=self.logger,
            metrics=metrics,
        )
        #: Finds the Pods nobody else will delete (see kuberun.janitor).
        self.janitor = Janitor(
            controller,
            self.reaper,
            config.kubernetes.namespace,
            self.name,
            live=self.connection_ids,
            list_timeout=config.timeouts.pod_stop,
            logger=self.logger,
            ownership=ownership,
        )
        self._drained = False
        self._exit_hook = _undrained_warning(self)
        atexit.register(self._exit_hook)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._servers: set[SSHServer] = set()
        self._prefix = secrets.token_hex(3)
        self._counter = itertools.count(1)
        self.closing = False
        self._unauthenticated = 0
        self._refused = 0
        self._refusal_logged = -_REFUSAL_LOG_INTERVAL
        #: User mode's claims, replica Lease and idle reaper (None in other modes).
        self.workspaces: WorkspaceManager | None = None
        if config.pod.mode == "user":
            self.workspaces = WorkspaceManager(
                api_client,
                config,
                logger=self.logger,
                metrics=metrics,
                identity=name,
                track=self.track,
                debts=self.reaper,
            )

    def next_connection_id(self) -> str:
        """A unique, label-safe connection id."""
        return f"{self._prefix}-{os.getpid():x}-{next(self._counter)}"

    def track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def handler_for(
        self,
        connection_id: str,
        client_address: str | None,
        audit: ConnectionAudit | None = None,
    ) -> NetworkHandler:
        logger = ConnectionLogger(self.logger, {"connection_id": connection_id})
        return new(
            self.api_client,
            connection_id,
            self.config,
            logger,
            metrics=self.metrics,
            client_address=client_address,
            gateway=self.name,
            owner=self.owner,
            track=self.track,
            audit=audit,
            workspaces=self.workspaces,
            reaper=self.reaper,
        )

    def connection_ids(self) -> set[str]:
        """The ids of the open connections (their Pods are not leftovers)."""
        return {server.connection_id for server in self._servers}

    async def start(self, janitor_interval: float = JANITOR_INTERVAL) -> bool:
        """Start the janitor: look for Pods an earlier run of this gateway left,
        then every ``janitor_interval`` seconds (and, in the cross-namespace
        layout, for Pods of vanished gateways). Returns False (and logs a warning)
        when the API server cannot be reached now: the gateway still serves, as
        the cluster may come up later.
        """
        reachable = await self.janitor.start(
            janitor_interval, min(self.config.timeouts.pod_stop, _START_CHECK)
        )
        if not reachable:
            self.logger.warning(
                "the Kubernetes API server cannot be reached now; serving anyway, "
                "logins wait for it (up to timeouts.pod_start)"
            )
        return reachable

    @property
    def connections(self) -> int:
        return len(self._servers)

    def _register(self, server: SSHServer) -> None:
        self._servers.add(server)
        if self.metrics is not None:
            self.metrics.connections.inc()

    @property
    def unauthenticated(self) -> int:
        """Connections that have not authenticated yet (bounded by ``ssh.max_startups``)."""
        return self._unauthenticated

    def _startup_begin(self) -> bool:
        """Count one more unauthenticated connection; False when ``ssh.max_startups`` is reached."""
        limit = self.config.ssh.max_startups
        if self._unauthenticated < limit:
            self._unauthenticated += 1
            return True
        self._refused += 1
        if self.metrics is not None:
            self.metrics.connections_refused.labels(reason="max_startups").inc()
        now = time.monotonic()
        if now - self._refusal_logged >= _REFUSAL_LOG_INTERVAL:
            # At most one line per interval: a flood must not flood the log too.
            self._refusal_logged = now
            self.logger.warning(
                "refusing new connections: %d unauthenticated already (ssh.max_startups); "
                "%d refused so far",
                self._unauthenticated,
                self._refused,
            )
        return False

    def _startup_end(self) -> None:
        self._unauthenticated -= 1

    def _unregister(self, server: SSHServer) -> None:
        if server in self._servers:
            self._servers.discard(server)
            if self.metrics is not None:
                self.metrics.connections.dec()

    async def drain(
        self, message: str = "the gateway is shutting down", grace: float | None = None
    ) -> list[PodRef]:
        """Tell every session, close every connection, and wait for every Pod's deletion.

        Pod deletions get ``grace`` seconds (default ``timeouts.pod_stop``) once
        the connections are closed. Then a last look for Pods of this gateway that
        no connection owns any more (whose deletion was lost track of) owes theirs
        too. What is still owed at the end is logged, by name, and returned. In
        user mode this gateway's claims on user Pods are released; the Pods
        themselves are left to their idle clock.
        """
        self.closing = True
        self._drained = True
        atexit.unregister(self._exit_hook)
        await self.janitor.stop()
        for server in list(self._servers):
            server.shutdown(message)
        # Let the exit statuses, and the output of programs that had already ended,
        # reach the clients before the connections close: a session closes once its
        # output is flushed. Then let the clients leave by themselves: output a client
        # has received but not yet read is lost if the server disconnects it (asyncssh
        # drops it). Clients that do neither get _DRAIN_GRACE seconds in all.
        deadline = asyncio.get_running_loop().time() + _DRAIN_GRACE
        await _poll_until(lambda: not any(server.busy for server in self._servers), deadline)
        await _poll_until(lambda: not self._servers, deadline)
        for server in list(self._servers):
            server.close_connection(message)
        # Each connection_lost, which starts that connection's Pod deletion, runs on
        # a later turn of the loop: wait for all of them before waiting for the tasks.
        await _poll_until(
            lambda: not self._servers, asyncio.get_running_loop().time() + _DRAIN_GRACE
        )
        grace = self.config.timeouts.pod_stop if grace is None else grace
        until = time.monotonic() + grace
        await self.wait_tasks(grace)
        if self.workspaces is not None:
            # Claims are released by now (connections closed); user Pods are left to
            # the idle clock, never deleted here.
            await self.workspaces.stop()
        floor = min(grace, _LAST_LOOK)
        found = await self._last_look(floor)
        left = await self.reaper.drain(max(floor if found else 0.0, until - time.monotonic()))
        searching = self.reaper.searching
        await self.reaper.close()
        if searching:
            self.logger.warning(
                "stopping while looking for the Pods of %d create(s) that lost their answer; "
                "the janitor of the next run with gateway id %r deletes any that appear",
                searching,
                self.name,
            )
        if left:
            self.logger.error(
                "stopping with %d Pod(s) not deleted (the API server did not accept the "
                "deletion within %.0fs): %s; the janitor of the next run with gateway id "
                "%r deletes them",
                len(left),
                grace,
                ", ".join(f"{ref.namespace}/{ref.name}" for ref in left),
                self.name,
            )
        return left

    async def _last_look(self, timeout: float) -> int:
        """Owe the deletion of every Pod of this gateway id that no open connection owns;
        returns how many were not owed yet.

        Every connection is closed by now, so each such Pod is one whose deletion was
        lost track of (a create whose answer never came, a start still running when its
        connection's clean-up gave up waiting): delete it now rather than leave it to the
        janitor of a next run that may never come.
        """
        try:
            found = await self.janitor.leftovers.find(time.monotonic() + timeout)
        except KuberunError as exc:
            self.logger.warning(
                "could not list this gateway's Pods before stopping (%s); the janitor of "
                "the next run with gateway id %r deletes any left",
                exc,
                self.name,
            )
            return 0
        owed = self.janitor.leftovers.owe(found)
        if owed:
            self.logger.warning(
                "stopping: %d Pod(s) of this gateway that no connection owned any more, "
                "deleting them: %s",
                len(owed),
                ", ".join(f"{ref.namespace}/{ref.name}" for ref in owed),
            )
        return len(owed)

    async def wait_tasks(self, timeout: float | None = None) -> None:
        """Wait for background tasks (Pod deletions) until none are left, or ``timeout``."""
        until = None if timeout is None else time.monotonic() + timeout
        while self._tasks:
            remaining = None if until is None else until - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            await asyncio.wait(list(self._tasks), timeout=remaining)


def _undrained_warning(gateway: Gateway) -> Callable[[], None]:
    """An exit hook: say so when the program ends with the gateway's Pods in use or owed."""

    def check() -> None:
        if gateway._drained or not (gateway._servers or gateway.reaper.owed):
            return
        gateway.logger.warning(
            "exiting without Gateway.drain(): %d connection(s) open, %d Pod deletion(s) "
            "owed; their Pods stay until the janitor of the next run with gateway id %r "
            "deletes them (await gateway.drain() before the program ends)",
            len(gateway._servers),
            gateway.reaper.owed,
            gateway.name,
        )

    return check


async def _poll_until(done: Callable[[], bool], deadline: float) -> None:
    """Check ``done`` every _DRAIN_POLL seconds until it holds or ``deadline`` (loop time)
    has passed. Only the shutdown uses it: a few seconds, once."""
    loop = asyncio.get_running_loop()
    for _ in range(max(0, int((deadline - loop.time()) / _DRAIN_POLL)) + 1):
        if done():
            return
        await asyncio.sleep(_DRAIN_POLL)


class SSHServer(asyncssh.SSHServer):
    """An asyncssh server that gives each authenticated connection a Pod.

    It does no authentication of its own: subclass it and implement
    asyncssh's auth callbacks. Every hook that does something calls
    ``super()`` first if you override it.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.conn: asyncssh.SSHServerConnection | None = None
        self.connection_id = gateway.next_connection_id()
        self.handler: NetworkHandler | None = None
        self._conn_handler: SSHConnectionHandler | None = None
        self._start: asyncio.Task[Any] | None = None
        self._unauthenticated = False
        self.audit = gateway.audit.connection(self.connection_id)
        self._no_more_sessions = False

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        tune_connection(conn)  # cheaper bulk data (kuberun.sshpackets)
        peer = conn.get_extra_info("peername")
        self.audit.opened(peer, conn.get_extra_info("sockname"))
        if not self.gateway._startup_begin():
            # Like OpenSSH's MaxStartups: closed before the version exchange.
            self.audit.closed("refused: ssh.max_startups reached")
            conn.abort()
            return
        self._unauthenticated = True
        watch_auth(conn, self.audit)
        on_global_request(conn, NO_MORE_SESSIONS_REQUEST, self._refuse_more_sessions)
        address = f"{peer[0]}:{peer[1]}" if peer else None
        self.handler = self.gateway.handler_for(self.connection_id, address, self.audit)
        self.gateway._register(self)

    def _startup_done(self) -> None:
        if self._unauthenticated:
            self._unauthenticated = False
            self.gateway._startup_end()

    def auth_completed(self) -> None:
        self._startup_done()
        assert self.conn is not None and self.handler is not None
        if self.gateway.closing:
            self.conn.close()
            return
        username = str(self.conn.get_extra_info("username") or "")
        self.handler.logger.info("authenticated as %r", username)
        if self.audit.username is None:  # no auth method was needed (begin_auth said so)
            self.audit.auth(username, "none", True)
        # Starts the Pod in connection mode; sessions wait for it themselves
        # so they can show its progress on their stderr.
        self._conn_handler = self.handler.connection_handler(username)

    def _refuse_more_sessions(self) -> bool:
        # The client will open no more sessions; one that tries is not who it
        # claims to be (sshd disconnects it, calling it a possible attack).
        self._no_more_sessions = True
        return True

    def session_requested(self) -> Any:
        handler = self._conn_handler
        if handler is None or self.gateway.closing:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "the gateway is not accepting sessions"
            )
        if self._no_more_sessions:
            handler.logger.warning(
                "session refused: the client had sent %s", NO_MORE_SESSIONS_REQUEST
            )
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "no more sessions on this connection"
            )
        limit = self.gateway.config.ssh.max_sessions
        if handler.session_count >= limit:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"too many sessions on this connection (max {limit})",
            )
        assert self.conn is not None
        session: KuberunSession = handler.new_session()
        chan = self.conn.create_server_channel(encoding=None)
        _limit_env_requests(chan)
        on_channel_request(chan, EOW_REQUEST, session.eow_received)
        return chan, session

    # -- forwarding: -L/-D/-W into the Pod; -R, Unix sockets refused ------------

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Any:
        handler = self._conn_handler
        if handler is None or self.gateway.closing:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "the gateway is not accepting channels"
            )
        assert self.conn is not None
        return open_forward(self.conn, handler, dest_host, dest_port)

    def unix_connection_requested(self, dest_path: str) -> Any:
        refuse_unix(self._conn_handler, dest_path)

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        return refuse_listener(self._conn_handler, f"{listen_host} port {listen_port}")

    def unix_server_requested(self, listen_path: str) -> Any:
        return refuse_listener(self._conn_handler, f"Unix socket {listen_path!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._startup_done()
        self.gateway._unregister(self)
        handler = self.handler
        if handler is not None:
            self.audit.closed(
                "gateway shutdown"
                if self.gateway.closing
                else f"connection lost: {exc}"
                if exc is not None
                else "client disconnected"
            )
            if exc is not None:
                # A TCP connect that never says hello (a readiness probe, a port scan)
                # is not worth a line at INFO every few seconds.
                said_hello = self.conn is not None and self.conn.get_extra_info("client_version")
                level = logging.INFO if said_hello else logging.DEBUG
                handler.logger.log(level, "connection lost: %s", exc)
            self.gateway.track(asyncio.ensure_future(handler.on_disconnect()))

    # -- gateway control ----------------------------------------------------

    def shutdown(self, message: str) -> None:
        if self._conn_handler is not None:
            self._conn_handler.shutdown(message)

    @property
    def busy(self) -> bool:
        """Whether a session channel of this connection is still open."""
        return self._conn_handler is not None and self._conn_handler.session_count > 0

    def close_connection(self, message: str = "the gateway is shutting down") -> None:
        if self._conn_handler is not None:
            self._conn_handler.abandon()
        if self.conn is not None:
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"kuberun: {message}")
