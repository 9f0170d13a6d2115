"""Pod deletions as debts that are paid, not attempts that expire.

Every Pod kuberun created and has to delete is *owed* to a :class:`Reaper`
(:meth:`Reaper.owe`). The reaper deletes it, and when the API server fails,
hangs or cannot be reached it keeps trying, with backoff, for as long as the
gateway runs: ``timeouts.pod_stop`` only bounds how long a client-facing step
waits for a deletion (:meth:`Reaper.settle`), never the deletion itself. A
debt is paid when the API server accepted the deletion or says the Pod is gone
(or was replaced: a UID precondition keeps kuberun away from a Pod it did not
create).

A create that got no answer may still make its Pod, even after the client is
gone: :meth:`Reaper.search` keeps looking for it by its labels for
:data:`LATE_CREATE_WINDOW` seconds and owes the deletion of what it finds.

What is owed is visible: :attr:`Reaper.pending` lists it, the gauge
``kuberun_pods_pending_deletion`` counts it, and the log says so once when a
deletion first fails and then at a low rate while debts remain. On shutdown,
:meth:`Reaper.drain` waits for the list within a grace and returns what it
leaves, so the gateway can say so.

The reaper keeps no state outside the process: what a gateway leaves when it
is killed is found by the janitor (:mod:`kuberun.janitor`) of its next run,
through the gateway-instance label every Pod carries, which owes it here too.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._cancel import wait_for
from .errors import KuberunError
from .pods import PodController, PodRef

__all__ = ["Debt", "Reaper"]

_log = logging.getLogger("kuberun")

#: Seconds between two summary lines about Pods still pending deletion.
SUMMARY_INTERVAL = 60.0
#: Backoff between deletion rounds of one Pod (each round retries on its own
#: within ``attempt_timeout``): from FIRST, doubling, up to MAX.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
#: How long a create that got no answer may still make its Pod: kube-apiserver
#: ends a request after its --request-timeout, one minute by default.
LATE_CREATE_WINDOW = 60.0
#: Longest pause between two looks for the Pod of such a create.
SEARCH_INTERVAL_MAX = 5.0


@dataclass
class Debt:
    """One Pod owed a deletion."""

    ref: PodRef
    since: float = field(default_factory=time.monotonic)
    attempts: int = 0
    last_error: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    on_paid: Callable[[PodRef], None] | None = None


class Reaper:
    """The to-delete list of one gateway (or of one API client in library use).

    :param controller: deletes Pods (its counters count the reaper's calls too)
    :param attempt_timeout: seconds one deletion round may take, retries
        included (``timeouts.pod_stop``); after a failed round the reaper
        waits (backoff) and starts another
    :param metrics: optional :class:`~kuberun.metrics.Metrics`; its
        ``pods_pending_deletion`` gauge follows the list and ``pods_deleted``
        counts payments
    :param on_paid: called with every Pod whose deletion is done
    """

    def __init__(
        self,
        controller: PodController,
        *,
        attempt_timeout: float,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
        metrics: Any = None,
        on_paid: Callable[[PodRef], None] | None = None,
        backoff_first: float = BACKOFF_FIRST,
        backoff_max: float = BACKOFF_MAX,
        summary_interval: float = SUMMARY_INTERVAL,
    ) -> None:
        self._controller = controller
        self._attempt_timeout = attempt_timeout
        self._logger = logger or _log
        self._metrics = metrics
        self._on_paid = on_paid
        self._backoff_first = backoff_first
        self._backoff_max = backoff_max
        self._summary_interval = summary_interval
        self._debts: dict[tuple[str, str], Debt] = {}
        self._searches: set[asyncio.Task[None]] = set()
        self._summarised = 0.0
        self._closed = False

    # -- the list -----------------------------------------------------------

    @property
    def pending(self) -> list[PodRef]:
        """The Pods owed a deletion, oldest first."""
        return [debt.ref for debt in sorted(self._debts.values(), key=lambda d: d.since)]

    @property
    def owed(self) -> int:
        """How many Pods are owed a deletion."""
        return len(self._debts)

    def owes(self, ref: PodRef) -> bool:
        """Whether ``ref`` is on the list."""
        return _key(ref) in self._debts

    def owe(self, ref: PodRef, on_paid: Callable[[PodRef], None] | None = None) -> None:
        """Put ``ref`` on the list and start deleting it (idempotent).

        ``on_paid`` is called once the deletion is done (with the first owing's
        hook, if the Pod was already owed). A Pod without a UID is refused
        (logged): without a UID precondition the name could meanwhile belong to
        a Pod kuberun did not create.
        """
        if not ref.uid:
            self._logger.error("not deleting Pod %s: its UID is unknown", ref.name)
            return
        key = _key(ref)
        if key in self._debts:
            return
        debt = Debt(ref, on_paid=on_paid)
        self._debts[key] = debt
        self._gauge()
        if self._closed:
            return  # listed, so a later drain() reports it, but no longer paid
        debt.task = asyncio.ensure_future(self._pay(debt))

    def paid(self, ref: PodRef) -> None:
        """Strike ``ref`` off the list: it is deleted or gone (also called by the reaper)."""
        debt = self._debts.pop(_key(ref), None)
        if debt is None:
            return
        debt.done.set()
        self._gauge()
        if debt.task is not None and debt.task is not asyncio.current_task():
            debt.task.cancel()
        if debt.attempts > 1:
            self._logger.info(
                "Pod %s deleted after %d attempts over %.0fs",
                ref.name,
                debt.attempts,
                time.monotonic() - debt.since,
            )
        else:
            self._logger.info("Pod %s deleted", ref.name)
        if self._metrics is not None:
            self._metrics.pods_deleted.inc()
        for hook in (debt.on_paid, self._on_paid):
            if hook is not None:
                hook(ref)

    def search(self, namespace: str, selector: str, window: float = LATE_CREATE_WINDOW) -> None:
        """Look for Pods matching ``selector`` for ``window`` seconds and owe each one's
        deletion: what a create that got no answer may still make."""
        if self._closed:
            return
        task = asyncio.ensure_future(self._search(namespace, selector, time.monotonic() + window))
        self._searches.add(task)
        task.add_done_callback(self._searches.discard)

    @property
    def searching(self) -> int:
        """How many searches for Pods of creates that lost their answer are running."""
        return len(self._searches)

    async def settle(self, ref: PodRef, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``ref``'s deletion; True once it is paid.

        The debt stays on the list either way: a caller that stops waiting
        (a client-facing step bounded by ``timeouts.pod_stop``) does not end
        the deletion.
        """
        debt = self._debts.get(_key(ref))
        if debt is None:
            return True
        try:
            await wait_for(asyncio.shield(debt.done.wait()), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def drain(self, timeout: float) -> list[PodRef]:
        """Wait up to ``timeout`` seconds for the list to empty; return what is left."""
        deadline = time.monotonic() + timeout
        while self._debts:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            waits = [asyncio.ensure_future(d.done.wait()) for d in list(self._debts.values())]
            try:
                await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        return self.pending

    async def close(self) -> list[PodRef]:
        """Stop paying (the list is kept, for the record); returns what is left."""
        self._closed = True
        tasks = [d.task for d in self._debts.values() if d.task is not None]
        tasks += self._searches
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return self.pending

    # -- paying -----------------------------------------------------------------

    async def _pay(self, debt: Debt) -> None:
        delay = self._backoff_first
        try:
            while True:
                debt.attempts += 1
                error = await self._controller.try_delete(debt.ref, self._attempt_timeout)
                if error is None:
                    self.paid(debt.ref)
                    return
                self._failed(debt, error)
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self._backoff_max)
        except asyncio.CancelledError:
            if _key(debt.ref) in self._debts and not self._closed:
                # The event loop is going away with this Pod still owed (the
                # embedding program exits without Gateway.drain()): say so.
                self._logger.error(
                    "Pod %s/%s was not deleted: the event loop stopped first "
                    "(call Gateway.drain() before exiting)",
                    debt.ref.namespace,
                    debt.ref.name,
                )
            raise

    async def _search(self, namespace: str, selector: str, until: float) -> None:
        interval = self._backoff_first / 4
        seen: set[str] = set()
        while True:
            deadline = min(until, time.monotonic() + self._attempt_timeout)
            try:
                pods = await self._controller.list_pods(namespace, selector, deadline)
            except KuberunError as exc:
                self._logger.debug("looking for Pods of %s: %s", selector, exc)
                pods = []
            for pod in pods:
                meta = pod.get("metadata") or {}
                uid = str(meta.get("uid") or "")
                if not uid or uid in seen or meta.get("deletionTimestamp"):
                    continue
                seen.add(uid)
                ref = PodRef(namespace, str(meta.get("name")), uid)
                if not self.owes(ref):
                    self._logger.info("Pod %s was made by a create that lost its answer", ref.name)
                    self.owe(ref)
            if time.monotonic() + interval >= until:
                return
            await asyncio.sleep(interval)
            interval = min(interval * 2, SEARCH_INTERVAL_MAX)

    def _failed(self, debt: Debt, error: KuberunError) -> None:
        debt.last_error = str(error)
        now = time.monotonic()
        first = debt.attempts == 1
        if first and not any(d.attempts > 1 or d.last_error for d in self._others(debt)):
            # The first Pod that fails to go: one line, then summaries at a low rate.
            self._summarised = now
            self._logger.warning(
                "could not delete Pod %s yet (%s); kuberun keeps trying", debt.ref.name, error
            )
            return
        if now - self._summarised >= self._summary_interval:
            self._summarised = now
            oldest = min(self._debts.values(), key=lambda d: d.since)
            self._logger.warning(
                "%d Pod(s) pending deletion; the oldest, %s, for %.0fs (last error: %s)",
                len(self._debts),
                oldest.ref.name,
                now - oldest.since,
                oldest.last_error or debt.last_error,
            )
        else:
            self._logger.debug("could not delete Pod %s yet: %s", debt.ref.name, error)

    def _others(self, debt: Debt) -> list[Debt]:
        return [d for d in self._debts.values() if d is not debt]

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.pods_pending_deletion.set(len(self._debts))


def _key(ref: PodRef) -> tuple[str, str]:
    return (ref.namespace, ref.uid or ref.name)
