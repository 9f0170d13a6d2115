"""The gateway end to end: OpenSSH and asyncssh clients, devcluster (or a real cluster) behind."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from .conftest import Gateway, wait_for

pytestmark = pytest.mark.openssh


async def test_exit_status_and_output(gateway: Gateway) -> None:
    code, out, err = await gateway.ssh("echo hi; exit 3")
    assert (code, out) == (3, b"hi\n"), err
    await gateway.wait_no_pods()


async def test_stderr_stays_on_stderr(gateway: Gateway) -> None:
    code, out, err = await gateway.ssh("echo out; echo err >&2")
    assert code == 0
    assert out == b"out\n"
    assert err.endswith(b"err\n")
    assert b"out" not in err


async def test_stdin_eof_reaches_the_program(gateway: Gateway) -> None:
    code, out, _ = await gateway.ssh("wc -c", stdin=b"x")
    assert code == 0
    assert out.strip() == b"1"


async def test_asyncssh_client(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as conn:
        result = await conn.run("echo hi; echo oops >&2; exit 3", input="")
        assert result.exit_status == 3
        assert result.stdout == "hi\n"
        assert result.stderr.endswith("oops\n")
        result = await conn.run("cat", input="payload")
        assert result.stdout == "payload"
        assert result.exit_status == 0
    await gateway.wait_no_pods()


async def test_64mib_byte_exact_both_ways(gateway: Gateway, tmp_path: Path) -> None:
    # The test can put a file where the Pod reads it: devcluster Pods are local processes,
    # and real-cluster Pods have the test's directory mounted (clusters.py).
    data = os.urandom(64 * 1024 * 1024)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()

    code, out, err = await gateway.ssh(f"cat {src}", timeout=120)
    assert code == 0, err
    assert len(out) == len(data)
    assert hashlib.sha256(out).hexdigest() == digest

    dst = tmp_path / "dst.bin"
    code, out, err = await gateway.ssh(f"cat > {dst}", stdin=data, timeout=120)
    assert code == 0, err
    assert hashlib.sha256(dst.read_bytes()).hexdigest() == digest


async def test_parallel_sessions_share_one_pod(gateway: Gateway, tmp_path: Path) -> None:
    """8 sessions over one ControlMaster connection run in one Pod at the same time:
    each waits until all 8 have checked in, which only ends if they overlap."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    socket = tmp_path / "cm"
    master = await asyncio.create_subprocess_exec(
        *gateway.ssh_args(extra_opts=["-M", "-N", "-o", f"ControlPath={socket}"]),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await wait_for(socket.exists, 30, "ControlMaster socket")
    control = ["-o", "ControlMaster=no", "-o", f"ControlPath={socket}"]
    script = (
        f"touch {barrier}/$$; n=0; "
        f"while [ $(ls {barrier} | wc -l) -lt 8 ]; do sleep 0.05; n=$((n+1)); "
        "[ $n -gt 600 ] && exit 9; done; echo $HOSTNAME"
    )
    try:
        results = await asyncio.gather(*(gateway.ssh(script, extra_opts=control) for _ in range(8)))
        assert [r[0] for r in results] == [0] * 8, [r[2] for r in results]
        hosts = {r[1] for r in results}
        assert len(hosts) == 1, hosts
        pods = await gateway.cluster.pods()
        assert len(pods) == 1
        assert pods[0]["metadata"]["name"].encode() + b"\n" in hosts
    finally:
        master.terminate()
        await master.wait()
    await gateway.wait_no_pods()


async def test_pod_labels(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as conn:
        await conn.run("true")
        pods = await gateway.cluster.pods()
        assert len(pods) == 1
        meta = pods[0]["metadata"]
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kuberun"
        assert meta["labels"]["kuberun.io/username"] == "alice"
        assert meta["labels"]["kuberun.io/connection-id"]
        assert meta["annotations"]["kuberun.io/client-address"].startswith("127.0.0.1:")
    await gateway.wait_no_pods()


@pytest.mark.parametrize(
    "gateway_overrides",
    [{"pod__spec": {"containers": [{"name": "shell", "image": "kuberun.devcluster/slow:30"}]}}],
)
async def test_client_killed_while_pod_starts(gateway: Gateway) -> None:
    proc = await asyncio.create_subprocess_exec(
        *gateway.ssh_args("echo never"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await wait_for(gateway.cluster.pods, 20, "Pod created")
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    await gateway.wait_no_pods()


@pytest.mark.parametrize(
    "gateway_overrides",
    [{"pod__spec": {"containers": [{"name": "shell", "image": "kuberun.devcluster/pull-error"}]}}],
)
async def test_image_pull_failure(gateway: Gateway) -> None:
    code, out, err = await gateway.ssh("echo never")
    assert code == 250
    assert out == b""
    assert b"ErrImagePull" in err or b"ImagePullBackOff" in err, err
    await gateway.wait_no_pods()


@pytest.mark.devcluster_only  # counts requests in devcluster's request log
async def test_api_calls_per_connection(gateway: Gateway) -> None:
    cluster = gateway.cluster.dev
    before = len(cluster.requests)
    async with gateway.asyncssh_connect() as conn:
        for _ in range(3):
            result = await conn.run("true")
            assert result.exit_status == 0
    await gateway.wait_no_pods()
    verbs: dict[str, int] = {}
    for record in cluster.requests[before:]:
        verbs[record.verb] = verbs.get(record.verb, 0) + 1
    assert verbs == {"create": 1, "watch": 1, "exec": 3, "delete": 1}, verbs


async def _faulty_create(gateway: Gateway, status: int, **kwargs: Any) -> None:
    gateway.cluster.dev.faults.fail(status, method="POST", verb="create", count=2, **kwargs)
    code, out, err = await gateway.ssh("echo ok")
    assert (code, out) == (0, b"ok\n"), err
    await gateway.wait_no_pods()


@pytest.mark.devcluster_only  # injected faults
async def test_create_retried_after_500(gateway: Gateway) -> None:
    await _faulty_create(gateway, 500)


@pytest.mark.devcluster_only  # injected faults
async def test_create_retried_after_429(gateway: Gateway) -> None:
    await _faulty_create(gateway, 429, retry_after=1)
