"""core/v1 Events about Pods, as the scheduler and kubelet record them.

Part of devcluster, a test double and not a production runtime. Repeated events
(same object, reason and message) are aggregated into one Event whose ``count``
grows, like client-go's event correlator; old Events are dropped beyond a cap
(real clusters expire them after an hour).
"""

from __future__ import annotations

import collections
import time
import uuid
from typing import Any

from .pods import NODE_NAME, now_rfc3339
from .store import Store

__all__ = ["EventRecorder"]

Obj = dict[str, Any]

MAX_EVENTS = 2000


class EventRecorder:
    """Writes Event objects into the store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._seq = 0
        self._keys: collections.OrderedDict[tuple[str, ...], tuple[str, str]] = (
            collections.OrderedDict()
        )

    def record(
        self,
        pod: Obj,
        type_: str,
        reason: str,
        message: str,
        *,
        field_path: str | None = None,
        component: str = "kubelet",
    ) -> None:
        """Record (or re-count) an event about ``pod``."""
        meta = pod.get("metadata") or {}
        namespace = meta.get("namespace", "default")
        key = (
            namespace,
            meta.get("name", ""),
            meta.get("uid", ""),
            field_path or "",
            reason,
            message,
        )
        now = now_rfc3339()
        known = self._keys.get(key)
        if known is not None:
            existing = self._store.get("events", known[0], known[1])
            if existing is not None:
                updated = dict(existing)
                updated["count"] = int(existing.get("count") or 1) + 1
                updated["lastTimestamp"] = now
                self._store.update("events", updated)
                self._keys.move_to_end(key)
                return
        involved: Obj = {
            "kind": "Pod",
            "namespace": namespace,
            "name": meta.get("name", ""),
            "uid": meta.get("uid", ""),
            "apiVersion": "v1",
            "resourceVersion": meta.get("resourceVersion", ""),
        }
        if field_path:
            involved["fieldPath"] = field_path
        # Like real event names: the object name plus a hex timestamp, so names sort by time.
        self._seq = max(self._seq + 1, time.time_ns())
        name = f"{meta.get('name', 'pod')}.{self._seq:x}"
        event: Obj = {
            "kind": "Event",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": now,
            },
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "source": {"component": component}
            if component != "kubelet"
            else {"component": component, "host": NODE_NAME},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "type": type_,
            "eventTime": None,
            "reportingComponent": component,
            "reportingInstance": NODE_NAME if component == "kubelet" else "",
        }
        self._store.create("events", event)
        self._keys[key] = (namespace, name)
        while len(self._keys) > MAX_EVENTS:
            _, (old_ns, old_name) = self._keys.popitem(last=False)
            old = self._store.get("events", old_ns, old_name)
            if old is not None:
                self._store.delete("events", old)
