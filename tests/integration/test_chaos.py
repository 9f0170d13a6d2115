"""A short seeded chaos run (the long one is ``make chaos``; see ``chaos.py``).

Two gateway processes, one after the other (uvloop with the Cython relay, asyncio
with the pure-Python one), each taking random connection lifecycles while
devcluster injects faults, then a SIGTERM mid-traffic. ``KUBERUN_CHAOS_SEED``
replays another seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .chaos import Options, run_chaos

pytestmark = [pytest.mark.openssh, pytest.mark.asyncio(loop_factories=["uvloop"])]

SEED = int(os.environ.get("KUBERUN_CHAOS_SEED", "20261130"))


@pytest.mark.devcluster_only  # its faults are devcluster's (make chaos-real: the real ones)
async def test_chaos(tmp_path: Path) -> None:
    options = Options(seed=SEED, lifecycles=80, epochs=2, concurrency=6, shutdown_lifecycles=6)
    report = await run_chaos(options, tmp_path)
    summary = report.summary()
    print(summary)
    assert not report.violations, f"{summary}\n(gateway logs in {tmp_path})"
    assert report.chaos_lifecycles == 80 and report.leaked_pods == 0
    assert report.unhandled_exceptions == 0 and report.silent_ends == 0
    # The faults really fired and the sessions really met them.
    assert sum(report.fired.values()) >= 40, summary
    assert any(o.result == "kuberun-error" for o in report.outcomes), summary
    assert any(o.result == "killed" for o in report.outcomes), summary
    assert all(e.gateway_exit == 0 for e in report.epochs), summary


@pytest.mark.devcluster_only  # devcluster's faults, and a probe in its storage
async def test_chaos_replicas(tmp_path: Path) -> None:
    """User mode on three replicas, killed, stopped and restarted under faults."""
    from .chaos_replicas import ReplicaOptions, run_replica_chaos

    options = ReplicaOptions(seed=SEED, replicas=3, lifecycles=40, concurrency=6, users=3)
    report = await run_replica_chaos(options, tmp_path)
    summary = report.summary()
    print(summary)
    assert not report.violations, f"{summary}\n(replica logs in {tmp_path})"
    assert report.deleted_under_connection == 0 and report.duplicates == 0
    assert report.leaked_pods == 0 and report.unhandled_exceptions == 0
    assert report.lifecycles == 40 and report.shared_checks > 0, summary
    assert report.disruptions["restart"] >= 1, summary
    assert report.pods_deleted >= 1, summary  # idle deletion really happened
