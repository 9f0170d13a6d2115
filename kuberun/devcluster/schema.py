"""Just enough of the Pod schema to decode like the API server does.

Part of devcluster, a test double and not a production runtime. Two jobs:
type errors become the API server's ``cannot unmarshal`` 400s (so handlers
never see a string where a list is expected), and unknown fields are reported
for ``fieldValidation`` (Strict → 400, Warn → ``Warning`` header). Sub-objects
devcluster never reads (volumes, probes, affinity, ...) are accepted as opaque.
"""

from __future__ import annotations

from typing import Any

from .apierrors import bad_request

__all__ = ["POD", "decode_check"]

# A schema node: a type tag, or a dict of fields (a struct), or a one-element
# list (a list of that node), or ("map", node) for string-keyed maps.
Node = str | dict[str, Any] | list[Any] | tuple[str, Any]

STR, INT, BOOL, ANY = "string", "int64", "bool", "any"
MAP_STR: Node = ("map", STR)

OWNER_REF: dict[str, Node] = {
    "apiVersion": STR,
    "kind": STR,
    "name": STR,
    "uid": STR,
    "controller": BOOL,
    "blockOwnerDeletion": BOOL,
}

META: dict[str, Node] = {
    "name": STR,
    "generateName": STR,
    "namespace": STR,
    "selfLink": STR,
    "uid": STR,
    "resourceVersion": STR,
    "generation": INT,
    "creationTimestamp": ANY,
    "deletionTimestamp": ANY,
    "deletionGracePeriodSeconds": INT,
    "labels": MAP_STR,
    "annotations": MAP_STR,
    "ownerReferences": [OWNER_REF],
    "finalizers": [STR],
    "managedFields": ANY,
}

KEY_REF: dict[str, Node] = {"name": STR, "key": STR, "optional": BOOL}
ENV_SOURCE: dict[str, Node] = {
    "fieldRef": {"apiVersion": STR, "fieldPath": STR},
    "resourceFieldRef": {"containerName": STR, "resource": STR, "divisor": ANY},
    "configMapKeyRef": KEY_REF,
    "secretKeyRef": KEY_REF,
    "fileKeyRef": ANY,
}
ENV_VAR: dict[str, Node] = {"name": STR, "value": STR, "valueFrom": ENV_SOURCE}
NAME_REF: dict[str, Node] = {"name": STR, "optional": BOOL}
ENV_FROM: dict[str, Node] = {"prefix": STR, "configMapRef": NAME_REF, "secretRef": NAME_REF}
RESOURCES: dict[str, Node] = {"limits": ("map", ANY), "requests": ("map", ANY), "claims": ANY}

CONTAINER: dict[str, Node] = {
    "name": STR,
    "image": STR,
    "command": [STR],
    "args": [STR],
    "workingDir": STR,
    "ports": ANY,
    "envFrom": [ENV_FROM],
    "env": [ENV_VAR],
    "resources": RESOURCES,
    "resizePolicy": ANY,
    "restartPolicy": STR,
    "restartPolicyRules": ANY,
    "volumeMounts": ANY,
    "volumeDevices": ANY,
    "livenessProbe": ANY,
    "readinessProbe": ANY,
    "startupProbe": ANY,
    "lifecycle": ANY,
    "terminationMessagePath": STR,
    "terminationMessagePolicy": STR,
    "imagePullPolicy": STR,
    "securityContext": ANY,
    "stdin": BOOL,
    "stdinOnce": BOOL,
    "tty": BOOL,
}

SPEC: dict[str, Node] = {
    "volumes": ANY,
    "initContainers": [CONTAINER],
    "containers": [CONTAINER],
    "ephemeralContainers": ANY,
    "restartPolicy": STR,
    "terminationGracePeriodSeconds": INT,
    "activeDeadlineSeconds": INT,
    "dnsPolicy": STR,
    "nodeSelector": MAP_STR,
    "serviceAccountName": STR,
    "serviceAccount": STR,
    "automountServiceAccountToken": BOOL,
    "nodeName": STR,
    "hostNetwork": BOOL,
    "hostPID": BOOL,
    "hostIPC": BOOL,
    "shareProcessNamespace": BOOL,
    "securityContext": ANY,
    "imagePullSecrets": ANY,
    "hostname": STR,
    "subdomain": STR,
    "affinity": ANY,
    "schedulerName": STR,
    "tolerations": ANY,
    "hostAliases": ANY,
    "priorityClassName": STR,
    "priority": INT,
    "dnsConfig": ANY,
    "readinessGates": ANY,
    "runtimeClassName": STR,
    "enableServiceLinks": BOOL,
    "preemptionPolicy": STR,
    "overhead": ANY,
    "topologySpreadConstraints": ANY,
    "setHostnameAsFQDN": BOOL,
    "os": ANY,
    "hostUsers": BOOL,
    "schedulingGates": ANY,
    "resourceClaims": ANY,
    "resources": ANY,
    "hostnameOverride": STR,
    "workloadRef": ANY,
}

POD: dict[str, Node] = {
    "kind": STR,
    "apiVersion": STR,
    "metadata": META,
    "spec": SPEC,
    "status": ANY,
}

_GO_NAMES = {STR: "string", INT: "int64", BOOL: "bool"}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _go_type(node: Node) -> str:
    if isinstance(node, str):
        return _GO_NAMES.get(node, "interface {}")
    if isinstance(node, list):
        return "[]" + _go_type(node[0])
    if isinstance(node, tuple):
        return "map[string]" + _go_type(node[1])
    return "struct"


def decode_check(obj: Any, schema: dict[str, Node], kind: str, unknown: list[str]) -> Any:
    """Decode like Go: 400 on a type mismatch; unknown field paths go to ``unknown``.

    Returns a normalised copy in which JSON ``null`` became what Go would decode it
    to: an absent field inside objects, the zero value inside lists and maps.
    """
    if not isinstance(obj, dict):
        raise bad_request(
            f'{kind} in version "v1" cannot be handled as a {kind}: json: cannot unmarshal '
            f"{_json_type(obj)} into Go value of type struct"
        )
    return _walk(obj, schema, "", kind, unknown)


def _mismatch(kind: str, path: str, value: Any, node: Node) -> Exception:
    return bad_request(
        f'{kind} in version "v1" cannot be handled as a {kind}: json: cannot unmarshal '
        f"{_json_type(value)} into Go struct field {kind}.{path} of type {_go_type(node)}"
    )


def _zero(node: Node) -> Any:
    if isinstance(node, (dict, tuple)):
        return {}
    if isinstance(node, list):
        return []
    return {STR: "", INT: 0, BOOL: False}.get(node) if isinstance(node, str) else None


def _walk(value: Any, node: Node, path: str, kind: str, unknown: list[str]) -> Any:
    if node == ANY:
        return value
    if isinstance(node, dict):
        if not isinstance(value, dict):
            raise _mismatch(kind, path, value, node)
        out: dict[str, Any] = {}
        for key, sub in value.items():
            child = f"{path}.{key}" if path else key
            if key not in node:
                unknown.append(child)
            elif sub is not None:
                out[key] = _walk(sub, node[key], child, kind, unknown)
        return out
    if isinstance(node, list):
        if not isinstance(value, list):
            raise _mismatch(kind, path, value, node)
        return [
            _zero(node[0]) if item is None else _walk(item, node[0], f"{path}[{i}]", kind, unknown)
            for i, item in enumerate(value)
        ]
    if isinstance(node, tuple):
        if not isinstance(value, dict):
            raise _mismatch(kind, path, value, node)
        return {
            key: _zero(node[1])
            if item is None
            else _walk(item, node[1], f"{path}.{key}", kind, unknown)
            for key, item in value.items()
        }
    ok = {
        STR: isinstance(value, str),
        INT: isinstance(value, int) and not isinstance(value, bool),
        BOOL: isinstance(value, bool),
    }.get(node, True)
    if not ok:
        raise _mismatch(kind, path, value, node)
    return value
