"""Who collects a gateway's Pods when the gateway dies without deleting them.

A gateway deletes its users' Pods when it stops (SIGTERM); one that is SIGKILLed, OOM-killed or
loses its node cannot. In a cluster the gateway runs as a Pod (``KUBERUN_POD_NAME`` and
``KUBERUN_POD_UID`` from the downward API) and its user Pods are collected by one of two means:

- **Same namespace**: each user Pod carries an ``ownerReference`` to the gateway's Pod, and the
  controller-manager's garbage collector deletes it once that Pod is gone.
- **A namespace of their own** (the layout ``deploy/`` ships): an ``ownerReference`` cannot point
  across namespaces (the collector looks the owner up in the dependent's namespace, does not find
  it, and deletes the new Pod at once). The user Pods carry two annotations naming the gateway's
  Pod instead, and every running gateway sweeps: at start and every :data:`SWEEP_INTERVAL`
  seconds it deletes the annotated Pods whose gateway Pod no longer exists (or has another UID).
  That needs ``get`` on Pods in the gateway's own namespace; a gateway that lacks it says so at
  start.

Independently, at start a gateway in a Pod deletes Pods labelled with its own name (a gateway
Pod restarted under a stable name, as in a StatefulSet, finds its predecessor's Pods that way).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import Config
from .errors import KuberunError
from .manifests import LABEL_GATEWAY, LABEL_MANAGED_BY, MANAGED_BY, id_label_value, managed_selector
from .pods import PodController, PodRef
from .workspace import LABEL_MODE

__all__ = [
    "ANNOTATION_GATEWAY_POD",
    "ANNOTATION_GATEWAY_POD_UID",
    "SWEEP_INTERVAL",
    "Janitor",
    "gateway_pod",
]

_log = logging.getLogger("kuberun")

#: ``namespace/name`` of the gateway Pod that created a user Pod in another namespace.
ANNOTATION_GATEWAY_POD = "kuberun.io/gateway-pod"
#: That gateway Pod's UID (a Pod recreated under the same name is another owner).
ANNOTATION_GATEWAY_POD_UID = "kuberun.io/gateway-pod-uid"
#: Seconds between two sweeps for Pods of vanished gateways (cross-namespace layout).
SWEEP_INTERVAL = 30.0
#: Where a Pod's ServiceAccount token mount says which namespace the Pod runs in.
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclasses.dataclass(frozen=True)
class GatewayPod:
    """The Pod this gateway runs in, from the downward API."""

    name: str
    uid: str
    namespace: str | None


def gateway_pod(env: Mapping[str, str] = os.environ) -> GatewayPod | None:
    """The gateway's own Pod: ``KUBERUN_POD_NAME``/``_UID``/``_NAMESPACE`` (or the
    ServiceAccount mount's namespace file); None outside a Pod."""
    name, uid = env.get("KUBERUN_POD_NAME"), env.get("KUBERUN_POD_UID")
    if not (name and uid):
        return None
    namespace = env.get("KUBERUN_POD_NAMESPACE")
    if not namespace:
        try:
            namespace = _SA_NAMESPACE.read_text().strip() or None
        except OSError:
            namespace = None
    return GatewayPod(name, uid, namespace)


def is_workspace(pod: Mapping[str, Any]) -> bool:
    """A user-mode Pod: shared by every replica, only the idle clock deletes it."""
    return bool((pod.get("metadata", {}).get("labels") or {}).get(LABEL_MODE) == "user")


class Janitor:
    """Decides how this gateway's Pods are collected and does the collecting it owns.

    :attr:`config` is the configuration to run the gateway with (in the cross-namespace layout
    its Pod template carries the gateway-Pod annotations); :attr:`owner` the ownerReference
    fields to give user Pods, or None.
    """

    def __init__(
        self, config: Config, api_client: Any, pod: GatewayPod | None, name: str | None
    ) -> None:
        self._controller = PodController(api_client, logger=_log)
        self._pod = pod
        self._name = name
        self._namespace = config.kubernetes.namespace
        self._timeout = config.timeouts.pod_stop
        self._task: asyncio.Task[None] | None = None
        self.owner: dict[str, str] | None = None
        self.cross_namespace = False
        self.config = config
        if pod is None:
            return
        if config.pod.mode == "user":
            # A user's Pod is shared by every replica and outlives any one of them: no
            # gateway owns it (the idle clock and the replicas' Leases decide its end).
            return
        if pod.namespace is None or pod.namespace == self._namespace:
            self.owner = {"apiVersion": "v1", "kind": "Pod", "name": pod.name, "uid": pod.uid}
            return
        self.cross_namespace = True
        metadata = dict(config.pod.metadata)
        metadata["annotations"] = {
            **(metadata.get("annotations") or {}),
            ANNOTATION_GATEWAY_POD: f"{pod.namespace}/{pod.name}",
            ANNOTATION_GATEWAY_POD_UID: pod.uid,
        }
        self.config = dataclasses.replace(
            config, pod=dataclasses.replace(config.pod, metadata=metadata)
        )

    async def start(self) -> None:
        """Collect leftovers once; in the cross-namespace layout, keep sweeping."""
        if self._pod is not None:
            await self.collect_leftovers()
            if self._pod.namespace is None:
                _log.warning(
                    "cannot tell which namespace this gateway's Pod is in (no "
                    "KUBERUN_POD_NAMESPACE, no ServiceAccount mount): user Pods get an "
                    "ownerReference to it, which the garbage collector honours only if "
                    "kubernetes.namespace (%r) is that namespace; set KUBERUN_POD_NAMESPACE "
                    "from the downward API (deploy/deployment.yaml)",
                    self._namespace,
                )
        if not self.cross_namespace:
            return
        assert self._pod is not None and self._pod.namespace is not None
        _log.info(
            "user Pods run in namespace %r, the gateway in %r: they carry the annotation %s "
            "instead of an ownerReference (which cannot cross namespaces), and every gateway "
            "deletes those of vanished gateways every %.0f s",
            self._namespace,
            self._pod.namespace,
            ANNOTATION_GATEWAY_POD,
            SWEEP_INTERVAL,
        )
        try:
            await self._controller.get(
                self._pod.namespace, self._pod.name, time.monotonic() + self._timeout
            )
        except KuberunError as exc:
            if getattr(exc, "status", None) == 403:
                _log.warning(
                    "the janitor may not read Pods in namespace %r (%s), so it cannot tell "
                    "which gateways are gone: the Pods of a gateway killed without SIGTERM "
                    "will stay. Grant 'get' on pods there (deploy/rbac.yaml: kuberun-janitor)",
                    self._pod.namespace,
                    exc,
                )
                return
            _log.warning("janitor: reading this gateway's own Pod failed: %s", exc)
        self._task = asyncio.create_task(self._sweep_forever(), name="kuberun-janitor")

    async def close(self) -> None:
        """Stop sweeping."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def collect_leftovers(self) -> None:
        """Delete Pods labelled for this gateway's name (no live connection owns them yet)."""
        name = self._name
        if not name:
            return
        pods = await self._list(managed_selector(gateway=name))
        for pod in pods:
            labels = pod.get("metadata", {}).get("labels") or {}
            # The selector already says so; a second look guards against an API server
            # that ignores label selectors.
            if labels.get(LABEL_GATEWAY) == id_label_value(name) and not is_workspace(pod):
                await self._delete(pod, "leftover Pod of this gateway")

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # the sweep must outlive any one failure
                _log.exception("janitor sweep failed")
            await asyncio.sleep(SWEEP_INTERVAL)

    async def sweep(self) -> int:
        """Delete the Pods whose gateway Pod is gone; returns how many were deleted."""
        owners: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for pod in await self._list(managed_selector()):
            annotations = pod.get("metadata", {}).get("annotations") or {}
            where, uid = (
                annotations.get(ANNOTATION_GATEWAY_POD),
                annotations.get(ANNOTATION_GATEWAY_POD_UID),
            )
            if where and uid and not is_workspace(pod):
                owners.setdefault((where, uid), []).append(pod)
        deleted = 0
        for (where, uid), pods in owners.items():
            if await self._gateway_alive(where, uid):
                continue
            for pod in pods:
                deleted += await self._delete(pod, f"its gateway Pod {where} is gone")
        return deleted

    async def _gateway_alive(self, where: str, uid: str) -> bool:
        namespace, _, name = where.partition("/")
        try:
            pod = await self._controller.get(namespace, name, time.monotonic() + self._timeout)
        except KuberunError as exc:
            # Only a definite "not found" condemns; anything else leaves the Pods alone.
            return getattr(exc, "status", None) != 404
        return bool(pod.get("metadata", {}).get("uid") == uid)

    async def _list(self, selector: str) -> list[dict[str, Any]]:
        try:
            pods = await self._controller.list_pods(
                self._namespace, selector, time.monotonic() + self._timeout
            )
        except KuberunError as exc:
            _log.warning("janitor could not list Pods: %s", exc)
            return []
        return [
            p
            for p in pods
            if (p.get("metadata", {}).get("labels") or {}).get(LABEL_MANAGED_BY) == MANAGED_BY
            and p.get("metadata", {}).get("uid")
        ]

    async def _delete(self, pod: Mapping[str, Any], why: str) -> int:
        meta = pod["metadata"]
        _log.info("janitor: deleting Pod %s: %s", meta.get("name"), why)
        ref = PodRef(self._namespace, meta.get("name", ""), meta["uid"])
        return int(await self._controller.delete(ref, self._timeout))
