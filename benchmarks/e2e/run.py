"""The end-to-end benchmark driver: ``python -m benchmarks.e2e`` (``make bench-e2e``).

Starts devcluster, one gateway process per exec-stream variant (Cython relay,
pure-Python relay, the kubernetes-asyncio/aiohttp baseline) and the direct
asyncssh server, each in its own process, then measures side by side, in
rotating order, round after round:

1. throughput with OpenSSH (``-c aes128-gcm@openssh.com``), down and up;
2. streams: the exec stream alone, no SSH, each variant against a TLS floor
   (the same bytes over the same connection with no per-byte work in Python);
3. keystroke round trips through a pty (asyncssh client);
4. scale: N concurrent shell sessions on one gateway process, idle CPU, churn;
5. audit: the Cython gateway's download CPU without auditing and with
   ``audit.recordings`` none, pty and all (each recording checked byte for byte).

Prints the tables and the targets of issue 7, and writes every sample as JSON.
The machine is shared: read ratios from one run, not absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import asyncssh

from kuberun.gateway import load_host_keys

from . import audit, latency, report, scale, streams
from .services import PY, ROOT, DevclusterProc, Service, SshMaster
from .throughput import Target, Transfer, run_transfer, verify

__all__ = ["main"]

VARIANTS = ("cython", "python", "aiohttp")
PHASES = ("throughput", "streams", "latency", "scale", "audit")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def raise_limits() -> dict[str, Any]:
    """Raise the soft fd and process limits to the hard ones (children inherit them)."""
    got: dict[str, Any] = {}
    for name in ("RLIMIT_NOFILE", "RLIMIT_NPROC"):
        which = getattr(resource, name)
        _soft, hard = resource.getrlimit(which)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(which, (hard, hard))
        got[name] = resource.getrlimit(which)
    return got


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) / (1 << 20):.0f} GiB RAM"
    versions: dict[str, str] = {}
    for mod in ("asyncssh", "uvloop", "aiohttp", "cryptography", "kubernetes_asyncio"):
        with contextlib.suppress(ImportError):
            versions[mod] = __import__(mod).__version__
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssh": ssh,
        "versions": versions,
        "loadavg_at_start": load,
    }


class Bench:
    """The processes of one benchmark run, in a temporary directory."""

    def __init__(self, workdir: Path, log_level: str) -> None:
        self.workdir = workdir
        self.log_level = log_level
        self.cluster: DevclusterProc | None = None
        self.services: list[Service] = []
        self.masters: list[SshMaster] = []
        self.key = workdir / "id_ed25519"

    def prepare(self) -> None:
        key = asyncssh.generate_private_key("ssh-ed25519")
        self.key.write_bytes(key.export_private_key())
        self.key.chmod(0o600)
        (self.workdir / "authorized_keys").write_bytes(key.export_public_key())
        load_host_keys([str(self.workdir / "host_key")])  # one ed25519 host key for all servers
        self.cluster = DevclusterProc.start(self.workdir, self.workdir / "devcluster.log")

    def gateway(self, relay: str, extra: list[str] | None = None, name: str = "") -> Service:
        assert self.cluster is not None
        name = name or f"gateway-{relay}"
        service = Service.start(
            name,
            [
                PY,
                "-m",
                "benchmarks.e2e.gateway_proc",
                "--kubeconfig",
                str(self.cluster.kubeconfig),
                "--workdir",
                str(self.workdir),
                "--relay",
                relay,
                "--log-level",
                self.log_level,
                *(extra or []),
            ],
            self.workdir / f"{name}.log",
        )
        self.services.append(service)
        return service

    def direct(self) -> Service:
        service = Service.start(
            "direct",
            [PY, "-m", "benchmarks.e2e.direct_proc", "--workdir", str(self.workdir)],
            self.workdir / "direct.log",
        )
        self.services.append(service)
        return service

    def master(self, name: str, port: int) -> SshMaster:
        master = SshMaster(self.key, port, self.workdir / f"ctl-{name}")
        master.start()
        self.masters.append(master)
        return master

    def stop_servers(self) -> None:
        """Stop every SSH master and server (their Pods are deleted), keep devcluster."""
        for master in self.masters:
            master.stop()
        self.masters.clear()
        for service in self.services:
            service.stop()
        self.services.clear()

    def close(self) -> None:
        self.stop_servers()
        if self.cluster is not None:
            self.cluster.stop()


@contextlib.contextmanager
def bench_dir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kuberun-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"logs kept in {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def throughput_phase(bench: Bench, args: argparse.Namespace) -> list[Transfer]:
    assert bench.cluster is not None
    targets = [Target("direct", bench.direct(), None, False)]  # type: ignore[arg-type]
    for relay in args.variants:
        targets.append(Target(relay, bench.gateway(relay), None, True))  # type: ignore[arg-type]
    for target in targets:
        target.master = bench.master(target.name, target.server.port)
    for target in targets:
        verify(target, 8 << 20)
    log(f"throughput: {len(targets)} targets verified; {args.rounds} rounds of {args.size} bytes")
    results: list[Transfer] = []
    for rnd in range(args.rounds):
        # Rotate the order each round so no target always runs first or last.
        order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
        for direction in ("down", "up"):
            for target in order:
                result = run_transfer(target, bench.cluster, direction, args.size)
                result.extra["round"] = rnd
                results.append(result)
                log(
                    f"  round {rnd} {direction:4} {target.name:8} {result.mb_s:7.1f} MB/s  "
                    f"server {result.per_gib(result.server_cpu):.2f} s/GiB  "
                    f"devcluster {result.per_gib(result.cluster_cpu):.2f} s/GiB"
                )
    return results


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.e2e", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="bytes per transfer")
    parser.add_argument("--rounds", type=int, default=3, help="throughput and streams rounds")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="gateway exec streams to compare"
    )
    parser.add_argument("--round-trips", type=int, default=1000, help="keystrokes per target")
    parser.add_argument(
        "--scale", default="100,500,1000", help="concurrent connections per scale step"
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=30.0, help="idle CPU window (one ping period)"
    )
    parser.add_argument("--churn", type=int, default=300, help="connections in the churn run")
    parser.add_argument("--churn-concurrency", type=int, default=20)
    parser.add_argument(
        "--only",
        default=",".join(PHASES),
        help=f"phases to run (comma-separated, of {', '.join(PHASES)})",
    )
    parser.add_argument("--json", type=Path, help="write all samples here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--log-level", default="WARNING", help="gateway log level")
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    for v in args.variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}")
    phases = set(args.only.split(","))
    for phase in phases - set(PHASES):
        parser.error(f"unknown phase {phase!r}")
    # SIGTERM unwinds like Ctrl-C, so every process started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    limits = raise_limits()
    info = machine_info()
    info["limits"] = limits
    data: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    started = time.time()
    with bench_dir(args.keep) as workdir:
        bench = Bench(workdir, args.log_level)
        try:
            bench.prepare()
            if "throughput" in phases:
                transfers = throughput_phase(bench, args)
                data["throughput"] = [asdict(t) for t in transfers]
            if "streams" in phases:
                data["streams"] = streams.run(bench, args)
            if "latency" in phases:
                data["latency"] = latency.run(bench, args)
            if "audit" in phases:
                data["audit"] = audit.run(bench, args)
            if "scale" in phases:
                bench.stop_servers()  # scale starts its own, with no other Pods around
                data["scale"] = scale.run(bench, args)
        finally:
            bench.close()
    data["seconds"] = time.time() - started
    print(report.render(data))
    out = args.json or ROOT / ".benchmarks" / "e2e" / time.strftime("%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    log(f"samples written to {out}")
    return 0
