"""Pod deletion is a debt that is paid: an API server that fails, hangs or is frozen
(SIGSTOP) for longer than ``timeouts.pod_stop`` delays a deletion, never cancels it.

The deletions are retried for as long as the gateway runs, shown in
``kuberun_pods_pending_deletion`` and the log; a stopping gateway names what it
leaves, and the janitor of the next run (same gateway id) or of the running one
(periodically) deletes it. Control-plane behaviour: one loop, one relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import asyncssh
import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.config import load_kube_config

from kuberun.config import Config, make_api_client
from kuberun.devcluster import DevCluster
from kuberun.gateway import GatewayRunner
from kuberun.manifests import LABEL_GATEWAY, LABEL_MANAGED_BY

from .conftest import gateway_config, wait_for

POD_STOP = 2

pytestmark = [
    pytest.mark.asyncio(loop_factories=["uvloop"]),
    pytest.mark.devcluster_only,  # freezes devcluster's process, injects its faults
]


class ClusterProcess:
    """``kuberun devcluster`` in a process of its own, to freeze with SIGSTOP."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.kubeconfig = workdir / "kubeconfig"
        self.proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Future[bytes] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kuberun.devcluster",
            "--listen",
            "127.0.0.1:0",
            "--kubeconfig",
            str(self.kubeconfig),
            "--workdir",
            str(self.workdir / "pods"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        line = await asyncio.wait_for(self.proc.stderr.readline(), 60)
        assert b"serving" in line, line
        # Keep its stderr drained, so it never blocks on a full pipe.
        self._drain = asyncio.ensure_future(self.proc.stderr.read())

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    async def pods(self) -> list[Any]:
        """The Pods kuberun manages, as the API server lists them."""
        conf = k8s.Configuration()
        await load_kube_config(str(self.kubeconfig), client_configuration=conf)
        async with k8s.ApiClient(conf) as api_client:
            listing = await k8s.CoreV1Api(api_client).list_namespaced_pod(
                "default", label_selector=f"{LABEL_MANAGED_BY}=kuberun"
            )
        return list(listing.items)


@pytest.fixture
async def cluster_process(tmp_path: Path) -> AsyncIterator[ClusterProcess]:
    proc = ClusterProcess(tmp_path)
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()


def _client_key(workdir: Path) -> Path:
    key = asyncssh.generate_private_key("ssh-ed25519")
    path = workdir / "id_ed25519"
    path.write_bytes(key.export_private_key())
    (workdir / "authorized_keys").write_bytes(key.export_public_key())
    return path


@contextlib.asynccontextmanager
async def _gateway(config: Config, **kwargs: Any) -> AsyncIterator[GatewayRunner]:
    api_client = await make_api_client(config.kubernetes)
    runner = GatewayRunner(config, api_client, **kwargs)
    await runner.start()
    try:
        yield runner
    finally:
        await runner.close()
        await api_client.close()


def _pending(runner: GatewayRunner) -> float:
    value = runner.metrics.registry.get_sample_value("kuberun_pods_pending_deletion")
    assert value is not None
    return value


async def _open_sessions(runner: GatewayRunner, key: Path, count: int) -> list[Any]:
    """``count`` connections, each with a session running ``sleep``."""
    opened = []
    for _ in range(count):
        conn = await asyncssh.connect(
            "127.0.0.1",
            runner.port,
            username="alice",
            client_keys=[str(key)],
            known_hosts=None,
        )
        proc = await conn.create_process("echo started; sleep 120")
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == "started\n"
        opened.append((conn, proc))
    return opened


@pytest.mark.parametrize("mode", ["connection", "session"])
async def test_frozen_api_server_pods_deleted_after_it_resumes(
    tmp_path: Path,
    cluster_process: ClusterProcess,
    mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kuberun")
    key = _client_key(tmp_path)
    config = gateway_config(
        cluster_process.kubeconfig,
        tmp_path,
        pod__mode=mode,
        kubernetes__ping_interval=1,
        timeouts__pod_stop=POD_STOP,
    )
    async with _gateway(config) as runner:
        opened = await _open_sessions(runner, key, 2)
        assert len(await cluster_process.pods()) == 2
        cluster_process.signal(signal.SIGSTOP)
        try:
            for conn, proc in opened:
                # Pings unanswered: the session ends with the stream-lost status...
                await asyncio.wait_for(proc.wait_closed(), 30)
                assert proc.exit_status == 252, proc.exit_status
                conn.close()  # ...and the client leaves: its Pod is owed a deletion
            # The deletion cannot be made within timeouts.pod_stop; it stays owed.
            await wait_for(lambda: _pending(runner) == 2, 60, "two deletions owed")
            await asyncio.sleep(POD_STOP * 2)
            assert _pending(runner) == 2
        finally:
            cluster_process.signal(signal.SIGCONT)
        await wait_for(lambda: _pending(runner) == 0, 60, "deletions paid")
        assert await cluster_process.pods() == [] or all(
            p.metadata.deletion_timestamp for p in await cluster_process.pods()
        )
    # Said once (then summarised at a low rate), never given up on.
    assert caplog.text.count("kuberun keeps trying") == 1, caplog.text
    assert "deleted after" in caplog.text


async def test_stopping_gateway_names_what_it_leaves_and_its_next_run_deletes_it(
    tmp_path: Path, cluster_process: ClusterProcess, caplog: pytest.LogCaptureFixture
) -> None:
    key = _client_key(tmp_path)
    # The id a gateway derives from its host name and listen address is stable, so
    # the next run finds what this one left; port 0 is not, so set the id here.
    config = gateway_config(
        cluster_process.kubeconfig,
        tmp_path,
        kubernetes__ping_interval=1,
        kubernetes__gateway_id="restarted-gw",
        timeouts__pod_stop=POD_STOP,
    )
    async with _gateway(config) as runner:
        await _open_sessions(runner, key, 1)
        (pod,) = await cluster_process.pods()
        assert pod.metadata.labels[LABEL_GATEWAY] == "restarted-gw"
        cluster_process.signal(signal.SIGSTOP)
        caplog.set_level(logging.INFO, logger="kuberun")
    # runner.close() (as on SIGTERM) gave up after its grace, naming the Pod.
    assert "stopping with 1 Pod(s) not deleted" in caplog.text
    assert f"default/{pod.metadata.name}" in caplog.text
    cluster_process.signal(signal.SIGCONT)
    assert len(await cluster_process.pods()) == 1

    async with _gateway(config):
        # The next run's janitor, at start-up, deletes the leftover.
        async def gone() -> bool:
            return all(p.metadata.deletion_timestamp for p in await cluster_process.pods())

        for _ in range(200):
            if await gone():
                break
            await asyncio.sleep(0.1)
        assert await gone(), "leftover not deleted by the next run"


async def test_deletion_failing_past_pod_stop_is_retried(tmp_path: Path) -> None:
    key = _client_key(tmp_path)
    async with DevCluster() as cluster:
        cluster.write_kubeconfig(str(tmp_path / "kubeconfig"))
        config = gateway_config(tmp_path / "kubeconfig", tmp_path, timeouts__pod_stop=POD_STOP)
        async with _gateway(config) as runner:
            fault = cluster.faults.fail(503, verb="delete", count=None)
            for conn, _ in await _open_sessions(runner, key, 1):
                conn.close()
            await wait_for(lambda: _pending(runner) == 1, 30, "deletion owed")
            await asyncio.sleep(POD_STOP * 3)
            assert len(cluster.pods()) == 1 and _pending(runner) == 1
            fault.cancel()
            await wait_for(lambda: not cluster.pods(), 60, "Pod deleted once the faults end")
            assert _pending(runner) == 0
            assert len(cluster.requests.where(verb="delete")) > 3


async def test_running_gateway_janitor_deletes_leftovers_periodically(tmp_path: Path) -> None:
    key = _client_key(tmp_path)
    async with DevCluster() as cluster:
        cluster.write_kubeconfig(str(tmp_path / "kubeconfig"))
        config = gateway_config(tmp_path / "kubeconfig", tmp_path)
        async with _gateway(config, janitor_interval=0.5) as runner:
            (conn, _), *_ = await _open_sessions(runner, key, 1)
            (live,) = [p["metadata"]["name"] for p in cluster.pods()]
            await _create_pod_of(runner, tmp_path / "kubeconfig", "leftover")
            await wait_for(lambda: cluster.pod("leftover") is None, 30, "leftover deleted")
            # The Pod of the live connection is not a leftover.
            await asyncio.sleep(1.5)
            assert cluster.pod(live) is not None
            conn.close()


async def test_stopping_gateway_deletes_its_pods_no_connection_owns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A last look at shutdown: a Pod of this gateway id whose deletion the gateway lost
    track of is deleted by this run, not left to a next one that may never come."""
    key = _client_key(tmp_path)
    async with DevCluster() as cluster:
        cluster.write_kubeconfig(str(tmp_path / "kubeconfig"))
        config = gateway_config(tmp_path / "kubeconfig", tmp_path)
        async with _gateway(config) as runner:
            await _open_sessions(runner, key, 1)
            # Made after the janitor's first round; its next one is minutes away.
            await _create_pod_of(runner, tmp_path / "kubeconfig", "lost-track-of")
            caplog.set_level(logging.INFO, logger="kuberun")
        # Deleted (a Pod still in its termination grace has its deletionTimestamp).
        lost = cluster.pod("lost-track-of")
        assert lost is None or lost["metadata"].get("deletionTimestamp")
        assert all(p["metadata"].get("deletionTimestamp") for p in cluster.pods())
    assert "1 Pod(s) of this gateway that no connection owned" in caplog.text
    assert "default/lost-track-of" in caplog.text
    assert "not deleted" not in caplog.text


async def _create_pod_of(runner: GatewayRunner, kubeconfig: Path, name: str) -> None:
    """Create a Pod labelled as one of ``runner``'s that none of its connections owns."""
    conf = k8s.Configuration()
    await load_kube_config(str(kubeconfig), client_configuration=conf)
    labels = {LABEL_MANAGED_BY: "kuberun", LABEL_GATEWAY: runner.gateway.name}
    async with k8s.ApiClient(conf) as api_client:
        await k8s.CoreV1Api(api_client).create_namespaced_pod(
            "default",
            cast(
                Any,
                {
                    "metadata": {"name": name, "labels": labels},
                    "spec": {"containers": [{"name": "shell", "image": "x"}]},
                },
            ),
        )


async def test_user_pod_idle_deletion_survives_a_frozen_api_server(
    tmp_path: Path, cluster_process: ClusterProcess
) -> None:
    # User mode keeps a user's Pod past the connection; its idle clock deletes it. A
    # frozen API server when the clock runs out delays that deletion, never cancels it.
    key = _client_key(tmp_path)
    config = gateway_config(
        cluster_process.kubeconfig,
        tmp_path,
        pod__mode="user",
        pod__idle_timeout=2,
        pod__lease_duration=2,
        timeouts__pod_stop=POD_STOP,
    )
    async with _gateway(config) as runner:
        for conn, proc in await _open_sessions(runner, key, 1):
            proc.close()
            conn.close()
        assert len(await cluster_process.pods()) == 1
        cluster_process.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(2 + POD_STOP * 2)  # past the idle clock and any one try
        finally:
            cluster_process.signal(signal.SIGCONT)

        async def gone() -> bool:
            return all(p.metadata.deletion_timestamp for p in await cluster_process.pods())

        await wait_for(gone, 60, "idle user Pod deleted once the API server is back")
