"""Discovery documents devcluster serves: version, API resource lists, OpenAPI v3.

devcluster is a test double, not a production runtime. kubectl 1.37 reads the
OpenAPI v3 document before ``create``/``apply``; when the Pod operations there
declare a ``fieldValidation`` query parameter, kubectl leaves schema validation
to the server (exec protocol spec §9), so a small document is enough.
"""

from __future__ import annotations

import hashlib
import os
import platform
import uuid
from typing import Any

from .apierrors import go_json
from .kubelet import NODE_LABELS
from .pods import NODE_NAME, POD_IP

__all__ = [
    "API_RESOURCES",
    "OPENAPI_LEASES",
    "OPENAPI_V1",
    "namespace_object",
    "node_object",
    "version_info",
]

Obj = dict[str, Any]

KUBE_VERSION = "v1.37.0"


def version_info() -> Obj:
    """``/version``."""
    return {
        "major": "1",
        "minor": "37",
        "emulationMajor": "1",
        "emulationMinor": "37",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "36",
        "gitVersion": KUBE_VERSION + "-devcluster",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.25.0",
        "compiler": "gc",
        "platform": f"linux/{NODE_LABELS['kubernetes.io/arch']}",
    }


def _resource(
    name: str, kind: str, verbs: list[str], namespaced: bool = True, short: list[str] | None = None
) -> Obj:
    res: Obj = {
        "name": name,
        "singularName": "" if "/" in name else name.rstrip("s"),
        "namespaced": namespaced,
        "kind": kind,
        "verbs": verbs,
    }
    if short:
        res["shortNames"] = short
    if name == "pods":
        res["categories"] = ["all"]
    return res


API_RESOURCES: Obj = {
    "kind": "APIResourceList",
    "groupVersion": "v1",
    "resources": [
        _resource("events", "Event", ["get", "list", "watch"], short=["ev"]),
        _resource("namespaces", "Namespace", ["get", "list"], namespaced=False, short=["ns"]),
        _resource("nodes", "Node", ["get", "list"], namespaced=False, short=["no"]),
        _resource(
            "pods",
            "Pod",
            ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            short=["po"],
        ),
        _resource("pods/exec", "PodExecOptions", ["create", "get"]),
        _resource("pods/log", "Pod", ["get"]),
        _resource("pods/status", "Pod", ["get"]),
    ],
}


def _param(name: str, typ: str = "string") -> Obj:
    return {"name": name, "in": "query", "schema": {"type": typ, "uniqueItems": True}}


_GVK = {"group": "", "version": "v1", "kind": "Pod"}
_WRITE_PARAMS = [
    _param("dryRun"),
    _param("fieldManager"),
    _param("fieldValidation"),
    _param("pretty"),
]


def _op(action: str, op_id: str, params: list[Obj], gvk: Obj | None = None) -> Obj:
    return {
        "operationId": op_id,
        "parameters": params,
        "responses": {"200": {"description": "OK"}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk or _GVK,
    }


OPENAPI_V1: Obj = {
    "openapi": "3.0.0",
    "info": {"title": "Kubernetes", "version": KUBE_VERSION},
    "paths": {
        "/api/v1/namespaces/{namespace}/pods": {
            "parameters": [
                {"name": "namespace", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "get": _op("list", "listCoreV1NamespacedPod", []),
            "post": _op("post", "createCoreV1NamespacedPod", _WRITE_PARAMS),
        },
        "/api/v1/namespaces/{namespace}/pods/{name}": {
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "namespace", "in": "path", "required": True, "schema": {"type": "string"}},
            ],
            "get": _op("get", "readCoreV1NamespacedPod", []),
            "put": _op("put", "replaceCoreV1NamespacedPod", _WRITE_PARAMS),
            "patch": _op(
                "patch", "patchCoreV1NamespacedPod", [*_WRITE_PARAMS, _param("force", "boolean")]
            ),
            "delete": _op(
                "delete",
                "deleteCoreV1NamespacedPod",
                [
                    _param("dryRun"),
                    _param("gracePeriodSeconds", "integer"),
                    _param("propagationPolicy"),
                ],
            ),
        },
    },
    "components": {"schemas": {}},
}

_LEASE_GVK = {"group": "coordination.k8s.io", "version": "v1", "kind": "Lease"}
_LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"

OPENAPI_LEASES: Obj = {
    "openapi": "3.0.0",
    "info": {"title": "Kubernetes", "version": KUBE_VERSION},
    "paths": {
        _LEASES: {
            "parameters": OPENAPI_V1["paths"]["/api/v1/namespaces/{namespace}/pods"]["parameters"],
            "get": _op("list", "listCoordinationV1NamespacedLease", [], _LEASE_GVK),
            "post": _op("post", "createCoordinationV1NamespacedLease", _WRITE_PARAMS, _LEASE_GVK),
        },
        _LEASES + "/{name}": {
            "parameters": OPENAPI_V1["paths"]["/api/v1/namespaces/{namespace}/pods/{name}"][
                "parameters"
            ],
            "get": _op("get", "readCoordinationV1NamespacedLease", [], _LEASE_GVK),
            "put": _op("put", "replaceCoordinationV1NamespacedLease", _WRITE_PARAMS, _LEASE_GVK),
            "patch": _op(
                "patch",
                "patchCoordinationV1NamespacedLease",
                [*_WRITE_PARAMS, _param("force", "boolean")],
                _LEASE_GVK,
            ),
            "delete": _op(
                "delete",
                "deleteCoordinationV1NamespacedLease",
                [_param("dryRun"), _param("gracePeriodSeconds", "integer")],
                _LEASE_GVK,
            ),
        },
    },
    "components": {"schemas": {}},
}

OPENAPI_V1_HASH = hashlib.sha512(go_json(OPENAPI_V1)).hexdigest()[:128].upper()
OPENAPI_LEASES_HASH = hashlib.sha512(go_json(OPENAPI_LEASES)).hexdigest()[:128].upper()


def openapi_root() -> Obj:
    """``/openapi/v3``: where each group-version's document lives."""
    return {
        "paths": {
            "api/v1": {"serverRelativeURL": f"/openapi/v3/api/v1?hash={OPENAPI_V1_HASH}"},
            "apis/coordination.k8s.io/v1": {
                "serverRelativeURL": "/openapi/v3/apis/coordination.k8s.io/v1"
                f"?hash={OPENAPI_LEASES_HASH}"
            },
        }
    }


def namespace_object(name: str, created: str) -> Obj:
    """A Namespace (devcluster accepts Pods in any namespace, so all exist)."""
    return {
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, "devcluster/ns/" + name)),
            "resourceVersion": "1",
            "creationTimestamp": created,
            "labels": {"kubernetes.io/metadata.name": name},
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def node_object(created: str) -> Obj:
    """The single node all Pods run on."""
    uname = os.uname()
    cpus = str(os.cpu_count() or 1)
    try:
        memory = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 1024}Ki"
    except (ValueError, OSError):
        memory = "0"
    resources = {"cpu": cpus, "memory": memory, "pods": "110", "ephemeral-storage": "0"}
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": NODE_NAME,
            "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, "devcluster/node")),
            "resourceVersion": "1",
            "creationTimestamp": created,
            "labels": dict(NODE_LABELS, **{"beta.kubernetes.io/os": "linux"}),
        },
        "spec": {},
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "lastHeartbeatTime": created,
                    "lastTransitionTime": created,
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                }
            ],
            "addresses": [
                {"type": "InternalIP", "address": POD_IP},
                {"type": "Hostname", "address": NODE_NAME},
            ],
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": uname.release,
                "osImage": platform.platform(),
                "containerRuntimeVersion": "devcluster://0.1.0",
                "kubeletVersion": KUBE_VERSION,
                "operatingSystem": "linux",
                "architecture": NODE_LABELS["kubernetes.io/arch"],
            },
        },
    }
