"""User mode (``pod.mode: user``): one Pod per user, shared by every gateway replica.

The Kubernetes API server is the only coordinator. The protocol, in short (the
README's "Workspaces" section says why it is safe):

* **Name.** A user's Pod is named ``pod.metadata.generateName`` + the DNS-safe
  username (or ``pod.metadata.name`` with ``{username}`` in it), so every
  replica computes the same name and the API server's "one object per name"
  rule makes creation race-free: one create wins, the others get 409 and join.
* **Claims.** A replica with connections to the Pod holds the annotation
  ``claims.kuberun.io/<its Lease name>``; it is written in the create itself or
  by a merge patch carrying the ``resourceVersion`` just read, and removed the
  same way when its last connection closes. Every write on a user Pod is thus
  a compare-and-swap on its resourceVersion.
* **Liveness.** A claim is live while its replica's Lease is
  (:mod:`kuberun.replicas`); a replica that cannot renew drops its claims and
  ends its user sessions before peers can see its Lease expire.
* **Idle deletion.** Every replica lists the user Pods periodically. A Pod
  without live claims starts an idle clock *at the resourceVersion seen*; a
  replica that has seen that same resourceVersion, still without live claims,
  for ``pod.idle_timeout`` deletes it with ``preconditions: {uid,
  resourceVersion}``. Any claim written meanwhile changed the resourceVersion,
  so the delete fails (409) instead of taking the Pod from under a connection.
* **Never reused:** a Pod that is terminating is waited out, one that has
  failed or succeeded is deleted, and a fresh one is created in its place.

Nothing here deletes a user Pod on disconnect or on gateway shutdown: a
stopping replica releases its claims and leaves the idle clock to decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from kubernetes_asyncio import client as k8s

from ._cancel import cancel_and_wait
from .errors import KubernetesAPIError, PodStartError, PodStartTimeout
from .manifests import (
    LABEL_CONNECTION_ID,
    LABEL_MANAGED_BY,
    LABEL_USERNAME,
    MANAGED_BY,
    USERNAME_PLACEHOLDER,
    build_pod,
    dns_safe_username,
    label_selector,
)
from .pods import PodController, PodRef, json_body, pod_ips, pod_progress
from .reaper import Reaper
from .replicas import MERGE_PATCH, ReplicaLease

if TYPE_CHECKING:
    from .audit import PodAudit
    from .config import Config

__all__ = [
    "ANNOTATION_IDLE_TIMEOUT",
    "CLAIM_PREFIX",
    "LABEL_MODE",
    "WorkspaceClaim",
    "WorkspaceManager",
    "user_pod_selector",
    "workspace_name",
]

LABEL_MODE = "kuberun.io/mode"
#: Annotation key prefix of a replica's claim; the rest of the key is its Lease name.
CLAIM_PREFIX = "claims.kuberun.io/"
#: The idle timeout the Pod was created with: every replica honours the Pod's own.
ANNOTATION_IDLE_TIMEOUT = "kuberun.io/idle-timeout"

ProgressListener = Callable[[str], None]


def user_pod_selector() -> str:
    """The label selector of every user-mode Pod kuberun manages."""
    return label_selector({LABEL_MANAGED_BY: MANAGED_BY, LABEL_MODE: "user"})


def workspace_name(metadata: Mapping[str, Any], username: str) -> str:
    """The deterministic name of ``username``'s Pod.

    ``metadata.name`` (with ``{username}`` replaced) if the template sets one,
    else ``metadata.generateName`` + the DNS-safe username.
    """
    safe = dns_safe_username(username)
    name = metadata.get("name")
    if isinstance(name, str) and name:
        return name.replace(USERNAME_PLACEHOLDER, safe)
    prefix = str(metadata.get("generateName") or "kuberun-").replace(USERNAME_PLACEHOLDER, safe)
    return prefix + safe


def _claims(pod: Mapping[str, Any]) -> dict[str, str]:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return {
        key[len(CLAIM_PREFIX) :]: str(value)
        for key, value in annotations.items()
        if key.startswith(CLAIM_PREFIX)
    }


def _is_dead(pod: Mapping[str, Any]) -> bool:
    """Terminating, failed or succeeded: never to be reused."""
    meta = pod.get("metadata") or {}
    phase = (pod.get("status") or {}).get("phase")
    return bool(meta.get("deletionTimestamp")) or phase in ("Failed", "Succeeded")


@dataclass
class _Workspace:
    """This replica's hold on one user's Pod."""

    name: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    uid: str = ""  # the Pod our claim is on ("" when we hold none)
    gone: bool = False  # the reaper saw that Pod deleted or terminating
    since: float = 0.0  # when our claim was taken (monotonic)
    claims: set[WorkspaceClaim] = field(default_factory=set)
    ready: asyncio.Task[PodRef] | None = None
    lines: list[str] = field(default_factory=list)
    listeners: list[ProgressListener] = field(default_factory=list)

    def report(self, line: str, logger: Any) -> None:
        self.lines.append(line)
        for listener in list(self.listeners):
            try:
                listener(line)
            except Exception:  # a closed channel must not break the Pod start
                logger.debug("progress listener failed", exc_info=True)


@dataclass
class _Idle:
    uid: str
    version: str
    since: float


class WorkspaceManager:
    """User-mode Pods of one gateway process: claims, the replica Lease, idle deletion.

    One per gateway (:class:`kuberun.Gateway` makes it); connections get a
    :class:`WorkspaceClaim` each from :meth:`claim`. It starts on first use
    and must be stopped with :meth:`stop` (which releases nothing by itself:
    close the connections first, their claims are released then).
    """

    def __init__(
        self,
        api_client: k8s.ApiClient,
        config: Config,
        *,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
        metrics: Any = None,
        identity: str | None = None,
        track: Callable[[asyncio.Task[Any]], None] | None = None,
        debts: Reaper | None = None,
    ) -> None:
        self.config = config
        # The gateway's to-delete list, for a user Pod that failed to start.
        self._debts = debts
        self.namespace = config.kubernetes.namespace
        self.logger = logger
        self.metrics = metrics
        self._track = track
        requests = metrics.backend_requests if metrics is not None else None
        failures = metrics.backend_failures if metrics is not None else None
        self.controller = PodController(
            api_client, logger=logger, requests_counter=requests, failures_counter=failures
        )
        self.lease = ReplicaLease(
            self.controller,
            api_client,
            self.namespace,
            config.pod.lease_duration,
            logger=logger,
            metrics=metrics,
            identity=identity,
        )
        self.lease.on_lost = self._lease_lost
        self.claim_key = CLAIM_PREFIX + self.lease.name
        self._workspaces: dict[str, _Workspace] = {}
        self._idle: dict[str, _Idle] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------

    @property
    def reap_interval(self) -> float:
        """Seconds between two looks at the user Pods."""
        pod = self.config.pod
        return max(0.2, min(pod.idle_timeout / 4, pod.lease_duration / 3, 10.0))

    def begin(self) -> None:
        """Start the replica Lease and the idle reaper without waiting (idempotent).

        A gateway calls this when it starts: its reaper must run even if no user
        ever connects to it, or the Pods of replicas gone before it would stay.
        """
        if self._stopped:
            return
        self.lease.begin()
        if self._reaper is None:
            self._reaper = asyncio.ensure_future(self._reap_loop())

    async def start(self, deadline: float) -> None:
        """:meth:`begin`, then wait until the replica Lease exists."""
        if self._stopped:
            raise PodStartError("the gateway is shutting down", "Closed")
        self.begin()
        await self.lease.start(deadline)

    async def stop(self) -> None:
        """Stop the reaper and delete the replica Lease. Claims still held (connections
        still open) are released first, best effort within ``timeouts.pod_stop``."""
        self._stopped = True
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
        held = [ws for ws in self._workspaces.values() if ws.uid]
        if held:
            deadline = time.monotonic() + self.config.timeouts.pod_stop
            await asyncio.gather(
                *(self._release_locked(ws, deadline) for ws in held), return_exceptions=True
            )
        await self.lease.stop(self.config.timeouts.pod_stop)

    def claim(
        self,
        username: str,
        *,
        connection_id: str,
        client_address: str | None = None,
        on_lost: Callable[[str], None] | None = None,
        audit: PodAudit | None = None,
    ) -> WorkspaceClaim:
        """A claim on ``username``'s Pod for one connection (not yet taken: see
        :meth:`WorkspaceClaim.start`). ``audit`` gets ``pod.created`` (this connection
        created the Pod), ``pod.reused`` (it joined one) or ``pod.failed``."""
        return WorkspaceClaim(self, username, connection_id, client_address, on_lost, audit)

    # -- the manifest -----------------------------------------------------------

    def _manifest(self, username: str, connection_id: str, address: str | None) -> dict[str, Any]:
        pod = build_pod(
            self.config.pod,
            connection_id=connection_id,
            username=username,
            client_address=address,
        )
        meta = pod["metadata"]
        meta.pop("generateName", None)
        meta["name"] = workspace_name(self.config.pod.metadata, username)
        labels = meta["labels"]
        # Not one connection's Pod, and no gateway's: neither label applies.
        labels.pop(LABEL_CONNECTION_ID, None)
        labels[LABEL_MODE] = "user"
        labels[LABEL_USERNAME] = dns_safe_username(username)
        meta["annotations"][ANNOTATION_IDLE_TIMEOUT] = f"{self.config.pod.idle_timeout:g}"
        meta["annotations"][self.claim_key] = "1"
        return pod

    # -- claiming -------------------------------------------------------------

    async def _attach(self, claim: WorkspaceClaim, deadline: float) -> _Workspace:
        manifest = self._manifest(claim.username, claim.connection_id, claim.client_address)
        name = manifest["metadata"]["name"]
        ws = self._workspaces.setdefault(name, _Workspace(name))
        async with ws.lock:
            if ws.uid and not (ws.gone or ws.ready is None or _failed(ws.ready)):
                # Joining a Pod we hold costs one read: it may have ended meanwhile.
                current = await self._get(name, deadline)
                if current is None or current["metadata"].get("uid") != ws.uid or _is_dead(current):
                    ws.gone = True
            if ws.uid and (ws.gone or ws.ready is None or _failed(ws.ready)):
                # The Pod we held is gone, has ended or will never be ready: never reuse it.
                self._forget(ws)
            if ws.uid:
                ws.claims.add(claim)
                self._count_reuse()
                return ws
            await self.start(deadline)
            await self.lease.wait_healthy(deadline)
            pod, created = await self._take(manifest, deadline)
            meta = pod["metadata"]
            ws.uid = str(meta.get("uid") or "")
            ws.gone = False
            ws.since = time.monotonic()
            ws.claims.add(claim)
            ws.lines = []
            if self.metrics is not None:
                self.metrics.user_pods_claimed.inc()
            if not self.lease.healthy:
                # The Lease lapsed while we claimed: peers may not honour the claim.
                await self._release(ws, deadline)
                raise PodStartError("this gateway cannot renew its Lease", "LeaseLost")
            ref = PodRef(self.namespace, name, ws.uid)
            claim.created = created
            verb = "created" if created else "joined"
            ws.report(f"Pod {name} {verb}, {pod_progress(pod)}", self.logger)
            ws.ready = asyncio.ensure_future(self._wait_ready(ws, ref, pod))
            ws.ready.add_done_callback(_consume)
            if created and self.metrics is not None:
                self.metrics.pods_created.inc()
            if not created:
                self._count_reuse()
            return ws

    def _forget(self, ws: _Workspace) -> None:
        """Drop our hold on a Pod without writing to it (it is gone or useless)."""
        ws.claims.clear()
        ws.uid, ws.ready, ws.gone = "", None, False
        if self.metrics is not None:
            self.metrics.user_pods_claimed.dec()

    def _count_reuse(self) -> None:
        if self.metrics is not None:
            self.metrics.user_pods_reused.inc()

    async def _take(self, manifest: dict[str, Any], deadline: float) -> tuple[dict[str, Any], bool]:
        """Create the user's Pod with our claim in it, or claim the one that exists.

        Returns the Pod and whether this call created it.
        """
        name = manifest["metadata"]["name"]
        api = self.controller.api

        async def create() -> dict[str, Any]:
            return await json_body(
                api.create_namespaced_pod(
                    self.namespace, cast(Any, manifest), _preload_content=False
                )
            )

        while True:
            try:
                return await self.controller.call(f"create Pod {name}", deadline, create), True
            except KubernetesAPIError as exc:
                if exc.status != 409:
                    raise PodStartError(f"cannot create the Pod: {exc}", exc.reason) from exc
            pod = await self._get(name, deadline)
            if pod is None:
                continue  # gone between our create and our read: create again
            if _is_dead(pod):
                await self._replace(pod, deadline)
                continue
            patched = await self._write_claims(pod, add=True, deadline=deadline)
            if patched is not None:
                return patched, False

    async def _get(self, name: str, deadline: float) -> dict[str, Any] | None:
        try:
            return await self.controller.get(self.namespace, name, deadline)
        except KubernetesAPIError as exc:
            if exc.status == 404:
                return None
            raise

    async def _replace(self, pod: dict[str, Any], deadline: float) -> None:
        """Wait until a terminating Pod is gone; delete one that has ended first."""
        meta = pod["metadata"]
        name, uid = meta["name"], meta.get("uid") or ""
        if not meta.get("deletionTimestamp"):
            self.logger.info("Pod %s has ended (%s): replacing it", name, pod_progress(pod))
            await self.controller.delete(
                PodRef(self.namespace, name, uid), max(1.0, deadline - time.monotonic())
            )
        delay = 0.1
        while time.monotonic() < deadline:
            current = await self._get(name, deadline)
            if current is None or (current["metadata"].get("uid") or "") != uid:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        raise PodStartTimeout(f"Pod {name} is still terminating", "Timeout")

    async def _write_claims(
        self, pod: dict[str, Any], *, add: bool, deadline: float
    ) -> dict[str, Any] | None:
        """Add (or remove) our claim with the Pod's resourceVersion as precondition.

        When adding, claims of replicas whose Lease is no longer alive are
        dropped in the same write. Returns the patched Pod, or None when the
        Pod changed (409) or vanished (404) since it was read: read it again.
        """
        meta = pod["metadata"]
        annotations: dict[str, str | None] = {self.claim_key: "1" if add else None}
        if add:
            for lease in _claims(pod):
                if lease != self.lease.name and not self.lease.alive(lease):
                    annotations[CLAIM_PREFIX + lease] = None
        body = {
            "metadata": {"resourceVersion": meta["resourceVersion"], "annotations": annotations}
        }
        api = self.controller.api

        async def patch() -> dict[str, Any]:
            return await json_body(
                api.patch_namespaced_pod(
                    meta["name"],
                    self.namespace,
                    body,
                    **MERGE_PATCH,
                    _preload_content=False,
                )
            )

        try:
            return await self.controller.call(f"claim Pod {meta['name']}", deadline, patch)
        except KubernetesAPIError as exc:
            if exc.status == 409:
                self._conflict("claim" if add else "release")
                return None
            if exc.status == 404:
                return None
            raise

    def _conflict(self, operation: str) -> None:
        if self.metrics is not None:
            self.metrics.claim_conflicts.labels(operation=operation).inc()

    async def _wait_ready(self, ws: _Workspace, ref: PodRef, pod: dict[str, Any]) -> PodRef:
        started = time.monotonic()
        deadline = started + self.config.timeouts.pod_start
        try:
            ready = await self.controller.wait_ready(
                pod, deadline, lambda line: ws.report(line, self.logger)
            )
        except (PodStartError, KubernetesAPIError) as exc:
            reason = getattr(exc, "reason", "") or "Error"
            if self.metrics is not None:
                self.metrics.pod_start_failures.labels(reason=reason).inc()
            # It will not become ready: nobody can use it, so the next connection gets a
            # new one (the delete names its UID, so a replacement is never hit).
            if reason not in ("Deleted", "Timeout"):
                if self._debts is not None:
                    self._debts.owe(ref)
                else:
                    self._spawn(self.controller.delete(ref, self.config.timeouts.pod_stop))
            if isinstance(exc, KubernetesAPIError):
                raise PodStartError(f"cannot start the Pod: {exc}", exc.reason) from exc
            raise
        if self.metrics is not None and ready.get("metadata", {}).get("uid") == ref.uid:
            self.metrics.pod_start_seconds.observe(time.monotonic() - started)
        ws.report(f"Pod {ref.name} is ready", self.logger)
        return dataclasses.replace(ref, ips=pod_ips(ready))  # forwards may name its IPs

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_consume)
        if self._track is not None:
            self._track(task)

    # -- releasing ------------------------------------------------------------

    async def _detach(self, claim: WorkspaceClaim, name: str) -> None:
        ws = self._workspaces.get(name)
        if ws is None:
            return
        async with ws.lock:
            if claim not in ws.claims:
                return
            ws.claims.discard(claim)
            if ws.claims or not ws.uid:
                return
            deadline = time.monotonic() + self.config.timeouts.pod_stop
            await self._release(ws, deadline)

    async def _release_locked(self, ws: _Workspace, deadline: float) -> None:
        async with ws.lock:
            if ws.uid:
                await self._release(ws, deadline)

    async def _release(self, ws: _Workspace, deadline: float) -> None:
        """Remove our claim from the Pod (the lock is held). A failure is left to the
        reaper, which removes claims this replica holds no connection for."""
        uid = ws.uid
        self._forget(ws)
        try:
            while True:
                pod = await self._get(ws.name, deadline)
                if pod is None or pod["metadata"].get("uid") != uid:
                    return
                if self.claim_key not in (pod["metadata"].get("annotations") or {}):
                    return
                if await self._write_claims(pod, add=False, deadline=deadline) is not None:
                    self.logger.info("released the claim on Pod %s", ws.name)
                    return
        except (KubernetesAPIError, PodStartTimeout) as exc:
            self.logger.warning("cannot release the claim on Pod %s yet: %s", ws.name, exc)

    def _lease_lost(self) -> None:
        """Our Lease lapsed: peers may soon delete our Pods, so stop using them now."""
        for ws in self._workspaces.values():
            if not ws.uid:
                continue
            claims = list(ws.claims)
            self._forget(ws)
            for claim in claims:
                claim.lost(
                    "this gateway lost contact with the Kubernetes API; your Pod may be "
                    "deleted, reconnect"
                )

    # -- the reaper -------------------------------------------------------------

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            try:
                await self.reap_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.logger.warning("look at user Pods failed: %s", exc)

    async def reap_once(self) -> None:
        """One look at every user Pod: fix our own claims, run idle clocks, delete."""
        deadline = time.monotonic() + max(self.reap_interval, 2.0)
        await self.lease.observe(deadline)
        listed = time.monotonic()
        pods = await self.controller.list_pods(self.namespace, user_pod_selector(), deadline)
        seen: set[str] = set()
        now = time.monotonic()
        for pod in pods:
            meta = pod.get("metadata") or {}
            name = str(meta.get("name") or "")
            seen.add(name)
            if meta.get("deletionTimestamp"):
                self._idle.pop(name, None)
                continue
            claims = _claims(pod)
            if self.lease.name in claims and await self._fix_own_claim(pod, deadline):
                continue  # the Pod changed: judge it next time
            if any(self.lease.alive(lease) for lease in claims) or self._holds(name, meta):
                self._idle.pop(name, None)
                continue
            uid, version = str(meta.get("uid") or ""), str(meta.get("resourceVersion") or "")
            idle = self._idle.get(name)
            if idle is None or idle.uid != uid or idle.version != version:
                self._idle[name] = _Idle(uid, version, now)
                continue
            if now - idle.since >= self._idle_timeout(pod):
                await self._delete_idle(name, idle, deadline)
        for name in list(self._idle):
            if name not in seen:
                del self._idle[name]
        alive = {
            (p["metadata"].get("name"), p["metadata"].get("uid"))
            for p in pods
            if not p["metadata"].get("deletionTimestamp")
        }
        for name, ws in list(self._workspaces.items()):
            if not ws.uid and not ws.claims and not ws.lock.locked():
                # Nothing held and nobody waiting: forget it (one entry per user otherwise).
                del self._workspaces[name]
                continue
            taken_before = ws.since < listed
            if ws.uid and taken_before and (ws.name, ws.uid) not in alive and not ws.lock.locked():
                ws.gone = True
        if self.metrics is not None:
            self.metrics.user_pods_idle.set(len(self._idle))
            self.metrics.replicas_alive.set(self.lease.alive_count())
        await self.lease.collect_expired(deadline)

    def _holds(self, name: str, meta: Mapping[str, Any]) -> bool:
        ws = self._workspaces.get(name)
        return ws is not None and bool(ws.uid) and ws.uid == meta.get("uid")

    def _idle_timeout(self, pod: Mapping[str, Any]) -> float:
        raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_IDLE_TIMEOUT)
        try:
            value = float(raw) if raw is not None else math.nan
        except ValueError:
            value = math.nan
        return value if math.isfinite(value) and value >= 0 else self.config.pod.idle_timeout

    async def _fix_own_claim(self, pod: dict[str, Any], deadline: float) -> bool:
        """Remove our claim from a Pod we hold no connection to (a release that failed,
        or connections dropped when our Lease lapsed). True if it wrote."""
        meta = pod["metadata"]
        ws = self._workspaces.get(meta["name"])
        if ws is not None and ws.uid == meta.get("uid"):
            return False
        if ws is not None and ws.lock.locked():
            return False  # a claim or release is under way: look again next time
        await self._write_claims(pod, add=False, deadline=deadline)
        self.logger.info("removed a stale claim of this gateway from Pod %s", meta["name"])
        return True

    async def _delete_idle(self, name: str, idle: _Idle, deadline: float) -> None:
        body = k8s.V1DeleteOptions(
            preconditions=k8s.V1Preconditions(uid=idle.uid, resource_version=idle.version),
            propagation_policy="Background",
        )
        api = self.controller.api

        async def delete() -> dict[str, Any]:
            return await json_body(
                api.delete_namespaced_pod(name, self.namespace, body=body, _preload_content=False)
            )

        del self._idle[name]
        try:
            await self.controller.call(f"delete idle Pod {name}", deadline, delete)
        except KubernetesAPIError as exc:
            if exc.status == 409:
                self._conflict("delete")  # claimed (or changed) since we looked
            elif exc.status != 404:
                self.logger.warning("cannot delete idle Pod %s: %s", name, exc)
            return
        self.logger.info("deleted Pod %s: idle for %gs", name, self.config.pod.idle_timeout)
        if self.metrics is not None:
            self.metrics.user_pods_idle_deleted.inc()
            self.metrics.pods_deleted.inc()


class WorkspaceClaim:
    """One connection's share of its user's Pod, with :class:`~kuberun.lease.PodLease`'s
    interface (:meth:`start`, :meth:`wait`, progress, :meth:`release`) so the
    connection handler treats both modes alike. Releasing never deletes the Pod."""

    def __init__(
        self,
        manager: WorkspaceManager,
        username: str,
        connection_id: str,
        client_address: str | None,
        on_lost: Callable[[str], None] | None,
        audit: PodAudit | None = None,
    ) -> None:
        self._manager = manager
        self._audit = audit
        self._audited = False
        self._asked = 0.0
        #: Whether this claim's attach created the Pod (else it joined an existing one).
        self.created = False
        self.username = username
        self.connection_id = connection_id
        self.client_address = client_address
        self._on_lost = on_lost
        self._task: asyncio.Task[_Workspace] | None = None
        self._ws: _Workspace | None = None
        self._listeners: list[ProgressListener] = []
        self._released = False

    def subscribe(self, listener: ProgressListener) -> None:
        """Receive progress lines (those reported already are replayed first)."""
        self._listeners.append(listener)
        if self._ws is not None:
            for line in self._ws.lines:
                listener(line)
            self._ws.listeners.append(listener)

    def unsubscribe(self, listener: ProgressListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
        if self._ws is not None and listener in self._ws.listeners:
            self._ws.listeners.remove(listener)

    def start(self) -> asyncio.Task[_Workspace]:
        """Start taking the claim (idempotent)."""
        if self._released:
            raise PodStartError("the connection is closing", "Closed")
        if self._task is None:
            self._asked = time.monotonic()
            deadline = self._asked + self._manager.config.timeouts.pod_start
            self._task = asyncio.ensure_future(self._manager._attach(self, deadline))
            self._task.add_done_callback(_consume)
        return self._task

    @property
    def ready(self) -> bool:
        """Whether the claim is taken and the Pod is ready."""
        ws = self._ws
        return ws is not None and ws.ready is not None and ws.ready.done() and not _failed(ws.ready)

    async def wait(self) -> PodRef:
        """The user's Pod once it is ready."""
        try:
            ref = await self._wait()
        except PodStartError as exc:
            self._record(None, exc)
            raise
        self._record(ref, None)
        return ref

    def _record(self, ref: PodRef | None, exc: PodStartError | None) -> None:
        """The first outcome of this claim goes to the audit trail (once)."""
        if self._audit is None or self._audited:
            return
        self._audited = True
        seconds = time.monotonic() - self._asked
        if exc is not None:
            self._audit.failed(exc.reason or "Error", str(exc), seconds)
        elif self.created:
            self._audit.created(ref, seconds)
        else:
            self._audit.reused(ref, None, seconds)

    async def _wait(self) -> PodRef:
        try:
            ws = await asyncio.shield(self.start())
        except KubernetesAPIError as exc:  # a refusal no retry helps with (403, 422, ...)
            raise PodStartError(f"cannot claim the Pod: {exc}", exc.reason) from exc
        if self._ws is not ws:
            self._ws = ws
            for listener in self._listeners:
                for line in ws.lines:
                    listener(line)
                ws.listeners.append(listener)
        ready = ws.ready
        if ready is None or self not in ws.claims:
            raise PodStartError("this connection's claim on its Pod was dropped", "Closed")
        return await asyncio.shield(ready)

    def lost(self, message: str) -> None:
        """The manager dropped this claim (its Lease lapsed)."""
        if self._on_lost is not None:
            self._on_lost(message)

    async def release(self) -> None:
        """Give up this connection's share; the last one removes the replica's claim."""
        self._released = True
        task = self._task
        if task is None:
            return
        # Cancelled mid-way, the claim may or may not have been added; detach copes
        # with both.
        await cancel_and_wait(task)
        name = workspace_name(self._manager.config.pod.metadata, self.username)
        await asyncio.shield(self._manager._detach(self, name))


def _failed(task: asyncio.Task[Any]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
