"""Tests of kuberun.metrics: names, registries, and the /metrics endpoint."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kuberun.errors import ConfigError
from kuberun.metrics import DIRECTIONS, Metrics, metrics_handler, start_metrics_server

EXPECTED = {
    # family name (as the parser reports it) -> type
    "kuberun_backend_requests": "counter",
    "kuberun_backend_failures": "counter",
    "kuberun_connections": "gauge",
    "kuberun_sessions": "gauge",
    "kuberun_pod_start_seconds": "histogram",
    "kuberun_exec_open_seconds": "histogram",
    "kuberun_relayed_bytes": "counter",
    "kuberun_stdin_eof_undeliverable": "counter",
    "kuberun_pods_created": "counter",
    "kuberun_pods_deleted": "counter",
    "kuberun_pod_start_failures": "counter",
    "kuberun_exec_failures": "counter",
    "kuberun_connections_refused": "counter",
    "kuberun_audit_events": "counter",
    "kuberun_audit_recorded_bytes": "counter",
    "kuberun_audit_dropped_bytes": "counter",
    "kuberun_audit_write_errors": "counter",
    "kuberun_user_pods_reused": "counter",
    "kuberun_user_pods_idle_deleted": "counter",
    "kuberun_user_pods_claimed": "gauge",
    "kuberun_user_pods_idle": "gauge",
    "kuberun_claim_conflicts": "counter",
    "kuberun_replicas_alive": "gauge",
    "kuberun_lease_renew_failures": "counter",
    "kuberun_claims_lost": "counter",
    "kuberun_forward_channels": "gauge",
    "kuberun_forwarded_bytes": "counter",
    "kuberun_forward_failures": "counter",
    "kuberun_forward_open_seconds": "histogram",
    "kuberun_pods_pending_deletion": "gauge",
}

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_metrics() -> dict[str, str]:
    """The README's metrics table: exposed name -> type (a row may name several)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Metrics", 1)[1].split("\n## ", 1)[0]
    table: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`kuberun_"):
            continue
        for name in re.findall(r"`(kuberun_[a-z_]+)(?:\{[^}]*\})?`", cells[0]):
            table[name] = cells[1]
    return table


def test_readme_metrics_table_matches_the_registry() -> None:
    text = generate_latest(Metrics().registry).decode()
    exposed = {
        (f"{f.name}_total" if f.type == "counter" else f.name): f.type
        for f in text_string_to_metric_families(text)
        if not (f.name.endswith("_created") and f.type == "gauge")
    }
    assert _readme_metrics() == exposed


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_every_metric_is_exposed_with_its_contract_name() -> None:
    metrics = Metrics()
    text = generate_latest(metrics.registry).decode()
    families = {
        f.name: f.type
        for f in text_string_to_metric_families(text)
        # prometheus-client's optional `*_created` timestamps (parsed as gauges)
        if not (f.name.endswith("_created") and f.type == "gauge")
    }
    assert families == EXPECTED
    for name in (
        "kuberun_backend_requests_total",
        "kuberun_backend_failures_total",
        "kuberun_relayed_bytes_total",
        "kuberun_stdin_eof_undeliverable_total",
        "kuberun_pods_deleted_total",
        "# TYPE kuberun_pod_start_seconds histogram",
        "# TYPE kuberun_exec_open_seconds histogram",
        "# HELP kuberun_connections ",
    ):
        assert name in text


def test_attributes_are_the_documented_ones() -> None:
    metrics = Metrics()
    metrics.backend_requests.inc()
    metrics.backend_requests.inc()
    metrics.backend_failures.inc()
    metrics.connections.inc()
    metrics.sessions.set(3)
    metrics.pod_start_seconds.observe(2.5)
    metrics.exec_open_seconds.observe(0.02)
    metrics.relayed_bytes.labels(direction="stdout").inc(1000)
    metrics.relayed_bytes.labels("stdin").inc(7)
    metrics.stdin_eof_undeliverable.inc()
    metrics.pods_created.inc()
    metrics.pods_deleted.inc()
    metrics.pod_start_failures.labels(reason="ErrImagePull").inc()
    metrics.exec_failures.labels(reason="StreamLost").inc()
    got = samples(metrics.registry)
    assert got[("kuberun_backend_requests_total", ())] == 2
    assert got[("kuberun_backend_failures_total", ())] == 1
    assert got[("kuberun_connections", ())] == 1
    assert got[("kuberun_sessions", ())] == 3
    assert got[("kuberun_pod_start_seconds_count", ())] == 1
    assert got[("kuberun_pod_start_seconds_sum", ())] == 2.5
    assert got[("kuberun_pod_start_seconds_bucket", (("le", "3.0"),))] == 1
    assert got[("kuberun_pod_start_seconds_bucket", (("le", "2.0"),))] == 0
    assert got[("kuberun_exec_open_seconds_bucket", (("le", "0.025"),))] == 1
    assert got[("kuberun_relayed_bytes_total", (("direction", "stdout"),))] == 1000
    assert got[("kuberun_relayed_bytes_total", (("direction", "stdin"),))] == 7
    assert got[("kuberun_relayed_bytes_total", (("direction", "stderr"),))] == 0
    assert got[("kuberun_stdin_eof_undeliverable_total", ())] == 1
    assert got[("kuberun_pods_created_total", ())] == 1
    assert got[("kuberun_pods_deleted_total", ())] == 1
    assert got[("kuberun_pod_start_failures_total", (("reason", "ErrImagePull"),))] == 1
    assert got[("kuberun_exec_failures_total", (("reason", "StreamLost"),))] == 1


def test_directions_are_present_before_the_first_byte() -> None:
    got = samples(Metrics().registry)
    assert DIRECTIONS == ("stdout", "stderr", "stdin")
    for direction in DIRECTIONS:
        assert got[("kuberun_relayed_bytes_total", (("direction", direction),))] == 0


def test_instances_do_not_share_state_or_the_global_registry() -> None:
    a, b = Metrics(), Metrics()
    a.backend_requests.inc()
    assert samples(b.registry)[("kuberun_backend_requests_total", ())] == 0
    assert a.registry is not b.registry
    assert REGISTRY.get_sample_value("kuberun_backend_requests_total") is None


def test_registry_is_injectable() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    assert metrics.registry is registry
    metrics.sessions.inc()
    assert registry.get_sample_value("kuberun_sessions") == 1
    with pytest.raises(ValueError):
        Metrics(registry)  # the names are taken on that registry


async def test_metrics_server_serves_the_registry() -> None:
    metrics = Metrics()
    metrics.backend_requests.inc(5)
    server = await start_metrics_server("127.0.0.1:0", metrics.registry)
    try:
        assert server.host == "127.0.0.1"
        assert server.port > 0
        url = f"http://127.0.0.1:{server.port}/metrics"
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain")
                assert "version=0.0.4" in response.headers["Content-Type"]
                body = await response.text()
            assert "kuberun_backend_requests_total 5.0" in body
            metrics.backend_requests.inc()
            async with session.get(url) as response:
                assert "kuberun_backend_requests_total 6.0" in await response.text()
            headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
            async with session.get(url, headers=headers) as response:
                assert response.headers["Content-Type"].startswith("application/openmetrics-text")
                assert (await response.text()).rstrip().endswith("# EOF")
            async with session.get(f"http://127.0.0.1:{server.port}/healthz") as response:
                assert response.status == 200 and await response.text() == "ok\n"
            async with session.get(f"http://127.0.0.1:{server.port}/other") as response:
                assert response.status == 404
    finally:
        await server.close()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", server.port)) != 0


async def test_metrics_server_on_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = await start_metrics_server("[::1]:0", CollectorRegistry())
    except OSError:
        pytest.skip("::1 is not configured")
    async with server:
        assert server.host == "::1"
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://[::1]:{server.port}/metrics") as response,
        ):
            assert response.status == 200


async def test_metrics_server_bad_listen() -> None:
    with pytest.raises(ConfigError) as info:
        await start_metrics_server("nope", CollectorRegistry())
    assert info.value.path == "metrics.listen"


async def test_metrics_server_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            await start_metrics_server(f"127.0.0.1:{port}", CollectorRegistry())


async def test_handler_mounts_in_an_existing_app() -> None:
    from aiohttp import web

    metrics = Metrics()
    app = web.Application()
    app.router.add_get("/custom", metrics_handler(metrics.registry))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/custom") as response,
        ):
            assert "kuberun_sessions 0.0" in await response.text()
    finally:
        await runner.cleanup()
