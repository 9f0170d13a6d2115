"""devcluster against a real cluster: the same probes run on both (``make test`` runs
them on devcluster, ``make test-real`` on the real one), each asserting what that
cluster does. Where the two agree, one assertion serves both; where they differ, the
difference is a row of "Differences from a real cluster" in kuberun/devcluster/README.md
and the test pins each side, so a change on either shows up here.

The probes talk to the API server as any client would (the official
kubernetes_asyncio client for REST, aiohttp's WebSocket client for exec), never
through kuberun's own code.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode

import aiohttp
import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.rest import ApiException
from kubernetes_asyncio.config import load_kube_config

from .clusters import TestCluster

pytestmark = pytest.mark.asyncio(loop_factories=["asyncio"])

IDLE = ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]


@dataclass
class Api:
    cluster: TestCluster
    conf: k8s.Configuration
    client: k8s.ApiClient
    shared: Path

    @property
    def core(self) -> k8s.CoreV1Api:
        return k8s.CoreV1Api(self.client)

    @property
    def ns(self) -> str:
        return self.cluster.namespace

    def spec(self, **container: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "containers": [{"name": "main", "image": "x", "command": IDLE, **container}],
            "terminationGracePeriodSeconds": 2,
        }
        return self.cluster.pod_spec(self.shared, spec) or spec

    async def create(self, name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {"metadata": {"name": name}, "spec": spec or self.spec()}
        pod = await self.core.create_namespaced_pod(self.ns, cast(Any, body))
        return cast(dict[str, Any], self.client.sanitize_for_serialization(pod))

    async def get(self, name: str) -> dict[str, Any]:
        resp: Any = await self.core.read_namespaced_pod(name, self.ns, _preload_content=False)
        return cast(dict[str, Any], json.loads(await resp.read()))

    async def wait(self, name: str, check: Any, timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            pod = await self.get(name)
            if check(pod):
                return pod
            assert time.monotonic() < deadline, f"Pod {name}: {pod.get('status')}"
            await asyncio.sleep(0.1)

    async def error(self, call: Any) -> dict[str, Any]:
        """The Status body of a failing call."""
        with pytest.raises(ApiException) as info:
            await call
        body = cast(dict[str, Any], json.loads(info.value.body or b""))
        assert body["code"] == info.value.status
        return body

    async def events(self, name: str) -> list[str]:
        resp: Any = await self.core.list_namespaced_event(
            self.ns, field_selector=f"involvedObject.name={name}", _preload_content=False
        )
        items = json.loads(await resp.read())["items"]
        items.sort(key=lambda e: e.get("firstTimestamp") or "")
        # The kubelet's warning that the cluster has no DNS add-on: true of the test
        # cluster, not of Kubernetes.
        return [e["reason"] for e in items if e["reason"] != "MissingClusterDNS"]


@pytest.fixture
async def api(cluster: TestCluster, tmp_path: Path) -> AsyncIterator[Api]:
    path = tmp_path / "admin-kubeconfig"
    cluster.write_admin_kubeconfig(path)
    conf = k8s.Configuration()
    await load_kube_config(str(path), client_configuration=conf)
    async with k8s.ApiClient(conf) as client:
        yield Api(cluster, conf, client, tmp_path)


def _running(pod: dict[str, Any]) -> bool:
    return bool(pod["status"].get("phase") == "Running")


# -- error bodies -----------------------------------------------------------------------


def _status(code: int, reason: str, message: str, name: str, kind: str) -> dict[str, Any]:
    """A REST error's ``metav1.Status``, field for field."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {"name": name, "kind": kind},
        "code": code,
    }


async def test_not_found_body(api: Api) -> None:
    body = await api.error(api.core.read_namespaced_pod("nope", api.ns))
    assert body == _status(404, "NotFound", 'pods "nope" not found', "nope", "pods")


async def test_already_exists_body(api: Api) -> None:
    await api.create("twice")
    body = await api.error(api.create("twice"))
    assert body == _status(409, "AlreadyExists", 'pods "twice" already exists', "twice", "pods")


async def test_invalid_body(api: Api) -> None:
    body = await api.error(api.create("Bad_Name"))
    assert body["reason"] == "Invalid" and body["code"] == 422
    assert body["details"]["name"] == "Bad_Name" and body["details"]["kind"] == "Pod"
    causes = body["details"]["causes"]
    assert causes[0]["reason"] == "FieldValueInvalid"
    assert causes[0]["field"] == "metadata.name"
    assert body["message"].startswith('Pod "Bad_Name" is invalid: metadata.name: Invalid value: ')


async def test_uid_precondition_conflict_body(api: Api) -> None:
    uid = (await api.create("guarded"))["metadata"]["uid"]
    body = await api.error(
        api.core.delete_namespaced_pod(
            "guarded", api.ns, body=k8s.V1DeleteOptions(preconditions=k8s.V1Preconditions(uid="x"))
        )
    )
    # The delete path's own wording (rest.BeforeDelete): the kind, not the resource.
    message = (
        'Operation cannot be fulfilled on Pod "guarded": the UID in the precondition (x) '
        f"does not match the UID in record ({uid}). The object might have been deleted and "
        "then recreated"
    )
    assert body == _status(409, "Conflict", message, "guarded", "Pod")


# -- Pod status -------------------------------------------------------------------------


async def test_running_pod_status(api: Api) -> None:
    await api.create("runs")
    pod = await api.wait("runs", _running)
    status = pod["status"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {
        "PodReadyToStartContainers": "True",
        "Initialized": "True",
        "Ready": "True",
        "ContainersReady": "True",
        "PodScheduled": "True",
    }
    assert status["qosClass"] == "BestEffort"
    assert status["hostIP"] and status["podIP"] and status["startTime"]
    (container,) = status["containerStatuses"]
    assert container["ready"] is True and container["started"] is True
    assert container["restartCount"] == 0
    assert set(container["state"]) == {"running"}
    # The runtime's name prefixes the container ID.
    runtime = "containerd" if api.cluster.real else "devcluster"
    assert container["containerID"].startswith(f"{runtime}://")
    if api.cluster.real:
        # The Pod network: its own address, not the node's.
        assert status["podIP"] != status["hostIP"]
    else:
        # devcluster's Pods are processes on this machine: they share its address.
        assert status["podIP"] == status["hostIP"]


async def test_pending_while_the_image_cannot_be_pulled(api: Api) -> None:
    image = "kuberun.local/absent:1" if api.cluster.real else "kuberun.devcluster/pull-error"
    await api.create("nopull", api.spec(image=image, imagePullPolicy="IfNotPresent"))

    def waiting(pod: dict[str, Any]) -> bool:
        statuses = pod["status"].get("containerStatuses") or []
        reason = statuses and statuses[0]["state"].get("waiting", {}).get("reason")
        return reason in ("ErrImagePull", "ImagePullBackOff")

    pod = await api.wait("nopull", waiting)
    assert pod["status"]["phase"] == "Pending"
    conditions = {c["type"]: c for c in pod["status"]["conditions"]}
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Ready"]["reason"] == "ContainersNotReady"
    assert conditions["PodScheduled"]["status"] == "True"
    waiting_state = pod["status"]["containerStatuses"][0]["state"]["waiting"]
    assert image in waiting_state["message"]
    reasons = await api.events("nopull")
    assert "Failed" in reasons and "Pulling" in reasons


async def test_event_reasons_of_a_life(api: Api) -> None:
    # The node has the image (pulled for the first Pod, or imported): "Pulled", as
    # already present, and never "Pulling".
    spec = api.spec(image="kuberun.local/debian:bookworm", imagePullPolicy="IfNotPresent")
    await api.create("first", spec)
    await api.wait("first", _running)
    await api.create("life", spec)
    await api.wait("life", _running)
    await api.core.delete_namespaced_pod("life", api.ns)
    deadline = time.monotonic() + 30
    while "Killing" not in (reasons := await api.events("life")):
        assert time.monotonic() < deadline, reasons
        await asyncio.sleep(0.2)
    assert set(reasons) == {"Scheduled", "Pulled", "Created", "Started", "Killing"}, reasons


# -- watch ------------------------------------------------------------------------------


async def _watch_lines(api: Api, **query: Any) -> list[dict[str, Any]]:
    resp: Any = await api.core.list_namespaced_pod(
        api.ns, watch=True, _preload_content=False, **query
    )
    lines = []
    async for raw in resp.content:
        if raw.strip():
            lines.append(json.loads(raw))
    return lines


async def test_watch_from_version_1(api: Api) -> None:
    await api.create("w1")
    events = await _watch_lines(api, resource_version="1", timeout_seconds=5)
    assert events, "no events"
    first = events[0]
    if first["type"] == "ERROR":
        # A real API server whose watch cache no longer reaches back to version 1
        # (it holds a window of recent changes); devcluster keeps its whole history.
        assert api.cluster.real
        assert first["object"]["code"] == 410 and first["object"]["reason"] == "Expired"
        assert first["object"]["message"].startswith("too old resource version: 1 (")
        return
    # Within the history: every change since version 1 is replayed.
    names = [e["object"]["metadata"]["name"] for e in events if e["type"] == "ADDED"]
    assert "w1" in names


async def test_watch_initial_events_end_with_a_bookmark(api: Api) -> None:
    await api.create("w2")
    events = await _watch_lines(
        api,
        send_initial_events=True,
        resource_version_match="NotOlderThan",
        allow_watch_bookmarks=True,
        timeout_seconds=3,
    )
    types = [e["type"] for e in events]
    assert types[0] == "ADDED"
    bookmark = next(e for e in events if e["type"] == "BOOKMARK")
    assert bookmark["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


# -- exec -------------------------------------------------------------------------------


async def _exec(api: Api, pod: str, command: list[str], protocol: str) -> tuple[bytes, bytes, Any]:
    """Run ``command`` over a raw WebSocket: (stdout, channel-3 status, close code)."""
    conf = api.conf
    context = ssl.create_default_context(cafile=conf.ssl_ca_cert)
    if conf.cert_file:
        context.load_cert_chain(conf.cert_file, conf.key_file)
    headers = {}
    token = (conf.api_key or {}).get("authorization") or (conf.api_key or {}).get("BearerToken")
    if token:
        headers["Authorization"] = token if token.startswith("Bearer ") else f"Bearer {token}"
    query = urlencode([("stdout", "true"), *(("command", c) for c in command)])
    url = f"{conf.host}/api/v1/namespaces/{api.ns}/pods/{pod}/exec?{query}"
    out, status, close = b"", b"", None
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url, protocols=(protocol,), ssl=context, headers=headers) as ws,
    ):
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.CLOSE:
                # The server's Close frame (aiohttp's own close_code would say 1006
                # when its reply meets a connection the server already closed).
                close = msg.data
                break
            if msg.type != aiohttp.WSMsgType.BINARY:
                break  # CLOSED or ERROR: the connection ended without a Close frame
            if msg.data[:1] == b"\x01":
                out += msg.data[1:]
            elif msg.data[:1] == b"\x03":
                status += msg.data[1:]
        return out, status, close


@pytest.mark.parametrize("protocol", ["v5.channel.k8s.io", "v4.channel.k8s.io"])
async def test_exec_status_bodies_and_close(api: Api, protocol: str) -> None:
    """v5 goes through the API server's stream translator, which rewords the kubelet's
    errors and encodes Statuses with ``metadata``; v4 is the kubelet's own WebSocket
    server, proxied as it is: no ``metadata``, an InternalError without details. Both
    end with Close 1000 right after the status."""
    await api.create("ex")
    await api.wait("ex", _running)
    v5 = protocol.startswith("v5")
    meta: dict[str, Any] = {"metadata": {}} if v5 else {}

    out, status, close = await _exec(api, "ex", ["sh", "-c", "echo hi; exit 3"], protocol)
    assert out == b"hi\n"
    inner = (
        "command terminated with exit code 3"
        if v5
        else "error executing command [sh -c echo hi; exit 3], exit code 3"
    )
    assert json.loads(status) == {
        **meta,
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: {inner}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": "3"}]},
    }, status
    assert close == 1000

    out, status, close = await _exec(api, "ex", ["true"], protocol)
    assert json.loads(status) == {**meta, "status": "Success"}, status
    assert close == 1000

    out, status, close = await _exec(api, "ex", ["no-such-program"], protocol)
    body = json.loads(status)
    cause = (
        'error executing command in container: failed to exec in container: failed to start exec "'
    )
    tail = 'exec: "no-such-program": executable file not found in $PATH'
    assert body["reason"] == "InternalError" and body["code"] == 500
    assert body["message"].endswith(tail), body
    if v5:
        assert list(body) == ["metadata", "status", "message", "reason", "details", "code"]
        assert body["message"].startswith(
            f"Internal error occurred: Internal error occurred: {cause}"
        )
        assert (
            body["details"]["causes"][0]["message"]
            == body["message"][len("Internal error occurred: ") :]
        )
    else:
        assert list(body) == ["status", "message", "reason", "code"]
        assert body["message"].startswith(f"Internal error occurred: {cause}")
    assert close == 1000


# -- timing -----------------------------------------------------------------------------


async def test_pod_start_time(api: Api) -> None:
    """Create → Running. Not a fidelity target (a real node starts a container in
    seconds, devcluster a process in milliseconds); measured and printed so the README's
    row has numbers, bounded only against hanging."""
    started = time.monotonic()
    await api.create("timed")
    await api.wait("timed", _running, timeout=120)
    elapsed = time.monotonic() - started
    where = "the real cluster" if api.cluster.real else "devcluster"
    print(f"pod start on {where}: {elapsed:.2f} s")
