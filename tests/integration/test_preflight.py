"""`kuberun check` catches what `serve` would die on, through the same checks: each
problem gets a message naming its key and exit status 2, from both commands."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import yaml

from kuberun.devcluster import DevCluster

from .test_cli import KUBERUN, run, serve_config, start

pytestmark = [
    pytest.mark.asyncio(loop_factories=["uvloop"]),
    pytest.mark.devcluster_only,  # about the host and the config, not the cluster
]


@pytest.fixture
async def cluster() -> AsyncIterator[DevCluster]:
    async with DevCluster() as c:
        yield c


def _public_host_key(tmp: Path, config: dict[str, Any]) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp / "host_key.pub").write_bytes(key.export_public_key())
    config["ssh"]["host_keys"] = [str(tmp / "host_key.pub")]


def _unresolvable_listen(tmp: Path, config: dict[str, Any]) -> None:
    config["ssh"]["listen"] = "not-a-host.invalid:2223"


def _host_key_in_missing_dir(tmp: Path, config: dict[str, Any]) -> None:
    config["ssh"]["host_keys"] = [str(tmp / "nonexistent" / "dir" / "key")]


def _garbage_host_key(tmp: Path, config: dict[str, Any]) -> None:
    (tmp / "garbage").write_text("not a key\n")
    config["ssh"]["host_keys"] = [str(tmp / "garbage")]


PROBLEMS: dict[str, tuple[Callable[[Path, dict[str, Any]], None], bytes, bytes]] = {
    "public host key": (_public_host_key, b"ssh.host_keys[0]", b"is a public key"),
    "unresolvable listen": (_unresolvable_listen, b"ssh.listen", b"cannot resolve host"),
    "missing key dir": (_host_key_in_missing_dir, b"ssh.host_keys[0]", b"does not exist"),
    "not a key": (_garbage_host_key, b"ssh.host_keys[0]", b"is not a private key"),
}


@pytest.mark.parametrize("command", ["check", "serve"])
@pytest.mark.parametrize("problem", list(PROBLEMS))
async def test_problem_named_with_exit_2(
    tmp_path: Path,
    cluster: DevCluster,
    command: str,
    problem: str,
) -> None:
    cluster.write_kubeconfig(str(tmp_path / "kubeconfig"))
    config = serve_config(tmp_path, tmp_path / "kubeconfig")
    make_problem, key, words = PROBLEMS[problem]
    make_problem(tmp_path, config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code, _, err = await run(*KUBERUN, command, "--config", str(path))
    assert code == 2, err
    assert key in err and words in err, err
    assert b"Traceback" not in err and b"listening" not in err
    assert not (tmp_path / "nonexistent").exists()  # never creates directories


async def test_missing_authorized_keys_is_a_warning(
    tmp_path: Path,
    cluster: DevCluster,
) -> None:
    cluster.write_kubeconfig(str(tmp_path / "kubeconfig"))
    config = serve_config(tmp_path, tmp_path / "kubeconfig")
    config["ssh"]["authorized_keys"] = str(tmp_path / "authorized_keys")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    warning = b"ssh.authorized_keys: " + str(tmp_path / "authorized_keys").encode()
    code, out, err = await run(*KUBERUN, "check", "--config", str(path))
    assert code == 0, err
    assert warning in err and b"does not exist" in err
    assert b"config OK" in out
    proc = await start("serve", "--config", str(path))
    await proc.wait_output(rb"listening on")
    assert await proc.stop(signal.SIGTERM) == 0
    assert warning in proc.err and b"WARNING" in proc.err
