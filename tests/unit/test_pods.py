"""Pure Pod status logic: readiness, fail-fast reasons, progress lines."""

from __future__ import annotations

from typing import Any

import pytest

from kuberun.pods import pod_failure, pod_is_ready, pod_progress


def pod(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "status": status}


def test_ready_condition() -> None:
    assert pod_is_ready(pod(conditions=[{"type": "Ready", "status": "True"}]))
    assert not pod_is_ready(pod(conditions=[{"type": "Ready", "status": "False"}]))
    assert not pod_is_ready(pod())


@pytest.mark.parametrize(
    "reason",
    [
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "CrashLoopBackOff",
    ],
)
def test_fatal_waiting_reasons(reason: str) -> None:
    p = pod(
        phase="Pending",
        containerStatuses=[
            {"name": "shell", "state": {"waiting": {"reason": reason, "message": "details"}}}
        ],
    )
    failure = pod_failure(p)
    assert failure is not None
    assert failure.reason == reason
    assert reason in str(failure) and "details" in str(failure)


def test_container_creating_is_not_fatal() -> None:
    p = pod(
        phase="Pending",
        containerStatuses=[
            {"name": "shell", "state": {"waiting": {"reason": "ContainerCreating"}}}
        ],
    )
    assert pod_failure(p) is None
    assert pod_progress(p) == "Pending: ContainerCreating"


def test_unschedulable() -> None:
    p = pod(
        phase="Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available",
            }
        ],
    )
    failure = pod_failure(p)
    assert failure is not None and failure.reason == "Unschedulable"
    assert "0/3 nodes" in str(failure)


@pytest.mark.parametrize("phase", ["Failed", "Succeeded"])
def test_terminal_phases_fail(phase: str) -> None:
    failure = pod_failure(pod(phase=phase))
    assert failure is not None and failure.reason == phase


def test_deleted_pod_fails() -> None:
    p = {"metadata": {"name": "p", "deletionTimestamp": "2026-01-01T00:00:00Z"}, "status": {}}
    failure = pod_failure(p)
    assert failure is not None and failure.reason == "Deleted"
