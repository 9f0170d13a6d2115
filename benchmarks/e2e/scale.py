"""Many connections on one gateway process: memory, idle CPU, churn and API calls.

For each step N, a fresh gateway (Cython relay) and a fresh direct server each
get N concurrent asyncssh connections holding an open shell session (from a
separate client process). Memory per connection is the RSS growth over the
process's own baseline (taken after a few warm-up connections) divided by N;
the gateway's cost beyond asyncssh's is the difference to the direct server's.
Idle CPU is the server's CPU time over ``--idle-seconds`` with every session open
and silent (this includes the exec streams' WebSocket pings). Churn runs
``--churn`` short connections (connect, Pod ready, exec ``true``, exit,
disconnect) and waits until devcluster has deleted every Pod; devcluster's
request log gives the API calls per connection.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from typing import Any

from .services import PY, ROOT, DevclusterProc, Service, _child_env

__all__ = ["run"]

WARMUP = 5


def _client(bench: Any, mode: str, port: int, count: int, concurrency: int) -> Any:
    return subprocess.Popen(
        [
            PY,
            "-m",
            "benchmarks.e2e.scale_client",
            mode,
            "--port",
            str(port),
            "--key",
            str(bench.key),
            "--count",
            str(count),
            "--concurrency",
            str(concurrency),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(bench.workdir / "scale-client.log", "ab"),
        cwd=ROOT,
        env=_child_env(),
        text=True,
    )


def _churn(bench: Any, port: int, count: int, concurrency: int) -> dict[str, Any]:
    proc = _client(bench, "churn", port, count, concurrency)
    out, _ = proc.communicate(timeout=3600)
    return dict(json.loads(out.splitlines()[-1]))


def _wait_no_pods(cluster: DevclusterProc, timeout: float = 600) -> float:
    started = time.perf_counter()
    while cluster.pod_count():
        if time.perf_counter() - started > timeout:
            raise RuntimeError("Pods were not deleted in time")
        time.sleep(0.1)
    return time.perf_counter()


def _api_kind(record: dict[str, Any]) -> str:
    if str(record.get("path", "")).endswith("/exec"):
        return "exec"
    return str(record["verb"])


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _hold_step(
    bench: Any, kind: str, n: int, idle_seconds: float, concurrency: int
) -> dict[str, Any]:
    cluster: DevclusterProc = bench.cluster
    server: Service = bench.gateway("cython") if kind == "gateway" else bench.direct()
    try:
        _churn(bench, server.port, WARMUP, WARMUP)
        if kind == "gateway":
            _wait_no_pods(cluster)
        time.sleep(1)
        base_rss = server.rss()
        client = _client(bench, "hold", server.port, n, concurrency)
        assert client.stdout is not None and client.stdin is not None
        opened = json.loads(client.stdout.readline())
        time.sleep(3)  # let the last sessions settle
        rss = server.rss()
        processes = cluster.process_count() if kind == "gateway" else None
        cpu0, dc0 = server.cpu(), cluster.cpu()
        time.sleep(idle_seconds)
        cpu1, dc1 = server.cpu(), cluster.cpu()
        client.stdin.write("close\n")
        client.stdin.flush()
        closed = json.loads(client.stdout.readline())
        client.wait(60)
        if kind == "gateway":
            _wait_no_pods(cluster)
        got = int(opened["opened"])
        step = {
            "kind": kind,
            "n": n,
            "opened": got,
            "failed": opened["failed"],
            "errors": opened["errors"],
            "open_seconds": opened["seconds"],
            "close_seconds": closed["seconds"],
            "base_rss": base_rss,
            "rss": rss,
            "rss_per_conn": (rss - base_rss) / got if got else float("nan"),
            "idle_cpu_pct": 100 * (cpu1 - cpu0) / idle_seconds,
            "cluster_idle_cpu_pct": 100 * (dc1 - dc0) / idle_seconds,
            "cluster_processes": processes,
        }
        _log(
            f"  scale {kind:7} n={n:5} opened {got} (failed {opened['failed']}) in "
            f"{opened['seconds']:.1f}s  RSS +{step['rss_per_conn'] / 1024:.1f} KiB/conn  "
            f"idle CPU {step['idle_cpu_pct']:.2f}%"
        )
        return step
    finally:
        server.stop()
        bench.services.remove(server)


def run(bench: Any, args: Any) -> dict[str, Any]:
    cluster: DevclusterProc = bench.cluster
    steps = [int(x) for x in str(args.scale).split(",") if x]
    out: dict[str, Any] = {"idle_seconds": args.idle_seconds, "steps": []}
    for n in steps:
        for kind in ("direct", "gateway"):
            out["steps"].append(_hold_step(bench, kind, n, args.idle_seconds, 50))
    if args.churn:
        server = bench.gateway("cython")
        try:
            _churn(bench, server.port, WARMUP, WARMUP)
            _wait_no_pods(cluster)
            cluster.clear_requests()
            cpu0, dc0 = server.cpu(), cluster.cpu()
            started = time.perf_counter()
            result = _churn(bench, server.port, args.churn, args.churn_concurrency)
            client_done = time.perf_counter()
            ended = _wait_no_pods(cluster)
            cpu1, dc1 = server.cpu(), cluster.cpu()
            requests = cluster.requests()
        finally:
            server.stop()
            bench.services.remove(server)
        done = int(result["done"])
        tally = collections.Counter(_api_kind(r) for r in requests)
        times = sorted(result["times"])
        out["churn"] = {
            "connections": args.churn,
            "concurrency": args.churn_concurrency,
            "done": done,
            "failed": result["failed"],
            "errors": result["errors"],
            "seconds_client": client_done - started,
            "seconds_until_pods_deleted": ended - started,
            "per_second": done / (ended - started) if done else 0.0,
            "connection_p50_s": times[len(times) // 2] if times else float("nan"),
            "gateway_cpu_ms_per_conn": 1000 * (cpu1 - cpu0) / max(done, 1),
            "cluster_cpu_ms_per_conn": 1000 * (dc1 - dc0) / max(done, 1),
            "api_calls": len(requests),
            "api_calls_per_conn": len(requests) / max(done, 1),
            "api_calls_by_verb": dict(tally),
        }
        _log(
            f"  churn {done}/{args.churn} in {ended - started:.1f}s: "
            f"{out['churn']['per_second']:.1f}/s, {out['churn']['api_calls_per_conn']:.2f} "
            f"API calls/conn"
        )
    return out
