"""Security properties (SECURITY.md): TLS verification, secrets kept out of logs,
deletes limited to kuberun's own Pods."""

from __future__ import annotations

import asyncio
import base64
import logging
import signal
from pathlib import Path
from typing import Any, cast

import asyncssh
import pytest
import yaml
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.config import load_kube_config

from kuberun.config import make_api_client
from kuberun.devcluster.tls import generate_certificates
from kuberun.errors import EXIT_POD_FAILED, CommandStartError
from kuberun.execstream import ExecConnector
from kuberun.gateway import GatewayRunner
from kuberun.manifests import LABEL_CONNECTION_ID, LABEL_GATEWAY, LABEL_MANAGED_BY

from .clusters import TestCluster
from .conftest import Gateway, gateway_config, wait_for
from .test_cli import make_key, run, serve_config, ssh_cmd, start

TLS_OFF = "TLS verification of the Kubernetes API server"


# -- TLS --------------------------------------------------------------------------------


@pytest.mark.openssh
async def test_verify_tls_off_warns_at_every_start(tmp_path: Path, cluster: TestCluster) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    cluster.write_kubeconfig(str(kubeconfig))
    config = serve_config(tmp_path, kubeconfig, cluster)
    config["kubernetes"]["verify_tls"] = False
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    key, pub = make_key(tmp_path / "client")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "alice").write_bytes(pub)
    for _ in range(2):
        proc = await start("serve", "--config", str(path))
        try:
            match = await proc.wait_output(rb"listening on 127\.0\.0\.1:(\d+)")
            assert TLS_OFF.encode() in proc.err and b"verify_tls: false" in proc.err
            code, out, err = await run(*ssh_cmd(key, int(match.group(1)), "echo insecure"))
            assert (code, out) == (0, b"insecure\n"), err
        finally:
            assert await proc.stop(signal.SIGTERM) == 0


@pytest.mark.devcluster_only  # counts requests in devcluster's request log
async def test_verify_tls_is_on_by_default(tmp_path: Path, cluster: TestCluster) -> None:
    # A kubeconfig that trusts another CA: every API call and every exec must fail.
    data = cluster.dev.kubeconfig()
    other_ca = generate_certificates(["127.0.0.1"]).ca_pem
    data["clusters"][0]["cluster"]["certificate-authority-data"] = base64.b64encode(
        other_ca
    ).decode()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(data))
    config = gateway_config(kubeconfig, tmp_path)
    assert config.kubernetes.verify_tls is True
    api_client = await make_api_client(config.kubernetes)
    try:
        with pytest.raises(CommandStartError, match=r"TLS|certificate"):
            await ExecConnector(api_client.configuration).open(
                "default", "any", "shell", ["true"], _NoListener(), timeout=10
            )
        key = asyncssh.generate_private_key("ssh-ed25519")
        (tmp_path / "authorized_keys").write_bytes(key.export_public_key())
        config = gateway_config(kubeconfig, tmp_path, timeouts__pod_start=3, timeouts__pod_stop=3)
        runner = GatewayRunner(config, api_client, name="tls")
        await runner.start()
        try:
            async with asyncssh.connect(
                "127.0.0.1",
                runner.port,
                username="alice",
                client_keys=[key],
                known_hosts=None,
            ) as conn:
                result = await conn.run("echo never")
            assert result.exit_status == EXIT_POD_FAILED
            stderr = str(result.stderr)
            assert "kuberun: " in stderr and "certificate" in stderr.lower()
        finally:
            await runner.close()
    finally:
        await api_client.close()
    assert cluster.dev.pods() == []
    assert not cluster.dev.requests.where(verb="create")


class _NoListener:
    exec_stdout = exec_stderr = staticmethod(lambda data: None)

    def exec_pause_input(self) -> None:
        pass

    def exec_resume_input(self) -> None:
        pass

    def exec_finished(self, result: Any) -> None:
        pass


# -- secrets in logs --------------------------------------------------------------------


@pytest.mark.devcluster_only  # injected faults
async def test_token_and_password_never_logged(
    tmp_path: Path, cluster: TestCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, asyncssh and kubernetes_asyncio included
    kubeconfig = tmp_path / "kubeconfig"
    cluster.write_kubeconfig(str(kubeconfig))
    config = gateway_config(kubeconfig, tmp_path, timeouts__pod_start=5, timeouts__pod_stop=5)
    api_client = await make_api_client(config.kubernetes)
    dev = cluster.dev
    password = "pw-" + "9f3Kq7Zx" * 3
    runner = GatewayRunner(config, api_client, password=password, name="secrets")
    await runner.start()

    def connect(secret: str) -> Any:
        return asyncssh.connect(
            "127.0.0.1",
            runner.port,
            username="alice",
            password=secret,
            client_keys=None,
            known_hosts=None,
            preferred_auth="password",
        )

    try:
        with pytest.raises(asyncssh.PermissionDenied):
            async with connect("wrong-" + password):
                pass
        async with connect(password) as conn:
            assert (await conn.run("echo ok")).stdout == "ok\n"
            # Failure paths log the API server's answers: still no token.
            dev.faults.fail(403, verb="exec", count=1)
            failed = await conn.run("echo refused")
            assert failed.exit_status == 251
            dev.faults.drop_exec(after_bytes=10, count=1)
            await conn.run("yes | head -c 100000")
            proc = await conn.create_process("echo started; exec sleep 30")
            assert await asyncio.wait_for(proc.stdout.readline(), 20) == "started\n"
            proc.send_signal("TERM")
            await asyncio.wait_for(proc.wait(), 20)
        dev.faults.fail(500, verb="create", count=2)
        dev.faults.fail(500, verb="delete", count=1)
        async with connect(password) as conn:
            await conn.run("true")
        await wait_for(lambda: not dev.pods() or None, 20, "Pods deleted")
    finally:
        await runner.close()
        await api_client.close()
    text = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert len(caplog.records) > 50  # DEBUG really was on
    assert dev.token not in text
    assert base64.b64encode(dev.token.encode()).decode() not in text
    assert password not in text


# -- deletes ----------------------------------------------------------------------------


async def test_only_kuberun_pods_are_deleted(gateway: Gateway) -> None:
    cluster = gateway.cluster
    kubeconfig = gateway.workdir / "kubeconfig"
    conf = k8s.Configuration()
    await load_kube_config(str(kubeconfig), client_configuration=conf)
    ns = cluster.namespace
    spec: dict[str, Any] = {"containers": [{"name": "shell", "image": "x"}]}
    if cluster.real:
        spec = cluster.pod_spec(gateway.workdir, spec) or spec
        spec["containers"][0]["command"] = ["sleep", "1h"]
    async with k8s.ApiClient(conf) as api_client:
        api = k8s.CoreV1Api(api_client)

        async def pod(name: str, labels: dict[str, str]) -> None:
            await api.create_namespaced_pod(
                ns, cast(Any, {"metadata": {"name": name, "labels": labels}, "spec": spec})
            )

        async def names() -> set[str]:
            return {p["metadata"]["name"] for p in await cluster.pods()}

        await pod("plain", {})
        await pod("gateway-label-only", {LABEL_GATEWAY: "test"})
        await pod("other-gateway", {LABEL_MANAGED_BY: "kuberun", LABEL_GATEWAY: "other"})
        await pod("leftover", {LABEL_MANAGED_BY: "kuberun", LABEL_GATEWAY: "test"})
        live = {LABEL_MANAGED_BY: "kuberun", LABEL_GATEWAY: "test"}
        async with gateway.asyncssh_connect() as conn:
            # The Pod of a live connection of this gateway is not a leftover.
            assert (await conn.run("true")).exit_status == 0
            await pod("live", dict(live, **{LABEL_CONNECTION_ID: _connection_id(gateway)}))
            await gateway.runner.gateway.janitor.sweep()
            assert "live" in await names()
        bystanders = {"plain", "gateway-label-only", "other-gateway"}

        # The janitor deletes only the leftovers of this gateway.
        await gateway.runner.gateway.janitor.sweep()

        async def leftovers_gone() -> bool:
            # "live" and "leftover", and the Pod of the connection that has ended
            return not await names() - bystanders

        await wait_for(leftovers_gone, 30, "leftovers deleted")
        assert bystanders <= await names()

        # A Pod replaced under kuberun's feet (same name, new UID) is not deleted:
        # the delete carries the old UID as a precondition.
        async with gateway.asyncssh_connect() as conn:
            assert (await conn.run("true")).exit_status == 0
            (mine,) = await names() - bystanders
            await api.delete_namespaced_pod(mine, ns, grace_period_seconds=0)

            async def mine_gone() -> bool:
                return mine not in await names()

            await wait_for(mine_gone, 20, "Pod gone")
            await pod(mine, {"app": "someone-else"})
        await asyncio.sleep(0.5)
        await gateway.runner.gateway.wait_tasks()
        assert await names() == bystanders | {mine}
        replaced = await cluster.pod(mine)
        assert replaced is not None and replaced["metadata"]["labels"] == {"app": "someone-else"}
        if not cluster.real:  # only devcluster keeps a request log
            deletes = [r for r in cluster.dev.requests.where(verb="delete") if r.name == mine]
            assert deletes and deletes[-1].status == 409


def _connection_id(gateway: Gateway) -> str:
    (cid,) = gateway.runner.gateway.connection_ids()
    return cid
