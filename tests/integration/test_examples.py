"""The programs in examples/ run as written: OpenSSH logs in through each, SIGTERM stops
it with every Pod deleted; the README quotes them; a program that forgets to drain
says so at exit."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from kuberun.devcluster import DevCluster

from .conftest import SSH_OPTS, wait_for
from .test_cli import Proc, make_key

pytestmark = [
    pytest.mark.asyncio(loop_factories=["uvloop"]),
    pytest.mark.devcluster_only,  # the examples' docstrings try them on devcluster too
]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.fixture
async def cluster() -> AsyncIterator[DevCluster]:
    async with DevCluster() as c:
        yield c


def _config(tmp: Path, cluster: DevCluster) -> Path:
    cluster.write_kubeconfig(str(tmp / "kubeconfig"))
    path = tmp / "kuberun.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "kubernetes": {"kubeconfig": str(tmp / "kubeconfig")},
                "timeouts": {"pod_start": 20, "pod_stop": 10},
            }
        )
    )
    return path


async def _example(script: str | Path, *args: str) -> tuple[Proc, int]:
    proc = Proc(
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLES / script),
            *args,
            "--listen",
            "127.0.0.1:0",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    )
    match = await proc.wait_output(rb"listening on 127\.0\.0\.1:(\d+)")
    return proc, int(match.group(1))


async def _ssh(
    port: int, *command: str, opts: list[str], env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "ssh",
        *opts,  # first: OpenSSH keeps the first value of an option (BatchMode)
        *SSH_OPTS,
        "-p",
        str(port),
        "alice@127.0.0.1",
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )


def _password_opts(tmp: Path, password: str) -> tuple[list[str], dict[str, str]]:
    """OpenSSH typing a password: SSH_ASKPASS, forced, answers the prompt."""
    askpass = tmp / "askpass"
    askpass.write_text(f"#!/bin/sh\necho '{password}'\n")
    askpass.chmod(0o700)
    env = dict(os.environ, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force")
    opts = [
        "-o",
        "BatchMode=no",
        "-o",
        "PreferredAuthentications=password",
        "-o",
        "PubkeyAuthentication=no",
    ]
    return opts, env


async def _shutdown_example(
    tmp: Path, cluster: DevCluster, script: str | Path = "graceful_shutdown.py"
) -> tuple[Proc, int, asyncio.subprocess.Process]:
    """graceful_shutdown.py (or a variant), with one client in a long session."""
    key, pub = make_key(tmp / "client")
    (tmp / "authorized_keys").write_bytes(pub)
    proc, port = await _example(
        script, str(_config(tmp, cluster)), "--authorized-keys", str(tmp / "authorized_keys")
    )
    ssh = await _ssh(port, "echo started; sleep 600", opts=["-i", str(key)])
    assert ssh.stdout is not None
    assert await asyncio.wait_for(ssh.stdout.readline(), 60) == b"started\n"
    return proc, port, ssh


async def _stopped_cleanly(proc: Proc, cluster: DevCluster) -> None:
    assert await proc.stop(signal.SIGTERM) == 0, proc.err.decode(errors="replace")
    assert cluster.pods() == []


async def test_password_auth(tmp_path: Path, cluster: DevCluster) -> None:
    proc, port = await _example("password_auth.py", str(_config(tmp_path, cluster)))
    try:
        opts, env = _password_opts(tmp_path, "wonderland")
        ssh = await _ssh(port, "echo", "hello from the Pod", opts=opts, env=env)
        out, err = await asyncio.wait_for(ssh.communicate(), 60)
        assert (ssh.returncode, out) == (0, b"hello from the Pod\n"), err
        opts, env = _password_opts(tmp_path, "not-it")
        ssh = await _ssh(port, "true", opts=[*opts, "-o", "NumberOfPasswordPrompts=1"], env=env)
        _, err = await asyncio.wait_for(ssh.communicate(), 60)
        assert ssh.returncode == 255 and b"Permission denied" in err
    finally:
        await _stopped_cleanly(proc, cluster)


async def test_embedding(tmp_path: Path, cluster: DevCluster) -> None:
    key, pub = make_key(tmp_path / "client")
    (tmp_path / "alice.pub").write_bytes(pub)
    proc, port = await _example(
        "embedding.py",
        str(_config(tmp_path, cluster)),
        "--host-key",
        str(tmp_path / "host_key"),
        "--user",
        f"alice={tmp_path / 'alice.pub'}",
    )
    try:
        ssh = await _ssh(port, "echo $((6 * 7))", opts=["-i", str(key), "-v"])
        out, err = await asyncio.wait_for(ssh.communicate(), 60)
        assert (ssh.returncode, out) == (0, b"42\n"), err
        assert b"remote software version ExampleGateway_1.0" in err
    finally:
        await _stopped_cleanly(proc, cluster)
    assert (tmp_path / "host_key").exists()


async def test_graceful_shutdown(tmp_path: Path, cluster: DevCluster) -> None:
    proc, _, ssh = await _shutdown_example(tmp_path, cluster)
    try:
        assert len(cluster.pods()) == 1
    finally:
        await _stopped_cleanly(proc, cluster)
    _, err = await asyncio.wait_for(ssh.communicate(), 30)
    assert ssh.returncode == 254
    assert b"kuberun: maintenance: back in five minutes" in err


async def test_forgetting_to_drain_is_said_at_exit(tmp_path: Path, cluster: DevCluster) -> None:
    # graceful_shutdown.py without its drain(): the program says what it leaves.
    source = (EXAMPLES / "graceful_shutdown.py").read_text()
    drain = 'left = await gateway.drain("maintenance: back in five minutes", grace=args.grace)'
    assert drain in source
    careless = tmp_path / "careless.py"
    careless.write_text(source.replace(drain, "left = []"))
    proc, _, ssh = await _shutdown_example(tmp_path, cluster, careless)
    await proc.stop(signal.SIGTERM)
    assert b"exiting without Gateway.drain(): 1 connection(s) open" in proc.err
    if ssh.returncode is None:
        ssh.kill()
    await ssh.wait()
    # The janitor of the next run (same gateway id) deletes what it left.
    assert len(cluster.pods()) == 1
    proc, _ = await _example(
        "graceful_shutdown.py",
        str(_config(tmp_path, cluster)),
        "--authorized-keys",
        str(tmp_path / "authorized_keys"),
    )
    try:
        await wait_for(
            lambda: all(p["metadata"].get("deletionTimestamp") for p in cluster.pods()),
            30,
            "leftover deleted by the next run",
        )
    finally:
        await _stopped_cleanly(proc, cluster)


async def test_readme_quotes_the_examples() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for example in sorted(EXAMPLES.glob("*.py")):
        assert f"examples/{example.name}" in readme, example.name
    # The main one verbatim, from its imports on: what the README shows runs.
    source = (EXAMPLES / "password_auth.py").read_text(encoding="utf-8")
    body = source[source.index("import argparse") :]
    assert body in readme
