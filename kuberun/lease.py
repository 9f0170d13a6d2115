"""A Pod held for one SSH connection (or one session): start it once, release it always.

:class:`PodLease` is where the "no Pod leaks, ever" promise is kept. Whatever
happens — the Pod fails to start, the client vanishes while it is starting,
the create call loses its answer, the gateway shuts down — :meth:`release`
owes the deletion of every Pod the lease may have made to the gateway's
:class:`~kuberun.reaper.Reaper`, which keeps trying for as long as the gateway
runs; :meth:`release` itself waits for it at most ``timeouts.pod_stop``.
Deletion runs in a task of its own so a cancelled caller cannot abandon it
halfway.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from ._cancel import cancel_and_wait, wait_for
from .audit import PodAudit
from .errors import KubernetesAPIError, PodStartError, PodStartTimeout, client_message
from .pods import PodController, PodRef, pod_ips, pod_progress
from .reaper import Reaper

__all__ = ["PodLease"]

ProgressListener = Callable[[str], None]


class PodLease:
    """One Pod's life: :meth:`start` creates it and waits for Ready, :meth:`release` deletes it.

    :param label_selector: selects exactly this lease's Pod (kuberun's
        managed-by label plus the connection or session id); used to find a
        Pod whose create call lost its answer.
    :param reaper: the to-delete list the lease's Pods are owed to
    :param track: called with every deletion task so the owner (the gateway)
        can wait for them on shutdown.
    """

    def __init__(
        self,
        controller: PodController,
        namespace: str,
        manifest: Mapping[str, Any],
        label_selector: str,
        *,
        start_timeout: float,
        stop_timeout: float,
        reaper: Reaper,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
        metrics: Any = None,
        track: Callable[[asyncio.Task[Any]], None] | None = None,
        audit: PodAudit | None = None,
    ) -> None:
        self._controller = controller
        self._namespace = namespace
        self._manifest = manifest
        self._selector = label_selector
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._reaper = reaper
        self._logger = logger
        self._metrics = metrics
        self._track = track
        self._audit = audit
        self._delete_started = 0.0
        self._listeners: list[ProgressListener] = []
        self._lines: list[str] = []
        self._task: asyncio.Task[PodRef] | None = None
        self._ref: PodRef | None = None
        self._create_sent = False
        # Set when a create attempt failed in a way that may have made a Pod
        # (_late: one that got no answer, so the Pod may even appear later).
        self._uncertain = False
        self._late = False
        # A create attempt still on its way when the lease was released.
        self._orphan: asyncio.Future[dict[str, Any]] | None = None
        self._released = False
        self._cleanup: asyncio.Task[None] | None = None

    # -- progress ---------------------------------------------------------

    def subscribe(self, listener: ProgressListener) -> None:
        """Receive progress lines (the ones already reported are replayed first)."""
        for line in self._lines:
            listener(line)
        self._listeners.append(listener)

    def unsubscribe(self, listener: ProgressListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _report_retry(self, error: KubernetesAPIError) -> None:
        """A create attempt failed and is retried: tell the waiting user (once per kind)."""
        line = f"waiting for the cluster: {client_message(error)}, retrying"
        if not self._lines or self._lines[-1] != line:
            self._report(line)

    def _report(self, line: str) -> None:
        self._lines.append(line)
        for listener in list(self._listeners):
            try:
                listener(line)
            except Exception:  # a closed channel must not break Pod start
                self._logger.debug("progress listener failed", exc_info=True)

    # -- lifecycle --------------------------------------------------------

    @property
    def ref(self) -> PodRef | None:
        """The Pod, once created."""
        return self._ref

    @property
    def ready(self) -> bool:
        """Whether the Pod has started and is ready."""
        task = self._task
        return (
            task is not None and task.done() and not task.cancelled() and task.exception() is None
        )

    def start(self) -> asyncio.Task[PodRef]:
        """Start creating the Pod (idempotent); the task's result is the ready Pod."""
        if self._released:
            raise PodStartError("the connection is closing", "Closed")
        if self._task is None:
            self._task = asyncio.ensure_future(self._start())
            # The result is consumed by sessions; make sure an unobserved
            # failure does not end up in asyncio's default exception handler.
            self._task.add_done_callback(_consume)
        return self._task

    async def wait(self) -> PodRef:
        """Wait until the Pod is ready (start it if needed); shared by all sessions."""
        return await asyncio.shield(self.start())

    async def _start(self) -> PodRef:
        started = time.monotonic()
        deadline = started + self._start_timeout
        self._report("creating the Pod")
        try:
            self._create_sent = True
            pod = await self._controller.create(
                self._namespace,
                self._manifest,
                deadline,
                self._selector,
                uncertain=self._mark_uncertain,
                orphan=self._take_orphan,
                on_retry=self._report_retry,
            )
            self._ref = _ref_of(self._namespace, pod)
            if self._metrics is not None:
                self._metrics.pods_created.inc()
            self._logger.info("Pod %s created", self._ref.name)
            self._report(f"Pod {self._ref.name} created, {pod_progress(pod)}")
            pod = await self._controller.wait_ready(pod, deadline, self._report)
            self._ref = dataclasses.replace(self._ref, ips=pod_ips(pod))
            self._report(f"Pod {self._ref.name} is ready")
        except asyncio.CancelledError:
            if self._audit is not None and self._ref is not None:
                elapsed = time.monotonic() - started
                self._audit.failed("Cancelled", "no longer wanted", elapsed, self._ref)
            self._schedule_delete()
            raise
        except (PodStartError, KubernetesAPIError) as exc:
            reason = getattr(exc, "reason", "") or "Error"
            if self._metrics is not None:
                self._metrics.pod_start_failures.labels(reason=reason).inc()
            if self._audit is not None:
                self._audit.failed(reason, str(exc), time.monotonic() - started, self._ref)
            self._schedule_delete()
            if isinstance(exc, KubernetesAPIError):
                raise PodStartError(f"cannot create the Pod: {exc}", exc.reason).told(
                    f"cannot create the Pod: {client_message(exc)}"
                ) from exc
            if isinstance(exc, PodStartTimeout) and exc.last is not None:
                # One clear line for the user; the details went to the log.
                exc.told(
                    f"the Pod did not start within {self._start_timeout:g}s: "
                    f"{client_message(exc.last)}"
                )
            raise
        except BaseException:
            self._schedule_delete()
            raise
        if self._metrics is not None:
            self._metrics.pod_start_seconds.observe(time.monotonic() - started)
        if self._audit is not None:
            self._audit.created(self._ref, time.monotonic() - started)
        if self._released:
            # Released while the last step was finishing: do not hand out the Pod.
            self._schedule_delete()
            raise PodStartError("the connection closed while the Pod was starting", "Closed")
        return self._ref

    async def release(self) -> None:
        """Cancel a pending start and delete the Pod. Safe to call many times."""
        self._released = True
        task = self._task
        if task is not None:
            await cancel_and_wait(task)
        self._schedule_delete()
        cleanup = self._cleanup
        if cleanup is not None:
            await asyncio.shield(cleanup)

    def _schedule_delete(self) -> None:
        if self._cleanup is not None or not self._create_sent:
            return
        self._cleanup = asyncio.ensure_future(self._delete())
        if self._track is not None:
            self._track(self._cleanup)

    def _mark_uncertain(self, late: bool) -> None:
        self._uncertain = True
        self._late = self._late or late

    def _take_orphan(self, attempt: asyncio.Future[dict[str, Any]]) -> bool:
        """Called with a create attempt still in flight when the start is cancelled.

        When the lease is being released, its answer is awaited by the deletion
        (a Pod it makes is deleted by name and UID, no search needed); otherwise
        (a timeout of that attempt) the attempt is cancelled as usual.
        """
        if not self._released:
            return False
        self._orphan = attempt
        return True

    async def _delete(self) -> None:
        self._delete_started = time.monotonic()
        deadline = self._delete_started + self._stop_timeout
        done: set[str] = set()
        if self._orphan is not None:
            await self._settle_orphan(deadline)
        owed = []
        ref = self._ref
        if ref is not None:
            done.add(ref.uid)
            self._reaper.owe(ref, on_paid=self._paid)
            owed.append(ref)
        if self._uncertain:
            owed += await self._sweep(deadline, done, until_deadline=self._late)
            if self._late:
                # A create without an answer may make its Pod later still, even
                # after timeouts.pod_stop: keep looking, beyond this step.
                self._reaper.search(self._namespace, self._selector)
        for pod in owed:
            await self._reaper.settle(pod, max(0.0, deadline - time.monotonic()))

    async def _settle_orphan(self, deadline: float) -> None:
        """Wait for the answer of a create that was in flight at release time."""
        attempt = self._orphan
        assert attempt is not None
        try:
            pod = await wait_for(asyncio.shield(attempt), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            attempt.cancel()  # counts as an attempt without an answer (uncertain)
            await asyncio.gather(attempt, return_exceptions=True)
        except Exception:
            pass  # the attempt said itself whether it may have made a Pod
        else:
            if self._ref is None:
                self._ref = _ref_of(self._namespace, pod)
                if self._metrics is not None:
                    self._metrics.pods_created.inc()

    async def _sweep(
        self, deadline: float, done: set[str], *, until_deadline: bool
    ) -> list[PodRef]:
        """Owe the deletion of the Pods of this lease that kuberun does not know of.

        The create may have made a Pod whose name never reached us (its answer
        was a 5xx, or never came). A create attempt that got no answer at all may
        even make its Pod a while later, as the API server may still be working
        on it: then look for this lease's labels until ``deadline``
        (``timeouts.pod_stop``), not just once. What this search misses (the API
        server does not answer it) the janitor finds later.
        """
        interval = _SWEEP_FIRST
        found: list[PodRef] = []
        while True:
            try:
                pods = await self._controller.list_pods(self._namespace, self._selector, deadline)
            except (KubernetesAPIError, PodStartTimeout) as exc:
                self._logger.warning(
                    "cannot look for a Pod of a create that lost its answer yet (%s)", exc
                )
                return found
            for pod in pods:
                meta = pod.get("metadata") or {}
                uid = str(meta.get("uid") or "")
                if uid in done or meta.get("deletionTimestamp"):
                    continue
                done.add(uid)
                ref = _ref_of(self._namespace, pod)
                self._logger.info("Pod %s was made by a create that lost its answer", ref.name)
                self._reaper.owe(ref, on_paid=self._paid)
                found.append(ref)
            if not until_deadline or time.monotonic() + interval >= deadline:
                return found
            await asyncio.sleep(interval)
            interval = min(interval * 2, _SWEEP_MAX)

    def _paid(self, ref: PodRef) -> None:
        """The reaper deleted one of this lease's Pods (maybe long after release)."""
        if self._audit is not None:
            self._audit.deleted(ref, time.monotonic() - self._delete_started)


def _ref_of(namespace: str, pod: Mapping[str, Any]) -> PodRef:
    meta = pod.get("metadata") or {}
    return PodRef(namespace, str(meta.get("name")), str(meta.get("uid") or ""))


#: Intervals between looks for Pods of a create that lost its answer.
_SWEEP_FIRST = 0.25
_SWEEP_MAX = 2.0


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
