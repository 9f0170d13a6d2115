"""Timeouts and cancellation that never lose a cancel.

Before Python 3.12, :func:`asyncio.wait_for` returns the inner result when the inner
awaitable finishes in the same turn of the event loop as a cancel of the caller, and the
cancel is lost (CPython gh-86296): the caller goes on as if it had never been cancelled.
For kuberun that means a Pod start, cancelled because the client left, can run on to its
deadline while the connection's clean-up waits for it, and a gateway shutting down in the
meantime never hears of the Pod. The two helpers here keep a cancel a cancel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

__all__ = ["cancel_and_wait", "wait_for"]

_T = TypeVar("_T")

#: Seconds between two cancels of a task that has not ended after the first.
RECANCEL_INTERVAL = 1.0


async def wait_for(aw: Awaitable[_T], timeout: float | None) -> _T:
    """Like :func:`asyncio.wait_for`, but a cancel of the caller always raises.

    On a cancel the inner awaitable is cancelled and awaited, then
    :class:`asyncio.CancelledError` is raised, even if the inner one had finished: a
    caller that must not lose that result shields the awaitable and looks at it itself.
    On a timeout the inner awaitable is cancelled and awaited; if it still produced a
    result, that is returned, else :class:`asyncio.TimeoutError` is raised.
    """
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    if not done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise asyncio.TimeoutError
    return task.result()


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has ended, whatever it ends with.

    The cancel is repeated every :data:`RECANCEL_INTERVAL` seconds while the task runs
    on: code outside kuberun's control (a library's own ``asyncio.wait_for``) can still
    lose one.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait((task,), timeout=RECANCEL_INTERVAL)
