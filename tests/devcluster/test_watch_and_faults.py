"""Watch semantics, fault injection (Python and HTTP) and the request log."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from kuberun.devcluster import DevCluster

from .conftest import Api, client_ssl, pod

PODS = "/api/v1/namespaces/default/pods"


async def _watch_lines(
    api: Api, query: str, count: int | None = None, timeout: float = 20
) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    async with api.session.get(
        api.cluster.url + PODS + "?" + query,
        headers={"Authorization": f"Bearer {api.cluster.token}"},
        ssl=api.ssl,
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/json"
        async for raw in resp.content:
            lines.append(json.loads(raw))
            if count is not None and len(lines) >= count:
                break
    return lines


async def test_watch_list_with_initial_events_and_bookmark(api: Api) -> None:
    await api.create_pod(pod("w1"))
    events = await _watch_lines(
        api,
        "watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan"
        "&allowWatchBookmarks=true&fieldSelector=metadata.name%3Dw1&timeoutSeconds=5",
        count=2,
    )
    assert events[0]["type"] == "ADDED"
    assert events[0]["object"]["metadata"]["name"] == "w1"
    mark = events[1]
    assert mark["type"] == "BOOKMARK"
    assert mark["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert mark["object"]["kind"] == "Pod"


async def test_watch_timeout_ends_cleanly(api: Api) -> None:
    # The server ends the stream by itself (the client would wait 20 s).
    events = await _watch_lines(api, "watch=1&resourceVersion=0&timeoutSeconds=1")
    assert events == []


async def test_too_old_resource_version_is_410(api: Api, cluster: DevCluster) -> None:
    await api.create_pod(pod("old"))
    cluster.faults.expire_watch_history()
    events = await _watch_lines(api, "watch=true&resourceVersion=1&timeoutSeconds=5")
    assert len(events) == 1
    assert events[0]["type"] == "ERROR"
    status = events[0]["object"]
    assert (status["kind"], status["code"], status["reason"]) == ("Status", 410, "Expired")
    assert status["message"].startswith("too old resource version: 1 (")


async def test_dropped_watch(api: Api, cluster: DevCluster) -> None:
    await api.create_pod(pod("a"))
    await api.create_pod(pod("b"))
    cluster.faults.drop_watches(after_events=1)
    lines: list[bytes] = []
    try:
        async with api.session.get(
            cluster.url + PODS + "?watch=true",
            headers={"Authorization": f"Bearer {cluster.token}"},
            ssl=api.ssl,
        ) as resp:
            async for raw in resp.content:
                lines.append(raw)
    except aiohttp.ClientPayloadError:
        pass  # the stream was cut, not ended
    assert len(lines) == 1


async def test_selector_transitions_in_watch(api: Api, cluster: DevCluster) -> None:
    await api.create_pod(pod("lab"))
    _, listed, _ = await api.request("GET", PODS)
    rv = listed["metadata"]["resourceVersion"]
    task = asyncio.create_task(
        _watch_lines(api, f"watch=true&labelSelector=x%3Dy&resourceVersion={rv}", count=2)
    )
    await asyncio.sleep(0.2)
    for labels in ({"x": "y"}, None):
        await api.request(
            "PATCH",
            PODS + "/lab",
            {"metadata": {"labels": labels}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
    events = await asyncio.wait_for(task, 20)
    assert [e["type"] for e in events] == ["ADDED", "DELETED"]


async def test_fail_latency_and_plain_429(api: Api, cluster: DevCluster) -> None:
    rule = cluster.faults.fail(409, method="POST", path=r"/pods$", count=2, message="busy")
    for _ in range(2):
        status, body, _ = await api.request("POST", PODS, pod("c"))
        assert status == 409
        assert body["reason"] == "Conflict"
        assert body["message"] == "Operation cannot be fulfilled on pods: busy"
    assert rule.hits == 2 and not rule.active
    assert (await api.request("POST", PODS, pod("c")))[0] == 201

    cluster.faults.fail(429, verb="get", plain_text=True, retry_after=3)
    status, body, headers = await api.request("GET", PODS + "/c")
    assert status == 429
    assert headers["Content-Type"].startswith("text/plain")
    assert headers["Retry-After"] == "3"
    assert body == b"Too many requests, please try again later.\n"

    slow = cluster.faults.latency(0.3, verb="list", count=1)
    start = time.monotonic()
    assert (await api.request("GET", PODS))[0] == 200
    assert time.monotonic() - start >= 0.3
    assert slow.hits == 1


async def test_node_faults(api: Api, cluster: DevCluster) -> None:
    cluster.faults.delay_pod_start(0.5, name="^late$")
    cluster.faults.fail_image_pull(name="^unlucky$")
    await api.create_pod(pod("late"))
    await api.create_pod(pod("unlucky"))
    creating = await api.wait_pod("late", lambda p: bool(p["status"].get("containerStatuses")))
    waiting = creating["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "ContainerCreating"
    await api.running("late")
    await api.wait_pod(
        "unlucky", lambda p: "ErrImagePull" in json.dumps(p["status"].get("containerStatuses"))
    )


async def test_admin_endpoint(cluster: DevCluster) -> None:
    headers = {"Authorization": f"Bearer {cluster.token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        base = cluster.url + "/_devcluster"
        ssl = client_ssl(cluster)
        async with session.post(
            base + "/faults",
            json={"type": "fail", "status": 500, "verb": "list", "count": 1},
            ssl=ssl,
        ) as resp:
            assert resp.status == 201
            created = await resp.json()
        assert created["type"] == "fail" and created["remaining"] == 1
        async with session.get(cluster.url + PODS, ssl=ssl) as resp:
            assert resp.status == 500
            assert (await resp.json())["reason"] == "InternalError"
        async with session.get(base + "/faults", ssl=ssl) as resp:
            assert (await resp.json())["faults"] == []
        async with session.post(base + "/faults", json={"type": "nope"}, ssl=ssl) as resp:
            assert resp.status == 400
        async with session.get(base + "/requests", ssl=ssl) as resp:
            log = (await resp.json())["requests"]
        assert [(r["verb"], r["status"]) for r in log] == [("list", 500)]
        async with session.delete(base + "/requests", ssl=ssl) as resp:
            assert resp.status == 200
    url = cluster.url + "/_devcluster/faults"
    async with aiohttp.ClientSession() as anon, anon.get(url, ssl=client_ssl(cluster)) as resp:
        assert resp.status == 401
    assert len(cluster.requests) == 0


async def test_request_log(api: Api, cluster: DevCluster) -> None:
    await api.create_pod(pod("counted"))
    await api.request("GET", PODS + "/counted")
    await api.request("GET", PODS + "?labelSelector=a%3Db")
    await api.request("DELETE", PODS + "/counted?gracePeriodSeconds=0")
    verbs = [(r.verb, r.name, r.status) for r in cluster.requests]
    assert verbs == [
        ("create", "counted", 201),
        ("get", "counted", 200),
        ("list", "", 200),
        ("delete", "counted", 200),
    ]
    assert cluster.requests.where(verb="list")[0].query == {"labelSelector": "a=b"}
    assert cluster.requests.tally(name="counted") == {"create": 1, "get": 1, "delete": 1}
