"""Bulk transfer: ``head -c N /dev/zero`` down to OpenSSH, and N bytes of stdin up into ``cat``."""

from __future__ import annotations

import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from .services import DevclusterProc, Service, SshMaster

__all__ = ["Target", "Transfer", "run_transfer", "verify"]

GIB = 1 << 30


@dataclass
class Target:
    """Something OpenSSH talks to: the direct server or a gateway variant."""

    name: str
    server: Service
    master: SshMaster
    gateway: bool  # devcluster does part of the work


@dataclass
class Transfer:
    target: str
    direction: str
    size: int
    seconds: float
    server_cpu: float
    cluster_cpu: float
    client_cpu: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mb_s(self) -> float:
        return self.size / self.seconds / 1e6

    def per_gib(self, cpu: float) -> float:
        return cpu * GIB / self.size


def _command(direction: str, size: int) -> str:
    if direction == "down":
        return f"head -c {size} /dev/zero"
    return "cat >/dev/null"


def run_transfer(target: Target, cluster: DevclusterProc, direction: str, size: int) -> Transfer:
    """One transfer; raises if ssh fails."""
    args = target.master.args(_command(direction, size))
    feeder: subprocess.Popen[bytes] | None = None
    s0, c0, k0 = target.server.cpu(), cluster.cpu(), target.master.cpu()
    t0 = time.perf_counter()
    if direction == "down":
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    else:
        feeder = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
        proc = subprocess.Popen(args, stdin=feeder.stdout, stdout=subprocess.DEVNULL)
        assert feeder.stdout is not None
        feeder.stdout.close()
    rc = proc.wait()
    t1 = time.perf_counter()
    s1, c1, k1 = target.server.cpu(), cluster.cpu(), target.master.cpu()
    if feeder is not None:
        feeder.wait()
    if rc != 0:
        raise RuntimeError(f"{target.name} {direction}: ssh exited with {rc}")
    return Transfer(target.name, direction, size, t1 - t0, s1 - s0, c1 - c0, k1 - k0)


def verify(target: Target, size: int) -> None:
    """Both directions move exactly ``size`` bytes (also warms every path up)."""
    out = subprocess.run(
        target.master.args(f"head -c {size} /dev/zero"), capture_output=True, check=True
    ).stdout
    if len(out) != size or out.count(0) != size:
        raise RuntimeError(f"{target.name}: download gave {len(out)} bytes, expected {size}")
    out = subprocess.run(
        target.master.args("wc -c"), input=bytes(size), capture_output=True, check=True
    ).stdout
    if int(out.split()[0]) != size:
        raise RuntimeError(f"{target.name}: upload counted {out!r}, expected {size}")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
