"""User mode across gateway replicas: three ``kuberun serve``-like processes, one cluster.

The replicas share nothing but the API server (devcluster in this process, or the
real cluster), as the replicas of a Deployment do. They are killed (SIGKILL) and
stopped (SIGTERM) from outside while users are connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from .chaos import GatewayProcess, _free_port
from .clusters import TestCluster
from .conftest import wait_for

IDLE = 2.0
LEASE = 2.0


class Replicas:
    def __init__(self, cluster: TestCluster, tmp_path: Path, key_path: Path) -> None:
        self.cluster = cluster
        self.tmp_path = tmp_path
        self.key_path = key_path
        self.kubeconfig = tmp_path / "kubeconfig"
        cluster.write_kubeconfig(str(self.kubeconfig))
        self.procs: list[GatewayProcess] = []
        # How long a user Pod's deletion may take to show, after its idle timeout:
        # a real node stops the container first.
        self.gone = IDLE + (60 if cluster.real else 20)

    def config(self, workdir: Path) -> dict[str, Any]:
        pod: dict[str, Any] = {"mode": "user", "idle_timeout": IDLE, "lease_duration": LEASE}
        spec = self.cluster.pod_spec(self.tmp_path)
        if spec is not None:
            pod["spec"] = spec
        return {
            "ssh": {
                "listen": "127.0.0.1:0",
                "host_keys": [str(workdir / "host_key")],
                "authorized_keys": str(self.tmp_path / "authorized_keys"),
            },
            "kubernetes": self.cluster.kubernetes_config(self.kubeconfig),
            "pod": pod,
            "timeouts": {"pod_start": self.cluster.pod_start, "pod_stop": 10, "command_start": 10},
            "metrics": {"listen": f"127.0.0.1:{_free_port()}"},
        }

    async def start(self, count: int) -> None:
        for _ in range(count):
            workdir = self.tmp_path / f"replica{len(self.procs)}"
            workdir.mkdir()
            proc = GatewayProcess(workdir, self.config(workdir), "uvloop", "cython")
            self.procs.append(proc)
        await asyncio.gather(*(p.start() for p in self.procs if p.proc is None))

    def connect(self, index: int, user: str = "alice") -> Any:
        return asyncssh.connect(
            "127.0.0.1",
            self.procs[index].port,
            username=user,
            client_keys=[str(self.key_path)],
            known_hosts=None,
            encryption_algs=["aes128-gcm@openssh.com"],
        )

    async def user_pods(self) -> list[dict[str, Any]]:
        return [
            p
            for p in await self.cluster.pods()
            if p["metadata"]["labels"].get("kuberun.io/mode") == "user"
            and not p["metadata"].get("deletionTimestamp")
        ]

    async def no_pods(self) -> bool:
        return not await self.cluster.pods()

    async def lease_count(self) -> int:
        return len(await self.cluster.leases())

    async def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                await proc.stop(20)
        unhandled = [u for p in self.procs for u in p.unhandled()]
        assert unhandled == [], unhandled


@pytest.fixture
async def replicas(
    cluster: TestCluster, tmp_path: Path, client_key: Path
) -> AsyncIterator[Replicas]:
    r = Replicas(cluster, tmp_path, client_key)
    try:
        yield r
    finally:
        await r.close()


async def _host(conn: Any) -> str:
    result = await conn.run('printf "%s" "$HOSTNAME"', input="", check=True)
    return str(result.stdout)


async def test_connections_on_different_replicas_share_the_pod(replicas: Replicas) -> None:
    await replicas.start(3)
    async with replicas.connect(0) as a, replicas.connect(1) as b, replicas.connect(2) as c:
        assert {await _host(a), await _host(b), await _host(c)} == {"kuberun-alice"}
        await a.run('echo from-a > "$HOME/note"', input="", check=True)
        assert (await c.run('cat "$HOME/note"', input="", check=True)).stdout == "from-a\n"
        pods = await replicas.user_pods()
        assert len(pods) == 1
        claims = [k for k in pods[0]["metadata"]["annotations"] if k.startswith("claims.")]
        assert len(claims) == 3  # one per replica
        assert await replicas.lease_count() == 3
        # One replica's user leaves: the others keep the Pod past the idle timeout.
        await a.run("true", input="")
    uid = (await replicas.user_pods())[0]["metadata"]["uid"]
    async with replicas.connect(1) as b:
        await asyncio.sleep(IDLE + 1)
        assert [p["metadata"]["uid"] for p in (await replicas.user_pods())] == [uid]
        assert (await b.run('cat "$HOME/note"', input="")).stdout == "from-a\n"
    await wait_for(replicas.no_pods, replicas.gone, "the idle Pod deleted")
    reused = [await p.metric("kuberun_user_pods_reused_total") for p in replicas.procs]
    deleted = [await p.metric("kuberun_user_pods_idle_deleted_total") for p in replicas.procs]
    assert sum(x or 0 for x in reused) >= 3
    assert sum(x or 0 for x in deleted) == 1


async def test_twenty_racing_first_connections_make_one_pod(replicas: Replicas) -> None:
    await replicas.start(3)
    served: set[str] = set()

    async def one(i: int) -> str:
        async with replicas.connect(i % 3, user="racer") as conn:
            host = await _host(conn)
            served.update(p["metadata"]["uid"] for p in await replicas.cluster.pods())
            return host

    hosts = await asyncio.gather(*(one(i) for i in range(20)))
    assert set(hosts) == {"kuberun-racer"}
    assert len(served) == 1
    if not replicas.cluster.real:  # devcluster's request log
        requests = replicas.cluster.dev.requests
        creates = [r for r in requests if r.verb == "create" and r.resource == "pods"]
        assert len([r for r in creates if r.status == 201]) == 1
        assert len(creates) >= 3  # every replica tried; the losers got 409 and joined
    assert len(await replicas.user_pods()) == 1
    await wait_for(replicas.no_pods, replicas.gone, "the idle Pod deleted")


async def test_sigkilled_replica_user_reconnects_elsewhere_to_the_same_pod(
    replicas: Replicas,
) -> None:
    await replicas.start(2)
    conn = await replicas.connect(0).__aenter__()
    try:
        await conn.run('echo before > "$HOME/state"', input="", check=True)
        uid = (await replicas.user_pods())[0]["metadata"]["uid"]
        assert replicas.procs[0].proc is not None
        replicas.procs[0].proc.send_signal(signal.SIGKILL)
        await replicas.procs[0].proc.wait()
        killed = time.monotonic()
    finally:
        conn.abort()
    async with replicas.connect(1) as again:
        assert (await again.run('cat "$HOME/state"', input="")).stdout == "before\n"
        assert [p["metadata"]["uid"] for p in (await replicas.user_pods())] == [uid]
    left = time.monotonic()

    # The dead replica's claim keeps the Pod until its Lease is seen expired; then the
    # idle clock runs. Never before either.
    async def deleted() -> float | None:
        return None if await replicas.user_pods() else time.monotonic()

    gone = await wait_for(deleted, LEASE + replicas.gone, "deletion")
    assert gone - left >= IDLE - 0.2
    assert gone - killed >= LEASE + IDLE - 0.5

    # The survivor collects the dead replica's Lease in time.
    async def one_lease() -> bool:
        return await replicas.lease_count() == 1

    await wait_for(one_lease, 4 * LEASE + 10, "Lease GC")


async def test_sigterm_of_one_replica_leaves_the_others_users_alone(replicas: Replicas) -> None:
    await replicas.start(2)
    async with replicas.connect(1) as survivor, replicas.connect(1, user="bob") as bob:
        proc = await survivor.create_process("cat", encoding=None)
        proc.stdin.write(b"ping\n")
        assert await asyncio.wait_for(proc.stdout.readexactly(5), 20) == b"ping\n"
        leaving = await replicas.connect(0).__aenter__()
        await _host(leaving)
        await _host(bob)
        pods_before = {
            p["metadata"]["name"]: p["metadata"]["uid"] for p in (await replicas.user_pods())
        }
        assert replicas.procs[0].proc is not None
        code = await replicas.procs[0].stop(30)
        assert code == 0
        with contextlib.suppress(Exception):
            await leaving.wait_closed()
        # Nothing was deleted; the stopped replica released its claim and its Lease.
        pods = {p["metadata"]["name"]: p["metadata"]["uid"] for p in (await replicas.user_pods())}
        assert pods == pods_before
        assert await replicas.lease_count() == 1
        alice = (await replicas.user_pods())[0]
        claims = [k for k in alice["metadata"]["annotations"] if k.startswith("claims.")]
        assert len(claims) == 1
        # The survivor's session still works, well past the idle timeout.
        await asyncio.sleep(IDLE + 1)
        proc.stdin.write(b"pong\n")
        assert await asyncio.wait_for(proc.stdout.readexactly(5), 20) == b"pong\n"
        proc.stdin.write_eof()
        await proc.wait()
        assert {
            p["metadata"]["name"]: p["metadata"]["uid"] for p in (await replicas.user_pods())
        } == (pods_before)
    await wait_for(replicas.no_pods, replicas.gone, "the idle Pods deleted")
