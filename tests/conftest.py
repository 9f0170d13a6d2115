"""Shared test configuration: every async test runs on asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from typing import Any

import pytest


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return factories
    factories["uvloop"] = uvloop.new_event_loop
    return factories


def pytest_report_header(config: pytest.Config) -> str:
    """Which cluster the integration tests use (tests/integration/clusters.py)."""
    if os.environ.get("KUBERUN_TEST_CLUSTER") == "real":
        return f"integration cluster: real ({os.environ.get('KUBERUN_REAL_KUBECONFIG')})"
    return "integration cluster: devcluster"


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "openssh: uses the OpenSSH client binaries")
