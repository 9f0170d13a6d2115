"""kuberun.relay picks an implementation from the environment."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import ModuleType

import pytest

import kuberun._relay_py as relay_py
from kuberun import relay


def _probe(env: dict[str, str], block_extension: bool = False) -> subprocess.CompletedProcess[str]:
    """Import kuberun.relay in a fresh interpreter and print what it chose."""
    code = """
        import sys, warnings
        if BLOCK:
            sys.modules["kuberun._relay"] = None  # makes 'import kuberun._relay' fail
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            from kuberun import relay
        print(relay.IMPLEMENTATION, relay.ExecDecoder.__module__, len(caught))
    """.replace("BLOCK", str(block_extension))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KUBERUN_")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_no_extensions_forces_python() -> None:
    out = _probe({"KUBERUN_NO_EXTENSIONS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["python", "kuberun._relay_py", "0"]


def test_missing_extension_falls_back_with_a_warning() -> None:
    out = _probe({}, block_extension=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["python", "kuberun._relay_py", "1"]
    assert "pure-Python relay" in out.stderr  # the logging warning


def test_required_extension_missing_is_an_import_error() -> None:
    out = _probe({"KUBERUN_REQUIRE_EXTENSIONS": "1"}, block_extension=True)
    assert out.returncode != 0
    assert "ImportError" in out.stderr and "KUBERUN_REQUIRE_EXTENSIONS" in out.stderr


def test_extension_is_preferred(relay_pair: object) -> None:
    out = _probe({"KUBERUN_REQUIRE_EXTENSIONS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cython", "kuberun._relay", "0"]


def test_public_names() -> None:
    for name in relay.__all__:
        assert hasattr(relay, name), name
    assert relay.IMPLEMENTATION in ("cython", "python")
    assert relay.decode_status is relay_py.decode_status
    assert (relay.PROTOCOL_V5, relay.PROTOCOL_V4, relay.PROTOCOL_V1) == (
        "v5.channel.k8s.io",
        "v4.channel.k8s.io",
        "channel.k8s.io",
    )
    assert relay.DEFAULT_MAX_PAYLOAD == 16 * 1024 * 1024
    assert relay.DEFAULT_MAX_STATUS == 64 * 1024


@pytest.mark.parametrize("impl_name", ["python", "cython"])
def test_sink_protocol_is_satisfied_by_a_plain_class(
    impl_name: str, relay_pair: tuple[ModuleType, ModuleType]
) -> None:
    impl = relay_pair[0 if impl_name == "python" else 1]

    class Sink:
        def on_stdout(self, data: memoryview) -> None: ...
        def on_stderr(self, data: memoryview) -> None: ...
        def on_status(self, data: bytes) -> None: ...
        def on_ping(self, payload: bytes) -> None: ...
        def on_close(self, code: int | None, reason: str) -> None: ...

    sink: relay.ExecSink = Sink()
    impl.ExecDecoder(sink).feed(b"\x82\x02\x01x")
