"""kuberun on the real path, side by side with kubectl, in one run.

    ssh → kuberun → kube-apiserver → kubelet → containerd    against    kubectl exec -i

* Throughput: SIZE each way, OpenSSH through the gateway (a ControlMaster connection
  holds the Pod; each transfer is a session on it) against ``kubectl exec -i`` into the
  same Pod, rounds alternating between the two; medians and ratios.
* Keystroke round trips: one byte into ``cat`` and its echo back, an asyncssh session
  through the gateway against ``kubectl exec -i`` (pipes both, no pty).
* Pod start: a new connection's first command (``ssh ... true``: Pod created, Running,
  exec, exit) against ``kubectl run --rm -i --restart=Never ... -- true``; p50 and p99.
* API calls per connection: the gateway's own counters (``kuberun_backend_requests_total``
  and exec opens) around one connection with three sessions.
* Port forwarding: SIZE each way and 1-byte echoes to a server in the Pod
  (``benchmarks/e2e/forward_target.py``), through ``ssh -L`` on the gateway against
  ``kubectl port-forward`` (SPDY, or SPDY over WebSocket).

Needs a real cluster (KUBERUN_REAL_KUBECONFIG, as the tests): ``make bench-real``.
The gateway runs as ``tests.integration.gatewayproc`` (uvloop, Cython relay) with the
ServiceAccount of deploy/rbac.yaml in a namespace of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh

from tests.integration.chaos import SSH_OPTS, GatewayProcess
from tests.integration.clusters import REAL_IMAGE, RealTestCluster, open_cluster

KUBECTL = str(Path(sys.executable).with_name("kubectl"))
FORWARD_TARGET = Path(__file__).with_name("e2e") / "forward_target.py"
# The e2e suite's transfer and echo loops (imported by name: mypy sees benchmarks/ as
# two roots, this file and the e2e package).
_forward: Any = importlib.import_module("benchmarks.e2e.forward")
#: The target's port inside the Pod's network namespace.
POD_PORT = 18080
MiB = 1 << 20


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Bench:
    def __init__(self, cluster: RealTestCluster, workdir: Path) -> None:
        self.cluster = cluster
        self.workdir = workdir
        key = asyncssh.generate_private_key("ssh-ed25519")
        self.key = workdir / "id_ed25519"
        self.key.write_bytes(key.export_private_key())
        self.key.chmod(0o600)
        (workdir / "authorized_keys").write_bytes(key.export_public_key())
        self.kubeconfig = workdir / "kubeconfig"
        cluster.write_kubeconfig(self.kubeconfig)
        self.admin = workdir / "admin-kubeconfig"
        cluster.write_admin_kubeconfig(self.admin)
        self.metrics = f"127.0.0.1:{_free_port()}"
        self.control = workdir / "cm"
        self.gateway: GatewayProcess | None = None
        self.pod = ""

    def config(self) -> dict[str, Any]:
        return {
            "ssh": {
                "listen": "127.0.0.1:0",
                "host_keys": [str(self.workdir / "host_key")],
                "authorized_keys": str(self.workdir / "authorized_keys"),
            },
            "kubernetes": self.cluster.kubernetes_config(self.kubeconfig),
            "pod": {"spec": self.cluster.pod_spec(self.workdir)},
            "timeouts": {"pod_start": 120},
            "metrics": {"listen": self.metrics},
        }

    def ssh(self, *command: str, control: bool = True) -> list[str]:
        assert self.gateway is not None
        mux = ["-o", "ControlMaster=no", "-o", f"ControlPath={self.control}"] if control else []
        return [
            "ssh", *SSH_OPTS, "-i", str(self.key), "-p", str(self.gateway.port), "-T", *mux,
            "bench@127.0.0.1", *command,
        ]  # fmt: skip

    def connect(self) -> Any:
        assert self.gateway is not None
        return asyncssh.connect(
            "127.0.0.1",
            self.gateway.port,
            username="bench",
            client_keys=[str(self.key)],
            known_hosts=None,
            encryption_algs=["aes128-gcm@openssh.com"],
        )

    def kubectl(self, *args: str) -> list[str]:
        return [KUBECTL, "--kubeconfig", str(self.admin), "-n", self.cluster.namespace, *args]

    async def start(self) -> None:
        self.gateway = GatewayProcess(self.workdir, self.config(), "uvloop", "cython")
        await self.gateway.start()
        self.master = await asyncio.create_subprocess_exec(
            *self.ssh(control=False)[:-1],
            "-M", "-N", "-o", f"ControlPath={self.control}", "bench@127.0.0.1",
            stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not self.control.exists():
            assert time.monotonic() < deadline, "ControlMaster did not start"
            await asyncio.sleep(0.1)
        out = await _output(self.ssh("echo $HOSTNAME"))
        self.pod = out.decode().strip()

    async def stop(self) -> None:
        self.master.terminate()
        await self.master.wait()
        if self.gateway is not None:
            await self.gateway.stop(60)

    # -- throughput ---------------------------------------------------------------------

    async def throughput(self, size: int, rounds: int) -> dict[str, list[float]]:
        down = f"head -c {size} /dev/zero"
        up = "cat >/dev/null"
        runs: dict[str, Callable[[], Awaitable[float]]] = {
            "kuberun download": lambda: _timed(self.ssh(down)),
            "kubectl download": lambda: _timed(
                self.kubectl("exec", "-i", self.pod, "--", *down.split())
            ),
            "kuberun upload": lambda: _timed(self.ssh(up), stdin_size=size),
            "kubectl upload": lambda: _timed(
                self.kubectl("exec", "-i", self.pod, "--", "sh", "-c", up), stdin_size=size
            ),
        }  # fmt: skip
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                times[name].append(await run())
        return times

    # -- keystrokes ---------------------------------------------------------------------

    async def keystrokes(self, count: int) -> dict[str, list[float]]:
        assert self.gateway is not None
        result: dict[str, list[float]] = {}
        async with self.connect() as conn:
            proc = await conn.create_process("cat", encoding=None)
            result["kuberun"] = await _echo_rtts(proc.stdin.write, proc.stdout.read, count)
            proc.stdin.write_eof()
            await proc.wait()
        kubectl = await asyncio.create_subprocess_exec(
            *self.kubectl("exec", "-i", self.pod, "--", "cat"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert kubectl.stdin is not None and kubectl.stdout is not None
        result["kubectl"] = await _echo_rtts(kubectl.stdin.write, kubectl.stdout.read, count)
        kubectl.stdin.close()
        await kubectl.wait()
        return result

    # -- Pod start ------------------------------------------------------------------------

    async def pod_starts(self, count: int) -> dict[str, list[float]]:
        result: dict[str, list[float]] = {"kuberun": [], "kubectl": []}
        for i in range(count):
            result["kuberun"].append(await _timed(self.ssh("true", control=False)))
            result["kubectl"].append(
                await _timed(
                    self.kubectl(
                        "run", f"kubectl-start-{i}", "--rm", "-i", "--restart=Never",
                        f"--image={REAL_IMAGE}", "--image-pull-policy=Never", "--quiet",
                        "--", "true",
                    )
                )
            )  # fmt: skip
        return result

    # -- port forwarding ----------------------------------------------------------------

    async def forwards(self, size: int, rounds: int, echoes: int) -> dict[str, list[float]]:
        """ssh -L through the gateway against kubectl port-forward, to one server in the Pod."""
        script = self.workdir / "forward_target.py"  # the workdir is mounted in the Pod
        script.write_text(FORWARD_TARGET.read_text())
        server = await asyncio.create_subprocess_exec(
            *self.ssh(f"exec python3 {script} {POD_PORT}"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        assert server.stdout is not None
        await asyncio.wait_for(server.stdout.readline(), 60)  # listening
        via_ssh, via_kubectl = _free_port(), _free_port()
        await _output(
            [
                "ssh", *SSH_OPTS, "-o", f"ControlPath={self.control}", "-O", "forward",
                "-L", f"{via_ssh}:localhost:{POD_PORT}", "bench@127.0.0.1",
            ]
        )  # fmt: skip
        kubectl = await asyncio.create_subprocess_exec(
            *self.kubectl("port-forward", self.pod, f"{via_kubectl}:{POD_PORT}"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        assert kubectl.stdout is not None
        await asyncio.wait_for(kubectl.stdout.readline(), 60)  # "Forwarding from ..."
        ports = {"kuberun": via_ssh, "kubectl": via_kubectl}
        result: dict[str, list[float]] = {}
        try:
            for _ in range(rounds):
                for name, port in ports.items():
                    for direction in ("download", "upload"):
                        seconds = await asyncio.to_thread(
                            _forward.move, port, "down" if direction == "download" else "up", size
                        )
                        result.setdefault(f"{name} {direction}", []).append(seconds)
            for name, port in ports.items():
                result[f"{name} echo"] = await asyncio.to_thread(_forward.echo_rtts, port, echoes)
        finally:
            kubectl.terminate()
            await kubectl.wait()
            server.terminate()
            await server.wait()
        return result

    # -- API calls ------------------------------------------------------------------------

    async def api_calls(self) -> dict[str, float]:
        """The gateway's counters across one connection that runs three sessions."""
        assert self.gateway is not None
        before = await self._counters()
        async with self.connect() as conn:
            for _ in range(3):
                await conn.run("true", check=True)
        await asyncio.sleep(5)  # the delete runs after the disconnect
        after = await self._counters()
        return {k: after[k] - before.get(k, 0) for k in after}

    async def _counters(self) -> dict[str, float]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://{self.metrics}/metrics") as resp,
        ):
            text = await resp.text()
        found: dict[str, float] = {}
        for name in ("kuberun_backend_requests_total", "kuberun_exec_open_seconds_count"):
            match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
            found[name] = float(match.group(1)) if match else 0.0
        return found


async def _output(argv: list[str]) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, (argv, proc.returncode)
    return out


async def _timed(argv: list[str], stdin_size: int = 0) -> float:
    """Wall time of ``argv``; stdout is discarded, stdin gets ``stdin_size`` zero bytes."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin_size else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
    )
    if stdin_size:
        assert proc.stdin is not None
        chunk = bytes(MiB)
        left = stdin_size
        while left:
            proc.stdin.write(chunk[: min(left, MiB)])
            left -= min(left, MiB)
            await proc.stdin.drain()
        proc.stdin.close()
    code = await proc.wait()
    assert code == 0, (argv, code)
    return time.monotonic() - started


async def _echo_rtts(write: Any, read: Any, count: int) -> list[float]:
    samples = []
    for i in range(count + 20):
        started = time.perf_counter()
        write(b"x")
        got = await asyncio.wait_for(read(1), 30)
        assert got == b"x", got
        if i >= 20:  # warm-up
            samples.append((time.perf_counter() - started) * 1000)
    return samples


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        async with open_cluster(real=True) as cluster:
            assert isinstance(cluster, RealTestCluster)
            bench = Bench(cluster, Path(tmp))
            await bench.start()
            try:
                size = args.size_mib * MiB
                forwards = await bench.forwards(size, args.rounds, args.keys)
                if args.forward_only:
                    times, keys, starts, calls = {}, {}, {}, {}
                else:
                    times = await bench.throughput(size, args.rounds)
                    keys = await bench.keystrokes(args.keys)
                    starts = await bench.pod_starts(args.starts)
                    calls = await bench.api_calls()
            finally:
                await bench.stop()
    print(
        f"# real path, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores"
    )
    if not args.forward_only:
        _print_exec(args, times, keys, starts, calls)
    _print_forwards(args, forwards)


def _print_exec(
    args: argparse.Namespace,
    times: dict[str, list[float]],
    keys: dict[str, list[float]],
    starts: dict[str, list[float]],
    calls: dict[str, float],
) -> None:
    print(f"\n## Throughput, {args.size_mib} MiB per transfer, medians of {args.rounds}\n")
    print("| direction | kuberun (ssh) | kubectl exec -i | kuberun / kubectl |")
    print("|---|---|---|---|")
    for direction in ("download", "upload"):
        k = statistics.median(times[f"kuberun {direction}"])
        c = statistics.median(times[f"kubectl {direction}"])
        mbs = args.size_mib * MiB / 1e6
        print(
            f"| {direction} | {mbs / k:.0f} MB/s ({k:.2f} s) | {mbs / c:.0f} MB/s ({c:.2f} s) "
            f"| {c / k:.2f} |"
        )
    print(f"\n## Keystroke round trip, {args.keys} samples (ms)\n")
    print("| path | p50 | p90 | p99 |")
    print("|---|---|---|---|")
    for name, samples in keys.items():
        print(
            f"| {name} | {percentile(samples, 50):.2f} | {percentile(samples, 90):.2f} "
            f"| {percentile(samples, 99):.2f} |"
        )
    print(f"\n## Pod start to first command's end, {args.starts} each (s)\n")
    print("| path | p50 | p99 |")
    print("|---|---|---|")
    for name, samples in starts.items():
        print(f"| {name} | {percentile(samples, 50):.2f} | {percentile(samples, 99):.2f} |")
    print("\n## API calls per connection (3 sessions)\n")
    for name, value in calls.items():
        print(f"- {name}: {value:g}")


def _print_forwards(args: argparse.Namespace, forwards: dict[str, list[float]]) -> None:
    print(f"\n## Port forwarding to a server in the Pod, {args.size_mib} MiB, medians\n")
    print("| direction | kuberun (ssh -L) | kubectl port-forward | kuberun / kubectl |")
    print("|---|---|---|---|")
    for direction in ("download", "upload"):
        k = statistics.median(forwards[f"kuberun {direction}"])
        c = statistics.median(forwards[f"kubectl {direction}"])
        mbs = args.size_mib * MiB / 1e6
        print(f"| {direction} | {mbs / k:.0f} MB/s | {mbs / c:.0f} MB/s | {c / k:.2f} |")
    print(f"\n1-byte echo, {args.keys} samples (ms)\n")
    print("| path | p50 | p90 | p99 |")
    print("|---|---|---|---|")
    for name in ("kuberun", "kubectl"):
        samples = forwards[f"{name} echo"]
        print(
            f"| {name} | {percentile(samples, 50):.2f} | {percentile(samples, 90):.2f} "
            f"| {percentile(samples, 99):.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_path", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keys", type=int, default=300)
    parser.add_argument("--starts", type=int, default=20)
    parser.add_argument(
        "--forward-only", action="store_true", help="only the port-forwarding comparison"
    )
    import uvloop

    uvloop.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
