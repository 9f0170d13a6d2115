"""Pod REST semantics of devcluster, checked with exact status codes and bodies."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from kuberun.devcluster import DevCluster

from .conftest import Api, client_ssl, pod

PODS = "/api/v1/namespaces/default/pods"


async def test_auth(api: Api) -> None:
    status, body, _ = await api.request("GET", PODS, token=None)
    assert status == 401
    assert body == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Unauthorized",
        "reason": "Unauthorized",
        "code": 401,
    }
    assert (await api.request("GET", PODS, token="nope"))[0] == 401
    assert (await api.request("GET", "/version", token=None))[0] == 200
    assert (await api.request("GET", "/version", token="nope"))[0] == 401


async def test_discovery(api: Api) -> None:
    _, resources, _ = await api.request("GET", "/api/v1")
    names = {r["name"]: r for r in resources["resources"]}
    assert "watch" in names["pods"]["verbs"]
    assert names["pods/exec"]["verbs"] == ["create", "get"]
    _, root, _ = await api.request("GET", "/openapi/v3")
    url = root["paths"]["api/v1"]["serverRelativeURL"]
    _, doc, _ = await api.request("GET", url)
    post = doc["paths"]["/api/v1/namespaces/{namespace}/pods"]["post"]
    assert "fieldValidation" in [p["name"] for p in post["parameters"]]
    status, body, _ = await api.request("GET", "/api/v1/widgets")
    assert (status, body["reason"]) == (404, "NotFound")
    status, text = await api.raw_body("GET", "/nothing-here")
    assert (status, text) == (404, b"404 page not found\n")


async def test_create_defaults_and_generate_name(api: Api) -> None:
    manifest = pod("")
    del manifest["metadata"]["name"]
    manifest["metadata"]["generateName"] = "sess-"
    created = await api.create_pod(manifest)
    name = created["metadata"]["name"]
    assert name.startswith("sess-") and len(name) == 10
    assert set(name[5:]) <= set("bcdfghjklmnpqrstvwxz2456789")
    assert created["kind"] == "Pod" and created["apiVersion"] == "v1"
    assert created["metadata"]["uid"] and created["metadata"]["resourceVersion"]
    assert created["spec"]["restartPolicy"] == "Always"
    assert created["spec"]["terminationGracePeriodSeconds"] == 30
    assert created["spec"]["containers"][0]["imagePullPolicy"] == "Always"
    assert created["status"] == {"phase": "Pending", "qosClass": "BestEffort"}
    _, listed, _ = await api.request("GET", PODS)
    assert listed["kind"] == "PodList"
    assert "kind" not in listed["items"][0]
    assert listed["metadata"]["resourceVersion"]


async def test_create_errors(api: Api, cluster: DevCluster) -> None:
    await api.create_pod(pod("dup"))
    status, body, _headers = await api.request("POST", PODS, pod("dup"))
    assert status == 409
    assert body["reason"] == "AlreadyExists"
    assert body["message"] == 'pods "dup" already exists'
    assert body["details"] == {"name": "dup", "kind": "pods"}

    bad = pod("Bad_Name", containers=[])
    status, body, _ = await api.request("POST", PODS, bad)
    assert status == 422
    assert body["reason"] == "Invalid"
    assert body["details"]["kind"] == "Pod"
    fields = [c["field"] for c in body["details"]["causes"]]
    assert fields == ["metadata.name", "spec.containers"]
    assert body["message"].startswith('Pod "Bad_Name" is invalid: [metadata.name: Invalid value')

    nameless = pod("x")
    del nameless["metadata"]["name"]
    status, body, _ = await api.request("POST", PODS, nameless)
    assert status == 422
    assert body["message"] == (
        'Pod "" is invalid: metadata.name: Required value: name or generateName is required'
    )

    status, body, _ = await api.request(
        "POST", PODS, raw=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert (status, body["reason"]) == (400, "BadRequest")

    wrong_type = pod("typed")
    wrong_type["spec"]["containers"][0]["command"] = "echo hi"
    status, body, _ = await api.request("POST", PODS, wrong_type)
    assert status == 400
    assert "cannot unmarshal string into Go struct field" in body["message"]

    other_ns = pod("elsewhere")
    other_ns["metadata"]["namespace"] = "other"
    status, body, _ = await api.request("POST", PODS, other_ns)
    assert status == 400

    status, body, _ = await api.request(
        "POST", PODS, pod("x"), headers={"Content-Type": "application/vnd.kubernetes.protobuf"}
    )
    assert status == 415
    assert [p["metadata"]["name"] for p in cluster.pods()] == ["dup"]


async def test_dry_run_and_field_validation(api: Api, cluster: DevCluster) -> None:
    status, body, _ = await api.request("POST", PODS + "?dryRun=All", pod("dry"))
    assert status == 201 and body["metadata"]["name"] == "dry"
    assert cluster.pods() == []
    extra = pod("extra")
    extra["spec"]["bogus"] = 1
    status, body, _ = await api.request("POST", PODS + "?fieldValidation=Strict", extra)
    assert status == 400
    assert body["message"] == 'strict decoding error: unknown field "spec.bogus"'
    status, body, headers = await api.request("POST", PODS + "?fieldValidation=Warn", extra)
    assert status == 201
    assert headers["Warning"] == '299 - "unknown field \\"spec.bogus\\""'


async def test_get_not_found_body(api: Api) -> None:
    status, raw = await api.raw_body("GET", PODS + "/nope")
    assert status == 404
    assert raw == (
        b'{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",'
        b'"message":"pods \\"nope\\" not found","reason":"NotFound",'
        b'"details":{"name":"nope","kind":"pods"},"code":404}\n'
    )


async def test_list_selectors_and_paging(api: Api) -> None:
    for i in range(5):
        manifest = pod(f"p{i}")
        manifest["metadata"]["labels"] = {"idx": str(i), "even": str(i % 2 == 0).lower()}
        await api.create_pod(manifest)
    _, body, _ = await api.request("GET", PODS + "?labelSelector=even%3Dtrue")
    assert [p["metadata"]["name"] for p in body["items"]] == ["p0", "p2", "p4"]
    _, body, _ = await api.request("GET", PODS + "?labelSelector=idx+in+(1,3),even!%3Dtrue")
    assert [p["metadata"]["name"] for p in body["items"]] == ["p1", "p3"]
    _, body, _ = await api.request("GET", PODS + "?fieldSelector=metadata.name%3Dp2")
    assert [p["metadata"]["name"] for p in body["items"]] == ["p2"]
    status, body, _ = await api.request("GET", PODS + "?fieldSelector=spec.bogus%3Dx")
    assert (status, body["message"]) == (400, "field label not supported: spec.bogus")
    status, _, _ = await api.request("GET", PODS + "?labelSelector=a+in+b")
    assert status == 400
    names = []
    cont = ""
    while True:
        _, body, _ = await api.request(
            "GET", PODS + "?limit=2" + (f"&continue={cont}" if cont else "")
        )
        names += [p["metadata"]["name"] for p in body["items"]]
        cont = body["metadata"].get("continue", "")
        if not cont:
            break
    assert names == ["p0", "p1", "p2", "p3", "p4"]


async def test_delete_preconditions_and_grace(api: Api, cluster: DevCluster) -> None:
    created = await api.create_pod(pod("victim"))
    await api.running("victim")
    opts = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": "not-it"}}
    status, body, _ = await api.request("DELETE", PODS + "/victim", opts)
    assert status == 409
    assert body["details"] == {"name": "victim", "kind": "Pod"}
    assert body["message"].startswith('Operation cannot be fulfilled on Pod "victim"')
    status, body, _ = await api.request(
        "DELETE", PODS + "/victim", {"preconditions": {"uid": created["metadata"]["uid"]}}
    )
    assert status == 200
    assert body["metadata"]["deletionTimestamp"]
    assert body["metadata"]["deletionGracePeriodSeconds"] == 30
    for _ in range(500):
        if cluster.pod("victim") is None:
            break
        await asyncio.sleep(0.02)
    assert cluster.pod("victim") is None
    assert (await api.request("DELETE", PODS + "/victim"))[0] == 404


async def test_sigkill_after_grace_period(api: Api, cluster: DevCluster) -> None:
    stubborn = pod("stubborn", command=["sh", "-c", "trap '' TERM; while :; do sleep 1; done"])
    await api.create_pod(stubborn)
    await api.running("stubborn")
    status, body, _ = await api.request("DELETE", PODS + "/stubborn?gracePeriodSeconds=1")
    assert status == 200 and body["metadata"]["deletionGracePeriodSeconds"] == 1
    await asyncio.sleep(0.5)
    assert cluster.pod("stubborn") is not None  # still inside its grace period
    for _ in range(300):
        if cluster.pod("stubborn") is None:
            break
        await asyncio.sleep(0.02)
    assert cluster.pod("stubborn") is None
    assert cluster.process_count() == 0


async def test_force_delete_is_immediate(api: Api, cluster: DevCluster) -> None:
    await api.create_pod(pod("gone"))
    await api.running("gone")
    status, _body, _ = await api.request("DELETE", PODS + "/gone?gracePeriodSeconds=0")
    assert status == 200
    assert cluster.pod("gone") is None
    assert cluster.process_count() == 0


async def test_update_and_patches(api: Api, cluster: DevCluster) -> None:
    await api.create_pod(pod("patchy"))
    status, body, _ = await api.request(
        "PATCH",
        PODS + "/patchy",
        {"metadata": {"labels": {"a": "1"}}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert status == 200 and body["metadata"]["labels"] == {"a": "1"}
    status, body, _ = await api.request(
        "PATCH",
        PODS + "/patchy",
        [{"op": "add", "path": "/metadata/annotations", "value": {"n": "x"}}],
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert status == 200 and body["metadata"]["annotations"] == {"n": "x"}
    status, body, _ = await api.request(
        "PATCH",
        PODS + "/patchy",
        {"metadata": {"labels": {"b": "2"}}},
        headers={"Content-Type": "application/strategic-merge-patch+json"},
    )
    assert body["metadata"]["labels"] == {"a": "1", "b": "2"}
    status, body, _ = await api.request(
        "PATCH",
        PODS + "/patchy",
        {"spec": {"restartPolicy": "Never"}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert status == 422
    assert "pod updates may not change fields" in body["message"]
    current = cluster.pod("patchy")
    assert current is not None
    stale = json.loads(json.dumps(current))
    stale["metadata"]["resourceVersion"] = "1"
    status, body, _ = await api.request("PUT", PODS + "/patchy", stale)
    assert (status, body["reason"]) == (409, "Conflict")
    current["metadata"]["labels"] = {"c": "3"}
    status, body, _ = await api.request("PUT", PODS + "/patchy", current)
    assert status == 200 and body["metadata"]["labels"] == {"c": "3"}


async def test_finalizers_hold_the_pod(api: Api, cluster: DevCluster) -> None:
    held = pod("held")
    held["metadata"]["finalizers"] = ["example.com/hold"]
    await api.create_pod(held)
    await api.running("held")
    assert (await api.request("DELETE", PODS + "/held?gracePeriodSeconds=0"))[0] == 200
    await asyncio.sleep(0.3)
    still = cluster.pod("held")
    assert still is not None and still["metadata"]["deletionTimestamp"]
    assert cluster.process_count() == 0  # the processes went; the object stays
    status, _, _ = await api.request(
        "PATCH",
        PODS + "/held",
        {"metadata": {"finalizers": None}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert status == 200
    assert cluster.pod("held") is None


async def test_other_resources(api: Api) -> None:
    await api.create_pod(pod("e1"))
    await api.running("e1")
    _, events, _ = await api.request(
        "GET", "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3De1"
    )
    reasons = [e["reason"] for e in events["items"]]
    assert reasons[:2] == ["Scheduled", "Pulling"] and "Started" in reasons
    _, nodes, _ = await api.request("GET", "/api/v1/nodes")
    assert [n["metadata"]["name"] for n in nodes["items"]] == ["devcluster"]
    _, namespaces, _ = await api.request("GET", "/api/v1/namespaces")
    assert "default" in [n["metadata"]["name"] for n in namespaces["items"]]
    _, table, _ = await api.request(
        "GET", PODS, headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}
    )
    assert table["kind"] == "Table"
    assert table["rows"][0]["cells"][:3] == ["e1", "1/1", "Running"]


JUNK_BODIES: list[object] = [
    None,
    1,
    "x",
    [],
    {"metadata": None, "spec": None},
    {"metadata": "x"},
    {"metadata": {"name": 5}},
    {"metadata": {"name": "j1"}, "spec": {"containers": "x"}},
    {"metadata": {"name": "j2"}, "spec": {"containers": [1, None]}},
    {"metadata": {"name": "j3", "labels": {"k": 1}}, "spec": {"containers": []}},
    {
        "metadata": {"name": "j4"},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": "i",
                    "resources": "lots",
                    "env": [{"name": "X", "valueFrom": {"fieldRef": "metadata.name"}}],
                }
            ]
        },
    },
    {"metadata": {"name": "j5"}, "spec": {"containers": [{"name": "c", "image": "i"}]}},
]


async def test_junk_never_breaks_the_server(api: Api, cluster: DevCluster) -> None:
    for body in JUNK_BODIES:
        status, _, _ = await api.request(
            "POST",
            PODS,
            raw=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert 400 <= status < 500 or status == 201, (body, status)
    patches = [
        ("application/json-patch+json", [{"op": "replace", "path": "", "value": 3}]),
        ("application/json-patch+json", [{"op": "remove", "path": "/no/such"}]),
        ("application/json-patch+json", {"op": "add"}),
        ("application/merge-patch+json", ["not", "an", "object"]),
        ("application/strategic-merge-patch+json", {"metadata": {"labels": {"x": None}}}),
        ("application/apply-patch+yaml", {"metadata": {}}),
    ]
    for ctype, body in patches:
        status, _, _ = await api.request(
            "PATCH", PODS + "/j5", raw=json.dumps(body).encode(), headers={"Content-Type": ctype}
        )
        assert status < 500, (ctype, body, status)
    for query in ("?watch=1&timeoutSeconds=x", "?limit=x", "?continue=@@", "?labelSelector=!!"):
        status, _, _ = await api.request("GET", PODS + query)
        assert status == 400, query
    assert (await api.request("PUT", "/api/v1/watch/namespaces/default/pods/j5", {}))[0] == 405
    assert (await api.request("GET", PODS + "/j5"))[0] == 200


async def test_named_legacy_watch(api: Api) -> None:
    await api.create_pod(pod("named"))
    await api.create_pod(pod("other"))
    async with api.session.get(
        api.cluster.url + "/api/v1/watch/namespaces/default/pods/named?timeoutSeconds=1",
        headers={"Authorization": f"Bearer {api.cluster.token}"},
        ssl=api.ssl,
    ) as resp:
        names = {json.loads(line)["object"]["metadata"]["name"] async for line in resp.content}
    assert names == {"named"}


async def test_client_gone_mid_body_is_quiet(
    api: Api, cluster: DevCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that sends a create's headers and vanishes before its body (a
    cancelled call, a killed process) is routine: no Pod, no error logged, and
    the server goes on serving."""
    host, port = cluster.url.removeprefix("https://").rsplit(":", 1)
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        _, writer = await asyncio.open_connection(
            host.strip("[]"), int(port), ssl=client_ssl(cluster), server_hostname=host.strip("[]")
        )
        writer.write(
            f"POST {PODS} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {cluster.token}\r\n"
            'Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{"kind":'.encode()
        )
        await writer.drain()
        await asyncio.sleep(0.05)  # the handler is now waiting for the rest of the body
        writer.transport.abort()
    for _ in range(100):
        if sum(1 for r in cluster.requests if r.verb == "create") == 3:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not errors, [r.getMessage() for r in errors]
    creates = [r for r in cluster.requests if r.verb == "create"]
    assert len(creates) == 3
    assert (await api.request("GET", PODS))[1]["items"] == []
