"""Prometheus metrics of the gateway.

All metrics live in one :class:`Metrics` object on a registry of its own
(injectable), so two gateways in one process, or two tests, never share
counters::

    metrics = Metrics()
    server = await start_metrics_server("127.0.0.1:9100", metrics.registry)
    ...
    await server.close()
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from .config import parse_listen

__all__ = [
    "DIRECTIONS",
    "FORWARD_DIRECTIONS",
    "Metrics",
    "MetricsServer",
    "metrics_handler",
    "start_metrics_server",
]

#: Values of the ``direction`` label of ``kuberun_relayed_bytes_total``.
DIRECTIONS = ("stdout", "stderr", "stdin")
#: Values of the ``direction`` label of ``kuberun_forwarded_bytes_total``.
FORWARD_DIRECTIONS = ("to_pod", "from_pod")

# Pod start is dominated by scheduling and image pulls: seconds to minutes.
_POD_START_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 45, 60, 90, 120, 180, 300)
# Opening an exec is one TLS connection and one HTTP upgrade: milliseconds.
_EXEC_OPEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Every metric kuberun exports, registered on ``registry``.

    :param registry:
        The registry to register on; by default a new private one (never
        prometheus-client's global registry, so nothing leaks between
        instances).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.backend_requests = Counter(
            "kuberun_backend_requests",
            "Requests sent to the Kubernetes API server.",
            registry=r,
        )
        self.backend_failures = Counter(
            "kuberun_backend_failures",
            "Kubernetes API requests that failed (error status or connection error).",
            registry=r,
        )
        self.connections = Gauge(
            "kuberun_connections", "SSH connections currently open.", registry=r
        )
        self.sessions = Gauge(
            "kuberun_sessions", "SSH session channels currently open.", registry=r
        )
        self.pod_start_seconds = Histogram(
            "kuberun_pod_start_seconds",
            "Seconds from creating a Pod until it was ready.",
            buckets=_POD_START_BUCKETS,
            registry=r,
        )
        self.exec_open_seconds = Histogram(
            "kuberun_exec_open_seconds",
            "Seconds to open one exec stream (connect, TLS, upgrade).",
            buckets=_EXEC_OPEN_BUCKETS,
            registry=r,
        )
        self.relayed_bytes = Counter(
            "kuberun_relayed_bytes",
            "Payload bytes relayed between SSH channels and exec streams.",
            ["direction"],
            registry=r,
        )
        for direction in DIRECTIONS:
            # Present from the start, so rate() works before the first byte.
            self.relayed_bytes.labels(direction=direction)
        self.stdin_eof_undeliverable = Counter(
            "kuberun_stdin_eof_undeliverable",
            "SSH EOFs that could not be passed on (API server without v5.channel.k8s.io).",
            registry=r,
        )
        self.pods_created = Counter("kuberun_pods_created", "Pods created by kuberun.", registry=r)
        self.pods_deleted = Counter("kuberun_pods_deleted", "Pods deleted by kuberun.", registry=r)
        self.pods_pending_deletion = Gauge(
            "kuberun_pods_pending_deletion",
            "Pods kuberun owes a deletion: not yet accepted by the API server (retried "
            "with backoff for as long as the gateway runs).",
            registry=r,
        )
        self.pod_start_failures = Counter(
            "kuberun_pod_start_failures",
            "Pods that did not become ready, by reason (ErrImagePull, Timeout, ...).",
            ["reason"],
            registry=r,
        )
        self.connections_refused = Counter(
            "kuberun_connections_refused",
            "SSH connections closed before authentication, by reason (max_startups).",
            ["reason"],
            registry=r,
        )
        self.connections_refused.labels(reason="max_startups")
        # -- user mode (kuberun.workspace, kuberun.replicas) --
        self.user_pods_reused = Counter(
            "kuberun_user_pods_reused",
            "Connections that joined an existing user Pod instead of creating one.",
            registry=r,
        )
        self.user_pods_idle_deleted = Counter(
            "kuberun_user_pods_idle_deleted",
            "User Pods this replica deleted after pod.idle_timeout without a live claim.",
            registry=r,
        )
        self.user_pods_claimed = Gauge(
            "kuberun_user_pods_claimed",
            "User Pods this replica holds a claim on (it has connections to them).",
            registry=r,
        )
        self.user_pods_idle = Gauge(
            "kuberun_user_pods_idle",
            "User Pods this replica last saw without a live claim (idle clock running).",
            registry=r,
        )
        self.claim_conflicts = Counter(
            "kuberun_claim_conflicts",
            "Writes on user Pods refused by a resourceVersion/UID precondition (409), "
            "by operation (claim, release, delete): another replica got there first.",
            ["operation"],
            registry=r,
        )
        for operation in ("claim", "release", "delete"):
            self.claim_conflicts.labels(operation=operation)
        self.replicas_alive = Gauge(
            "kuberun_replicas_alive",
            "Gateway replicas (this one included) whose Lease this replica saw renewed "
            "within its duration.",
            registry=r,
        )
        self.lease_renew_failures = Counter(
            "kuberun_lease_renew_failures",
            "Failed renewals of this replica's Lease.",
            registry=r,
        )
        self.claims_lost = Counter(
            "kuberun_claims_lost",
            "Times this replica could not renew its Lease in time and dropped its claims "
            "(its user-mode sessions were ended).",
            registry=r,
        )
        self.exec_failures = Counter(
            "kuberun_exec_failures",
            "Exec streams that failed to open or were lost, by reason.",
            ["reason"],
            registry=r,
        )
        self.audit_events = Counter(
            "kuberun_audit_events",
            "Audit events emitted, by event kind.",
            ["event"],
            registry=r,
        )
        self.audit_recorded_bytes = Counter(
            "kuberun_audit_recorded_bytes",
            "Session bytes written to recordings.",
            registry=r,
        )
        self.audit_dropped_bytes = Counter(
            "kuberun_audit_dropped_bytes",
            "Session bytes left out of recordings (writer behind under on_overflow: drop, "
            "or a write error).",
            registry=r,
        )
        self.audit_write_errors = Counter(
            "kuberun_audit_write_errors",
            "Failed writes (and opens) of audit event files and recordings; events dropped "
            "because the writer was behind count here too.",
            registry=r,
        )
        self.forward_channels = Gauge(
            "kuberun_forward_channels",
            "Forwarding channels (ssh -L, -D, -W) currently open to Pods.",
            registry=r,
        )
        self.forwarded_bytes = Counter(
            "kuberun_forwarded_bytes",
            "Payload bytes relayed by forwarding channels, to_pod or from_pod.",
            ["direction"],
            registry=r,
        )
        for direction in FORWARD_DIRECTIONS:
            self.forwarded_bytes.labels(direction=direction)
        self.forward_failures = Counter(
            "kuberun_forward_failures",
            "Forwarding channels refused, failed to open or lost, by reason.",
            ["reason"],
            registry=r,
        )
        self.forward_open_seconds = Histogram(
            "kuberun_forward_open_seconds",
            "Seconds to open a forwarding channel (Pod ready to channel confirmed).",
            buckets=_EXEC_OPEN_BUCKETS,
            registry=r,
        )


def metrics_handler(
    registry: CollectorRegistry,
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp handler serving ``registry`` (``generate_latest`` output).

    Mount it in an application of your own, or use :func:`start_metrics_server`.
    The text exposition format is the default; OpenMetrics is served when the
    scraper's ``Accept`` header asks for it.
    """

    async def handle(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        # A few dozen series render in well under a millisecond: no thread.
        return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

    return handle


class MetricsServer:
    """A running ``/metrics`` endpoint; see :func:`start_metrics_server`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        #: The address actually bound (the real port when 0 was asked for).
        self.host = host
        self.port = port

    async def close(self) -> None:
        """Stop serving and release the socket."""
        await self._runner.cleanup()

    async def __aenter__(self) -> MetricsServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def start_metrics_server(listen: str, registry: CollectorRegistry) -> MetricsServer:
    """Serve ``registry`` as Prometheus ``/metrics`` on ``listen`` (``"HOST:PORT"``).

    Runs on the current event loop (aiohttp).  The text exposition format is
    served by default and OpenMetrics when the scraper asks for it; ``/healthz``
    answers ``ok`` (a liveness probe; neither is logged).  Port 0
    binds a free port; :attr:`MetricsServer.port` tells which.

    :raises ConfigError: if ``listen`` is malformed (path ``metrics.listen``).
    :raises OSError: if the address cannot be bound.
    """
    host, port = parse_listen(listen, "metrics.listen")
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(registry))
    # Liveness: answered by the event loop itself, so a stuck loop fails it.
    app.router.add_get("/healthz", _healthz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = host, port
    for address in runner.addresses:
        bound_host, bound_port = address[0], address[1]
        break
    return MetricsServer(runner, bound_host, int(bound_port))
