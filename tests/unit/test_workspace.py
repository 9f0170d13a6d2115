"""Pure parts of user mode: the workspace name, claims, MicroTime, Lease liveness."""

from __future__ import annotations

import datetime
import re
import time

import pytest

from kuberun.manifests import dns_safe_username
from kuberun.replicas import ReplicaLease, micro_time
from kuberun.workspace import CLAIM_PREFIX, _claims, _is_dead, workspace_name

MICRO = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


def test_workspace_name_from_generate_name_or_name_template() -> None:
    assert workspace_name({"generateName": "ws-"}, "alice") == "ws-alice"
    assert workspace_name({}, "alice") == "kuberun-alice"
    assert workspace_name({"name": "home-{username}-pod"}, "Jane.Doe") == (
        f"home-{dns_safe_username('Jane.Doe')}-pod"
    )
    # Distinct usernames, distinct Pods; the same username, the same Pod on every replica.
    assert workspace_name({}, "Alice") != workspace_name({}, "alice")
    assert workspace_name({}, "a b") == workspace_name({}, "a b")


def test_micro_time_always_has_six_fractional_digits() -> None:
    whole = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    assert micro_time(whole) == "2026-01-02T03:04:05.000000Z"
    plus_one = datetime.timezone(datetime.timedelta(hours=1))
    assert micro_time(datetime.datetime(2026, 1, 2, 4, 4, 5, 7, tzinfo=plus_one)) == (
        "2026-01-02T03:04:05.000007Z"
    )
    assert MICRO.fullmatch(micro_time())


def test_claims_and_dead_pods() -> None:
    pod = {
        "metadata": {
            "annotations": {CLAIM_PREFIX + "kuberun-replica-a": "1", "other/x": "y"},
        },
        "status": {"phase": "Running"},
    }
    assert _claims(pod) == {"kuberun-replica-a": "1"}
    assert not _is_dead(pod)
    assert _is_dead({"metadata": {"deletionTimestamp": "x"}, "status": {"phase": "Running"}})
    assert _is_dead({"metadata": {}, "status": {"phase": "Failed"}})
    assert _is_dead({"metadata": {}, "status": {"phase": "Succeeded"}})


def test_a_peer_lease_is_alive_until_seen_unchanged_for_its_duration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lease = ReplicaLease.__new__(ReplicaLease)
    lease.name, lease.duration, lease._seen = "kuberun-replica-me", 3.0, {}
    lease._renewed = float("-inf")
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    # Never seen: alive for a duration from first sight (its Lease may be read later).
    assert lease.alive("kuberun-replica-other")
    now[0] += 2.9
    assert lease.alive("kuberun-replica-other")
    now[0] += 0.2
    assert not lease.alive("kuberun-replica-other")
    # Our own Lease is alive only while our renewals are recent.
    assert not lease.alive("kuberun-replica-me")
    lease._renewed = now[0]
    assert lease.alive("kuberun-replica-me")
    now[0] += 2.1
    assert not lease.alive("kuberun-replica-me")  # gave up at two thirds of the duration
