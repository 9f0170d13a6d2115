"""Pod status transitions, restart policies, reserved images, env and GC."""

from __future__ import annotations

import asyncio
from typing import Any

from kuberun.devcluster import DevCluster

from .conftest import Api, RawWebSocket, exec_params, pod

PODS = "/api/v1/namespaces/default/pods"


def _state(p: dict[str, Any], index: int = 0) -> dict[str, Any]:
    statuses = (p.get("status") or {}).get("containerStatuses") or []
    return statuses[index] if len(statuses) > index else {}


async def _exec_out(cluster: DevCluster, name: str, command: list[str]) -> bytes:
    ws = await RawWebSocket.connect(
        cluster,
        f"/api/v1/namespaces/default/pods/{name}/exec",
        exec_params(command, stdout=True),
        ["v5.channel.k8s.io"],
    )
    messages, _ = await ws.messages_until_close()
    await ws.close()
    return b"".join(p[1:] for _, p in messages if p[:1] == b"\x01")


async def test_watch_sees_a_real_node_sequence(api: Api, cluster: DevCluster) -> None:
    watcher = cluster.store.watch("pods", "default", lambda o: True, None)
    await api.create_pod(pod("seq"))
    await api.running("seq")
    events = watcher.drain()
    watcher.close()
    assert events[0].type == "ADDED"
    assert events[0].obj["status"]["phase"] == "Pending"
    assert "nodeName" not in events[0].obj["spec"]
    scheduled = events[1].obj
    assert scheduled["spec"]["nodeName"] == "devcluster"
    assert [c["type"] for c in scheduled["status"]["conditions"]] == ["PodScheduled"]
    creating = events[2].obj["status"]
    assert creating["containerStatuses"][0]["state"]["waiting"]["reason"] == "ContainerCreating"
    ready = {c["type"]: c for c in creating["conditions"]}
    assert ready["Ready"]["reason"] == "ContainersNotReady"
    final = events[-1].obj["status"]
    assert final["phase"] == "Running"
    assert final["containerStatuses"][0]["ready"] is True
    assert "running" in final["containerStatuses"][0]["state"]
    versions = [int(e.obj["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions)


async def test_restart_policies(api: Api) -> None:
    await api.create_pod(pod("ok", ["sh", "-c", "exit 0"], restartPolicy="Never"))
    await api.create_pod(pod("bad", ["sh", "-c", "exit 2"], restartPolicy="Never"))
    await api.create_pod(pod("again", ["sh", "-c", "exit 1"], restartPolicy="Always"))
    done = await api.wait_pod("ok", lambda p: p["status"]["phase"] == "Succeeded")
    term = _state(done)["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (0, "Completed")
    conds = {c["type"]: c for c in done["status"]["conditions"]}
    assert conds["Ready"]["reason"] == "PodCompleted"
    failed = await api.wait_pod("bad", lambda p: p["status"]["phase"] == "Failed")
    term = _state(failed)["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (2, "Error")
    conds = {c["type"]: c for c in failed["status"]["conditions"]}
    assert conds["Ready"]["reason"] == "PodFailed"
    looping = await api.wait_pod("again", lambda p: _state(p).get("restartCount", 0) >= 1)
    assert looping["status"]["phase"] == "Running"
    assert _state(looping)["lastState"]["terminated"]["exitCode"] == 1


async def test_reserved_images(api: Api) -> None:
    slow = pod("slow")
    slow["spec"]["containers"][0]["image"] = "kuberun.devcluster/slow:0.5"
    broken = pod("broken")
    broken["spec"]["containers"][0]["image"] = "kuberun.devcluster/pull-error"
    await api.create_pod(slow)
    await api.create_pod(broken)
    creating = await api.wait_pod("slow", lambda p: bool(_state(p)))
    assert _state(creating)["state"]["waiting"]["reason"] == "ContainerCreating"
    await api.running("slow")
    pulling = await api.wait_pod(
        "broken",
        lambda p: _state(p).get("state", {}).get("waiting", {}).get("reason") == "ErrImagePull",
    )
    assert pulling["status"]["phase"] == "Pending"
    await api.wait_pod(
        "broken",
        lambda p: _state(p)["state"]["waiting"]["reason"] == "ImagePullBackOff",
        timeout=10,
    )


async def test_environment_and_working_dir(api: Api, cluster: DevCluster, tmp_path: Any) -> None:
    manifest = pod("envy", ["sh", "-c", "sleep 600"])
    ctr = manifest["spec"]["containers"][0]
    ctr["workingDir"] = str(tmp_path)
    ctr["env"] = [
        {"name": "GREETING", "value": "hello"},
        {"name": "MESSAGE", "value": "$(GREETING) world $$(GREETING)"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    await api.create_pod(manifest)
    await api.running("envy")
    out = await _exec_out(
        cluster, "envy", ["sh", "-c", 'echo "$HOSTNAME|$MESSAGE|$POD_NAME|$(pwd)"']
    )
    assert out.decode().strip() == f"envy|hello world $(GREETING)|envy|{tmp_path}"


async def test_missing_secret_is_a_config_error(api: Api) -> None:
    manifest = pod("secretive")
    manifest["spec"]["containers"][0]["env"] = [
        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "k"}}}
    ]
    await api.create_pod(manifest)
    waiting = await api.wait_pod(
        "secretive", lambda p: "CreateContainerConfigError" in str(_state(p))
    )
    assert _state(waiting)["state"]["waiting"]["message"] == 'secret "creds" not found'


async def test_unschedulable_node_selector(api: Api) -> None:
    await api.create_pod(pod("picky", nodeSelector={"disk": "ssd"}))
    stuck = await api.wait_pod("picky", lambda p: bool(p["status"].get("conditions")))
    cond = stuck["status"]["conditions"][0]
    assert (cond["type"], cond["status"], cond["reason"]) == (
        "PodScheduled",
        "False",
        "Unschedulable",
    )


async def test_logs_endpoint(api: Api) -> None:
    await api.create_pod(pod("logger", ["sh", "-c", "echo one; echo two >&2; sleep 600"]))
    await api.running("logger")
    for _ in range(200):
        status, body = await api.raw_body("GET", PODS + "/logger/log")
        if body.count(b"\n") >= 2:
            break
        await asyncio.sleep(0.02)
    assert status == 200 and body == b"one\ntwo\n"
    _, tail = await api.raw_body("GET", PODS + "/logger/log?tailLines=1")
    assert tail == b"two\n"


async def test_owner_references_are_collected(api: Api, cluster: DevCluster) -> None:
    owner = await api.create_pod(pod("owner"))
    ref = {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "owner",
        "uid": owner["metadata"]["uid"],
    }
    child = pod("child")
    child["metadata"]["ownerReferences"] = [ref]
    await api.create_pod(child)
    orphan = pod("orphan")
    orphan["metadata"]["ownerReferences"] = [dict(ref, name="ghost", uid="0000-gone")]
    await api.create_pod(orphan)
    await api.running("child")
    # An owner that does not exist: the dependent is collected.
    for _ in range(300):
        if cluster.pod("orphan") is None:
            break
        await asyncio.sleep(0.02)
    assert cluster.pod("orphan") is None
    assert cluster.pod("child") is not None
    status, _, _ = await api.request("DELETE", PODS + "/owner?gracePeriodSeconds=0")
    assert status == 200
    for _ in range(300):
        if cluster.pod("child") is None:
            break
        await asyncio.sleep(0.02)
    assert cluster.pods() == []
    assert cluster.process_count() == 0


async def test_orphan_and_foreground_propagation(api: Api, cluster: DevCluster) -> None:
    for policy in ("Orphan", "Foreground"):
        owner = await api.create_pod(pod("boss"))
        dep = pod("worker")
        dep["metadata"]["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Pod", "name": "boss", "uid": owner["metadata"]["uid"]}
        ]
        await api.create_pod(dep)
        await api.running("worker")
        status, _, _ = await api.request(
            "DELETE", PODS + "/boss", {"propagationPolicy": policy, "gracePeriodSeconds": 0}
        )
        assert status == 200
        for _ in range(300):
            if cluster.pod("boss") is None:
                break
            await asyncio.sleep(0.02)
        assert cluster.pod("boss") is None
        if policy == "Orphan":
            survivor = cluster.pod("worker")
            assert survivor is not None and "ownerReferences" not in survivor["metadata"]
            await api.request("DELETE", PODS + "/worker?gracePeriodSeconds=0")
        else:
            assert cluster.pod("worker") is None
