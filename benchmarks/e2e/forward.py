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
   connection, with the server's CPU (and devcluster's, which on a real node is
   the kubelet's and the API server's) per GiB;
2. latency: 1-byte round trips through the forward (median, p99).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import subprocess
import time
from dataclasses import dataclass, field

from .procstat import cpu_seconds
from .run import Bench, bench_dir, log, parse_size
from .services import PY, Service, ssh_base

__all__ = ["echo_rtts", "main", "move"]

GIB = 1 << 30
CHUNK = 1 << 20


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


def transfer(forward: Forward, direction: str, size: int, cluster_cpu: float) -> dict[str, float]:
    """One transfer through ``forward``; wall time and CPU deltas."""
    s0, k0 = forward.cpu()
    seconds = move(forward.local_port, direction, size)
    s1, k1 = forward.cpu()
    return {
        "seconds": seconds,
        "server_cpu": s1 - s0,
        "client_cpu": k1 - k0,
        "cluster_cpu": cluster_cpu,
    }


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


def _table(forwards: list[Forward], size: int) -> None:
    direct = next(f for f in forwards if f.name == "direct")
    print(f"\n-L throughput, {size / (1 << 20):.0f} MiB per transfer, medians of the rounds")
    print(
        f"{'target':8} {'dir':4} {'MB/s':>7} {'ratio':>6} {'server s/GiB':>13} "
        f"{'+cluster s/GiB':>15} {'CPU ratio':>10}"
    )
    for direction in ("down", "up"):
        ref = direct.samples[direction]
        ref_mbs = statistics.median(size / s["seconds"] / 1e6 for s in ref)
        ref_cpu = statistics.median(s["server_cpu"] * GIB / size for s in ref)
        for f in forwards:
            got = f.samples[direction]
            mbs = statistics.median(size / s["seconds"] / 1e6 for s in got)
            cpu = statistics.median(s["server_cpu"] * GIB / size for s in got)
            both = statistics.median((s["server_cpu"] + s["cluster_cpu"]) * GIB / size for s in got)
            print(
                f"{f.name:8} {direction:4} {mbs:7.0f} {mbs / ref_mbs:6.2f} {cpu:13.2f} "
                f"{both:15.2f} {cpu / ref_cpu:10.2f}"
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
            log(f"forward: {len(forwards)} forwards; {args.rounds} rounds of {args.size} bytes")
            for rnd in range(args.rounds):
                order = forwards[rnd % len(forwards) :] + forwards[: rnd % len(forwards)]
                for direction in ("down", "up"):
                    for f in order:
                        c0 = bench.cluster.cpu()
                        sample = transfer(f, direction, args.size, 0.0)
                        sample["cluster_cpu"] = bench.cluster.cpu() - c0 if f.gateway else 0.0
                        f.samples.setdefault(direction, []).append(sample)
                        log(
                            f"  round {rnd} {f.name} {direction}: "
                            f"{args.size / sample['seconds'] / 1e6:.0f} MB/s"
                        )
            for f in forwards:
                f.echo_ms = echo_rtts(f.local_port, args.echoes)
            _table(forwards, args.size)
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
