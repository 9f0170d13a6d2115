"""PID files (for signals and kill-on-close) stay in the Pod: with devcluster, in the
Pod's own scratch directory ($TMPDIR), removed with the Pod, never in the host's /tmp."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from .conftest import Gateway

pytestmark = [
    pytest.mark.asyncio(loop_factories=["uvloop"]),
    pytest.mark.devcluster_only,  # devcluster's Pods share the host's file system
]


@pytest.fixture
def relay_impl() -> str:
    return "cython"


async def test_pid_files_live_and_die_with_the_pod(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as conn:
        result = await conn.run('printf "%s\\n" "$TMPDIR"; ls "$TMPDIR"')
        assert result.exit_status == 0, result.stderr
        tmpdir, *files = str(result.stdout).splitlines()
        assert Path(tmpdir).is_relative_to(gateway.cluster.dev.workdir)
        assert any(f.startswith("kuberun-") and f.endswith(".pid") for f in files), files
        connection_id = next(iter(gateway.runner.gateway.connection_ids()))
    assert not glob.glob(f"/tmp/kuberun-{connection_id}*")
    await gateway.wait_no_pods()
    assert not Path(tmpdir).exists()
