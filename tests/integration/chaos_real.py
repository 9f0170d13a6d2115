"""The faults a real cluster can take, for the chaos run (``make chaos-real``).

devcluster injects faults into its own API; a real cluster is hurt from outside, as
an operator's bad day would: kube-apiserver SIGKILLed and started again (mid-traffic:
watches, execs and creates in flight), the kubelet and containerd restarted (SIGTERM
or SIGKILL), and the console container of a running Pod killed (SIGKILL to every
process in its cgroup, so the kubelet restarts it). Components are restarted with
``scripts/realcluster-restart``; one cluster fault runs at a time, and an epoch ends
only once the API server answers and the node is Ready again.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import random
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from .clusters import ROOT, RealTestCluster

RESTART = ROOT / "scripts" / "realcluster-restart"
#: label -> (weight, component, SIGKILL?, seconds down)
COMPONENT_FAULTS: dict[str, tuple[float, str, bool, float]] = {
    "apiserver-killed": (2, "kube-apiserver", True, 1.0),
    "kubelet-restarted": (1, "kubelet", False, 0.0),
    "kubelet-killed": (1, "kubelet", True, 0.5),
    "containerd-restarted": (1, "containerd", False, 0.0),
    "containerd-killed": (1, "containerd", True, 0.5),
}
CONTAINER_KILL_WEIGHT = 3.0
#: How long the cluster may take to be whole again after a fault.
HEAL_TIMEOUT = 180.0


class RealFaults:
    """Injects cluster faults, one at a time, in the background."""

    def __init__(self, cluster: RealTestCluster, directory: Path) -> None:
        self.cluster = cluster
        self.directory = directory
        self.task: asyncio.Task[None] | None = None
        self.fired: dict[str, int] = {}
        self.failures: list[str] = []
        #: Container kills so far: a session whose program got SIGKILL is then expected.
        self.container_kills = 0
        #: When containerd last went down and was back (monotonic seconds).
        self.runtime_down: tuple[float, float] = (-1e9, -1e9)

    def runtime_restarted_since(self, started: float) -> bool:
        """Whether containerd went down after ``started`` (or is down now).

        An exec whose containerd dies ends with a Success status and without the
        output that was still on its way: the API server says so, not kuberun
        (``kubectl exec`` exits 0 with no output the same way). Such sessions are
        counted apart, not as kuberun's wrong endings.
        """
        down, back = self.runtime_down
        return back >= started or down >= started

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def inject(self, rng: random.Random) -> str | None:
        """Start one fault unless one is running; return its label."""
        if self.busy:
            return None
        labels = [*COMPONENT_FAULTS, "container-killed"]
        weights = [*(w for w, *_ in COMPONENT_FAULTS.values()), CONTAINER_KILL_WEIGHT]
        label = rng.choices(labels, weights=weights)[0]
        delay = rng.random() * 2  # into the lifecycles that start alongside
        self.task = asyncio.ensure_future(self._run(label, delay, rng.random()))
        return label

    async def _run(self, label: str, delay: float, pick: float) -> None:
        await asyncio.sleep(delay)
        try:
            if label == "container-killed":
                if await self._kill_a_container(pick):
                    self.container_kills += 1
                    self.fired[label] = self.fired.get(label, 0) + 1
                return
            _, component, kill, down = COMPONENT_FAULTS[label]
            began = time.monotonic()
            if component == "containerd":
                self.runtime_down = (began, float("inf"))
            await self._restart(component, kill, down)
            self.fired[label] = self.fired.get(label, 0) + 1
            await self.wait_healthy()
            if component == "containerd":
                self.runtime_down = (began, time.monotonic())
        except Exception as exc:  # recorded as a violation by the run
            self.failures.append(f"{label}: {exc!r}")

    async def _restart(self, component: str, kill: bool, down: float) -> None:
        argv = [sys.executable, str(RESTART), str(self.directory), component, "--down", str(down)]
        if kill:
            argv.append("--kill")
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"restart {component}: {err.decode(errors='replace')}")

    async def _kill_a_container(self, pick: float) -> bool:
        """SIGKILL every process of one running Pod's console container."""
        try:
            pods = await self.cluster.pods()
        except Exception:
            return False  # the API server may be the thing that is down
        targets = []
        for pod in pods:
            for status in (pod.get("status") or {}).get("containerStatuses") or []:
                cid = str(status.get("containerID") or "").partition("://")[2]
                if cid and "running" in (status.get("state") or {}):
                    targets.append(cid)
        if not targets:
            return False
        cid = targets[int(pick * len(targets)) % len(targets)]
        pids = container_pids(cid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return bool(pids)

    async def wait_healthy(self, timeout: float = HEAL_TIMEOUT) -> None:
        """The API server ready and the node Ready (after a fault, or before an epoch)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                nodes = await self.cluster.core.list_node(_request_timeout=5)
                ready = [
                    c.status
                    for n in nodes.items
                    for c in n.status.conditions or []
                    if c.type == "Ready"
                ]
                if ready and all(s == "True" for s in ready):
                    return
                last = ready
            except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
                last = exc
            except Exception as exc:  # the client's ApiException while starting up
                last = exc
            await asyncio.sleep(0.5)
        raise RuntimeError(f"cluster not healthy after {timeout:.0f} s: {last!r}")

    async def settle(self) -> None:
        """Wait for the running fault, then for a whole cluster."""
        if self.task is not None:
            await self.task
            self.task = None
        await self.wait_healthy()


def container_pids(container_id: str) -> list[int]:
    """The processes of a container, from its cgroup (cgroupfs driver, v1 or unified)."""
    pids: set[int] = set()
    for pattern in (
        f"/sys/fs/cgroup/*/kubepods*/**/{container_id}/cgroup.procs",
        f"/sys/fs/cgroup/kubepods*/**/{container_id}/cgroup.procs",
    ):
        for path in glob.glob(pattern, recursive=True):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(line) for line in Path(path).read_text().split())
    return sorted(pids)
