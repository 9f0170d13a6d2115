"""Stopping the cluster while a graceful Pod deletion is under way."""

from __future__ import annotations

import asyncio

from kuberun.devcluster import DevCluster

from .conftest import Api, pod


async def test_stop_while_a_deletion_waits_for_its_grace_period(api: Api) -> None:
    # A container that ignores SIGTERM keeps the deletion's stop waiting for its
    # grace period; stopping the cluster cancels that deletion part-way, and the
    # cluster's own stop must then finish the job instead of waiting forever.
    cluster: DevCluster = api.cluster
    await api.create_pod(pod("stubborn", ["sh", "-c", "trap '' TERM; while :; do sleep 1; done"]))
    await api.running("stubborn")
    status, _, _ = await api.request(
        "DELETE",
        "/api/v1/namespaces/default/pods/stubborn",
        {"gracePeriodSeconds": 30},
    )
    assert status == 200
    await asyncio.sleep(0.3)  # the deletion is now waiting out the grace period
    await asyncio.wait_for(cluster.stop(), 20)
    assert cluster.process_count() == 0
