"""Fixtures for the unit tests: the relay codec under both implementations."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

RELAY_MODULES = {"python": "kuberun._relay_py", "cython": "kuberun._relay"}


def load_relay(name: str) -> ModuleType:
    """Import one relay implementation; skip (or fail, under KUBERUN_REQUIRE_EXTENSIONS=1)
    when the Cython extension is not built."""
    try:
        return importlib.import_module(RELAY_MODULES[name])
    except ImportError as exc:
        if os.environ.get("KUBERUN_REQUIRE_EXTENSIONS", "") not in ("", "0"):
            pytest.fail(f"KUBERUN_REQUIRE_EXTENSIONS=1 but {RELAY_MODULES[name]} is missing: {exc}")
        pytest.skip(f"{RELAY_MODULES[name]} is not built: {exc}")


@pytest.fixture(params=["python", "cython"])
def relay_impl(request: pytest.FixtureRequest) -> ModuleType:
    """The relay codec module, once per implementation."""
    return load_relay(request.param)


@pytest.fixture(scope="session")
def relay_pair() -> tuple[ModuleType, ModuleType]:
    """Both implementations at once (python, cython), for differential tests."""
    return load_relay("python"), load_relay("cython")
