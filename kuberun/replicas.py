"""Gateway replicas' heartbeats: one ``coordination.k8s.io/v1`` Lease per replica.

Each gateway process that serves user-mode Pods (:mod:`kuberun.workspace`) owns
a Lease named ``kuberun-replica-<random id>``, created when it starts and
renewed every quarter of ``pod.lease_duration``. Its claims on user Pods are
only as good as this Lease: peers treat a claim as live while they see the
claimant's Lease change at least once per ``leaseDurationSeconds``.

Liveness is judged the way client-go's leader election judges it, by local
observation only: a peer records *when it saw* each Lease's resourceVersion
change (``time.monotonic``), never compares ``renewTime`` with its own clock,
and declares the Lease expired once it has seen no change for the Lease's
``leaseDurationSeconds``. A Lease it cannot find counts the same way from the
moment it first missed it. So clock skew between replicas does not matter,
only a difference in clock *rates*, which the margin below absorbs.

The owner gives up first: if it has not renewed successfully for two thirds of
the duration, it reports the loss (:attr:`ReplicaLease.on_lost`) so its claims
are dropped and its user-mode sessions ended *before* any peer can see the
Lease expire and delete a Pod under them. client-go's RenewDeadline <
LeaseDuration rule, for the same reason: the API server gives no fencing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from kubernetes_asyncio import client as k8s

from ._cancel import wait_for
from .errors import KubernetesAPIError, PodStartTimeout
from .manifests import LABEL_MANAGED_BY, MANAGED_BY, label_selector
from .pods import PodController, json_body

__all__ = ["LABEL_COMPONENT", "LEASE_COMPONENT", "MERGE_PATCH", "ReplicaLease", "micro_time"]

#: Label on every replica Lease (with ``app.kubernetes.io/managed-by: kuberun``).
LABEL_COMPONENT = "app.kubernetes.io/component"
LEASE_COMPONENT = "kuberun-replica"
LEASE_PREFIX = "kuberun-replica-"

#: Makes a kubernetes-asyncio ``patch_*`` call send a JSON merge patch (RFC 7386): a
#: ``null`` removes a key, and ``metadata.resourceVersion`` acts as a precondition.
MERGE_PATCH: dict[str, Any] = {"_content_type": "application/merge-patch+json"}

#: Renewals per lease duration (the kubelet's node lease uses 4 too).
RENEWALS_PER_DURATION = 4
#: The owner drops its claims when it has not renewed for this share of the duration.
GIVE_UP_FRACTION = 2 / 3


def micro_time(when: datetime.datetime | None = None) -> str:
    """A ``MicroTime`` as the API server requires it: UTC, six fractional digits, ``Z``.

    (``datetime.isoformat()`` drops the fraction when it is zero, which the API
    server rejects.)
    """
    when = when or datetime.datetime.now(datetime.timezone.utc)
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class _Seen:
    """What a replica last saw of one Lease, and when (its own monotonic clock)."""

    version: str  # the resourceVersion, or "" while the Lease is missing
    since: float
    duration: float
    uid: str = ""


class ReplicaLease:
    """This replica's Lease (renewed in the background) and its view of its peers'.

    :param duration: ``pod.lease_duration`` in seconds
    :param on_lost: called (once per loss) when renewals failed for longer than
        two thirds of ``duration``: the owner must stop relying on its claims
    """

    def __init__(
        self,
        controller: PodController,
        api_client: k8s.ApiClient,
        namespace: str,
        duration: float,
        *,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
        metrics: Any = None,
        identity: str | None = None,
    ) -> None:
        self._controller = controller
        self._api = k8s.CoordinationV1Api(api_client)
        self.namespace = namespace
        self.duration = duration
        self.name = LEASE_PREFIX + secrets.token_hex(5)
        self.identity = identity or self.name
        self._logger = logger
        self._metrics = metrics
        self.on_lost: Callable[[], None] | None = None
        self._renewed = -math.inf  # monotonic time the last successful renewal was sent
        self._lost = False
        self._task: asyncio.Task[None] | None = None
        self._started: asyncio.Future[None] | None = None
        self._seen: dict[str, _Seen] = {}

    # -- own Lease ----------------------------------------------------------

    @property
    def renew_interval(self) -> float:
        return self.duration / RENEWALS_PER_DURATION

    @property
    def healthy(self) -> bool:
        """Whether the last successful renewal is recent enough to rely on our claims."""
        return time.monotonic() - self._renewed < self.duration * GIVE_UP_FRACTION

    def _body(self) -> dict[str, Any]:
        now = micro_time()
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: LEASE_COMPONENT},
            },
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, math.ceil(self.duration)),
                "acquireTime": now,
                "renewTime": now,
            },
        }

    def begin(self) -> None:
        """Start creating and renewing the Lease in the background (idempotent)."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
            self._task = asyncio.ensure_future(self._run())

    async def start(self, deadline: float) -> None:
        """:meth:`begin`, then wait until the Lease exists."""
        self.begin()
        assert self._started is not None
        remaining = max(0.0, deadline - time.monotonic())
        try:
            await wait_for(asyncio.shield(self._started), remaining)
        except asyncio.TimeoutError:
            raise PodStartTimeout(
                f"this gateway's Lease {self.name} could not be created in time", "Timeout"
            ) from None

    async def wait_healthy(self, deadline: float) -> None:
        """Wait until the Lease is freshly renewed (claims may be written)."""
        await self.start(deadline)
        while not self.healthy:
            if time.monotonic() >= deadline:
                raise PodStartTimeout(
                    f"this gateway cannot renew its Lease {self.name}", "LeaseLost"
                )
            await asyncio.sleep(min(0.1, self.renew_interval))

    async def _renew_once(self) -> None:
        sent = time.monotonic()
        deadline = sent + self.renew_interval
        patch = {"spec": {"renewTime": micro_time(), "holderIdentity": self.identity}}

        async def renew() -> dict[str, Any]:
            return await json_body(
                self._api.patch_namespaced_lease(
                    self.name,
                    self.namespace,
                    patch,
                    **MERGE_PATCH,
                    _preload_content=False,
                )
            )

        async def create() -> dict[str, Any]:
            return await json_body(
                self._api.create_namespaced_lease(
                    self.namespace, cast(Any, self._body()), _preload_content=False
                )
            )

        try:
            await self._controller.call(f"renew Lease {self.name}", deadline, renew)
        except KubernetesAPIError as exc:
            if exc.status != 404:
                raise
            # Not created yet, or deleted by a peer that saw it expire: make it again.
            await self._controller.call(f"create Lease {self.name}", deadline, create)
        self._renewed = max(self._renewed, sent)
        if self._lost:
            self._lost = False
            self._logger.warning("Lease %s renewed again", self.name)

    async def _run(self) -> None:
        assert self._started is not None
        while True:
            try:
                await self._renew_once()
                if not self._started.done():
                    self._started.set_result(None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._metrics is not None:
                    self._metrics.lease_renew_failures.inc()
                self._logger.warning("cannot renew Lease %s: %s", self.name, exc)
            if not self.healthy and self._renewed > -math.inf and not self._lost:
                self._lost = True
                self._logger.error(
                    "Lease %s not renewed for %.1fs: dropping this gateway's claims on user Pods",
                    self.name,
                    time.monotonic() - self._renewed,
                )
                if self._metrics is not None:
                    self._metrics.claims_lost.inc()
                if self.on_lost is not None:
                    self.on_lost()
            delay = self.renew_interval - (time.monotonic() - self._renewed)
            await asyncio.sleep(min(self.renew_interval, max(0.05, delay)))

    async def stop(self, timeout: float) -> None:
        """Stop renewing and delete the Lease (a graceful exit; claims are released first)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._started is None:
            return
        deadline = time.monotonic() + timeout

        async def delete() -> dict[str, Any]:
            return await json_body(
                self._api.delete_namespaced_lease(self.name, self.namespace, _preload_content=False)
            )

        try:
            await self._controller.call(f"delete Lease {self.name}", deadline, delete)
        except KubernetesAPIError as exc:
            if exc.status != 404:
                self._logger.warning("cannot delete Lease %s: %s", self.name, exc)
        except PodStartTimeout as exc:
            self._logger.warning("cannot delete Lease %s: %s", self.name, exc)

    # -- peers --------------------------------------------------------------

    async def observe(self, deadline: float) -> None:
        """List the replica Leases and note every change (one request)."""

        async def do_list() -> dict[str, Any]:
            return await json_body(
                self._api.list_namespaced_lease(
                    self.namespace,
                    label_selector=label_selector(
                        {LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: LEASE_COMPONENT}
                    ),
                    _preload_content=False,
                )
            )

        listing = await self._controller.call("list Leases", deadline, do_list)
        now = time.monotonic()
        present = set()
        for item in listing.get("items") or []:
            meta = item.get("metadata") or {}
            name = str(meta.get("name") or "")
            version = str(meta.get("resourceVersion") or "")
            declared = (item.get("spec") or {}).get("leaseDurationSeconds")
            duration = float(declared) if isinstance(declared, int) and declared > 0 else 0.0
            present.add(name)
            seen = self._seen.get(name)
            if seen is None or seen.version != version:
                self._seen[name] = _Seen(
                    version, now, max(duration, self.duration), str(meta.get("uid") or "")
                )
        for name, seen in self._seen.items():
            if name not in present and seen.version:
                # Gone (released, or collected by a peer): counts from now on.
                self._seen[name] = _Seen("", now, seen.duration)

    def alive(self, lease: str) -> bool:
        """Whether claims made under ``lease`` are still to be honoured.

        Our own Lease is alive while it is healthy. A peer's is alive until it
        has been seen unchanged (or missing) for its duration; one never seen
        at all is given a duration from now, since a claim may be read before
        the Lease that backs it.
        """
        if lease == self.name:
            return self.healthy
        seen = self._seen.get(lease)
        now = time.monotonic()
        if seen is None:
            self._seen[lease] = _Seen("", now, self.duration)
            return True
        return now - seen.since <= seen.duration

    def alive_count(self) -> int:
        """Replicas seen alive, this one included when healthy."""
        peers = sum(
            1
            for name in list(self._seen)
            if name != self.name and self._seen[name].version and self.alive(name)
        )
        return peers + (1 if self.healthy else 0)

    async def collect_expired(self, deadline: float) -> None:
        """Delete peers' Leases seen unchanged for twice their duration (crashed replicas).

        The delete names the resourceVersion and UID seen, so a Lease renewed
        meanwhile is left alone (409).
        """
        now = time.monotonic()
        for name, seen in list(self._seen.items()):
            if name == self.name or now - seen.since <= 2 * seen.duration:
                continue
            if not seen.version:
                # Long gone, but still remembered as such: forgetting it would make a
                # stale claim under it look new (alive) again. One small entry per
                # replica that came and went while this one ran.
                continue
            body = k8s.V1DeleteOptions(
                preconditions=k8s.V1Preconditions(uid=seen.uid, resource_version=seen.version)
            )

            async def delete(name: str = name, body: Any = body) -> dict[str, Any]:
                return await json_body(
                    self._api.delete_namespaced_lease(
                        name, self.namespace, body=body, _preload_content=False
                    )
                )

            try:
                await self._controller.call(f"delete expired Lease {name}", deadline, delete)
                self._logger.info("deleted the expired Lease %s of a gateway that is gone", name)
            except (KubernetesAPIError, PodStartTimeout) as exc:
                self._logger.debug("expired Lease %s not deleted: %s", name, exc)
