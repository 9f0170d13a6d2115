"""kubernetes-asyncio (what kuberun itself uses for REST) against devcluster."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.rest import ApiException
from kubernetes_asyncio.stream import WsApiClient

from kuberun.devcluster import DevCluster

from .conftest import pod_manifest


@pytest.fixture
async def api(kubeconfig: Path) -> AsyncIterator[client.CoreV1Api]:
    conf = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=conf)
    async with client.ApiClient(conf) as api_client:
        yield client.CoreV1Api(api_client)


async def test_create_watch_until_ready_delete(api: client.CoreV1Api, cluster: DevCluster) -> None:
    listed = await api.list_namespaced_pod("default")
    seen: list[tuple[str, str, bool]] = []

    async def follow() -> None:
        async with watch.Watch() as w:
            async for event in w.stream(
                api.list_namespaced_pod,
                "default",
                field_selector="metadata.name=aio",
                resource_version=listed.metadata.resource_version,
                timeout_seconds=30,
            ):
                pod = event["object"]
                ready = any(
                    c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []
                )
                seen.append((event["type"], pod.status.phase, ready))
                if ready:
                    w.stop()

    watching = asyncio.create_task(follow())
    await asyncio.sleep(0.1)  # let the watch connect before the Pod exists
    # The client sends a plain dict body as it is; its stubs ask for a V1Pod, hence the casts.
    created = await api.create_namespaced_pod("default", cast(Any, pod_manifest("aio")))
    await asyncio.wait_for(watching, 30)
    assert seen[0] == ("ADDED", "Pending", False)
    assert seen[-1] == ("MODIFIED", "Running", True)
    assert all(t == "MODIFIED" for t, _, _ in seen[1:])

    # A watch from the creation version replays every change, then the deletion.
    deleted = await api.delete_namespaced_pod("aio", "default")
    assert deleted.metadata.deletion_timestamp is not None
    types = []
    async with watch.Watch() as w2:
        async for event in w2.stream(
            api.list_namespaced_pod,
            "default",
            field_selector="metadata.name=aio",
            resource_version=created.metadata.resource_version,
            timeout_seconds=30,
        ):
            types.append(event["type"])
            if event["type"] == "DELETED":
                w2.stop()
    assert types[-1] == "DELETED"
    assert "ADDED" not in types
    assert cluster.pods() == []


async def test_bad_token_is_401(kubeconfig: Path, cluster: DevCluster) -> None:
    conf = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=conf)
    conf.api_key = {"authorization": "Bearer wrong"}
    async with client.ApiClient(conf) as api_client:
        with pytest.raises(ApiException) as info:
            await client.CoreV1Api(api_client).list_namespaced_pod("default")
    assert info.value.status == 401
    assert info.value.body is not None
    body = json.loads(info.value.body)
    assert body["reason"] == "Unauthorized"
    assert body["kind"] == "Status"


async def test_injected_500_and_429(api: client.CoreV1Api, cluster: DevCluster) -> None:
    cluster.faults.fail(500, verb="create")
    with pytest.raises(ApiException) as info:
        await api.create_namespaced_pod("default", cast(Any, pod_manifest("flaky")))
    assert info.value.status == 500
    assert info.value.body is not None
    assert json.loads(info.value.body)["reason"] == "InternalError"

    cluster.faults.fail(429, method="GET", path=r"/pods$", retry_after=2)
    with pytest.raises(ApiException) as info:
        await api.list_namespaced_pod("default")
    assert info.value.status == 429
    assert info.value.headers is not None and info.value.body is not None
    assert info.value.headers["Retry-After"] == "2"
    body = json.loads(info.value.body)
    assert body["reason"] == "TooManyRequests"
    assert body["details"]["retryAfterSeconds"] == 2

    # Each rule fired once; the next calls go through.
    created = await api.create_namespaced_pod("default", cast(Any, pod_manifest("flaky")))
    assert created.metadata.name == "flaky"
    assert len((await api.list_namespaced_pod("default")).items) == 1
    assert cluster.requests.tally(resource="pods", verb="create") == {"create": 2}
    assert [r.status for r in cluster.requests.where(verb="create")] == [500, 201]


async def test_ws_exec_v4(kubeconfig: Path, api: client.CoreV1Api, cluster: DevCluster) -> None:
    """kubernetes-asyncio's WsApiClient offers only v4.channel.k8s.io."""
    await api.create_namespaced_pod("default", cast(Any, pod_manifest("aio-exec")))
    while not (pod := cluster.pod("aio-exec")) or pod["status"]["phase"] != "Running":
        await asyncio.sleep(0.02)
    conf = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=conf)
    async with WsApiClient(conf) as ws_client:
        v1 = client.CoreV1Api(api_client=ws_client)
        out = await v1.connect_get_namespaced_pod_exec(
            "aio-exec",
            "default",
            # The stub says ``command: str``; the API takes an argv list.
            command=cast(Any, ["sh", "-c", "echo from-v4; echo e >&2"]),
            stderr=True,
            stdin=False,
            stdout=True,
            tty=False,
        )
    assert "from-v4" in out
    assert cluster.requests.where(verb="exec")[-1].status == 101
