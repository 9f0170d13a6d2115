"""The Kubernetes the integration tests run against: devcluster, or a real cluster.

``KUBERUN_TEST_CLUSTER=real`` (``make test-real``) runs the suites against a real
cluster whose cluster-admin kubeconfig ``KUBERUN_REAL_KUBECONFIG`` names. The tests
see the same small interface either way (:class:`TestCluster`):

* Pods are listed through the API (the real one) or devcluster's store.
* On the real cluster every test gets a namespace of its own, created and deleted
  by the fixture, so tests cannot see each other's Pods; the gateway runs with the
  ServiceAccount and Role of ``deploy/rbac.yaml`` applied in that namespace (a token
  from the TokenRequest API), never with cluster-admin, so a verb missing there
  fails a test.
* Pod templates are adapted: every container runs the locally imported
  ``kuberun.local/debian:bookworm``, and the test's temporary directory is mounted
  at the same path (a hostPath volume) so a test can put a file where the Pod reads
  it, as it can with devcluster's local processes. devcluster's reserved images that
  stand for a behaviour get the real cluster's way of causing it: a slow start is an
  init container that sleeps, a pull error an image that is not there.

Tests that need devcluster itself (fault injection, its request log) carry the
``devcluster_only`` marker; tests that only make sense on a real cluster carry
``real_only``. Each is deselected, visibly, in the other mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import yaml
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.rest import ApiException
from kubernetes_asyncio.config import load_kube_config

from kuberun.devcluster import DevCluster

ROOT = Path(__file__).resolve().parents[2]
RBAC = ROOT / "deploy" / "rbac.yaml"

#: "real" runs the integration suites against the cluster of KUBERUN_REAL_KUBECONFIG.
MODE = os.environ.get("KUBERUN_TEST_CLUSTER", "dev")
REAL = MODE == "real"
#: The image every real-cluster Pod runs (imported into containerd, never pulled).
REAL_IMAGE = "kuberun.local/debian:bookworm"
#: An image that was never imported: pulling it fails for real (no registry).
ABSENT_IMAGE = "kuberun.local/absent:1"
#: devcluster's reserved images (kuberun/devcluster/README.md).
DEV_PULL_ERROR = "kuberun.devcluster/pull-error"
DEV_SLOW = "kuberun.devcluster/slow:"
#: The gateway's ServiceAccount in deploy/rbac.yaml.
GATEWAY_ACCOUNT = "kuberun"

Obj = dict[str, Any]


def real_kubeconfig() -> Path:
    """The real cluster's cluster-admin kubeconfig (KUBERUN_REAL_KUBECONFIG)."""
    value = os.environ.get("KUBERUN_REAL_KUBECONFIG")
    if not value:
        raise RuntimeError(
            "KUBERUN_TEST_CLUSTER=real needs KUBERUN_REAL_KUBECONFIG (the cluster-admin "
            "kubeconfig `scripts/realcluster up DIR` writes to DIR/kubeconfig); "
            "`make test-real` sets both"
        )
    path = Path(value)
    if not path.is_file():
        raise RuntimeError(f"KUBERUN_REAL_KUBECONFIG={value}: no such file (is the cluster up?)")
    return path


class TestCluster:
    """What a test needs from the cluster behind the gateway."""

    __test__ = False  # not a test class, despite the name
    real: bool = False
    namespace: str = "default"
    context: str = "devcluster"
    #: Seconds a Pod gets to start (the gateway's timeouts.pod_start) in tests.
    pod_start: float = 20

    def write_kubeconfig(self, path: str | os.PathLike[str]) -> None:
        """Write the kubeconfig the gateway uses (for a real cluster: its own account)."""
        raise NotImplementedError

    def write_admin_kubeconfig(self, path: str | os.PathLike[str]) -> None:
        """Write a kubeconfig for the test's own requests (any verb, this namespace)."""
        raise NotImplementedError

    async def pods(self) -> list[Obj]:
        """Every Pod object in the test's namespace, terminating ones included."""
        raise NotImplementedError

    async def pod(self, name: str) -> Obj | None:
        """One Pod object, or None."""
        for pod in await self.pods():
            if pod["metadata"]["name"] == name:
                return pod
        return None

    async def delete_pod_now(self, name: str) -> None:
        """Delete a Pod without a grace period (test clean-up; 404 is fine)."""
        raise NotImplementedError

    async def leases(self) -> list[Obj]:
        """Every Lease object in the test's namespace."""
        raise NotImplementedError

    def kubernetes_config(self, kubeconfig: Path) -> Obj:
        """The gateway config's ``kubernetes`` section for the kubeconfig written above."""
        return {"kubeconfig": str(kubeconfig), "context": self.context, "namespace": self.namespace}

    def pod_spec(self, shared: Path, spec: Obj | None = None) -> Obj | None:
        """The ``pod.spec`` to configure (None: keep the gateway's default)."""
        return spec

    @property
    def dev(self) -> DevCluster:
        """devcluster itself, for ``devcluster_only`` tests."""
        raise RuntimeError("this test needs devcluster (mark it devcluster_only)")


class DevTestCluster(TestCluster):
    """devcluster: everything in the ``default`` namespace of a fresh instance."""

    def __init__(self, cluster: DevCluster) -> None:
        self._cluster = cluster

    @property
    def dev(self) -> DevCluster:
        return self._cluster

    def write_kubeconfig(self, path: str | os.PathLike[str]) -> None:
        self._cluster.write_kubeconfig(path)

    write_admin_kubeconfig = write_kubeconfig

    async def pods(self) -> list[Obj]:
        return self._cluster.pods()

    async def pod(self, name: str) -> Obj | None:
        return self._cluster.pod(name)

    async def delete_pod_now(self, name: str) -> None:
        with contextlib.suppress(Exception):
            await self._cluster.registry.delete(self.namespace, name, {"gracePeriodSeconds": 0})

    async def leases(self) -> list[Obj]:
        return self._cluster.lease_list(self.namespace)


class RealTestCluster(TestCluster):
    """A namespace of its own on the real cluster, with deploy/rbac.yaml applied in it."""

    real = True
    context = "kuberun-test"
    pod_start = 90  # a loaded 2-core machine can take many seconds to start a container

    def __init__(self, admin_kubeconfig: Path) -> None:
        self.admin_kubeconfig = admin_kubeconfig
        self.namespace = f"kr-{secrets.token_hex(4)}"
        self.token = ""
        self._admin: Obj = yaml.safe_load(admin_kubeconfig.read_text())
        self._api_client: k8s.ApiClient | None = None

    @property
    def api_client(self) -> k8s.ApiClient:
        assert self._api_client is not None, "the cluster is not started"
        return self._api_client

    @property
    def core(self) -> k8s.CoreV1Api:
        return k8s.CoreV1Api(self.api_client)

    async def start(self) -> None:
        conf = k8s.Configuration()
        await load_kube_config(str(self.admin_kubeconfig), client_configuration=conf)
        self._api_client = k8s.ApiClient(conf)
        await self.core.create_namespace(
            cast(Any, {"metadata": {"name": self.namespace, "labels": {"kuberun.io/test": "1"}}})
        )
        await self._apply_rbac()
        # Pods are refused until the ServiceAccount controller made `default`, and their
        # token volume waits for the CA ConfigMap: wait for both, as a user's namespace has.
        await self._wait_exists(
            lambda: self.core.read_namespaced_service_account("default", self.namespace),
            "ServiceAccount default",
        )
        await self._wait_exists(
            lambda: self.core.read_namespaced_config_map("kube-root-ca.crt", self.namespace),
            "ConfigMap kube-root-ca.crt",
        )
        request = await self.core.create_namespaced_service_account_token(
            GATEWAY_ACCOUNT,
            self.namespace,
            cast(Any, {"spec": {"expirationSeconds": 4 * 3600}}),
        )
        self.token = request.status.token

    async def _apply_rbac(self) -> None:
        rbac = k8s.RbacAuthorizationV1Api(self.api_client)
        for doc in yaml.safe_load_all(RBAC.read_text()):
            if not doc:
                continue
            doc = copy.deepcopy(doc)
            doc["metadata"]["namespace"] = self.namespace
            for subject in doc.get("subjects") or []:
                subject["namespace"] = self.namespace
            kind = doc["kind"]
            if kind == "ServiceAccount":
                await self.core.create_namespaced_service_account(self.namespace, doc)
            elif kind == "Role":
                await rbac.create_namespaced_role(self.namespace, doc)
            elif kind == "RoleBinding":
                await rbac.create_namespaced_role_binding(self.namespace, doc)
            else:
                raise RuntimeError(f"{RBAC}: unexpected kind {kind}")

    async def _wait_exists(self, read: Any, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await read()
                return
            except ApiException as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise RuntimeError(f"namespace {self.namespace}: no {what}") from exc
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        if self._api_client is None:
            return
        try:
            # Not waited for: the namespace controller removes what is left.
            await self.core.delete_namespace(self.namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise
        finally:
            await self._api_client.close()
            self._api_client = None

    def _kubeconfig(self, user: Obj) -> Obj:
        admin = self._admin
        current = admin.get("current-context")
        context = next(c for c in admin["contexts"] if c["name"] == current)["context"]
        cluster = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "real", "cluster": cluster["cluster"]}],
            "users": [{"name": "real", "user": user}],
            "contexts": [
                {
                    "name": self.context,
                    "context": {"cluster": "real", "user": "real", "namespace": self.namespace},
                }
            ],
            "current-context": self.context,
        }

    def write_kubeconfig(self, path: str | os.PathLike[str]) -> None:
        _write_private(Path(path), self._kubeconfig({"token": self.token}))

    def write_admin_kubeconfig(self, path: str | os.PathLike[str]) -> None:
        admin = self._admin
        current = admin.get("current-context")
        context = next(c for c in admin["contexts"] if c["name"] == current)["context"]
        user = next(u for u in admin["users"] if u["name"] == context["user"])["user"]
        _write_private(Path(path), self._kubeconfig(user))

    async def pods(self) -> list[Obj]:
        resp: Any = await self.core.list_namespaced_pod(self.namespace, _preload_content=False)
        items: list[Obj] = json.loads(await resp.read())["items"]
        return items

    async def leases(self) -> list[Obj]:
        coordination = k8s.CoordinationV1Api(self.api_client)
        resp: Any = await coordination.list_namespaced_lease(self.namespace, _preload_content=False)
        items: list[Obj] = json.loads(await resp.read())["items"]
        return items

    async def delete_pod_now(self, name: str) -> None:
        try:
            await self.core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def pod_spec(self, shared: Path, spec: Obj | None = None) -> Obj:
        return real_pod_spec(shared, spec)


def real_pod_spec(shared: Path, spec: Obj | None = None) -> Obj:
    """``spec`` (default: the gateway's) for the real cluster: local image, ``shared``
    mounted at its own path, devcluster's behaviour images translated."""
    spec = copy.deepcopy(spec) if spec else {"containers": [{"name": "shell", "image": "x"}]}
    init: list[Obj] = list(spec.get("initContainers") or [])
    for container in spec["containers"]:
        image = container.get("image", "")
        if image.startswith("kuberun.local/"):  # a real-cluster image, meant as it is
            container.setdefault("imagePullPolicy", "Never")
            continue
        if image == DEV_PULL_ERROR:
            container.update(image=ABSENT_IMAGE, imagePullPolicy="IfNotPresent")
            continue
        if image.startswith(DEV_SLOW):
            seconds = image[len(DEV_SLOW) :] or "30"
            init.append(
                {
                    "name": f"slow-start-{len(init)}",
                    "image": REAL_IMAGE,
                    "imagePullPolicy": "Never",
                    # PID 1 ignores a TERM it has no handler for: end on it, as the
                    # idle command does, so deleting a starting Pod takes no grace period.
                    "command": ["sh", "-c", f"trap 'exit 0' TERM; sleep {seconds} & wait"],
                }
            )
        # IfNotPresent finds the image imported; Always (or the default for an untagged
        # image) would try a registry that cannot be reached.
        if container.get("imagePullPolicy") != "IfNotPresent":
            container["imagePullPolicy"] = "Never"
        container["image"] = REAL_IMAGE
    for container in [*spec["containers"], *init]:
        mounts = container.setdefault("volumeMounts", [])
        mounts.append({"name": "test-shared", "mountPath": str(shared)})
    if init:
        spec["initContainers"] = init
    spec.setdefault("volumes", []).append(
        {"name": "test-shared", "hostPath": {"path": str(shared), "type": "Directory"}}
    )
    # The idle command exits on TERM at once; a short grace keeps deletes quick anyway.
    spec.setdefault("terminationGracePeriodSeconds", 5)
    return spec


def _write_private(path: Path, data: Obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".kubeconfig-", dir=str(path.parent))
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(data, fh, default_flow_style=False, sort_keys=False)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


@asynccontextmanager
async def open_cluster(real: bool = REAL) -> AsyncIterator[TestCluster]:
    """devcluster, or (``real``; default KUBERUN_TEST_CLUSTER=real) a namespace of its
    own on the real cluster."""
    if real:
        cluster = RealTestCluster(real_kubeconfig())
        try:
            await cluster.start()
            yield cluster
        finally:
            await cluster.close()
    else:
        async with DevCluster() as dev:
            yield DevTestCluster(dev)
