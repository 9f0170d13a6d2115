"""Per-user Pods: ``{username}`` placeholders in the Pod template (every mode)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from kuberun.manifests import dns_safe_username

from .conftest import Gateway, wait_for
from .test_audit_trail import read_events

pytestmark = pytest.mark.openssh

_TEMPLATE = {
    "metadata": {"generateName": "ws-{username}-", "labels": {"home": "home-{username}"}},
    "spec": {
        "containers": [
            {
                "name": "shell",
                "image": "debian",
                "env": [{"name": "CLAIM", "value": "home-{username}"}],
            }
        ]
    },
}


@pytest.mark.parametrize(
    "gateway_overrides",
    [
        {"pod__metadata": _TEMPLATE["metadata"], "pod__spec": _TEMPLATE["spec"]},
        {
            "pod__metadata": _TEMPLATE["metadata"],
            "pod__spec": _TEMPLATE["spec"],
            "pod__mode": "session",
        },
    ],
    ids=["connection", "session"],
)
async def test_username_placeholder_reaches_the_pod(
    gateway: Gateway, gateway_overrides: dict[str, Any]
) -> None:
    gateway.user = "alice"
    async with gateway.asyncssh_connect() as conn:
        result = await conn.run('printf "%s %s" "$CLAIM" "$HOSTNAME"', input="")
        claim, hostname = str(result.stdout).split()
        assert claim == "home-alice"
        assert hostname.startswith("ws-alice-")
        pods = await gateway.cluster.pods()
        assert [p["metadata"]["labels"]["home"] for p in pods] == ["home-alice"]
    await gateway.wait_no_pods()


@pytest.mark.parametrize(
    "gateway_overrides",
    [{"pod__metadata": _TEMPLATE["metadata"], "pod__spec": _TEMPLATE["spec"]}],
)
async def test_placeholder_takes_the_dns_safe_form(gateway: Gateway, tmp_path: Any) -> None:
    # The per-user authorized_keys template is not used here: one file serves every user.
    gateway.user = "Jane.Doe"
    safe = dns_safe_username("Jane.Doe")
    async with gateway.asyncssh_connect() as conn:
        result = await conn.run('printf "%s" "$CLAIM"', input="")
        assert result.stdout == f"home-{safe}"
        pods = await wait_for(gateway.cluster.pods, 10, "the Pod")
        assert pods[0]["metadata"]["labels"]["home"] == f"home-{safe}"
    await gateway.wait_no_pods()


# --------------------------------------------------------------------------
# pod.mode: user, one gateway

IDLE = 2.0
USER_MODE = {"pod__mode": "user", "pod__idle_timeout": IDLE, "pod__lease_duration": 2}


async def _user_pods(gateway: Gateway) -> list[dict[str, Any]]:
    return [
        p
        for p in await gateway.cluster.pods()
        if p["metadata"]["labels"].get("kuberun.io/mode") == "user"
    ]


async def _deleted_at(gateway: Gateway, uid: str) -> float | None:
    """The time if the Pod ``uid`` is gone or terminating, else None."""
    for p in await gateway.cluster.pods():
        if p["metadata"]["uid"] == uid and not p["metadata"].get("deletionTimestamp"):
            return None
    return time.monotonic()


async def _phase(gateway: Gateway, uid: str) -> str | None:
    for p in await gateway.cluster.pods():
        if p["metadata"]["uid"] == uid:
            return str((p.get("status") or {}).get("phase"))
    return None


async def _whoami(conn: Any) -> tuple[str, str]:
    result = await conn.run('printf "%s %s" "$HOSTNAME" "$HOME"', input="")
    host, home = str(result.stdout).split()
    return host, home


@pytest.mark.parametrize("gateway_overrides", [USER_MODE])
async def test_two_connections_of_one_user_share_the_pod(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as first, gateway.asyncssh_connect() as second:
        host1, _ = await _whoami(first)
        host2, _ = await _whoami(second)
        assert host1 == host2 == "kuberun-alice"
        await first.run('echo shared > "$HOME/note"', input="", check=True)
        result = await second.run('cat "$HOME/note"', input="", check=True)
        assert result.stdout == "shared\n"
        pods = await _user_pods(gateway)
        assert len(pods) == 1
        meta = pods[0]["metadata"]
        assert meta["labels"]["kuberun.io/username"] == "alice"
        assert "kuberun.io/connection-id" not in meta["labels"]
        claims = [k for k in meta["annotations"] if k.startswith("claims.kuberun.io/")]
        assert len(claims) == 1  # one replica: one claim, however many connections
        assert gateway.runner.metrics.user_pods_reused._value.get() == 1
        # Connected for longer than the idle timeout: the Pod stays.
        await asyncio.sleep(IDLE * 2)
        assert [p["metadata"]["uid"] for p in (await _user_pods(gateway))] == [meta["uid"]]


@pytest.mark.parametrize("gateway_overrides", [USER_MODE])
async def test_two_users_get_two_pods(gateway: Gateway) -> None:
    gateway.user = "alice"
    async with gateway.asyncssh_connect() as alice:
        gateway.user = "Bob.Smith"
        async with gateway.asyncssh_connect() as bob:
            host_a, _ = await _whoami(alice)
            host_b, _ = await _whoami(bob)
    assert host_a == "kuberun-alice"
    assert host_b == "kuberun-" + dns_safe_username("Bob.Smith")
    names = sorted(p["metadata"]["name"] for p in (await _user_pods(gateway)))
    assert names == sorted([host_a, host_b])


@pytest.mark.parametrize("gateway_overrides", [USER_MODE])
async def test_reconnect_within_the_timeout_then_idle_deletion(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as conn:
        await conn.run("echo kept > $HOME/state", input="", check=True)
    uid = (await _user_pods(gateway))[0]["metadata"]["uid"]
    await asyncio.sleep(IDLE / 2)
    async with gateway.asyncssh_connect() as conn:
        result = await conn.run("cat $HOME/state", input="", check=True)
        assert result.stdout == "kept\n"
    assert [p["metadata"]["uid"] for p in (await _user_pods(gateway))] == [uid]
    left = time.monotonic()
    deleted = await wait_for(lambda: _deleted_at(gateway, uid), IDLE + 15, "the idle Pod deleted")
    # Never before the idle timeout (a little slack: the release may precede `left`).
    assert deleted - left >= IDLE - 0.2
    await gateway.wait_no_pods()
    assert gateway.runner.metrics.user_pods_idle_deleted._value.get() == 1
    # The next connection gets a fresh Pod under the same name.
    async with gateway.asyncssh_connect() as conn:
        host, _ = await _whoami(conn)
        assert host == "kuberun-alice"
        assert (await _user_pods(gateway))[0]["metadata"]["uid"] != uid


@pytest.mark.parametrize(
    "gateway_overrides",
    [
        {
            **USER_MODE,
            "pod__spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "shell", "image": "debian"}],
            },
            # Ends (successfully) once $HOME/stop exists.
            "pod__idle_command": [
                "/bin/sh",
                "-c",
                'while [ ! -e "$HOME/stop" ]; do sleep 0.1; done',
            ],
        }
    ],
)
async def test_a_pod_that_ended_is_replaced_not_reused(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as conn:
        await conn.run('touch "$HOME/stop"', input="")
        uid = (await _user_pods(gateway))[0]["metadata"]["uid"]

        async def ended() -> bool:
            return await _phase(gateway, uid) == "Succeeded"

        await wait_for(ended, 20, "the Pod to end")
        # A second connection now must not join the Pod that ended.
        async with gateway.asyncssh_connect() as again:
            result = await again.run("echo ok", input="")
            assert result.stdout == "ok\n"
            pods = await _user_pods(gateway)
            assert len(pods) == 1 and pods[0]["metadata"]["uid"] != uid


@pytest.fixture
def gateway_overrides(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Indirect parameters: ``"AUDIT"`` becomes a directory of this test's own."""
    raw: dict[str, Any] = getattr(request, "param", {})
    return {k: str(tmp_path / "audit") if v == "AUDIT" else v for k, v in raw.items()}


@pytest.mark.parametrize(
    "gateway_overrides", [{**USER_MODE, "audit__directory": "AUDIT"}], indirect=True
)
async def test_audit_trail_says_created_then_reused_and_never_deleted(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as first:
        await first.run("true", input="", check=True)
        async with gateway.asyncssh_connect() as second:
            await second.run("true", input="", check=True)
    uid = (await _user_pods(gateway))[0]["metadata"]["uid"]
    directory = Path(gateway.runner.config.audit.directory or "")

    def both_written() -> bool:
        # The audit's writer thread writes events as they come, not by the time the
        # client has its answer: wait for the second connection's.
        kinds = [e["event"] for e in read_events(directory)]
        return kinds.count("pod.created") + kinds.count("pod.reused") >= 2

    await wait_for(both_written, 10, "the two connections' Pod events")
    events = read_events(directory)
    pods = [(e["event"], e["connection"]) for e in events if e["event"].startswith("pod.")]
    created = [c for kind, c in pods if kind == "pod.created"]
    assert len(created) == 1
    # The second connection joined the Pod the first created; closing either deletes nothing.
    joined = [c for kind, c in pods if kind == "pod.reused" and c != created[0]]
    assert joined
    assert not [kind for kind, _ in pods if kind in ("pod.deleted", "pod.failed")]
    assert all(e["pod"]["uid"] == uid for e in events if e["event"] in ("pod.created",))


@pytest.mark.devcluster_only  # injected faults
@pytest.mark.parametrize("gateway_overrides", [USER_MODE])
async def test_a_refused_read_while_joining_is_a_clear_pod_start_error(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as first:
        await first.run("true", input="", check=True)
        gateway.cluster.dev.faults.fail(403, verb="get", count=1)
        async with gateway.asyncssh_connect() as second:
            result = await second.run("echo never", input="")
            assert result.exit_status == 250
            assert "kuberun: " in str(result.stderr) and "403" in str(result.stderr)
        # The first connection is untouched.
        assert (await first.run("echo still", input="")).stdout == "still\n"


@pytest.mark.devcluster_only  # injected faults
@pytest.mark.parametrize("gateway_overrides", [USER_MODE])
async def test_a_replica_that_cannot_renew_its_lease_gives_up_its_sessions_first(
    gateway: Gateway,
) -> None:
    """Peers would see the Lease expire after lease_duration and could delete the Pod:
    the replica ends its user sessions before that, and serves again once renewed."""
    metrics = gateway.runner.metrics
    async with gateway.asyncssh_connect() as conn:
        proc = await conn.create_process("echo started; sleep 60", encoding="utf-8")
        assert await proc.stdout.readline() == "started\n"
        fault = gateway.cluster.dev.faults.fail(503, path="/leases/", count=None)
        try:
            result = await asyncio.wait_for(proc.wait(), 20)
            assert result.exit_status == 254
            assert "lost contact with the Kubernetes API" in str(result.stderr)
            assert metrics.claims_lost._value.get() == 1
            assert metrics.lease_renew_failures._value.get() >= 1
        finally:
            fault.cancel()
    # Renewed again: the user is served again.
    async with gateway.asyncssh_connect() as conn:
        assert (await conn.run("echo back", input="")).stdout == "back\n"


@pytest.mark.devcluster_only  # a server on the host is a port of the Pod only there
@pytest.mark.parametrize("gateway_overrides", [USER_MODE])
async def test_port_forwarding_reaches_the_users_pod(gateway: Gateway) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with gateway.asyncssh_connect() as first, gateway.asyncssh_connect() as second:
            host, _ = await _whoami(first)
            # The forward of the second connection goes to the Pod both share, by its name.
            reader, writer = await second.open_connection(host, port)
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            writer.close()
            assert len(await _user_pods(gateway)) == 1
    finally:
        server.close()
        await server.wait_closed()
