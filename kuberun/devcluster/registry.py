"""Pod storage semantics of devcluster: create, update, delete, finalizers and GC.

devcluster is a test double, not a production runtime. This is the part of
kube-apiserver's generic registry and Pod strategy that clients can observe:
generateName, AlreadyExists, dry runs, graceful deletion with
``deletionTimestamp`` first and DELETED only once the Pod's processes are gone,
preconditions, finalizers, and the garbage collector for ``ownerReferences``
that name Pods.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import logging
from typing import Any

from .apierrors import ApiError, already_exists, bad_request, conflict, invalid, not_found
from .kubelet import Kubelet
from .pods import (
    check_create_body,
    check_spec_update,
    default_pod,
    generate_name,
    now_rfc3339,
    precondition_error,
    validate_pod,
)
from .schema import POD, decode_check
from .store import Store

__all__ = ["PodRegistry"]

log = logging.getLogger("kuberun.devcluster")
Obj = dict[str, Any]

_GENERATE_ATTEMPTS = 8
_MUTABLE_META = ("labels", "annotations", "finalizers", "ownerReferences")


def decode_pod(body: Any, validation: str | None) -> tuple[Obj, list[str]]:
    """Decode a Pod body like the API server: types checked, nulls dropped, and
    ``fieldValidation`` applied to unknown fields. Returns the body and warnings."""
    unknown: list[str] = []
    decoded: Obj = decode_check(body, POD, "Pod", unknown)
    mode = (validation or "Warn").lower()
    if mode not in ("ignore", "warn", "strict"):
        raise bad_request(
            f'fieldValidation: Unsupported value: "{validation}": supported values: '
            '"Ignore", "Strict", "Warn"'
        )
    if not unknown or mode == "ignore":
        return decoded, []
    texts = [f'unknown field "{path}"' for path in unknown]
    if mode == "strict":
        raise bad_request("strict decoding error: " + ", ".join(texts))
    return decoded, texts


class PodRegistry:
    """Pods as the API server stores them, driving the node through :class:`Kubelet`."""

    def __init__(self, store: Store, kubelet: Kubelet) -> None:
        self.store = store
        self.kubelet = kubelet
        self._tasks: set[asyncio.Task[Any]] = set()
        self._gc_scheduled = False

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- create ------------------------------------------------------------------
    def create(
        self, namespace: str, body: Any, *, dry_run: bool = False, validation: str | None = None
    ) -> tuple[Obj, list[str]]:
        """Create a Pod; returns the stored object and warnings."""
        body, warnings = decode_pod(body, validation)
        check_create_body(body, namespace)
        meta = body.get("metadata") or {}
        name = meta.get("name") or ""
        prefix = meta.get("generateName") or ""
        generating = not name and bool(prefix)
        attempts = _GENERATE_ATTEMPTS if generating else 1
        for _ in range(attempts):
            pod = default_pod(body, namespace)
            if not name and prefix:
                pod["metadata"]["name"] = generate_name(prefix)
            validate_pod(pod)
            new_name = pod["metadata"]["name"]
            existing = self.store.get("pods", namespace, new_name)
            if existing is None:
                break
            if not generating:
                # The API server says so when the name is held by a Pod still terminating.
                dying = (
                    "object is being deleted: "
                    if existing["metadata"].get("deletionTimestamp")
                    else ""
                )
                raise already_exists("pods", new_name, f'{dying}pods "{new_name}" already exists')
        else:
            raise ApiError(
                409,
                "AlreadyExists",
                f'pods "{new_name}" already exists, the server was not able to generate a '
                "unique name for the object",
                {"name": new_name, "kind": "pods", "retryAfterSeconds": 1},
            )
        if dry_run:
            return pod, warnings
        stored = self.store.create("pods", pod)
        self.kubelet.admit(stored)
        if stored["metadata"].get("ownerReferences"):
            self.schedule_gc()
        return stored, warnings

    # ---- read --------------------------------------------------------------------
    def get(self, namespace: str, name: str) -> Obj:
        """The Pod or 404."""
        pod = self.store.get("pods", namespace, name)
        if pod is None:
            raise not_found("pods", name)
        return pod

    # ---- update / patch ------------------------------------------------------------
    def update(
        self,
        namespace: str,
        name: str,
        body: Any,
        *,
        dry_run: bool = False,
        validation: str | None = None,
        check_rv: bool = True,
    ) -> tuple[Obj, list[str]]:
        """Replace a Pod's mutable fields (metadata and the few mutable spec fields)."""
        current = self.get(namespace, name)
        body, warnings = decode_pod(body, validation)
        meta = body.get("metadata") or {}
        if meta.get("name") and meta["name"] != name:
            raise bad_request(
                f"the name of the object ({meta['name']}) does not match the name on the URL "
                f"({name})"
            )
        if meta.get("namespace") and meta["namespace"] != namespace:
            raise bad_request(
                "the namespace of the provided object does not match the namespace sent on "
                "the request"
            )
        rv = meta.get("resourceVersion")
        if check_rv and rv and rv != current["metadata"]["resourceVersion"]:
            raise conflict(
                "pods",
                name,
                "the object has been modified; please apply your changes to the latest version "
                "and try again",
            )
        # The body is defaulted like any decoded Pod before the immutability check.
        new_spec = default_pod({"spec": body.get("spec") or {}}, namespace)["spec"]
        check_spec_update(current, {"spec": new_spec})
        merged_spec = copy.deepcopy(current.get("spec") or {})
        for key in ("activeDeadlineSeconds", "tolerations"):
            if key in new_spec:
                merged_spec[key] = new_spec[key]
        updated = copy.deepcopy(current)
        updated["spec"] = merged_spec
        new_meta = updated["metadata"]
        for key in _MUTABLE_META:
            if meta.get(key):
                new_meta[key] = copy.deepcopy(meta[key])
            else:
                new_meta.pop(key, None)
        if new_meta.get("deletionTimestamp"):
            added = set(new_meta.get("finalizers") or []) - set(
                current["metadata"].get("finalizers") or []
            )
            if added:
                raise invalid(
                    "Pod",
                    name,
                    [
                        {
                            "reason": "FieldValueForbidden",
                            "message": "Forbidden: no new finalizers can be added if the "
                            "object is being deleted, found new finalizers "
                            + str(sorted(added)).replace("'", '"'),
                            "field": "metadata.finalizers",
                        }
                    ],
                )
        validate_pod(updated)
        if updated == current or dry_run:
            return (current if updated == current else updated), warnings
        stored = self.store.update("pods", updated)
        self.schedule_gc()
        self.maybe_remove(stored)
        return stored, warnings

    # ---- delete --------------------------------------------------------------------
    async def delete(
        self, namespace: str, name: str, options: Obj, *, dry_run: bool = False
    ) -> Obj:
        """Delete with the API server's grace-period and precondition rules."""
        pod = self.get(namespace, name)
        meta = pod["metadata"]
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != meta.get("uid"):
            raise precondition_error(name, "uid", pre["uid"], meta.get("uid", ""))
        if pre.get("resourceVersion") and pre["resourceVersion"] != meta.get("resourceVersion"):
            raise precondition_error(
                name, "resourceVersion", pre["resourceVersion"], meta.get("resourceVersion", "")
            )
        policy = options.get("propagationPolicy")
        if options.get("orphanDependents") is True and not policy:
            policy = "Orphan"
        if policy not in (None, "", "Orphan", "Background", "Foreground"):
            raise invalid(
                "DeleteOptions",
                "",
                [
                    {
                        "reason": "FieldValueNotSupported",
                        "message": f'Unsupported value: "{policy}": supported values: '
                        '"Foreground", "Background", "Orphan"',
                        "field": "propagationPolicy",
                    }
                ],
            )
        grace = options.get("gracePeriodSeconds")
        if grace is None:
            grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
        grace = int(grace)
        if grace < 0:
            grace = 1
        phase = (pod.get("status") or {}).get("phase")
        if not (pod.get("spec") or {}).get("nodeName") or phase in ("Succeeded", "Failed"):
            grace = 0
        if dry_run:
            return pod
        worker = self.kubelet.worker_for(pod)
        if meta.get("deletionTimestamp"):
            current_grace = meta.get("deletionGracePeriodSeconds")
            if current_grace is not None and grace >= int(current_grace):
                return pod
        finalizers = list(meta.get("finalizers") or [])
        wanted = {"Foreground": "foregroundDeletion", "Orphan": "orphan"}.get(policy or "")
        if wanted and wanted not in finalizers and not meta.get("deletionTimestamp"):
            finalizers.append(wanted)
        updated = copy.deepcopy(pod)
        umeta = updated["metadata"]
        when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=grace)
        umeta["deletionTimestamp"] = now_rfc3339(when)
        umeta["deletionGracePeriodSeconds"] = grace
        if finalizers:
            umeta["finalizers"] = finalizers
        if grace == 0 and not finalizers:
            # Force deletion: the object goes at once; its processes die first.
            if worker is not None:
                await asyncio.shield(worker.stop_containers(0))
                status = worker.final_status()
                if status is not None:
                    updated["status"] = status
            current = self.store.get("pods", namespace, name)
            if current is None or current["metadata"].get("uid") != meta.get("uid"):
                return updated
            updated["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            final = self.store.delete("pods", updated)
            self.kubelet.forget(meta["uid"])
            self.schedule_gc()
            return final
        stored = self.store.update("pods", updated)
        if worker is not None:
            self._spawn(self._terminate(worker, grace))
        self.schedule_gc()
        return stored

    async def _terminate(self, worker: Any, grace: int) -> None:
        await worker.stop_containers(grace)
        pod = worker.pod()
        if pod is not None:
            worker.publish()
            self.maybe_remove(worker.pod() or pod)

    def maybe_remove(self, pod: Obj) -> None:
        """Remove a deleted Pod once its processes are gone and no finalizer holds it."""
        meta = pod["metadata"]
        if not meta.get("deletionTimestamp") or meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                self.schedule_gc()
            return
        worker = self.kubelet.worker_for(pod)
        if worker is not None and not worker.terminated.is_set():
            return
        current = self.store.get("pods", meta["namespace"], meta["name"])
        if current is None or current["metadata"].get("uid") != meta.get("uid"):
            return
        self.store.delete("pods", current)
        self.kubelet.forget(meta["uid"])
        self.schedule_gc()

    # ---- garbage collection ----------------------------------------------------------
    def schedule_gc(self) -> None:
        """Run the garbage collector soon (coalesces bursts of changes)."""
        if self._gc_scheduled:
            return
        self._gc_scheduled = True
        asyncio.get_running_loop().call_soon(self._gc)

    def _gc(self) -> None:
        self._gc_scheduled = False
        try:
            self._collect()
        except Exception:  # the collector must never take the server down
            log.exception("garbage collection failed")

    def _collect(self) -> None:
        pods = self.store.list("pods")
        by_uid = {p["metadata"]["uid"]: p for p in pods}
        dependents: dict[str, list[Obj]] = {}
        for dep in pods:
            refs = _pod_owner_uids(dep)
            for uid in refs:
                dependents.setdefault(uid, []).append(dep)
            if not refs or dep["metadata"].get("deletionTimestamp"):
                continue
            alive = [by_uid[u] for u in refs if u in by_uid]
            foreground = [o for o in alive if _deleting_in_foreground(o)]
            # Deleted once no owner is left, or every remaining owner is going in
            # the foreground (the collector removes dependents first there).
            if not alive or len(foreground) == len(alive):
                self._spawn(self._gc_delete(dep))
        for pod in pods:
            meta = pod["metadata"]
            if not meta.get("deletionTimestamp"):
                continue
            fins = list(meta.get("finalizers") or [])
            uid = meta["uid"]
            if "orphan" in fins:
                for dep in dependents.get(uid, []):
                    self._strip_owner(dep, uid)
                fins.remove("orphan")
                self._set_finalizers(pod, fins)
            elif "foregroundDeletion" in fins and not dependents.get(uid):
                fins.remove("foregroundDeletion")
                self._set_finalizers(pod, fins)

    async def _gc_delete(self, pod: Obj) -> None:
        meta = pod["metadata"]
        try:
            await self.delete(
                meta["namespace"],
                meta["name"],
                {"propagationPolicy": "Background", "preconditions": {"uid": meta["uid"]}},
            )
        except ApiError:
            pass  # already gone or replaced: nothing to collect

    def _strip_owner(self, dep: Obj, owner_uid: str) -> None:
        current = self.store.get("pods", dep["metadata"]["namespace"], dep["metadata"]["name"])
        if current is None:
            return
        updated = copy.deepcopy(current)
        refs = [
            r for r in updated["metadata"].get("ownerReferences") or [] if r.get("uid") != owner_uid
        ]
        if refs:
            updated["metadata"]["ownerReferences"] = refs
        else:
            updated["metadata"].pop("ownerReferences", None)
        self.store.update("pods", updated)

    def _set_finalizers(self, pod: Obj, finalizers: list[str]) -> None:
        current = self.store.get("pods", pod["metadata"]["namespace"], pod["metadata"]["name"])
        if current is None:
            return
        updated = copy.deepcopy(current)
        if finalizers:
            updated["metadata"]["finalizers"] = finalizers
        else:
            updated["metadata"].pop("finalizers", None)
        stored = self.store.update("pods", updated)
        self.maybe_remove(stored)

    async def shutdown(self) -> None:
        """Cancel background deletions."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _pod_owner_uids(pod: Obj) -> list[str]:
    return [
        str(ref.get("uid", ""))
        for ref in pod["metadata"].get("ownerReferences") or []
        if ref.get("kind") == "Pod" and ref.get("apiVersion") == "v1"
    ]


def _deleting_in_foreground(pod: Obj) -> bool:
    meta = pod["metadata"]
    return bool(meta.get("deletionTimestamp")) and "foregroundDeletion" in (
        meta.get("finalizers") or []
    )
