"""The official ``kubernetes`` Python client (sync; run in a thread) against devcluster."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import stream

from kuberun.devcluster import DevCluster

from .conftest import pod_manifest


def _api(kubeconfig: Path) -> client.CoreV1Api:
    return client.CoreV1Api(
        config.new_client_from_config(  # type: ignore[no-untyped-call]  # unannotated upstream
            config_file=str(kubeconfig)
        )
    )


def _name(pod: client.V1Pod) -> str | None:
    assert pod.metadata is not None
    return pod.metadata.name


def _wait_running(api: client.CoreV1Api, name: str) -> Any:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pod = api.read_namespaced_pod(name, "default")
        assert pod.status is not None
        if pod.status.phase == "Running":
            assert pod.status.container_statuses is not None  # a running Pod lists its containers
            if all(c.ready for c in pod.status.container_statuses):
                return pod
        time.sleep(0.02)
    raise AssertionError(f"pod {name} not running")


def _crud(kubeconfig: Path) -> None:
    api = _api(kubeconfig)
    # The client takes a plain dict body; its annotations ask for a V1Pod.
    created = api.create_namespaced_pod("default", cast(Any, pod_manifest("py-crud")))
    assert created.metadata is not None and created.status is not None
    assert created.spec is not None
    assert created.metadata.name == "py-crud"
    assert created.metadata.uid
    assert created.status.phase == "Pending"
    assert created.spec.restart_policy == "Always"
    pod = _wait_running(api, "py-crud")
    assert pod.spec.node_name == "devcluster"
    listed = api.list_namespaced_pod("default", label_selector="app=py-crud")
    assert [_name(p) for p in listed.items] == ["py-crud"]
    by_field = api.list_namespaced_pod("default", field_selector="metadata.name=py-crud")
    assert len(by_field.items) == 1
    everywhere = api.list_pod_for_all_namespaces()
    assert "py-crud" in [_name(p) for p in everywhere.items]
    deleted = api.delete_namespaced_pod("py-crud", "default", grace_period_seconds=5)
    assert deleted.metadata is not None
    assert deleted.metadata.deletion_timestamp is not None
    deadline = time.monotonic() + 30
    while True:
        try:
            api.read_namespaced_pod("py-crud", "default")
        except ApiException as exc:
            assert exc.status == 404
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(ApiException) as info:
        api.delete_namespaced_pod("py-crud", "default")
    assert info.value.status == 404


async def test_create_read_list_delete(kubeconfig: Path, cluster: DevCluster) -> None:
    await asyncio.to_thread(_crud, kubeconfig)
    assert cluster.pods() == []


def _exec(kubeconfig: Path) -> None:
    api = _api(kubeconfig)
    api.create_namespaced_pod("default", cast(Any, pod_manifest("py-exec")))
    _wait_running(api, "py-exec")
    out = stream(
        api.connect_get_namespaced_pod_exec,
        "py-exec",
        "default",
        command=["sh", "-c", "echo hello; echo oops >&2"],
        stderr=True,
        stdin=False,
        stdout=True,
        tty=False,
    )
    assert "hello" in out
    ws = stream(
        api.connect_get_namespaced_pod_exec,
        "py-exec",
        "default",
        command=["sh", "-c", "echo out; echo err >&2; exit 4"],
        stderr=True,
        stdin=False,
        stdout=True,
        tty=False,
        _preload_content=False,
    )
    ws.run_forever(timeout=30)
    assert ws.read_stdout() == "out\n"
    assert ws.read_stderr() == "err\n"
    assert ws.returncode == 4
    # stdin with an explicit EOF: v5 (negotiated by this client) delivers the half-close.
    ws = stream(
        api.connect_get_namespaced_pod_exec,
        "py-exec",
        "default",
        command=["wc", "-c"],
        stderr=True,
        stdin=True,
        stdout=True,
        tty=False,
        _preload_content=False,
    )
    assert ws.subprotocol == "v5.channel.k8s.io"
    ws.write_stdin("12345")
    ws.close_channel(0)
    ws.run_forever(timeout=30)
    assert ws.read_stdout().strip() == "5"
    assert ws.returncode == 0


async def test_stream_exec(kubeconfig: Path) -> None:
    await asyncio.to_thread(_exec, kubeconfig)
