"""What only a real cluster shows: the kubelet's and containerd's own failures and
interventions reaching the SSH client (an image that is not there, a container that
exits, a Pod deleted by someone else), `kuberun check` against the real admission
chain, and the gateway's rights being those of deploy/rbac.yaml and no more.

The ownerReference garbage collection by the controller-manager and the start-up
janitor run on both clusters: test_cli.py::test_sigkilled_gateway_pods_collected_by_owner
and test_security.py::test_only_kuberun_pods_are_deleted.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import yaml
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.rest import ApiException
from kubernetes_asyncio.config import load_kube_config

from .clusters import ABSENT_IMAGE, RealTestCluster, TestCluster
from .conftest import Gateway
from .test_cli import KUBERUN, run, serve_config

pytestmark = [
    pytest.mark.real_only,
    pytest.mark.openssh,
    pytest.mark.asyncio(loop_factories=["uvloop"]),
]


@pytest.fixture
def relay_impl() -> str:
    return "cython"  # the relay matrix runs on devcluster; here the cluster is the subject


def _absent(policy: str) -> dict[str, Any]:
    return {
        "pod__spec": {
            "containers": [{"name": "shell", "image": ABSENT_IMAGE, "imagePullPolicy": policy}]
        }
    }


@pytest.mark.parametrize(
    ("gateway_overrides", "reasons"),
    [
        (_absent("Never"), [b"ErrImageNeverPull"]),
        (_absent("IfNotPresent"), [b"ErrImagePull", b"ImagePullBackOff"]),
    ],
    ids=["never-pull", "pull-fails"],
)
async def test_missing_image_fails_fast_with_the_kubelets_reason(
    gateway: Gateway, reasons: list[bytes]
) -> None:
    started = time.monotonic()
    code, out, err = await gateway.ssh("echo never")
    elapsed = time.monotonic() - started
    assert code == 250, err
    assert out == b""
    assert any(r in err for r in reasons), err
    assert ABSENT_IMAGE.encode() in err, err  # the kubelet's own message names the image
    # Fail-fast: the reason ends the wait, not timeouts.pod_start.
    assert elapsed < gateway.cluster.pod_start / 2, elapsed
    await gateway.wait_no_pods()


async def _admin(gateway: Gateway) -> k8s.ApiClient:
    path = gateway.workdir / "admin-kubeconfig"
    gateway.cluster.write_admin_kubeconfig(path)
    conf = k8s.Configuration()
    await load_kube_config(str(path), client_configuration=conf)
    return k8s.ApiClient(conf)


async def _started(conn: asyncssh.SSHClientConnection) -> asyncssh.SSHClientProcess[str]:
    proc = await conn.create_process("echo started; exec sleep 120")
    assert await asyncio.wait_for(proc.stdout.readline(), 30) == "started\n"
    return proc


def _ended_visibly(result: asyncssh.SSHCompletedProcess) -> None:
    """A session that something outside ended: a non-zero status or a signal, and a
    kuberun message when the status is kuberun's own."""
    assert result.exit_status != 0 or result.exit_signal, result
    if result.exit_status is not None and 250 <= result.exit_status <= 254:
        assert "kuberun: " in str(result.stderr), result


async def test_pod_deleted_by_someone_else_mid_session(gateway: Gateway) -> None:
    async with await _admin(gateway) as admin, gateway.asyncssh_connect() as conn:
        proc = await _started(conn)
        (pod,) = await gateway.cluster.pods()
        await k8s.CoreV1Api(admin).delete_namespaced_pod(
            pod["metadata"]["name"], gateway.cluster.namespace
        )
        result = await asyncio.wait_for(proc.wait(), 60)
        _ended_visibly(result)
        # The connection's Pod is gone: a new session fails with a message, no hang.
        later = await asyncio.wait_for(conn.run("echo after"), 60)
        assert later.stdout != "after\n" or later.exit_status != 0, later
        _ended_visibly(later)
    await gateway.wait_no_pods(60)


async def test_container_exits_mid_session(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as conn:
        proc = await _started(conn)
        # PID 1 of the console container is the idle command, which exits on TERM:
        # the container ends, and with it every process the sessions run in it.
        killer = await asyncio.wait_for(conn.run("kill -TERM 1"), 30)
        assert killer.exit_status in (0, 137, None) or killer.exit_signal, killer
        result = await asyncio.wait_for(proc.wait(), 60)
        _ended_visibly(result)
    await gateway.wait_no_pods(60)


async def test_gateway_credentials_are_the_role_only(gateway: Gateway) -> None:
    cluster = gateway.cluster
    assert isinstance(cluster, RealTestCluster)
    conf = k8s.Configuration()
    await load_kube_config(str(gateway.workdir / "kubeconfig"), client_configuration=conf)
    async with k8s.ApiClient(conf) as api_client:
        api = k8s.CoreV1Api(api_client)
        await api.list_namespaced_pod(cluster.namespace)  # what the Role grants
        for call in (
            lambda: api.list_namespaced_pod("default"),  # another namespace
            lambda: api.list_namespaced_secret(cluster.namespace),  # another resource
            lambda: api.list_node(),  # cluster scope
        ):
            with pytest.raises(ApiException) as info:
                await call()
            assert info.value.status == 403


async def _check(tmp_path: Path, config: dict[str, Any]) -> tuple[int, bytes, bytes]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return await run(*KUBERUN, "check", "--config", str(path))


async def test_check_meets_the_real_admission_chain(tmp_path: Path, cluster: TestCluster) -> None:
    assert isinstance(cluster, RealTestCluster)
    kubeconfig = tmp_path / "kubeconfig"
    cluster.write_kubeconfig(kubeconfig)
    config = serve_config(tmp_path, kubeconfig, cluster)
    code, out, err = await _check(tmp_path, config)
    assert code == 0, err
    assert b"OK" in out

    # Strict field validation: a misspelt field is refused by the API server itself.
    config["pod"]["spec"]["containers"][0]["imagePulPolicy"] = "Never"
    code, out, err = await _check(tmp_path, config)
    assert code != 0
    assert b"imagePulPolicy" in err, err
    del config["pod"]["spec"]["containers"][0]["imagePulPolicy"]

    # Validation: a quantity that is not one.
    config["pod"]["spec"]["containers"][0]["resources"] = {"limits": {"cpu": "lots"}}
    code, out, err = await _check(tmp_path, config)
    assert code != 0
    assert b"cpu" in err or b"quantit" in err, err
    del config["pod"]["spec"]["containers"][0]["resources"]

    # Authorization: the gateway's account may not create Pods outside its namespace.
    config["kubernetes"]["namespace"] = "default"
    code, out, err = await _check(tmp_path, config)
    assert code != 0
    assert b"forbidden" in err.lower(), err
    assert await cluster.pods() == []  # dry runs create nothing


async def test_pod_objects_read_back(gateway: Gateway) -> None:
    """The Pod kuberun made, as the real API server stored it: its labels, the owner
    reference's absence without a gateway Pod, and the node it ran on."""
    async with gateway.asyncssh_connect() as conn:
        assert (await conn.run("true")).exit_status == 0
        (pod,) = await gateway.cluster.pods()
    assert pod["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kuberun"
    assert "ownerReferences" not in pod["metadata"]
    assert pod["spec"]["nodeName"]
    assert pod["status"]["phase"] == "Running"
    assert pod["status"]["podIP"]
    await gateway.wait_no_pods()
