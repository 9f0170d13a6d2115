"""devcluster's state directory: a restarted cluster keeps its CA and token, so its
clients keep trusting it; each Pod's TMPDIR is in its scratch directory."""

from __future__ import annotations

from pathlib import Path

import kubernetes_asyncio.client as k8s
from kubernetes_asyncio.config import load_kube_config

from kuberun.devcluster import DevCluster


async def _list_pods(kubeconfig: Path) -> int:
    conf = k8s.Configuration()
    await load_kube_config(str(kubeconfig), client_configuration=conf)
    async with k8s.ApiClient(conf) as api_client:
        return len((await k8s.CoreV1Api(api_client).list_namespaced_pod("default")).items)


async def test_restart_keeps_ca_and_token(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with DevCluster(workdir=state) as first:
        first.write_kubeconfig(str(tmp_path / "kubeconfig"))
        port, ca, token = first.port, first.ca_pem, first.token
    assert (state / "ca.key").stat().st_mode & 0o077 == 0
    assert (state / "token").stat().st_mode & 0o077 == 0
    async with DevCluster(port=port, workdir=state) as second:
        assert (second.ca_pem, second.token) == (ca, token)
        # A client holding the first run's kubeconfig still gets in.
        assert await _list_pods(tmp_path / "kubeconfig") == 0
    # Without a state directory every start is new.
    async with DevCluster() as a, DevCluster() as b:
        assert a.ca_pem != b.ca_pem and a.token != b.token
