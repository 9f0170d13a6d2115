"""The `kuberun` command as users run it: demo, serve, check; shutdown and garbage collection."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any, cast

import asyncssh
import pytest
import yaml

from .clusters import REAL_IMAGE, TestCluster
from .conftest import SSH_OPTS, wait_for, wait_no_pods

pytestmark = pytest.mark.openssh

KUBERUN = [sys.executable, "-m", "kuberun"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A `kuberun` subprocess whose output is collected as it runs."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out = b""
        self.err = b""
        self._tasks = [
            asyncio.ensure_future(self._pump(proc.stdout, "out")),
            asyncio.ensure_future(self._pump(proc.stderr, "err")),
        ]

    async def _pump(self, stream: asyncio.StreamReader | None, name: str) -> None:
        assert stream is not None
        while chunk := await stream.read(65536):
            setattr(self, name, getattr(self, name) + chunk)

    async def wait_output(self, pattern: bytes, timeout: float = 60) -> re.Match[bytes]:
        regex = re.compile(pattern)

        def found() -> re.Match[bytes] | None:
            if self.proc.returncode is not None:
                pytest.fail(f"kuberun exited early: {self.err.decode(errors='replace')}")
            return regex.search(self.out + self.err)

        result: re.Match[bytes] = await wait_for(found, timeout, f"output {pattern!r}")
        return result

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.gather(*self._tasks)
        return code


async def start(*args: str, env: dict[str, str] | None = None) -> Proc:
    proc = await asyncio.create_subprocess_exec(
        *KUBERUN,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    return Proc(proc)


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out, err


def make_key(directory: Path) -> tuple[Path, bytes]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "id_ed25519"
    path.write_bytes(key.export_private_key())
    path.chmod(0o600)
    return path, key.export_public_key()


def ssh_cmd(key: Path, port: int, *command: str, user: str = "alice") -> list[str]:
    return ["ssh", *SSH_OPTS, "-i", str(key), "-p", str(port), f"{user}@127.0.0.1", *command]


def serve_config(
    tmp: Path, kubeconfig: Path, cluster: TestCluster | None = None, **pod: Any
) -> dict[str, Any]:
    """A `kuberun serve` config; with ``cluster``, for that cluster (see clusters.py)."""
    config: dict[str, Any] = {
        "ssh": {
            "listen": "127.0.0.1:0",
            "host_keys": [str(tmp / "host_key")],
            "authorized_keys": str(tmp / "keys" / "{username}"),
        },
        "kubernetes": {"kubeconfig": str(kubeconfig), "context": "devcluster"},
        "pod": {"subsystems": {}, **pod},
        "timeouts": {"pod_start": 20, "pod_stop": 10},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
    }
    if cluster is not None:
        config["kubernetes"] = cluster.kubernetes_config(kubeconfig)
        config["timeouts"]["pod_start"] = cluster.pod_start
        spec = cluster.pod_spec(tmp, config["pod"].pop("spec", None))
        if spec is not None:
            config["pod"]["spec"] = spec
    return config


async def start_serve(
    tmp: Path, cluster: TestCluster, env: dict[str, str] | None = None, **pod: Any
) -> tuple[Proc, int, Path, dict[str, Any]]:
    tmp.mkdir(parents=True, exist_ok=True)
    kubeconfig = tmp / "kubeconfig"
    cluster.write_kubeconfig(str(kubeconfig))
    config = serve_config(tmp, kubeconfig, cluster, **pod)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    key, pub = make_key(tmp / "client")
    (tmp / "keys").mkdir(exist_ok=True)
    (tmp / "keys" / "alice").write_bytes(pub)
    proc = await start("serve", "--config", str(path), env=env)
    match = await proc.wait_output(rb"listening on 127\.0\.0\.1:(\d+)")
    return proc, int(match.group(1)), key, config


async def test_help_lists_commands() -> None:
    code, out, _ = await run(*KUBERUN, "--help")
    assert code == 0
    for word in (b"serve", b"demo", b"devcluster", b"check"):
        assert word in out
    for command in ("serve", "demo", "devcluster", "check"):
        code, out, _ = await run(*KUBERUN, command, "--help")
        assert code == 0 and b"usage: kuberun " + command.encode() in out


@pytest.mark.parametrize("command", ["serve", "check"])
async def test_misplaced_key_is_named(tmp_path: Path, command: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("pod:\n  spek:\n    containers: []\n")
    code, out, err = await run(*KUBERUN, command, "--config", str(path))
    assert code != 0
    assert b"pod.spek" in err
    assert b"listening" not in err + out


async def test_check_dry_runs_the_template(tmp_path: Path, cluster: TestCluster) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    cluster.write_kubeconfig(str(kubeconfig))
    config = serve_config(tmp_path, kubeconfig, cluster)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = await run(*KUBERUN, "check", "--config", str(path))
    assert code == 0, err
    assert b"OK" in out
    assert await cluster.pods() == []  # a dry run creates nothing
    if not cluster.real:  # only devcluster keeps a request log
        assert cluster.dev.requests.where(verb="create")[-1].query.get("dryRun") == "All"

    config["pod"]["spec"] = {"containers": [{"name": "shell", "image": ""}]}
    path.write_text(yaml.safe_dump(config))
    code, out, err = await run(*KUBERUN, "check", "--config", str(path))
    assert code != 0
    assert b"image" in err


async def test_serve_metrics_and_sigterm_with_open_session(
    tmp_path: Path, cluster: TestCluster
) -> None:
    proc, port, key, config = await start_serve(tmp_path, cluster)
    try:
        code, out, err = await run(*ssh_cmd(key, port, "echo hello"))
        assert (code, out) == (0, b"hello\n"), err

        metrics_url = f"http://{config['metrics']['listen']}/metrics"
        import aiohttp

        async def backend_requests() -> float:
            async with aiohttp.ClientSession() as http, http.get(metrics_url) as resp:
                text = await resp.text()
            assert "kuberun_backend_failures_total" in text
            found = re.search(r"^kuberun_backend_requests_total (\S+)$", text, re.M)
            assert found is not None, text
            return float(found.group(1))

        # create, watch, and the delete that follows the disconnect (in the background:
        # it may not have been made when the client has exited)
        deadline = asyncio.get_running_loop().time() + 30
        while await backend_requests() < 3:
            assert asyncio.get_running_loop().time() < deadline, "no Pod deletion counted"
            await asyncio.sleep(0.05)

        # An open session when SIGTERM arrives: told on stderr, Pod deleted, exit 0.
        await wait_no_pods(cluster)  # the first Pod may still be terminating
        client = await asyncio.create_subprocess_exec(
            *ssh_cmd(key, port, "echo started; sleep 60"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert client.stdout is not None
        assert await asyncio.wait_for(client.stdout.readline(), 30) == b"started\n"
        assert len(await cluster.pods()) == 1
    finally:
        code = await proc.stop(signal.SIGTERM)
    assert code == 0, proc.err.decode(errors="replace")
    _, client_err = await asyncio.wait_for(client.communicate(), 30)
    assert b"shutting down" in client_err
    assert client.returncode != 0
    if cluster.real:  # deleted, but a real Pod takes a moment to terminate
        await wait_no_pods(cluster)
    assert await cluster.pods() == []


async def test_sigkilled_gateway_pods_collected_by_owner(
    tmp_path: Path, cluster: TestCluster
) -> None:
    import kubernetes_asyncio.client as k8s
    from kubernetes_asyncio.config import load_kube_config

    # Stand-in for the gateway's own Pod (what the downward API names in a cluster).
    kubeconfig = tmp_path / "admin-kubeconfig"
    cluster.write_admin_kubeconfig(str(kubeconfig))
    conf = k8s.Configuration()
    await load_kube_config(str(kubeconfig), client_configuration=conf)
    ns = cluster.namespace
    async with k8s.ApiClient(conf) as api_client:
        api = k8s.CoreV1Api(api_client)
        container: dict[str, Any] = {"name": "g", "image": "x"}
        if cluster.real:
            container.update(image=REAL_IMAGE, imagePullPolicy="Never", command=["sleep", "1h"])
        owner = await api.create_namespaced_pod(
            ns,
            cast(  # the client serialises a plain dict body as it is; the stub wants a V1Pod
                Any,
                {
                    "metadata": {"name": "gateway-0"},
                    "spec": {"containers": [container]},
                },
            ),
        )
        env = dict(os.environ, KUBERUN_POD_NAME="gateway-0", KUBERUN_POD_UID=owner.metadata.uid)
        proc, port, key, _ = await start_serve(tmp_path, cluster, env=env)
        client = await asyncio.create_subprocess_exec(
            *ssh_cmd(key, port, "echo started; sleep 60"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert client.stdout is not None
        assert await asyncio.wait_for(client.stdout.readline(), 30) == b"started\n"
        user_pods = [p for p in await cluster.pods() if p["metadata"]["name"] != "gateway-0"]
        assert len(user_pods) == 1
        refs = user_pods[0]["metadata"]["ownerReferences"]
        assert refs[0]["uid"] == owner.metadata.uid and refs[0]["kind"] == "Pod"

        await proc.stop(signal.SIGKILL)
        if client.returncode is None:
            try:
                client.kill()
            except ProcessLookupError:
                pass
        await client.wait()
        # The gateway died without cleaning up: its Pod stays...
        assert any(p["metadata"]["name"] != "gateway-0" for p in await cluster.pods())

        # ...until a restarted gateway (same Pod name) runs its janitor.
        proc2, _, _, _ = await start_serve(tmp_path / "second", cluster, env=env)
        try:

            async def only_the_gateway_left() -> bool:
                return all(p["metadata"]["name"] == "gateway-0" for p in await cluster.pods())

            await wait_for(only_the_gateway_left, 30, "janitor did not delete the leftover Pod")
        finally:
            assert await proc2.stop() == 0

        # And if the gateway's own Pod goes away, Kubernetes collects user Pods.
        proc3, port3, _, _ = await start_serve(tmp_path / "third", cluster, env=env)
        key3 = tmp_path / "third" / "client" / "id_ed25519"
        client = await asyncio.create_subprocess_exec(
            *ssh_cmd(key3, port3, "echo started; sleep 60"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert client.stdout is not None
        assert await asyncio.wait_for(client.stdout.readline(), 30) == b"started\n"
        await proc3.stop(signal.SIGKILL)
        if client.returncode is None:
            try:
                client.kill()
            except ProcessLookupError:
                pass
        await client.wait()
        await api.delete_namespaced_pod("gateway-0", ns, grace_period_seconds=0)
        # Real: the controller-manager's garbage collector, then the kubelet, end it.
        await wait_no_pods(cluster, 60 if cluster.real else 30)


@pytest.mark.devcluster_only  # the demo is devcluster and a gateway in one process
async def test_demo_from_clean_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    key, pub = make_key(home / ".ssh")
    (home / ".ssh" / "authorized_keys").write_bytes(pub)
    port = free_port()
    kubeconfig = tmp_path / "demo-kubeconfig"
    env = dict(os.environ, HOME=str(home))
    env.pop("XDG_STATE_HOME", None)
    proc = await start(
        "demo", "--listen", f"127.0.0.1:{port}", "--kubeconfig", str(kubeconfig), env=env
    )
    try:
        await proc.wait_output(rb"ssh -p \d+ ")
        assert b"one-time password" in proc.out
        code, out, err = await run(*ssh_cmd(key, port, "echo from-demo; echo $HOSTNAME"))
        assert code == 0, err
        assert out.startswith(b"from-demo\n")
        kubectl = Path(sys.executable).parent / "kubectl"
        client = await asyncio.create_subprocess_exec(
            *ssh_cmd(key, port, "echo started; sleep 60"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert client.stdout is not None
        assert await asyncio.wait_for(client.stdout.readline(), 30) == b"started\n"
        code, out, err = await run(
            str(kubectl), "--kubeconfig", str(kubeconfig), "get", "pods", "-o", "name"
        )
        assert code == 0, err
        assert out.count(b"pod/") == 1
        assert (home / ".local" / "state" / "kuberun" / "ssh_host_ed25519_key").exists()
    finally:
        code = await proc.stop(signal.SIGINT)
    assert code == 0, proc.err.decode(errors="replace")
    await asyncio.wait_for(client.wait(), 30)
