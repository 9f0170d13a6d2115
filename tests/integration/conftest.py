"""Fixtures for end-to-end tests: a cluster (devcluster, or a real one: see clusters.py)
+ an in-process gateway + real SSH clients."""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from kuberun import _relay_py, execstream
from kuberun.config import Config, config_from_dict, make_api_client
from kuberun.gateway import GatewayRunner

from .clusters import MODE, TestCluster, open_cluster

try:
    from kuberun import _relay as _relay_c
except ImportError:  # pragma: no cover - `make test` requires the extension
    _relay_c = None  # type: ignore[assignment]

SSH_OPTS = [
    "-F",
    "/dev/null",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "Ciphers=aes128-gcm@openssh.com",
]


@pytest.fixture(params=["cython", "python"])
def relay_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the gateway with each relay implementation."""
    if request.param == "cython":
        if _relay_c is None:
            if os.environ.get("KUBERUN_REQUIRE_EXTENSIONS") == "1":
                pytest.fail("the Cython relay is not built")
            pytest.skip("the Cython relay is not built")
        monkeypatch.setattr(execstream, "relay", _relay_c)
    else:
        monkeypatch.setattr(execstream, "relay", _relay_py)
    return str(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (visibly, in the summary) what cannot run against this mode's cluster.

    On the real cluster one corner of the relay x event-loop matrix runs (the Cython
    relay on uvloop, as the gateway runs in production): the matrix is kuberun's and
    runs on devcluster; here the cluster is what is under test, and each test costs
    real Pods. KUBERUN_REAL_MATRIX=1 runs the whole matrix there too.
    """
    other = "devcluster_only" if MODE == "real" else "real_only"
    corner = MODE == "real" and os.environ.get("KUBERUN_REAL_MATRIX") != "1"
    ids = {item.nodeid for item in items}
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        off_corner = corner and _off_corner(item, ids)
        (drop if item.get_closest_marker(other) or off_corner else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _off_corner(item: pytest.Item, ids: set[str]) -> bool:
    """A matrix variant other than (Cython relay, uvloop) whose uvloop twin exists."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("relay_impl") == "python":
        return True
    if params.get("_asyncio_loop_factory") is not asyncio.new_event_loop:
        return False
    name, _, variant = item.nodeid.partition("[")
    twin = variant.replace("asyncio", "uvloop", 1)
    return twin != variant and f"{name}[{twin}" in ids


@pytest.fixture
async def cluster() -> AsyncIterator[TestCluster]:
    async with open_cluster() as c:
        yield c


@dataclass
class Gateway:
    """A running gateway and what a client needs to reach it."""

    runner: GatewayRunner
    cluster: TestCluster
    port: int
    key_path: Path
    workdir: Path
    user: str = "alice"
    extra: dict[str, Any] = field(default_factory=dict)

    def ssh_args(self, *args: str, tty: bool = False, extra_opts: Sequence[str] = ()) -> list[str]:
        return [
            "ssh",
            *SSH_OPTS,
            "-i",
            str(self.key_path),
            "-p",
            str(self.port),
            *(["-tt"] if tty else ["-T"]),
            *extra_opts,
            f"{self.user}@127.0.0.1",
            *args,
        ]

    async def ssh(
        self,
        *args: str,
        stdin: bytes = b"",
        tty: bool = False,
        extra_opts: Sequence[str] = (),
        timeout: float = 60,
    ) -> tuple[int, bytes, bytes]:
        return await run_command(
            *self.ssh_args(*args, tty=tty, extra_opts=extra_opts), stdin=stdin, timeout=timeout
        )

    def asyncssh_connect(self, **kwargs: Any) -> Any:
        return asyncssh.connect(
            "127.0.0.1",
            self.port,
            username=self.user,
            client_keys=[str(self.key_path)],
            known_hosts=None,
            encryption_algs=["aes128-gcm@openssh.com"],
            **kwargs,
        )

    async def wait_no_pods(self, timeout: float = 30) -> None:
        await wait_no_pods(self.cluster, timeout)


async def run_command(
    *argv: str, stdin: bytes = b"", timeout: float = 60
) -> tuple[int, bytes, bytes]:
    """Run ``argv`` with ``stdin``; its exit status, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    assert proc.returncode is not None
    return proc.returncode, out, err


async def wait_no_pods(cluster: TestCluster, timeout: float = 30) -> None:
    if cluster.real:
        timeout *= 2  # a real Pod terminates through the kubelet and the runtime

    async def none_left() -> bool:
        return not await cluster.pods()

    await wait_for(none_left, timeout, "Pods left behind")


async def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``cond`` (test-side only; it may return an awaitable) until truthy; fail
    with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out: {what}")
        await asyncio.sleep(0.05)


#: A shell loop for a pty session: prints ``stty size`` for every line it reads, and
#: exits after the line ``q``.
STTY_LOOP = 'echo ready; while read x; do stty size; [ "$x" = q ] && exit; done'


async def sizes_until(proc: Any, size: str, *, real: bool) -> list[str]:
    """Send a line to :data:`STTY_LOOP` in ``proc`` and return the size it prints; on the
    real cluster, again (for up to 10 s) until it prints ``size``. All printed, in order.

    devcluster applies a resize before the stdin that follows it, as sshd's pty does, so
    the first answer must be the new size. A real node applies a resize beside that
    stdin: a keystroke sent right after the change may still find the old size.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (10 if real else 0)
    sizes: list[str] = []
    while True:
        proc.stdin.write("\n")
        line = ""
        while not line:  # (the pty's echo of the newline comes first)
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).strip()
        sizes.append(line)
        if line == size or loop.time() >= deadline:
            return sizes
        await asyncio.sleep(0.2)


def gateway_config(
    cluster_kubeconfig: Path, workdir: Path, cluster: TestCluster | None = None, **overrides: Any
) -> Config:
    """The test gateway's config; with ``cluster``, its namespace, context and Pod
    template for that cluster (``pod__spec`` overrides are adapted to it too)."""
    data: dict[str, Any] = {
        "ssh": {
            "listen": "127.0.0.1:0",
            "host_keys": [str(workdir / "host_key")],
            "authorized_keys": str(workdir / "authorized_keys"),
            "accept_env": ["LANG", "LC_*", "KR_*"],
        },
        "kubernetes": {"kubeconfig": str(cluster_kubeconfig), "context": "devcluster"},
        "pod": {"subsystems": {"sftp": ["/usr/lib/openssh/sftp-server"]}},
        "timeouts": {"pod_start": 20, "pod_stop": 10, "command_start": 10},
        "metrics": {"listen": None},
    }
    if cluster is not None:
        data["kubernetes"] = cluster.kubernetes_config(cluster_kubeconfig)
        data["timeouts"]["pod_start"] = cluster.pod_start
        spec = cluster.pod_spec(workdir, overrides.pop("pod__spec", None))
        if spec is not None:
            data["pod"]["spec"] = spec
    for dotted, value in overrides.items():
        section, _, key = dotted.partition("__")
        data.setdefault(section, {})[key] = value
    return config_from_dict(data)


@pytest.fixture
def client_key(tmp_path: Path) -> Path:
    key = asyncssh.generate_private_key("ssh-ed25519")
    path = tmp_path / "id_ed25519"
    path.write_bytes(key.export_private_key())
    path.chmod(0o600)
    (tmp_path / "authorized_keys").write_bytes(key.export_public_key())
    return path


@pytest.fixture
def gateway_overrides() -> dict[str, Any]:
    """Override in a test module (or via indirect parametrisation) to change the config."""
    return {}


@pytest.fixture
async def gateway(
    cluster: TestCluster,
    client_key: Path,
    tmp_path: Path,
    relay_impl: str,
    gateway_overrides: dict[str, Any],
) -> AsyncIterator[Gateway]:
    kubeconfig = tmp_path / "kubeconfig"
    cluster.write_kubeconfig(str(kubeconfig))
    config = gateway_config(kubeconfig, tmp_path, cluster, **gateway_overrides)
    api_client = await make_api_client(config.kubernetes)
    runner = GatewayRunner(config, api_client, name="test")
    await runner.start()
    try:
        yield Gateway(runner, cluster, runner.port, client_key, tmp_path)
    finally:
        await runner.close()
        await api_client.close()
