"""How a gateway's user Pods are to be collected: ownerReference, annotations, or neither."""

from __future__ import annotations

from pathlib import Path

import pytest

from kuberun import janitor
from kuberun.config import Config, config_from_dict
from kuberun.janitor import (
    ANNOTATION_GATEWAY_POD,
    ANNOTATION_GATEWAY_POD_UID,
    GatewayPod,
    PodOwnership,
    gateway_pod,
)
from kuberun.manifests import build_pod


def config(**pod: object) -> Config:
    return config_from_dict({"kubernetes": {"namespace": "users"}, "pod": pod})


def test_gateway_pod_from_the_downward_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(janitor, "_SA_NAMESPACE", tmp_path / "absent")
    assert gateway_pod({}) is None
    assert gateway_pod({"KUBERUN_POD_NAME": "g"}) is None
    env = {"KUBERUN_POD_NAME": "g", "KUBERUN_POD_UID": "u"}
    assert gateway_pod(env) == GatewayPod("g", "u", None)
    (tmp_path / "ns").write_text("from-mount\n")
    monkeypatch.setattr(janitor, "_SA_NAMESPACE", tmp_path / "ns")
    assert gateway_pod(env) == GatewayPod("g", "u", "from-mount")
    assert gateway_pod({**env, "KUBERUN_POD_NAMESPACE": "gw"}) == GatewayPod("g", "u", "gw")


def test_same_namespace_owner_reference() -> None:
    j = PodOwnership(config(), GatewayPod("g", "u", "users"))
    assert j.owner == {"apiVersion": "v1", "kind": "Pod", "name": "g", "uid": "u"}
    assert not j.cross_namespace
    pod = build_pod(j.config.pod, connection_id="c", username="alice", owner=j.owner)
    assert pod["metadata"]["ownerReferences"][0]["uid"] == "u"
    assert ANNOTATION_GATEWAY_POD not in pod["metadata"]["annotations"]


def test_unknown_namespace_is_taken_as_the_same() -> None:
    j = PodOwnership(config(), GatewayPod("g", "u", None))
    assert j.owner is not None and not j.cross_namespace


def test_other_namespace_annotations_not_owner_reference() -> None:
    base = config(metadata={"generateName": "x-", "annotations": {"team": "a"}})
    j = PodOwnership(base, GatewayPod("g", "u", "gw"))
    assert j.owner is None and j.cross_namespace
    pod = build_pod(j.config.pod, connection_id="c", username="alice", owner=j.owner)
    meta = pod["metadata"]
    assert "ownerReferences" not in meta
    assert meta["annotations"][ANNOTATION_GATEWAY_POD] == "gw/g"
    assert meta["annotations"][ANNOTATION_GATEWAY_POD_UID] == "u"
    assert meta["annotations"]["team"] == "a"
    # The configured template itself is untouched.
    assert ANNOTATION_GATEWAY_POD not in base.pod.metadata["annotations"]


def test_user_mode_pods_have_no_gateway_owner() -> None:
    j = PodOwnership(config(mode="user"), GatewayPod("g", "u", "gw"))
    assert j.owner is None and not j.cross_namespace
    assert ANNOTATION_GATEWAY_POD not in (j.config.pod.metadata.get("annotations") or {})


def test_outside_a_pod_nothing_changes() -> None:
    base = config()
    j = PodOwnership(base, None)
    assert j.owner is None and j.config is base
