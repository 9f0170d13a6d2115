"""A cancel is never lost (kuberun/_cancel.py), and a Pod start cancelled in the very turn
its answer arrives neither loses the Pod nor keeps the connection's clean-up waiting."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

import pytest

from kuberun import _cancel, pods
from kuberun._cancel import cancel_and_wait, wait_for
from kuberun.lease import PodLease
from kuberun.pods import PodController, PodRef

POD = {"metadata": {"name": "kuberun-abcde", "uid": "u-1", "namespace": "ns"}}


async def _settle() -> None:
    """Let every task that can run, run."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_wait_for_raises_a_cancel_that_comes_with_the_result() -> None:
    inner: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(wait_for(inner, 30))
    await _settle()
    inner.set_result(1)  # the result and the cancel in one turn of the loop
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_wait_for_results_errors_and_timeouts() -> None:
    assert await wait_for(asyncio.sleep(0, "done"), 5) == "done"
    assert await wait_for(asyncio.sleep(0, "done"), None) == "done"
    with pytest.raises(ValueError):
        await wait_for(_raise(ValueError("bad")), 5)
    slow = asyncio.ensure_future(asyncio.sleep(30))
    with pytest.raises(asyncio.TimeoutError):
        await wait_for(slow, 0.01)
    assert slow.cancelled()


async def test_wait_for_returns_what_a_timed_out_awaitable_still_produced() -> None:
    async def stubborn() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return "late"
        return "never"

    assert await wait_for(stubborn(), 0.01) == "late"


async def test_cancel_and_wait_repeats_a_lost_cancel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cancel, "RECANCEL_INTERVAL", 0.01)
    cancels = 0

    async def loses_one_cancel() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancels += 1
                if cancels > 1:
                    raise

    task = asyncio.ensure_future(loses_one_cancel())
    await _settle()
    await asyncio.wait_for(cancel_and_wait(task), 10)
    assert task.cancelled() and cancels == 2


async def _raise(exc: Exception) -> None:
    raise exc


# -- Pod creates cancelled as their answer arrives ---------------------------------------


class _API:
    """``create_namespaced_pod`` answering when the test says so."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def create_namespaced_pod(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return await self.answer


def _controller(monkeypatch: pytest.MonkeyPatch) -> tuple[PodController, _API]:
    # No HTTP: the fake API's answer is the decoded body.
    monkeypatch.setattr(pods, "_json", lambda call: call)
    controller = PodController(cast(Any, None), logger=logging.getLogger("kuberun"))
    api = _API()
    controller._api = cast(Any, api)
    return controller, api


@pytest.mark.parametrize("takes_orphans", [False, True])
async def test_create_cancelled_as_its_answer_arrives_loses_no_pod(
    monkeypatch: pytest.MonkeyPatch, takes_orphans: bool
) -> None:
    controller, api = _controller(monkeypatch)
    uncertain: list[bool] = []
    orphans: list[asyncio.Future[dict[str, Any]]] = []

    def orphan(attempt: asyncio.Future[dict[str, Any]]) -> bool:
        if takes_orphans:
            orphans.append(attempt)
        return takes_orphans

    task = asyncio.ensure_future(
        controller.create(
            "ns",
            {},
            time.monotonic() + 30,
            "sel",
            uncertain=uncertain.append,
            orphan=orphan,
        )
    )
    await _settle()
    api.answer.set_result(POD)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Either the Pod is handed over by name, or it is looked for: never forgotten.
    if takes_orphans:
        assert [o.result() for o in orphans] == [POD] and uncertain == []
    else:
        assert uncertain == [False]


class _Controller:
    """A Pod start whose wait for Ready loses the first cancel (as asyncio.wait_for can
    before Python 3.12) and then waits on; deletions are recorded."""

    def __init__(self) -> None:
        self.cancels = 0

    async def create(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return POD

    async def wait_ready(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancels += 1
                if self.cancels > 1:
                    raise


class _Reaper:
    def __init__(self) -> None:
        self.owed: list[PodRef] = []

    def owe(self, ref: PodRef, on_paid: Any = None) -> None:
        self.owed.append(ref)

    async def settle(self, ref: PodRef, timeout: float) -> bool:
        return True


async def test_release_deletes_the_pod_of_a_start_that_lost_its_cancel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_cancel, "RECANCEL_INTERVAL", 0.01)
    controller, reaper = _Controller(), _Reaper()
    lease = PodLease(
        cast(Any, controller),
        "ns",
        {},
        "sel",
        start_timeout=3600,
        stop_timeout=5,
        reaper=cast(Any, reaper),
        logger=logging.getLogger("kuberun"),
    )
    lease.start()
    await _settle()
    # Before: release() waited for the start, which went on to its deadline (an hour).
    release = asyncio.ensure_future(lease.release())
    done, _ = await asyncio.wait((release,), timeout=30)
    if not done:
        await cancel_and_wait(release)
        pytest.fail("release() still waits for a start that lost its cancel")
    assert controller.cancels == 2
    assert [ref.name for ref in reaper.owed] == ["kuberun-abcde"]
