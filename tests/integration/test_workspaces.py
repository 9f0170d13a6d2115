"""Per-user Pods: ``{username}`` placeholders in the Pod template (every mode)."""

from __future__ import annotations

from typing import Any

import pytest

from kuberun.manifests import dns_safe_username

from .conftest import Gateway, wait_for

pytestmark = pytest.mark.openssh

_TEMPLATE = {
    "metadata": {"generateName": "ws-{username}-", "labels": {"home": "home-{username}"}},
    "spec": {
        "containers": [
            {
                "name": "shell",
                "image": "debian",
                "env": [{"name": "CLAIM", "value": "home-{username}"}],
            }
        ]
    },
}


@pytest.mark.parametrize(
    "gateway_overrides",
    [
        {"pod__metadata": _TEMPLATE["metadata"], "pod__spec": _TEMPLATE["spec"]},
        {
            "pod__metadata": _TEMPLATE["metadata"],
            "pod__spec": _TEMPLATE["spec"],
            "pod__mode": "session",
        },
    ],
    ids=["connection", "session"],
)
async def test_username_placeholder_reaches_the_pod(
    gateway: Gateway, gateway_overrides: dict[str, Any]
) -> None:
    gateway.user = "alice"
    async with gateway.asyncssh_connect() as conn:
        result = await conn.run('printf "%s %s" "$CLAIM" "$HOSTNAME"', input="")
        claim, hostname = str(result.stdout).split()
        assert claim == "home-alice"
        assert hostname.startswith("ws-alice-")
        pods = await gateway.cluster.pods()
        assert [p["metadata"]["labels"]["home"] for p in pods] == ["home-alice"]
    await gateway.wait_no_pods()


@pytest.mark.parametrize(
    "gateway_overrides",
    [{"pod__metadata": _TEMPLATE["metadata"], "pod__spec": _TEMPLATE["spec"]}],
)
async def test_placeholder_takes_the_dns_safe_form(gateway: Gateway, tmp_path: Any) -> None:
    # The per-user authorized_keys template is not used here: one file serves every user.
    gateway.user = "Jane.Doe"
    safe = dns_safe_username("Jane.Doe")
    async with gateway.asyncssh_connect() as conn:
        result = await conn.run('printf "%s" "$CLAIM"', input="")
        assert result.stdout == f"home-{safe}"
        pods = await wait_for(gateway.cluster.pods, 10, "the Pod")
        assert pods[0]["metadata"]["labels"]["home"] == f"home-{safe}"
    await gateway.wait_no_pods()
