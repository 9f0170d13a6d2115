"""``python -m kuberun.devcluster``: kubeconfig on start, everything stopped on SIGTERM/SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kuberun.devcluster.__main__ import parse_listen

KUBECTL = Path(sys.executable).with_name("kubectl")


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8443") == ("127.0.0.1", 8443)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":7000") == ("127.0.0.1", 7000)
    assert parse_listen("localhost") == ("localhost", 0)


def _pids_of(marker: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_until_signalled(tmp_path: Path, sig: signal.Signals) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kuberun.devcluster",
            "--listen",
            "127.0.0.1:0",
            "--kubeconfig",
            str(kubeconfig),
        ],
        stderr=subprocess.PIPE,
    )
    marker = f"{987000 + os.getpid() % 1000}.{sig.value}"
    try:
        deadline = time.monotonic() + 30
        while not kubeconfig.exists():
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline, "kubeconfig never written"
            time.sleep(0.05)
        config = yaml.safe_load(kubeconfig.read_text())
        assert config["current-context"] == "devcluster"
        assert config["clusters"][0]["name"] == "devcluster"
        assert config["clusters"][0]["cluster"]["server"].startswith("https://127.0.0.1:")
        assert oct(kubeconfig.stat().st_mode & 0o777) == "0o600"
        env = dict(os.environ, KUBECONFIG=str(kubeconfig), KUBECACHEDIR=str(tmp_path / "c"))
        subprocess.run(
            [
                str(KUBECTL),
                "run",
                "sleeper",
                "--image=x",
                "--restart=Never",
                "--command",
                "--",
                "sleep",
                marker,
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        subprocess.run(
            [str(KUBECTL), "wait", "--for=condition=Ready", "pod/sleeper", "--timeout=30s"],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        assert _pids_of(f"sleep {marker}")
        server.send_signal(sig)
        assert server.wait(timeout=30) == 0
        assert _pids_of(f"sleep {marker}") == []
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
