"""Server-side printing (``meta.k8s.io/v1`` Table) as kubectl requests it for ``get``.

Part of devcluster, a test double and not a production runtime. Columns and cell
texts follow the API server's printers for Pods, Events, Namespaces and Nodes.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from .pods import parse_rfc3339

__all__ = ["human_duration", "partial_metadata", "table", "wants"]

Obj = dict[str, Any]


def wants(accept: str, kind: str) -> bool:
    """Whether the Accept header asks for ``as=<kind>`` in ``meta.k8s.io``."""
    for part in accept.split(","):
        params = {
            k.strip(): v.strip() for k, _, v in (p.partition("=") for p in part.split(";")[1:])
        }
        if params.get("as") == kind and params.get("g") == "meta.k8s.io":
            return True
    return False


def human_duration(seconds: float) -> str:
    """Go's ``duration.HumanDuration`` (what the AGE column shows)."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        rest = s % 60
        return f"{minutes}m" if rest == 0 else f"{minutes}m{rest}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h" if rest == 0 else f"{hours}h{rest}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if days == 0 else f"{hours // 24 // 365}y{days}d"
    return f"{hours // 24 // 365}y"


def _age(ts: Any) -> str:
    when = parse_rfc3339(ts) if isinstance(ts, str) else None
    if when is None:
        return "<unknown>"
    now = datetime.datetime.now(datetime.timezone.utc)
    return human_duration((now - when).total_seconds())


def _col(name: str, description: str, priority: int = 0, fmt: str = "", typ: str = "string") -> Obj:
    return {
        "name": name,
        "type": typ,
        "format": fmt,
        "description": description,
        "priority": priority,
    }


_CREATED = (
    "CreationTimestamp is a timestamp representing the server time when this object was created."
)

POD_COLUMNS = [
    _col("Name", "Name must be unique within a namespace.", fmt="name"),
    _col("Ready", "The aggregate readiness state of this pod for accepting traffic."),
    _col("Status", "The aggregate status of the containers in this pod."),
    _col(
        "Restarts",
        "The number of times the containers in this pod have been restarted and when the last "
        "container in this pod has restarted.",
    ),
    _col(
        "Age",
        _CREATED,
    ),
    _col("IP", "IP address allocated to the pod. Routable at least within the cluster.", 1),
    _col("Node", "NodeName is a request to schedule this pod onto a specific node.", 1),
    _col(
        "Nominated Node",
        "nominatedNodeName is set only when this pod preempts other pods on the node.",
        1,
    ),
    _col(
        "Readiness Gates",
        "If specified, all readiness gates will be evaluated for pod readiness.",
        1,
    ),
]


def _pod_row(pod: Obj) -> list[Any]:
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    meta = pod.get("metadata") or {}
    total = len(spec.get("containers") or [])
    ready = 0
    restarts = 0
    last_restart: str | None = None
    reason = status.get("reason") or status.get("phase") or ""
    initializing = False
    inits = spec.get("initContainers") or []
    for i, cs in enumerate(status.get("initContainerStatuses") or []):
        restarts += int(cs.get("restartCount") or 0)
        state = cs.get("state") or {}
        term = state.get("terminated")
        waiting = state.get("waiting")
        if term and term.get("exitCode") == 0:
            continue
        if term:
            reason = "Init:" + (term.get("reason") or f"ExitCode:{term.get('exitCode')}")
        elif waiting and waiting.get("reason") not in (None, "", "PodInitializing"):
            reason = "Init:" + waiting["reason"]
        else:
            reason = f"Init:{i}/{len(inits)}"
        initializing = True
        break
    initialized = any(
        c.get("type") == "Initialized" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    if not initializing or initialized:
        restarts = 0
        running = False
        for cs in reversed(status.get("containerStatuses") or []):
            restarts += int(cs.get("restartCount") or 0)
            finished = ((cs.get("lastState") or {}).get("terminated") or {}).get("finishedAt")
            if finished and (last_restart is None or finished > last_restart):
                last_restart = finished
            state = cs.get("state") or {}
            if (state.get("waiting") or {}).get("reason"):
                reason = state["waiting"]["reason"]
            elif (state.get("terminated") or {}).get("reason"):
                reason = state["terminated"]["reason"]
            elif state.get("terminated"):
                term = state["terminated"]
                reason = (
                    f"Signal:{term['signal']}"
                    if term.get("signal")
                    else f"ExitCode:{term.get('exitCode')}"
                )
            elif cs.get("ready") and "running" in state:
                running = True
                ready += 1
        if reason == "Completed" and running:
            ready_cond = any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or []
            )
            reason = "Running" if ready_cond else "NotReady"
    if meta.get("deletionTimestamp"):
        reason = "Terminating"
    restart_cell = str(restarts)
    if restarts and last_restart:
        restart_cell = f"{restarts} ({_age(last_restart)} ago)"
    return [
        meta.get("name", ""),
        f"{ready}/{total}",
        reason,
        restart_cell,
        _age(meta.get("creationTimestamp")),
        status.get("podIP") or "<none>",
        spec.get("nodeName") or "<none>",
        status.get("nominatedNodeName") or "<none>",
        "<none>",
    ]


EVENT_COLUMNS = [
    _col("Last Seen", "The time since the last occurrence of this event."),
    _col("Type", "Type of this event (Normal, Warning), new types could be added in the future."),
    _col("Reason", "This should be a short, machine understandable string."),
    _col("Object", "The object that this event is about.", fmt="name"),
    _col("Subobject", "The subobject that this event is about.", 1),
    _col("Source", "The component reporting this event.", 1),
    _col("Message", "A human-readable description of the status of this operation."),
    _col("First Seen", "The time since the first occurrence of this event.", 1),
    _col("Count", "The number of times this event has occurred.", 1),
    _col("Name", "Name must be unique within a namespace.", 1, fmt="name"),
]


def _event_row(ev: Obj) -> list[Any]:
    inv = ev.get("involvedObject") or {}
    source = ev.get("source") or {}
    src = source.get("component", "")
    if source.get("host"):
        src = f"{src}, {source['host']}"
    return [
        _age(ev.get("lastTimestamp")),
        ev.get("type", ""),
        ev.get("reason", ""),
        f"{str(inv.get('kind', '')).lower()}/{inv.get('name', '')}",
        inv.get("fieldPath", ""),
        src,
        str(ev.get("message", "")).strip(),
        _age(ev.get("firstTimestamp")),
        int(ev.get("count") or 1),
        (ev.get("metadata") or {}).get("name", ""),
    ]


NAMESPACE_COLUMNS = [
    _col("Name", "Name must be unique within a namespace.", fmt="name"),
    _col("Status", "The status of the namespace"),
    _col(
        "Age",
        _CREATED,
    ),
]


def _namespace_row(ns: Obj) -> list[Any]:
    return [
        ns["metadata"]["name"],
        (ns.get("status") or {}).get("phase", ""),
        _age(ns["metadata"].get("creationTimestamp")),
    ]


NODE_COLUMNS = [
    _col("Name", "Name must be unique within a namespace.", fmt="name"),
    _col("Status", "The status of the node"),
    _col("Roles", "The roles of the node"),
    _col(
        "Age",
        _CREATED,
    ),
    _col("Version", "Kubelet Version reported by the node."),
    _col("Internal-IP", "List of addresses reachable to the node.", 1),
    _col("External-IP", "List of addresses reachable to the node.", 1),
    _col(
        "OS-Image",
        "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy)).",
        1,
    ),
    _col(
        "Kernel-Version",
        "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64).",
        1,
    ),
    _col(
        "Container-Runtime",
        "Container runtime version reported by the node through runtime remote API (e.g. containerd://1.4.2).",
        1,
    ),
]


def _node_row(node: Obj) -> list[Any]:
    info = (node.get("status") or {}).get("nodeInfo") or {}
    return [
        node["metadata"]["name"],
        "Ready",
        "<none>",
        _age(node["metadata"].get("creationTimestamp")),
        info.get("kubeletVersion", ""),
        "127.0.0.1",
        "<none>",
        info.get("osImage", ""),
        info.get("kernelVersion", ""),
        info.get("containerRuntimeVersion", ""),
    ]


LEASE_COLUMNS = [
    _col("Name", "Name must be unique within a namespace.", fmt="name"),
    _col("Holder", "holderIdentity contains the identity of the holder of a current lease."),
    _col("Age", _CREATED),
]


def _lease_row(lease: Obj) -> list[Any]:
    meta = lease.get("metadata") or {}
    holder = (lease.get("spec") or {}).get("holderIdentity") or ""
    return [meta.get("name", ""), holder, _age(meta.get("creationTimestamp"))]


PRINTERS: dict[str, tuple[list[Obj], Callable[[Obj], list[Any]]]] = {
    "pods": (POD_COLUMNS, _pod_row),
    "events": (EVENT_COLUMNS, _event_row),
    "namespaces": (NAMESPACE_COLUMNS, _namespace_row),
    "nodes": (NODE_COLUMNS, _node_row),
    "leases": (LEASE_COLUMNS, _lease_row),
}


def partial_metadata(obj: Obj) -> Obj:
    """``PartialObjectMetadata`` of an object."""
    return {
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata") or {},
    }


def table(resource: str, objects: list[Obj], list_meta: Obj, include: str | None) -> Obj:
    """A Table of ``objects``; ``include`` is the ``includeObject`` query value."""
    columns, row = PRINTERS[resource]
    rows = []
    for obj in objects:
        entry: Obj = {"cells": row(obj)}
        mode = (include or "Metadata").lower()
        if mode == "object":
            entry["object"] = obj
        elif mode != "none":
            entry["object"] = partial_metadata(obj)
        rows.append(entry)
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": columns,
        "rows": rows,
    }
