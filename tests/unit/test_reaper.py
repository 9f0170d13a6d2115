"""The to-delete list (kuberun.reaper) and the gateway id (kuberun.janitor), without a cluster."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from kuberun.config import config_from_dict
from kuberun.errors import KubernetesAPIError, KuberunError
from kuberun.janitor import GATEWAY_ID_ENV, gateway_id
from kuberun.manifests import is_valid_label_value
from kuberun.metrics import Metrics
from kuberun.pods import PodRef
from kuberun.reaper import Reaper


class _Controller:
    """Fails each deletion while ``failing`` is set."""

    def __init__(self) -> None:
        self.failing = True
        self.calls: list[str] = []

    async def try_delete(self, ref: PodRef, timeout: float) -> KuberunError | None:
        self.calls.append(ref.name)
        await asyncio.sleep(0)
        if self.failing:
            return KubernetesAPIError(503, "ServiceUnavailable", "injected")
        return None


def _reaper(controller: _Controller, metrics: Metrics | None = None) -> Reaper:
    return Reaper(
        controller,  # type: ignore[arg-type]
        attempt_timeout=1,
        metrics=metrics,
        backoff_first=0.01,
        backoff_max=0.02,
        summary_interval=3600,
    )


def _gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("kuberun_pods_pending_deletion")


async def test_a_debt_is_retried_until_paid(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kuberun")
    controller, metrics = _Controller(), Metrics()
    reaper = _reaper(controller, metrics)
    a, b = PodRef("default", "a", "uid-a"), PodRef("default", "b", "uid-b")
    reaper.owe(a)
    reaper.owe(a)  # owed once
    reaper.owe(b)
    assert reaper.pending == [a, b] and _gauge(metrics) == 2
    assert await reaper.settle(a, 0.2) is False  # a caller stops waiting...
    assert reaper.owes(a)  # ...the debt stays
    assert len(controller.calls) > 4
    controller.failing = False
    assert await reaper.settle(a, 5) and await reaper.settle(b, 5)
    assert reaper.pending == [] and _gauge(metrics) == 0
    assert metrics.registry.get_sample_value("kuberun_pods_deleted_total") == 2
    # One line when deletions start failing, not one per Pod or per attempt.
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "keeps trying" in warnings[0].getMessage()
    assert "deleted after" in caplog.text


async def test_drain_returns_what_is_left_and_close_stops_paying() -> None:
    controller = _Controller()
    reaper = _reaper(controller)
    ref = PodRef("default", "a", "uid-a")
    reaper.owe(ref)
    assert await reaper.drain(0.1) == [ref]
    assert await reaper.close() == [ref]
    calls = len(controller.calls)
    await asyncio.sleep(0.05)
    assert len(controller.calls) == calls


async def test_paid_from_outside_and_no_uid() -> None:
    controller = _Controller()
    reaper = _reaper(controller)
    ref = PodRef("default", "a", "uid-a")
    reaper.owe(ref)
    reaper.paid(ref)  # e.g. seen deleted some other way
    assert not reaper.owes(ref) and await reaper.settle(ref, 0)
    reaper.owe(PodRef("default", "nameonly", ""))  # never deleted by name alone
    assert reaper.pending == []
    await reaper.close()


def test_gateway_id(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in GATEWAY_ID_ENV:
        monkeypatch.delenv(var, raising=False)
    fixed = config_from_dict({"ssh": {"listen": "0.0.0.0:2222"}})
    assert gateway_id(fixed) == gateway_id(fixed)  # stable: derived, not random
    assert gateway_id(fixed).endswith("-0.0.0.0-2222")
    assert is_valid_label_value(gateway_id(fixed))
    assert gateway_id(config_from_dict({"ssh": {"listen": "0.0.0.0:2223"}})) != gateway_id(fixed)
    ephemeral = config_from_dict({"ssh": {"listen": "127.0.0.1:0"}})
    assert gateway_id(ephemeral) == gateway_id(ephemeral)  # one per process
    assert gateway_id(config_from_dict({"kubernetes": {"gateway_id": "gw-a"}})) == "gw-a"
    monkeypatch.setenv("KUBERUN_POD_NAME", "gateway-7f9c")  # the downward API
    assert gateway_id(fixed) == "gateway-7f9c"
    # The config wins over the environment.
    assert gateway_id(config_from_dict({"kubernetes": {"gateway_id": "gw-a"}})) == "gw-a"


@pytest.mark.parametrize("bad", ["", "-x", "a b", "x" * 64, 7])
def test_gateway_id_must_be_a_label_value(bad: Any) -> None:
    from kuberun.errors import ConfigError

    with pytest.raises(ConfigError, match=r"kubernetes\.gateway_id"):
        config_from_dict({"kubernetes": {"gateway_id": bad}})


class _Lister(_Controller):
    """Lists nothing, until a late Pod appears (a create that got no answer made it)."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False
        self.pods: list[dict[str, Any]] = []
        self.lists = 0

    async def list_pods(self, namespace: str, selector: str, deadline: float) -> list[Any]:
        self.lists += 1
        return list(self.pods)


async def test_search_owes_a_pod_that_appears_late() -> None:
    controller = _Lister()
    reaper = _reaper(controller)
    reaper.search("default", "kuberun.io/connection-id=c1", window=5)
    await asyncio.sleep(0.05)
    assert reaper.searching == 1 and controller.calls == []
    controller.pods = [{"metadata": {"name": "late", "uid": "uid-late"}}]
    for _ in range(100):
        if controller.calls:
            break
        await asyncio.sleep(0.02)
    assert controller.calls == ["late"]  # deleted once found, by UID
    assert await reaper.close() == []
    assert reaper.searching == 0
