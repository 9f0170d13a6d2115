"""Port forwarding benchmark: ``ssh -L`` through the gateway against ``ssh -L`` through a
direct asyncssh server, side by side in one run.

``python -m benchmarks.e2e.forward [--size 512M] [--rounds 3] [--echoes 2000]``
(``make bench-forward``).

The gateway's forward goes OpenSSH → asyncssh → kuberun → pods/portforward
WebSocket (TLS) → devcluster → the target's port; the direct server's goes
OpenSSH → asyncssh's own forwarder → the target's port. Both servers run in
processes of their own on uvloop, with the same host key, ciphers and auth
(``benchmarks.e2e.direct_proc``, ``benchmarks.e2e.gateway_proc``); the target
(``benchmarks.e2e.forward_target``) is a third process. Measured, in rotating
order each round:

1. throughput down (target → client) and up, N bytes over one forwarded
   connection, with the CPU per GiB of every process that shares the machine's
   cores: the server, devcluster (on a real node: the kubelet's and the API
   server's), the ssh client, the target and this process (the local end);
2. latency: 1-byte round trips through the forward (median, p99).

The CPU ceiling is the fastest those costs allow on the machine's cores: all
the processes together get at most one CPU-second per core per second, each
at most one.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import struct
import subprocess
import time
from dataclasses import dataclass, field

from .procstat import cpu_seconds
from .run import Bench, bench_dir, log, parse_size
from .services import PY, Service, ssh_base

__all__ = ["cpu_ceiling", "echo_rtts", "main", "move"]

GIB = 1 << 30
CHUNK = 1 << 20
#: CPU per GiB recorded for each process of a transfer (sample keys).
PROCESSES = ("server_cpu", "cluster_cpu", "client_cpu", "target_cpu", "local_cpu")


@dataclass
class Forward:
    """One ``ssh -N -L`` to a target through one server."""

    name: str
    server: Service
    local_port: int
    ssh: subprocess.Popen[bytes]
    gateway: bool
    samples: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    echo_ms: list[float] = field(default_factory=list)

    def cpu(self) -> tuple[float, float]:
        return self.server.cpu(), cpu_seconds(self.ssh.pid)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _connect(port: int, timeout: float = 60) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def start_forward(bench: Bench, name: str, server: Service, target: int, gateway: bool) -> Forward:
    local = _free_port()
    ssh = subprocess.Popen(
        [
            *ssh_base(bench.key, server.port),
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-L",
            f"{local}:localhost:{target}",
            "bench@127.0.0.1",
        ],
        stdin=subprocess.DEVNULL,
    )
    forward = Forward(name, server, local, ssh, gateway)
    _connect(local).close()  # listening (this first connection also warms the path)
    return forward


def move(port: int, direction: str, size: int) -> float:
    """``size`` bytes down from or up to the target through the forward listening on
    ``port``, over a fresh connection; the wall time in seconds."""
    conn = _connect(port)
    t0 = time.perf_counter()
    conn.sendall((b"D" if direction == "down" else b"U") + struct.pack(">Q", size))
    if direction == "down":
        buf = bytearray(CHUNK)
        left = size
        while left:
            n = conn.recv_into(buf, min(left, CHUNK))
            if not n:
                raise RuntimeError(f"port {port}: {left} bytes missing")
            left -= n
    else:
        zeros = memoryview(bytes(CHUNK))
        left = size
        while left:
            n = min(left, CHUNK)
            conn.sendall(zeros[:n])
            left -= n
        if conn.recv(2) != b"ok":
            raise RuntimeError(f"port {port}: upload not confirmed")
    seconds = time.perf_counter() - t0
    conn.close()
    return seconds


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def transfer(forward: Forward, direction: str, size: int, target: Service) -> dict[str, float]:
    """One transfer through ``forward``; wall time and CPU deltas (devcluster's is
    filled in by the caller)."""
    s0, k0 = forward.cpu()
    t0, l0 = target.cpu(), _own_cpu()
    seconds = move(forward.local_port, direction, size)
    s1, k1 = forward.cpu()
    t1, l1 = target.cpu(), _own_cpu()
    return {
        "seconds": seconds,
        "server_cpu": s1 - s0,
        "client_cpu": k1 - k0,
        "cluster_cpu": 0.0,
        "target_cpu": t1 - t0,
        "local_cpu": l1 - l0,
    }


def cpu_ceiling(per_gib: list[float], cores: int) -> float:
    """MB/s that CPU costs of ``per_gib`` (seconds per GiB, one per process) allow on
    ``cores`` cores, each process on at most one of them."""
    total = sum(per_gib)
    busiest = max(per_gib)
    if total <= 0:
        return float("inf")
    return min(cores / total, 1 / busiest) * GIB / 1e6


def echo_rtts(port: int, count: int) -> list[float]:
    """``count`` 1-byte round trips over one connection to the forward on ``port``, in ms."""
    conn = _connect(port)
    conn.sendall(b"E")
    times = []
    for i in range(count + 20):
        t0 = time.perf_counter()
        conn.sendall(b"x")
        if conn.recv(1) != b"x":
            raise RuntimeError(f"port {port}: echo lost")
        if i >= 20:  # the first round trips warm the path up
            times.append((time.perf_counter() - t0) * 1000)
    conn.close()
    return times


def _per_gib(samples: list[dict[str, float]], key: str, size: int) -> float:
    return statistics.median(s[key] * GIB / size for s in samples)


def _table(forwards: list[Forward], size: int) -> None:
    direct = next(f for f in forwards if f.name == "direct")
    cores = os.cpu_count() or 1
    print(f"\n-L throughput, {size / (1 << 20):.0f} MiB per transfer, medians of the rounds")
    print(
        "CPU s/GiB of each process (server, devcluster, ssh client, target, local end); "
        f"ceiling: the MB/s those costs allow on {cores} cores"
    )
    print(
        f"{'target':8} {'dir':4} {'MB/s':>7} {'ratio':>6} {'server':>7} {'x dir':>6} "
        f"{'cluster':>8} {'ssh':>6} {'target':>7} {'local':>6} {'all':>6} "
        f"{'ceiling':>8} {'c.ratio':>8}"
    )
    for direction in ("down", "up"):
        ref = direct.samples[direction]
        ref_mbs = statistics.median(size / s["seconds"] / 1e6 for s in ref)
        ref_cpu = _per_gib(ref, "server_cpu", size)
        ref_ceiling = cpu_ceiling([_per_gib(ref, k, size) for k in PROCESSES], cores)
        for f in forwards:
            got = f.samples[direction]
            mbs = statistics.median(size / s["seconds"] / 1e6 for s in got)
            costs = [_per_gib(got, k, size) for k in PROCESSES]
            ceiling = cpu_ceiling(costs, cores)
            cells = " ".join(f"{c:{w}.2f}" for c, w in zip(costs[1:], (8, 6, 7, 6), strict=True))
            print(
                f"{f.name:8} {direction:4} {mbs:7.0f} {mbs / ref_mbs:6.2f} {costs[0]:7.2f} "
                f"{costs[0] / ref_cpu:6.2f} {cells} {sum(costs):6.2f} "
                f"{ceiling:8.0f} {ceiling / ref_ceiling:8.2f}"
            )
    print("\n1-byte echo through -L (ms)")
    print(f"{'target':8} {'median':>7} {'p90':>7} {'p99':>7} {'added':>7}")
    ref_med = statistics.median(direct.echo_ms)
    for f in forwards:
        values = sorted(f.echo_ms)
        med = statistics.median(values)
        p90 = values[int(len(values) * 0.9)]
        p99 = values[int(len(values) * 0.99)]
        print(f"{f.name:8} {med:7.3f} {p90:7.3f} {p99:7.3f} {med - ref_med:7.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("512M"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--echoes", type=int, default=2000)
    parser.add_argument("--variants", nargs="+", default=["cython", "python"])
    parser.add_argument("--keep", action="store_true", help="keep the logs")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    with bench_dir(args.keep) as workdir:
        bench = Bench(workdir, args.log_level)
        target: Service | None = None
        forwards: list[Forward] = []
        try:
            bench.prepare()
            assert bench.cluster is not None
            target = Service.start(
                "target", [PY, "-m", "benchmarks.e2e.forward_target"], workdir / "target.log"
            )
            forwards.append(start_forward(bench, "direct", bench.direct(), target.port, False))
            for relay in args.variants:
                forwards.append(
                    start_forward(bench, relay, bench.gateway(relay), target.port, True)
                )
            log(
                f"forward: {len(forwards)} forwards; {args.rounds} rounds of {args.size} bytes; "
                f"load average {os.getloadavg()[0]:.1f}"
            )
            for rnd in range(args.rounds):
                order = forwards[rnd % len(forwards) :] + forwards[: rnd % len(forwards)]
                for direction in ("down", "up"):
                    for f in order:
                        c0 = bench.cluster.cpu()
                        sample = transfer(f, direction, args.size, target)
                        sample["cluster_cpu"] = bench.cluster.cpu() - c0 if f.gateway else 0.0
                        f.samples.setdefault(direction, []).append(sample)
                        log(
                            f"  round {rnd} {f.name} {direction}: "
                            f"{args.size / sample['seconds'] / 1e6:.0f} MB/s"
                        )
            for f in forwards:
                f.echo_ms = echo_rtts(f.local_port, args.echoes)
            _table(forwards, args.size)
            print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
        finally:
            for f in forwards:
                f.ssh.terminate()
                f.ssh.wait()
            if target is not None:
                target.stop()
            bench.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
