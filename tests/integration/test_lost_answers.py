"""API calls whose answers are lost or late: kuberun retries each attempt on its own
clock, adopts a Pod its lost create made, and deletes Pods that appear late.

Control-plane behaviour only: one event loop and one relay implementation.
"""

from __future__ import annotations

import pytest

from .conftest import Gateway

POD_START = 6
POD_STOP = 6
#: Longer than one attempt (a third of the budget), shorter than the whole budget
#: plus the retry: the first attempt gives up, the second gets through.
STUCK = 8

pytestmark = [
    pytest.mark.devcluster_only,  # injected faults
    pytest.mark.asyncio(loop_factories=["uvloop"]),
    pytest.mark.parametrize(
        "gateway_overrides",
        [{"timeouts__pod_start": POD_START, "timeouts__pod_stop": POD_STOP}],
    ),
]


@pytest.fixture
def relay_impl() -> str:
    return "cython"


async def _session_ok(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as conn:
        result = await conn.run("echo ok")
        assert (result.exit_status, result.stdout) == (0, "ok\n"), result.stderr


async def _no_pods_left(gateway: Gateway) -> None:
    # Deletions, and the search for Pods of creates that lost their answer, end
    # within timeouts.pod_stop; devcluster then needs a moment to stop the processes.
    await gateway.wait_no_pods(POD_STOP + 10)


async def test_create_whose_answer_is_late_is_adopted(gateway: Gateway) -> None:
    # The Pod is made at once; only the answer is held back past the attempt's timeout.
    gateway.cluster.dev.faults.slow_response(STUCK, verb="create", count=1)
    await _session_ok(gateway)
    creates = gateway.cluster.dev.requests.where(verb="create")
    assert len(creates) == 1  # adopted (found by its labels), not created twice
    await _no_pods_left(gateway)


async def test_stuck_create_is_retried_and_a_late_pod_deleted(gateway: Gateway) -> None:
    # The first create hangs before it is handled; it may still make its Pod
    # after the retry made another one. Neither may be left behind.
    gateway.cluster.dev.faults.latency(STUCK, verb="create", count=1)
    await _session_ok(gateway)
    await _no_pods_left(gateway)


@pytest.mark.parametrize("kind", ["slow_response", "latency"])
async def test_stuck_delete_is_retried(gateway: Gateway, kind: str) -> None:
    getattr(gateway.cluster.dev.faults, kind)(STUCK, verb="delete", count=1)
    await _session_ok(gateway)
    await _no_pods_left(gateway)
    assert len(gateway.cluster.dev.requests.where(verb="delete")) >= 1
