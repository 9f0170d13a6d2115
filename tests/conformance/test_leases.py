"""Leases (``coordination.k8s.io/v1``) and optimistic concurrency, judged by kubectl and
the official ``kubernetes`` Python client: what kuberun's user-mode workspaces rely on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kuberun.devcluster import DevCluster

from .conftest import Kubectl, pod_manifest, pod_ready, wait_until
from .test_python_client import _wait_running

# Non-zero microseconds: the official client re-serialises datetimes with isoformat(),
# which drops a zero fraction that kube-apiserver (and devcluster) then reject.
RENEW = "2026-12-05T01:02:03.250000Z"


def _lease(name: str, holder: str = "replica-a", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "labels": {"app": "kuberun"}},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 15,
            "renewTime": RENEW,
            **spec,
        },
    }


async def test_kubectl_discovers_creates_lists_and_deletes_leases(
    kubectl: Kubectl, cluster: DevCluster, tmp_path: Path
) -> None:
    resources = await kubectl("api-resources", "--api-group=coordination.k8s.io", check=True)
    assert "leases" in resources.out and "coordination.k8s.io/v1" in resources.out
    path = tmp_path / "lease.yaml"
    path.write_text(yaml.safe_dump(_lease("gw-a")))
    created = await kubectl("create", "-f", str(path), check=True)
    assert "lease.coordination.k8s.io/gw-a created" in created.out
    again = await kubectl("create", "-f", str(path))
    assert again.returncode != 0 and "AlreadyExists" in again.err
    table = (await kubectl("get", "leases", check=True)).out.splitlines()
    assert table[0].split() == ["NAME", "HOLDER", "AGE"]
    assert table[1].split()[:2] == ["gw-a", "replica-a"]
    got = json.loads((await kubectl("get", "lease", "gw-a", "-o", "json", check=True)).out)
    assert got["kind"] == "Lease" and got["apiVersion"] == "coordination.k8s.io/v1"
    assert got["spec"]["renewTime"] == RENEW
    patched = await kubectl(
        "patch", "lease", "gw-a", "--type=merge", "-p", '{"spec":{"holderIdentity":"b"}}'
    )
    assert patched.returncode == 0, patched.err
    assert cluster.lease_list()[0]["spec"]["holderIdentity"] == "b"
    deleted = await kubectl("delete", "lease", "gw-a", check=True)
    assert 'lease.coordination.k8s.io "gw-a" deleted' in deleted.out
    assert cluster.lease_list() == []


async def test_kubectl_delete_of_a_terminating_name_then_create_says_being_deleted(
    kubectl: Kubectl, cluster: DevCluster, tmp_path: Path
) -> None:
    manifest = pod_manifest("ws", terminationGracePeriodSeconds=30)
    # A container that ignores SIGTERM keeps the Pod terminating for the grace period.
    manifest["spec"]["containers"][0]["command"] = [
        "sh",
        "-c",
        "trap '' TERM; while :; do sleep 1; done",
    ]
    path = tmp_path / "ws.yaml"
    path.write_text(yaml.safe_dump(manifest))
    await kubectl("create", "-f", str(path), check=True)
    await wait_until(lambda: pod_ready(cluster, "ws"), what="ws ready")
    await kubectl("delete", "pod", "ws", "--wait=false", check=True)
    res = await kubectl("create", "-f", str(path))
    assert res.returncode != 0
    assert "object is being deleted" in res.err and "already exists" in res.err
    await kubectl("delete", "pod", "ws", "--grace-period=0", "--force", check=True)


def _coordination(kubeconfig: Path) -> tuple[Any, Any]:
    """The two APIs, typed loosely: the models declare every field Optional."""
    api = config.new_client_from_config(  # type: ignore[no-untyped-call]  # unannotated upstream
        config_file=str(kubeconfig)
    )
    return client.CoordinationV1Api(api), client.CoreV1Api(api)


def _lease_protocol(kubeconfig: Path) -> None:
    leases, _ = _coordination(kubeconfig)
    body = cast(Any, _lease("gw-b"))
    created = leases.create_namespaced_lease("default", body)
    assert created.metadata.uid and created.metadata.resource_version
    assert created.spec.lease_duration_seconds == 15
    with pytest.raises(ApiException) as exists:
        leases.create_namespaced_lease("default", body)
    assert exists.value.status == 409
    assert json.loads(cast(str, exists.value.body))["reason"] == "AlreadyExists"
    # A renewal written from the object read carries its resourceVersion: it wins once.
    current = leases.read_namespaced_lease("gw-b", "default")
    current.spec.renew_time = "2026-12-05T01:02:04.500000Z"
    renewed = leases.replace_namespaced_lease("gw-b", "default", current)
    assert renewed.metadata.resource_version != current.metadata.resource_version
    stale = current
    stale.spec.holder_identity = "intruder"
    with pytest.raises(ApiException) as conflict:
        leases.replace_namespaced_lease("gw-b", "default", stale)
    assert conflict.value.status == 409
    assert "the object has been modified" in json.loads(cast(str, conflict.value.body))["message"]
    assert leases.read_namespaced_lease("gw-b", "default").spec.holder_identity == "replica-a"
    # MicroTime must carry six fractional digits, as kube-apiserver insists.
    with pytest.raises(ApiException) as bad_time:
        leases.patch_namespaced_lease(
            "gw-b", "default", {"spec": {"renewTime": "2026-12-05T01:02:04Z"}}
        )
    assert bad_time.value.status == 400
    with pytest.raises(ApiException) as bad_duration:
        leases.patch_namespaced_lease("gw-b", "default", {"spec": {"leaseDurationSeconds": 0}})
    assert bad_duration.value.status == 422
    listed = leases.list_namespaced_lease("default", label_selector="app=kuberun")
    assert [x.metadata.name for x in listed.items] == ["gw-b"]
    # Deletion with preconditions: a stale resourceVersion or another uid is a 409.
    latest = leases.read_namespaced_lease("gw-b", "default")
    for pre in (
        client.V1Preconditions(resource_version=current.metadata.resource_version),
        client.V1Preconditions(uid="00000000-0000-0000-0000-000000000000"),
    ):
        with pytest.raises(ApiException) as refused:
            leases.delete_namespaced_lease(
                "gw-b", "default", body=client.V1DeleteOptions(preconditions=pre)
            )
        assert refused.value.status == 409
    status = leases.delete_namespaced_lease(
        "gw-b",
        "default",
        body=client.V1DeleteOptions(
            preconditions=client.V1Preconditions(
                uid=latest.metadata.uid, resource_version=latest.metadata.resource_version
            )
        ),
    )
    # Leases have no graceful deletion: the answer is a Status, not the object.
    answer = status if isinstance(status, dict) else status.to_dict()
    assert answer["status"] == "Success"
    with pytest.raises(ApiException) as gone:
        leases.read_namespaced_lease("gw-b", "default")
    assert gone.value.status == 404


async def test_python_client_lease_create_conflict_and_preconditions(kubeconfig: Path) -> None:
    await asyncio.to_thread(_lease_protocol, kubeconfig)


def _pod_cas(kubeconfig: Path) -> None:
    _, pods = _coordination(kubeconfig)
    pods.create_namespaced_pod("default", cast(Any, pod_manifest("cas")))
    # Once Running its status stops changing, so the resourceVersion read stays current.
    first = _wait_running(pods, "cas")
    rv = first.metadata.resource_version
    # A merge patch carrying resourceVersion is a compare-and-swap: the first one wins.
    claim = {"metadata": {"resourceVersion": rv, "annotations": {"kuberun.io/claim.a": "1"}}}
    won = pods.patch_namespaced_pod("cas", "default", claim)
    assert won.metadata.annotations["kuberun.io/claim.a"] == "1"
    with pytest.raises(ApiException) as lost:
        pods.patch_namespaced_pod(
            "cas",
            "default",
            {"metadata": {"resourceVersion": rv, "annotations": {"kuberun.io/claim.b": "1"}}},
        )
    assert lost.value.status == 409
    # So is a delete that names the resourceVersion it decided on.
    with pytest.raises(ApiException) as refused:
        pods.delete_namespaced_pod(
            "cas",
            "default",
            body=client.V1DeleteOptions(
                preconditions=client.V1Preconditions(uid=first.metadata.uid, resource_version=rv)
            ),
        )
    assert refused.value.status == 409
    assert "ResourceVersion" in json.loads(cast(str, refused.value.body))["message"]
    pods.delete_namespaced_pod(
        "cas",
        "default",
        grace_period_seconds=0,
        body=client.V1DeleteOptions(
            preconditions=client.V1Preconditions(
                uid=first.metadata.uid, resource_version=won.metadata.resource_version
            )
        ),
    )


async def test_python_client_pod_patch_and_delete_preconditions(
    kubeconfig: Path, cluster: DevCluster
) -> None:
    await asyncio.to_thread(_pod_cas, kubeconfig)
    await wait_until(lambda: cluster.pod("cas") is None, what="cas deleted")
