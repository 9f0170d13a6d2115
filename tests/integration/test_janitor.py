"""The janitor's sweep for user Pods in a namespace other than the gateway's (kuberun/janitor.py).

The real cluster's version (a gateway Pod SIGKILLed and force-deleted, its user Pods collected
by the other replica) is tests/integration/test_deploy.py; here the sweep's choices, on
devcluster, which takes Pods in any namespace.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes_asyncio import client as k8s

from kuberun.config import Config, config_from_dict, make_api_client
from kuberun.devcluster import DevCluster
from kuberun.janitor import (
    ANNOTATION_GATEWAY_POD,
    ANNOTATION_GATEWAY_POD_UID,
    GatewayPod,
    Janitor,
    PodOwnership,
)
from kuberun.manifests import LABEL_GATEWAY, LABEL_MANAGED_BY
from kuberun.pods import PodController
from kuberun.reaper import Reaper
from kuberun.workspace import LABEL_MODE

pytestmark = pytest.mark.devcluster_only

SPEC = {"containers": [{"name": "shell", "image": "x", "command": ["sleep", "3600"]}]}


@dataclasses.dataclass
class UsersNamespace:
    """devcluster, and a gateway config whose user Pods go to namespace ``users``."""

    dev: DevCluster
    config: Config
    api_client: k8s.ApiClient

    @property
    def api(self) -> k8s.CoreV1Api:
        return k8s.CoreV1Api(self.api_client)


@pytest.fixture
async def users(tmp_path: Path) -> AsyncIterator[UsersNamespace]:
    async with DevCluster() as dev:
        kubeconfig = tmp_path / "kubeconfig"
        dev.write_kubeconfig(str(kubeconfig))
        config = config_from_dict(
            {"kubernetes": {"kubeconfig": str(kubeconfig), "namespace": "users"}}
        )
        api_client = await make_api_client(config.kubernetes)
        try:
            yield UsersNamespace(dev, config, api_client)
        finally:
            await api_client.close()


def janitor_of(api_client: k8s.ApiClient, config: Config, pod: GatewayPod) -> Janitor:
    """The janitor a gateway in ``pod`` runs, with its own to-delete list."""
    controller = PodController(api_client, logger=logging.getLogger("kuberun"))
    reaper = Reaper(controller, attempt_timeout=config.timeouts.pod_stop)
    return Janitor(
        controller,
        reaper,
        config.kubernetes.namespace,
        pod.name,
        live=set,
        list_timeout=config.timeouts.pod_stop,
        ownership=PodOwnership(config, pod),
    )


async def test_sweep_deletes_only_pods_whose_gateway_pod_is_gone(
    users: UsersNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    config, api_client = users.config, users.api_client
    api = k8s.CoreV1Api(api_client)

    async def create(ns: str, name: str, **meta: Any) -> str:
        body = {"metadata": {"name": name, **meta}, "spec": SPEC}
        pod = await api.create_namespaced_pod(ns, cast(Any, body))
        return str(pod.metadata.uid)

    live_uid = await create("gw", "gateway-live")
    managed = {LABEL_MANAGED_BY: "kuberun"}

    def owned_by(where: str, uid: str) -> dict[str, str]:
        return {ANNOTATION_GATEWAY_POD: where, ANNOTATION_GATEWAY_POD_UID: uid}

    await create(
        "users",
        "of-live",
        labels=managed,
        annotations=owned_by("gw/gateway-live", live_uid),
    )
    await create(
        "users",
        "of-gone",
        labels=managed,
        annotations=owned_by("gw/gateway-gone", "u-gone"),
    )
    # Same name, another Pod: the one it names is gone.
    await create(
        "users",
        "of-replaced",
        labels=managed,
        annotations=owned_by("gw/gateway-live", "u-old"),
    )
    await create("users", "unannotated", labels=managed)
    await create("users", "not-ours", annotations=owned_by("gw/gateway-gone", "u"))
    await create(
        "users",
        "workspace",
        labels={**managed, LABEL_MODE: "user"},
        annotations=owned_by("gw/gateway-gone", "u-gone"),
    )

    janitor = janitor_of(api_client, config, GatewayPod("gateway-live", live_uid, "gw"))
    assert janitor.vanished is not None
    with caplog.at_level(logging.INFO, logger="kuberun"):
        assert await janitor.vanished.sweep() == 2
    left = await api.list_namespaced_pod("users")
    names = {p.metadata.name for p in left.items if not p.metadata.deletion_timestamp}
    assert names == {"of-live", "unannotated", "not-ours", "workspace"}
    assert "its gateway Pod gw/gateway-gone is gone" in caplog.text


async def test_start_warns_when_the_janitor_cannot_work(
    users: UsersNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    """Configured wrongly, the gateway says so at start: no `get` on Pods in its own
    namespace (then it does not sweep), or no way to tell which namespace that is."""
    dev, config, api_client = users.dev, users.config, users.api_client
    dev.faults.fail(403, verb="get", count=None, reason="Forbidden")
    with caplog.at_level(logging.INFO, logger="kuberun"):
        janitor = janitor_of(api_client, config, GatewayPod("g", "u", "gw"))
        await janitor.start()
        assert janitor.vanished is None  # no sweeping without the owner check
        await janitor.stop()
        assert "may not read Pods in namespace 'gw'" in caplog.text
        assert "kuberun-janitor" in caplog.text

        caplog.clear()
        unknown = janitor_of(api_client, config, GatewayPod("g", "u", None))
        await unknown.start()
        assert PodOwnership(config, GatewayPod("g", "u", None)).owner is not None
        assert "cannot tell which namespace this gateway's Pod is in" in caplog.text
        await unknown.stop()


async def test_collect_leftovers_waits_for_the_deletions(users: UsersNamespace) -> None:
    """What `gatewayproc --janitor` relies on: the leftovers of this gateway id are deleted
    when it returns, whether an earlier round owed them already or not."""
    dev, config, api_client = users.dev, users.config, users.api_client
    api = k8s.CoreV1Api(api_client)
    labels = {LABEL_MANAGED_BY: "kuberun", LABEL_GATEWAY: "g"}
    for name in ("first", "second"):
        body = {"metadata": {"name": name, "labels": labels}, "spec": SPEC}
        await api.create_namespaced_pod("users", cast(Any, body))
    janitor = janitor_of(api_client, config, GatewayPod("g", "u", "users"))
    fault = dev.faults.fail(503, verb="delete", count=None)
    assert len(await janitor.sweep()) == 2  # owed, not deleted yet
    fault.cancel()
    assert await janitor.collect_leftovers(timeout=30) == []
    left = await api.list_namespaced_pod("users")
    assert not [p for p in left.items if not p.metadata.deletion_timestamp]
