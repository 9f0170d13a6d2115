"""An API server that cannot be reached: the user sees progress and one clear line,
never an internal address or a Python exception name; the log says it once and
summarises; a client that quits cancels the start work; the gateway warns at start.

Control-plane behaviour: one loop, one relay.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest

from kuberun.config import make_api_client
from kuberun.devcluster import DevCluster
from kuberun.errors import EXIT_POD_FAILED
from kuberun.gateway import GatewayRunner

from .conftest import SSH_OPTS, gateway_config

POD_START = 4

pytestmark = [
    pytest.mark.asyncio(loop_factories=["uvloop"]),
    pytest.mark.devcluster_only,  # a devcluster stopped for good stands for the cluster
]

#: What the SSH user must never see: an address, a port, a Python exception name.
_LEAKS = re.compile(r"127\.0\.0\.1|:\d{2,5}\b|[A-Z][a-z]+(Error|Exception)\b|Errno")


async def _dead_cluster_kubeconfig(path: Path) -> None:
    """A kubeconfig for a cluster that has stopped: its port refuses connections."""
    async with DevCluster() as cluster:
        cluster.write_kubeconfig(str(path))


async def _runner(tmp_path: Path, key: Path, **overrides: Any) -> GatewayRunner:
    await _dead_cluster_kubeconfig(tmp_path / "kubeconfig")
    overrides.setdefault("timeouts__pod_start", POD_START)
    config = gateway_config(tmp_path / "kubeconfig", tmp_path, **overrides)
    runner = GatewayRunner(config, await make_api_client(config.kubernetes))
    await runner.start()
    return runner


async def _ssh(runner: GatewayRunner, key: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "ssh",
        *SSH_OPTS,
        "-i",
        str(key),
        "-p",
        str(runner.port),
        "-T",
        "alice@127.0.0.1",
        "echo hello",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_login_fails_with_progress_and_one_clear_line(
    tmp_path: Path, client_key: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kuberun")
    runner = await _runner(tmp_path, client_key)
    # serve warns at start: the cluster may come up later, so it still listens.
    assert "API server cannot be reached now" in caplog.text
    try:
        proc = await _ssh(runner, client_key)
        out, err = await asyncio.wait_for(proc.communicate(), POD_START + 30)
    finally:
        await runner.close()
        await runner.gateway.api_client.close()
    text = err.decode()
    assert proc.returncode == EXIT_POD_FAILED, text
    assert out == b""
    lines = text.splitlines()
    assert "kuberun: waiting for the cluster: cannot connect to the cluster, retrying" in lines
    assert lines[-1] == (
        f"kuberun: the Pod did not start within {POD_START}s: cannot connect to the cluster"
    )
    assert not _LEAKS.search(text), text
    # The log has the details, once: the first failure, then the one that ended it.
    connection_lines = [r for r in caplog.records if r.getMessage().startswith("[")]
    assert len(connection_lines) <= 4, [r.getMessage() for r in connection_lines]
    assert "ClientConnectorError" in caplog.text
    # A create that never reached the API server needs no search for its Pod.
    assert "lost its answer" not in caplog.text


async def test_client_quitting_during_start_cancels_the_work(
    tmp_path: Path, client_key: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kuberun")
    runner = await _runner(tmp_path, client_key, timeouts__pod_start=60, timeouts__pod_stop=30)
    try:
        proc = await _ssh(runner, client_key)
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert line.startswith(b"kuberun: "), line
        proc.kill()
        await proc.wait()
        await asyncio.sleep(0.5)
    finally:
        started = time.monotonic()
        await runner.close()
        stopped = time.monotonic() - started
        await runner.gateway.api_client.close()
    # Nothing is left to wait for: no deletion, no search for a create never sent.
    assert stopped < 10, stopped
    assert "cannot look for" not in caplog.text
    assert "lost its answer" not in caplog.text
