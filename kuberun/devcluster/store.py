"""In-memory object storage with etcd-like resourceVersions and watch fan-out.

Part of devcluster, a test double and not a production runtime. Objects are
plain JSON dicts and are never mutated once stored: every change stores a new
dict, so a watch event can hold a snapshot without copying. One counter gives
every change a ``resourceVersion`` across all resources, like an etcd revision.
A bounded history lets watches resume from a version; older versions get 410.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .apierrors import ApiError, go_json

__all__ = ["Delivery", "Expired", "Store", "Watcher"]

Obj = dict[str, Any]
Key = tuple[str, str, str]
Predicate = Callable[[Obj], bool]

# A watcher that falls this far behind is closed, as the API server's watch cache
# does with unresponsive watchers; the client re-lists or resumes from its version.
MAX_PENDING = 10_000


class Expired(ApiError):
    """410 ``too old resource version``, delivered as a watch ERROR event."""

    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(410, "Expired", f"too old resource version: {requested} ({oldest})")


@dataclass
class Delivery:
    """One watch event as a watcher sees it (``type`` may differ from the change)."""

    type: str
    obj: Obj
    rv: int
    _line: bytes | None = field(default=None, repr=False)

    def line(self) -> bytes:
        """The JSON line the API server writes for this event."""
        if self._line is None:
            self._line = go_json({"type": self.type, "object": self.obj}) + b"\n"
        return self._line


@dataclass
class _Change:
    resource: str
    namespace: str
    type: str
    obj: Obj
    prev: Obj | None
    rv: int
    delivery: Delivery


class Watcher:
    """A live subscription; iterate with :meth:`next`."""

    def __init__(self, store: Store, resource: str, namespace: str | None, pred: Predicate):
        self._store = store
        self.resource = resource
        self.namespace = namespace
        self.pred = pred
        self._pending: collections.deque[Delivery] = collections.deque()
        self._wakeup = asyncio.Event()
        self.closed = False
        self.overflowed = False

    def _offer(self, change: _Change) -> None:
        if self.closed or change.resource != self.resource:
            return
        if self.namespace is not None and change.namespace != self.namespace:
            return
        delivery = self._convert(change)
        if delivery is None:
            return
        if len(self._pending) >= MAX_PENDING:
            self.overflowed = True
            self.close()
            return
        self._pending.append(delivery)
        self._wakeup.set()

    def _convert(self, change: _Change) -> Delivery | None:
        now = self.pred(change.obj)
        if change.type == "DELETED":
            return change.delivery if now else None
        before = change.prev is not None and self.pred(change.prev)
        if now and (before or change.type == "ADDED"):
            return change.delivery
        if now:
            # The object started matching the selector: the watcher sees it appear.
            return Delivery("ADDED", change.obj, change.rv)
        if before and change.prev is not None:
            # It stopped matching: the watcher sees it go, with the change's version.
            gone = dict(change.prev)
            gone["metadata"] = dict(gone.get("metadata", {}), resourceVersion=str(change.rv))
            return Delivery("DELETED", gone, change.rv)
        return None

    def push(self, delivery: Delivery) -> None:
        """Queue a synthetic event (initial ADDED, BOOKMARK)."""
        self._pending.append(delivery)
        self._wakeup.set()

    @property
    def pending(self) -> int:
        """Events queued and not yet taken."""
        return len(self._pending)

    def drain(self) -> list[Delivery]:
        """Take every queued event without waiting."""
        items = list(self._pending)
        self._pending.clear()
        self._wakeup.clear()
        return items

    async def wait(self, timeout: float | None) -> bool:
        """Wait until an event is queued or the watcher closes; False on timeout."""
        if self._pending or self.closed:
            return True
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Stop receiving events and wake the reader."""
        if not self.closed:
            self.closed = True
            self._store._watchers.discard(self)
            self._wakeup.set()


class Store:
    """All objects of all resources, keyed by (resource, namespace, name)."""

    def __init__(self, history: int = 20_000) -> None:
        self._objects: dict[Key, Obj] = {}
        self._history: collections.deque[_Change] = collections.deque(maxlen=history)
        self._watchers: set[Watcher] = set()
        self.rv = 1
        # Versions at or below this one can no longer be replayed to a watch.
        self._compacted = 1

    # ---- reads -----------------------------------------------------------------
    def get(self, resource: str, namespace: str, name: str) -> Obj | None:
        """The stored object or None."""
        return self._objects.get((resource, namespace, name))

    def list(self, resource: str, namespace: str | None = None) -> list[Obj]:
        """Objects of a resource (one namespace, or all), sorted by namespace and name."""
        items = [
            obj
            for (res, ns, _), obj in self._objects.items()
            if res == resource and (namespace is None or ns == namespace)
        ]
        items.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        return items

    def __iter__(self) -> Iterator[Obj]:
        return iter(list(self._objects.values()))

    # ---- writes ----------------------------------------------------------------
    def _commit(self, resource: str, typ: str, obj: Obj, prev: Obj | None) -> Obj:
        self.rv += 1
        meta = dict(obj["metadata"])
        meta["resourceVersion"] = str(self.rv)
        stored = dict(obj)
        stored["metadata"] = meta
        ns = meta.get("namespace", "")
        key = (resource, ns, meta["name"])
        if typ == "DELETED":
            self._objects.pop(key, None)
        else:
            self._objects[key] = stored
        change = _Change(resource, ns, typ, stored, prev, self.rv, Delivery(typ, stored, self.rv))
        self._history.append(change)
        if len(self._history) == self._history.maxlen:
            self._compacted = max(self._compacted, self._history[0].rv - 1)
        for watcher in list(self._watchers):
            watcher._offer(change)
        return stored

    def create(self, resource: str, obj: Obj) -> Obj:
        """Store a new object; returns it with its resourceVersion."""
        return self._commit(resource, "ADDED", obj, None)

    def update(self, resource: str, obj: Obj) -> Obj:
        """Replace an existing object (same namespace/name)."""
        meta = obj["metadata"]
        prev = self._objects.get((resource, meta.get("namespace", ""), meta["name"]))
        return self._commit(resource, "MODIFIED", obj, prev)

    def delete(self, resource: str, obj: Obj) -> Obj:
        """Remove an object; watchers get DELETED with the final state."""
        return self._commit(resource, "DELETED", obj, obj)

    def compact(self) -> None:
        """Forget the change history, so watches from older versions get 410 Expired."""
        self._history.clear()
        self._compacted = self.rv

    # ---- watches ---------------------------------------------------------------
    def watch(
        self,
        resource: str,
        namespace: str | None,
        pred: Predicate,
        since: int | None,
    ) -> Watcher:
        """Subscribe to changes after version ``since`` (None: only future changes).

        Raises :class:`Expired` when ``since`` is older than the retained history.
        """
        watcher = Watcher(self, resource, namespace, pred)
        if since is not None and since < self.rv:
            if since < self._compacted:
                raise Expired(since, self._compacted + 1)
            for change in self._history:
                if change.rv > since:
                    watcher._offer(change)
        self._watchers.add(watcher)
        return watcher

    def close_watchers(self) -> None:
        """End every open watch (server shutdown)."""
        for watcher in list(self._watchers):
            watcher.close()
