"""Who deletes the Pods a gateway did not delete itself: the janitor.

A gateway deletes its users' Pods when their connections end and when it stops (SIGTERM).
One that is SIGKILLed, OOM-killed or loses its node cannot, and even a running gateway can
lose track of a deletion (a create whose answer never came, a listing that failed). Every
Pod kuberun creates carries ``kuberun.io/gateway`` with the id of the gateway instance that
made it (:func:`gateway_id`), and, when the gateway runs in a Pod (``KUBERUN_POD_NAME`` and
``KUBERUN_POD_UID`` from the downward API, :func:`gateway_pod`), a tie to that Pod
(:class:`PodOwnership`):

- **Same namespace**: an ``ownerReference`` to the gateway's Pod; the controller-manager's
  garbage collector deletes the user Pod once that Pod is gone.
- **A namespace of their own** (the layout ``deploy/`` ships): an ``ownerReference`` cannot
  point across namespaces (the collector looks the owner up in the dependent's namespace,
  does not find it, and deletes the new Pod at once), so the user Pods carry two annotations
  naming the gateway's Pod instead.

The :class:`Janitor` of a running gateway applies two policies in one loop, and owes every
deletion to the gateway's :class:`~kuberun.reaper.Reaper` (one list of debts: retries,
deadlines and the ``kuberun_pods_pending_deletion`` gauge are the same as for any Pod):

- :class:`OwnLeftovers`, in every deployment: at start-up and every :data:`JANITOR_INTERVAL`
  seconds, Pods labelled with this gateway's id that no live connection of it owns. A
  gateway restarted under the same id (a StatefulSet's stable Pod name, a fixed
  ``kubernetes.gateway_id``) finds its predecessor's Pods that way.
- :class:`VanishedGateways`, in the cross-namespace layout: at start-up and every
  :data:`SWEEP_INTERVAL` seconds, annotated Pods whose gateway Pod no longer exists (or has
  another UID), whichever gateway made them. That needs ``get`` on Pods in the gateway's
  own namespace; a gateway that lacks it says so at start and does not sweep.

Both list managed Pods the same way (:func:`managed_pods`) and leave alone user-mode Pods
(``pod.mode: user``: shared by every replica, deleted by their idle clock only).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from .config import Config
from .errors import KuberunError
from .manifests import (
    LABEL_CONNECTION_ID,
    LABEL_GATEWAY,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    id_label_value,
    managed_selector,
)
from .pods import PodController, PodRef
from .reaper import Reaper
from .workspace import LABEL_MODE

__all__ = [
    "ANNOTATION_GATEWAY_POD",
    "ANNOTATION_GATEWAY_POD_UID",
    "JANITOR_INTERVAL",
    "SWEEP_INTERVAL",
    "GatewayPod",
    "Janitor",
    "OwnLeftovers",
    "PodOwnership",
    "VanishedGateways",
    "gateway_id",
    "gateway_pod",
    "managed_pods",
]

_log = logging.getLogger("kuberun")

if TYPE_CHECKING:
    # Subscripting LoggerAdapter at run time needs Python 3.11.
    _Logger: TypeAlias = logging.Logger | logging.LoggerAdapter[logging.Logger]

#: ``namespace/name`` of the gateway Pod that created a user Pod in another namespace.
ANNOTATION_GATEWAY_POD = "kuberun.io/gateway-pod"
#: That gateway Pod's UID (a Pod recreated under the same name is another owner).
ANNOTATION_GATEWAY_POD_UID = "kuberun.io/gateway-pod-uid"
#: Seconds between two rounds for this gateway's own leftovers.
JANITOR_INTERVAL = 300.0
#: Seconds between two sweeps for Pods of vanished gateways (cross-namespace layout).
SWEEP_INTERVAL = 30.0
#: Where a Pod's ServiceAccount token mount says which namespace the Pod runs in.
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

#: Environment variables that name the gateway instance when the config does
#: not: set explicitly, or the gateway's own Pod name from the downward API.
GATEWAY_ID_ENV = ("KUBERUN_GATEWAY_ID", "KUBERUN_GATEWAY_NAME", "KUBERUN_POD_NAME")

_ephemeral_ids: dict[str, str] = {}


# -- who this gateway is ------------------------------------------------------


def gateway_id(config: Config) -> str:
    """The id of this gateway instance: the value of ``kubernetes.gateway_id``,
    else the downward API's Pod name (``KUBERUN_POD_NAME``, set in ``deploy/``),
    else the host name and the listen address.

    The default is stable across restarts of the same gateway on the same host
    and address. With port 0 (a free port, chosen anew each run) nothing is
    stable: the id then names this process, so two such gateways on one host
    never take each other's Pods for leftovers.
    """
    if config.kubernetes.gateway_id:
        return config.kubernetes.gateway_id
    for name in GATEWAY_ID_ENV:
        value = os.environ.get(name)
        if value:
            return id_label_value(value)
    host, port = config.ssh.listen_address
    base = f"{socket.gethostname()}-{host}-{port}"
    if port == 0:
        key = base
        if key not in _ephemeral_ids:
            _ephemeral_ids[key] = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        base = _ephemeral_ids[key]
    return id_label_value(base)


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


class PodOwnership:
    """How user Pods are tied to the gateway Pod ``pod`` (None: outside a Pod, no tie).

    :attr:`config` is the configuration to run the gateway with (in the cross-namespace
    layout its Pod template carries the gateway-Pod annotations); :attr:`owner` the
    ownerReference fields to give user Pods, or None; :attr:`cross_namespace` whether the
    annotations are used, so that :class:`VanishedGateways` must sweep.
    """

    def __init__(self, config: Config, pod: GatewayPod | None) -> None:
        self.pod = pod
        self.namespace = config.kubernetes.namespace
        self.owner: dict[str, str] | None = None
        self.cross_namespace = False
        self.config = config
        if pod is None:
            return
        if config.pod.mode == "user":
            # A user's Pod is shared by every replica and outlives any one of them: no
            # gateway owns it (the idle clock and the replicas' Leases decide its end).
            return
        if pod.namespace is None or pod.namespace == self.namespace:
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


# -- listing ------------------------------------------------------------------


def is_workspace(pod: Mapping[str, Any]) -> bool:
    """A user-mode Pod: shared by every replica, only the idle clock deletes it."""
    return bool((pod.get("metadata", {}).get("labels") or {}).get(LABEL_MODE) == "user")


async def managed_pods(
    controller: PodController, namespace: str, selector: str, deadline: float
) -> list[dict[str, Any]]:
    """The Pods matching ``selector`` a janitor may delete: managed by kuberun (checked
    again, against an API server that ignores label selectors), with a UID (the deletion's
    precondition), not being deleted already, and not user-mode workspaces.

    :raises KuberunError: if the Pods cannot be listed by ``deadline``
    """
    pods = await controller.list_pods(namespace, selector, deadline)
    found = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get(LABEL_MANAGED_BY) != MANAGED_BY or not meta.get("uid"):
            continue
        if meta.get("deletionTimestamp") or is_workspace(pod):
            continue
        found.append(pod)
    return found


def _ref(namespace: str, pod: Mapping[str, Any]) -> PodRef:
    meta = pod["metadata"]
    return PodRef(namespace, str(meta.get("name") or ""), str(meta["uid"]))


# -- the two policies ---------------------------------------------------------


class OwnLeftovers:
    """Pods labelled with this gateway's id that belong to none of its live connections.

    :param live: the connection ids of the gateway's open connections
    :param keep: optional; True for a Pod that must stay although no live
        connection owns it
    """

    def __init__(
        self,
        controller: PodController,
        reaper: Reaper,
        namespace: str,
        gateway: str,
        *,
        live: Callable[[], set[str]],
        keep: Callable[[Mapping[str, Any]], bool] | None = None,
        logger: _Logger = _log,
    ) -> None:
        self._controller = controller
        self._reaper = reaper
        self._namespace = namespace
        self._gateway = id_label_value(gateway)
        self._live = live
        self._keep = keep
        self._logger = logger

    async def find(self, deadline: float) -> list[PodRef]:
        """The leftovers now, owed already or not."""
        selector = managed_selector(gateway=self._gateway)
        pods = await managed_pods(self._controller, self._namespace, selector, deadline)
        live = {id_label_value(i) for i in self._live()}
        found = []
        for pod in pods:
            labels = pod["metadata"].get("labels") or {}
            # The selector already says so; a second look guards against an API server
            # that ignores label selectors.
            if labels.get(LABEL_GATEWAY) != self._gateway:
                continue
            if labels.get(LABEL_CONNECTION_ID) in live:
                continue
            if self._keep is not None and self._keep(pod):
                continue
            found.append(_ref(self._namespace, pod))
        return found

    async def sweep(self, deadline: float) -> list[PodRef]:
        """Owe the deletion of every leftover not owed yet; returns those."""
        return self.owe(await self.find(deadline))

    def owe(self, refs: list[PodRef]) -> list[PodRef]:
        """Owe the deletion of each of ``refs`` not owed yet; returns those."""
        owed = []
        for ref in refs:
            if self._reaper.owes(ref):
                continue
            self._logger.info("janitor: deleting leftover Pod %s", ref.name)
            self._reaper.owe(ref)
            owed.append(ref)
        return owed


class VanishedGateways:
    """Annotated Pods (cross-namespace layout) whose gateway Pod is gone.

    :param pod: this gateway's own Pod, whose namespace the gateway Pods are looked up in
    :param timeout: seconds one lookup, and the wait for the deletions of one sweep, may take
    """

    def __init__(
        self,
        controller: PodController,
        reaper: Reaper,
        namespace: str,
        pod: GatewayPod,
        *,
        timeout: float,
        logger: _Logger = _log,
    ) -> None:
        self._controller = controller
        self._reaper = reaper
        self._namespace = namespace
        self._pod = pod
        self._timeout = timeout
        self._logger = logger

    async def check(self) -> bool:
        """Say how the Pods are collected; False if this gateway may not look gateway Pods
        up (then sweeping is pointless, and the log says what to grant)."""
        self._logger.info(
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
                self._pod.namespace or "", self._pod.name, time.monotonic() + self._timeout
            )
        except KuberunError as exc:
            if getattr(exc, "status", None) == 403:
                self._logger.warning(
                    "the janitor may not read Pods in namespace %r (%s), so it cannot tell "
                    "which gateways are gone: the Pods of a gateway killed without SIGTERM "
                    "will stay. Grant 'get' on pods there (deploy/rbac.yaml: kuberun-janitor)",
                    self._pod.namespace,
                    exc,
                )
                return False
            self._logger.warning("janitor: reading this gateway's own Pod failed: %s", exc)
        return True

    async def sweep(self) -> int:
        """Owe the deletion of the Pods whose gateway Pod is gone and wait (up to
        ``timeout``) for it; returns how many were deleted."""
        deadline = time.monotonic() + self._timeout
        owners: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for pod in await managed_pods(
            self._controller, self._namespace, managed_selector(), deadline
        ):
            annotations = pod["metadata"].get("annotations") or {}
            where, uid = (
                annotations.get(ANNOTATION_GATEWAY_POD),
                annotations.get(ANNOTATION_GATEWAY_POD_UID),
            )
            if where and uid:
                owners.setdefault((where, uid), []).append(pod)
        owed = []
        for (where, uid), pods in owners.items():
            if await self._gateway_alive(where, uid):
                continue
            for pod in pods:
                ref = _ref(self._namespace, pod)
                if not self._reaper.owes(ref):
                    self._logger.info(
                        "janitor: deleting Pod %s: its gateway Pod %s is gone", ref.name, where
                    )
                    self._reaper.owe(ref)
                owed.append(ref)
        settled = await asyncio.gather(*(self._reaper.settle(r, self._timeout) for r in owed))
        return sum(settled)

    async def _gateway_alive(self, where: str, uid: str) -> bool:
        namespace, _, name = where.partition("/")
        try:
            pod = await self._controller.get(namespace, name, time.monotonic() + self._timeout)
        except KuberunError as exc:
            # Only a definite "not found" condemns; anything else leaves the Pods alone.
            return getattr(exc, "status", None) != 404
        return bool(pod.get("metadata", {}).get("uid") == uid)


# -- the loop -----------------------------------------------------------------


class Janitor:
    """The janitor of one gateway: :class:`OwnLeftovers` always, :class:`VanishedGateways`
    when ``ownership`` says user Pods are annotated; one loop; deletions owed to ``reaper``.

    :param live: the connection ids of the gateway's open connections
    :param keep: optional; True for a Pod of this gateway that must stay although no live
        connection owns it
    :param list_timeout: seconds one listing (one lookup) may take, retries included
    :param ownership: how this gateway's user Pods are tied to its Pod, if it runs in one
    """

    def __init__(
        self,
        controller: PodController,
        reaper: Reaper,
        namespace: str,
        gateway: str,
        *,
        live: Callable[[], set[str]],
        keep: Callable[[Mapping[str, Any]], bool] | None = None,
        list_timeout: float = 30.0,
        logger: _Logger | None = None,
        ownership: PodOwnership | None = None,
    ) -> None:
        self._logger = logger or _log
        self._list_timeout = list_timeout
        self._ownership = ownership
        #: This gateway's own leftovers.
        self.leftovers = OwnLeftovers(
            controller, reaper, namespace, gateway, live=live, keep=keep, logger=self._logger
        )
        #: Pods of vanished gateway Pods; None unless this gateway sweeps for them.
        self.vanished: VanishedGateways | None = None
        if ownership is not None and ownership.cross_namespace and ownership.pod is not None:
            self.vanished = VanishedGateways(
                controller,
                reaper,
                namespace,
                ownership.pod,
                timeout=list_timeout,
                logger=self._logger,
            )
        self._reaper = reaper
        self._failing: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def sweep(self, timeout: float | None = None) -> list[PodRef]:
        """One round of :class:`OwnLeftovers`: owe the deletion of every leftover; returns them.

        :raises KuberunError: if the Pods cannot be listed within ``timeout``
            (default ``list_timeout``)
        """
        return await self.leftovers.sweep(self._deadline(timeout))

    async def round(self, timeout: float | None = None) -> bool:
        """:meth:`sweep`, with a failure logged (once while it lasts); True if it listed."""
        return await self._logged("this gateway's Pods", self.sweep(timeout))

    async def collect_leftovers(self, timeout: float | None = None) -> list[PodRef]:
        """Owe the deletion of every leftover and wait (up to ``timeout``) for it; returns
        those still owed."""
        refs = await self.leftovers.find(self._deadline(timeout))
        self.leftovers.owe(refs)
        wait = self._list_timeout if timeout is None else timeout
        await asyncio.gather(*(self._reaper.settle(ref, wait) for ref in refs))
        return [ref for ref in refs if self._reaper.owes(ref)]

    async def start(self, interval: float = JANITOR_INTERVAL, timeout: float | None = None) -> bool:
        """The first round (within ``timeout``), the start-up checks, then the loop:
        :class:`OwnLeftovers` every ``interval`` seconds, :class:`VanishedGateways` at
        once and every :data:`SWEEP_INTERVAL`. Returns whether the first round could list
        Pods (False: the API server cannot be reached now)."""
        reachable = await self.round(timeout)
        ownership = self._ownership
        if ownership is not None and ownership.pod is not None and ownership.pod.namespace is None:
            self._logger.warning(
                "cannot tell which namespace this gateway's Pod is in (no "
                "KUBERUN_POD_NAMESPACE, no ServiceAccount mount): user Pods get an "
                "ownerReference to it, which the garbage collector honours only if "
                "kubernetes.namespace (%r) is that namespace; set KUBERUN_POD_NAMESPACE "
                "from the downward API (deploy/deployment.yaml)",
                ownership.namespace,
            )
        if self.vanished is not None and not await self.vanished.check():
            self.vanished = None
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run(interval))
        return reachable

    async def stop(self) -> None:
        """Stop the loop."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self, interval: float) -> None:
        # Each policy keeps its own schedule; the loop sleeps until the next one is due.
        now = time.monotonic()
        due = {"leftovers": now + interval, "vanished": now}
        while True:
            now = time.monotonic()
            if self.vanished is not None and due["vanished"] <= now:
                what = "Pods for vanished gateways"
                await self._surviving(what, self._logged(what, self.vanished.sweep()))
                due["vanished"] = time.monotonic() + SWEEP_INTERVAL
            if due["leftovers"] <= now:
                await self._surviving("this gateway's Pods", self.round())
                due["leftovers"] = time.monotonic() + interval
            nxt = due["leftovers"] if self.vanished is None else min(due.values())
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))

    async def _surviving(self, what: str, sweep: Awaitable[object]) -> None:
        """Await ``sweep``: the loop must outlive any one failure."""
        try:
            await sweep
        except Exception:
            self._logger.exception("janitor: looking for %s failed", what)

    async def _logged(self, what: str, sweep: Awaitable[object]) -> bool:
        """Await ``sweep``; a failure to list is logged once while it lasts. True if it listed."""
        try:
            await sweep
        except KuberunError as exc:
            level = logging.DEBUG if what in self._failing else logging.WARNING
            self._failing.add(what)
            self._logger.log(level, "janitor could not list %s: %s", what, exc)
            return False
        if what in self._failing:
            self._failing.discard(what)
            self._logger.info("janitor: listing Pods works again")
        return True

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (timeout if timeout is not None else self._list_timeout)
