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
