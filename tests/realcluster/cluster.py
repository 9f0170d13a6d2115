"""``up`` and ``down``: the life cycle of one real single-node cluster rooted at DIR.

``up`` is idempotent: a healthy cluster in DIR is only re-checked; anything else (a crashed
run, a half-started one) is torn down first and started afresh. On failure it tears down what
it started and raises with the tail of the failing component's log, so CI fails loudly and
leaves nothing running.
"""

from __future__ import annotations

import ipaddress
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.realcluster import processes
from tests.realcluster.api import Api, wait_for
from tests.realcluster.build import ensure_binaries
from tests.realcluster.common import CACHE, ClusterError, log, run
from tests.realcluster.configs import command_lines, write_configs
from tests.realcluster.images import DEBIAN_IMAGE, ensure_images
from tests.realcluster.layout import (
    ACTIVE_MARKER,
    APISERVER_PORT,
    ETCD_CLIENT_PORT,
    POD_CIDR,
    SERVICE_IP,
    Binaries,
    Layout,
    node_ip,
    node_name,
)
from tests.realcluster.pki import ensure_pki

# Start order; teardown handles its own order.
DAEMONS = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "kubelet",
]
SMOKE_NAMESPACE = "kube-system"
SMOKE_POD = "realcluster-smoke"


def build(binaries: Binaries) -> None:
    """Build every program and image the cluster needs (``make realcluster``)."""
    ensure_binaries(binaries)
    ensure_images(CACHE)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise ClusterError("must run as root (containers, mounts, network devices, cgroups)")


def _other_active_cluster(layout: Layout) -> Layout | None:
    """The cluster another DIR runs on this machine, if the marker names one."""
    try:
        other = Layout(Path(ACTIVE_MARKER.read_text().strip()))
    except OSError:
        return None
    return None if other.root == layout.root else other


def _running(layout: Layout) -> list[str]:
    return [name for name in DAEMONS if processes.running_pid(layout, name) is not None]


def down(layout: Layout) -> None:
    """Stop the cluster in DIR and remove its containers, mounts, devices and state."""
    _require_root()
    other = _other_active_cluster(layout)
    shared = other is not None and bool(_running(other))
    if shared and other is not None:
        log(f"the cluster from {other.root} is running: leaving the machine-wide parts to it")
    processes.teardown(layout, DAEMONS, machine_wide=not shared)
    for path in layout.cleanup_paths():
        if path.is_dir():
            run(["rm", "-rf", "--one-file-system", str(path)])
        else:
            path.unlink(missing_ok=True)
    if _other_active_cluster(layout) is None:
        ACTIVE_MARKER.unlink(missing_ok=True)


def up(layout: Layout, binaries: Binaries) -> None:
    """Build what is missing, start the cluster (or check the running one), wait until usable."""
    _require_root()
    started = time.monotonic()
    other = _other_active_cluster(layout)
    if other is not None and _running(other):
        raise ClusterError(
            f"a cluster from {other.root} is running on this machine (fixed ports, shared "
            f"devices); run `scripts/realcluster down {other.root}` first"
        )
    build(binaries)
    ip, node = node_ip(), node_name()
    api = None
    if _running(layout) == DAEMONS and layout.kubeconfig.exists():
        api = Api("127.0.0.1", APISERVER_PORT, layout.pki)
        # All daemons run: give an apiserver that is just restarting (fault injection) a
        # minute to become ready before calling the cluster broken and starting afresh.
        if _apiserver_ready_within(api, 60):
            log(f"cluster in {layout.root} is already running; checking it")
            _wait_usable(layout, api, node)
            log(f"ready in {time.monotonic() - started:.0f}s: KUBECONFIG={layout.kubeconfig}")
            return
    # Whatever is there is not a healthy cluster: clean it (and a dead one from another DIR).
    if other is not None:
        down(other)
    processes.teardown(layout, DAEMONS)
    if layout.state.exists():
        run(["rm", "-rf", "--one-file-system", str(layout.state)])
    layout.root.mkdir(parents=True, exist_ok=True)
    ACTIVE_MARKER.write_text(f"{layout.root}\n")
    try:
        ensure_pki(layout.pki, node, ip, SERVICE_IP)
        write_configs(layout, binaries, ip)
        api = Api("127.0.0.1", APISERVER_PORT, layout.pki)
        _start(layout, binaries, api)
        _wait_usable(layout, api, node)
    except BaseException:
        log(f"start failed; stopping what was started (logs stay in {layout.logs})")
        processes.teardown(layout, DAEMONS)
        raise
    log(f"ready in {time.monotonic() - started:.0f}s: KUBECONFIG={layout.kubeconfig}")


def _launch(layout: Layout, binaries: Binaries, api: Api, name: str) -> None:
    """Start daemon ``name`` and wait until it serves (scripts/realcluster-restart restarts one)."""
    argv = command_lines(layout, binaries, node_ip(), node_name())[name]
    env = None
    if name == "containerd":
        # The shim is found on PATH; runc and the CNI plugins by the paths in the config.
        env = dict(os.environ, PATH=f"{binaries.runtime}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    if name == "kubelet":
        # Bridge-to-Pod traffic and Pod-to-Pod through the node need forwarding.
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    processes.start(layout, name, argv, env)

    def serving() -> bool | None:
        processes.check_alive(layout, [name])
        if name == "etcd":
            return _etcd_healthy() or None
        if name == "kube-apiserver":
            return api.probe("GET", "/readyz")[0] == 200 or None
        if name == "containerd":
            return run([*_ctr(layout, binaries), "version"], check=False).returncode == 0 or None
        return True  # the others are judged by what they do (node Ready, ServiceAccounts, Pods)

    wait_for(name, serving, 180, lambda: processes.log_tail(layout, name))
    if name == "containerd":
        for image, archive in ensure_images(CACHE).items():
            # Into the CRI's namespace, unpacked, so the kubelet finds it as already present.
            run([*_ctr(layout, binaries), "-n", "k8s.io", "images", "import", str(archive)])
            log(f"imported {image}")


def _ctr(layout: Layout, binaries: Binaries) -> list[str]:
    return [str(binaries.runtime / "ctr"), "--address", str(layout.containerd_socket)]


def _start(layout: Layout, binaries: Binaries, api: Api) -> None:
    for name in DAEMONS:
        _launch(layout, binaries, api, name)
    # Verified once they all run: they must outlive this process (own session, stdin closed).
    processes.check_alive(layout, DAEMONS)


def _apiserver_ready_within(api: Api, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while api.probe("GET", "/readyz")[0] != 200:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _etcd_healthy() -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ETCD_CLIENT_PORT}/health", timeout=2) as r:
            return b'"true"' in r.read()
    except OSError:
        return False


def _node_ready(api: Api, node: str) -> bool | None:
    status, body = api.probe("GET", f"/api/v1/nodes/{node}")
    if status != 200:
        return None
    for condition in body.get("status", {}).get("conditions", []):
        if condition.get("type") == "Ready" and condition.get("status") == "True":
            return True
    return None


def _wait_usable(layout: Layout, api: Api, node: str) -> None:
    """Node Ready, the default ServiceAccount, and a Debian Pod running on the Pod network."""

    def alive() -> None:
        processes.check_alive(layout, DAEMONS)

    def ready() -> bool | None:
        alive()
        return _node_ready(api, node)

    wait_for(f"node {node} Ready", ready, 180, lambda: processes.log_tail(layout, "kubelet"))

    def service_account() -> bool | None:
        alive()
        path = "/api/v1/namespaces/default/serviceaccounts/default"
        return api.probe("GET", path)[0] == 200 or None

    wait_for(
        "the default ServiceAccount",
        service_account,
        120,
        lambda: processes.log_tail(layout, "kube-controller-manager"),
    )
    _smoke_pod(layout, api)


def _smoke_pod(layout: Layout, api: Api) -> None:
    """Run one Pod of the Debian image to prove the whole path, then delete it.

    It is deleted (not left behind) so suites that count Pods start from an empty cluster.
    """
    pods = f"/api/v1/namespaces/{SMOKE_NAMESPACE}/pods"
    api.request("DELETE", f"{pods}/{SMOKE_POD}?gracePeriodSeconds=0")

    def created() -> bool | None:
        status, body = api.probe(
            "POST",
            pods,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": SMOKE_POD},
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "image": DEBIAN_IMAGE,
                            "imagePullPolicy": "Never",
                            "command": ["sleep", "3600"],
                        }
                    ],
                    "terminationGracePeriodSeconds": 0,
                    "automountServiceAccountToken": False,
                },
            },
        )
        # 409: the previous one is still being deleted; 403: its ServiceAccount is not there yet.
        if status in (409, 403, 0):
            return None
        if status != 201:
            raise ClusterError(f"creating the smoke Pod: HTTP {status}: {body}")
        return True

    wait_for("the smoke Pod to be created", created, 60)
    last: dict[str, Any] = {}

    def running() -> bool | None:
        processes.check_alive(layout, DAEMONS)
        status, body = api.probe("GET", f"{pods}/{SMOKE_POD}")
        if status == 200:
            last.clear()
            last.update(body.get("status", {}))
        if last.get("phase") == "Running" and last.get("podIP"):
            return True
        return None

    wait_for(
        f"a Pod of {DEBIAN_IMAGE} to run",
        running,
        180,
        lambda: f"last Pod status: {last}\n{processes.log_tail(layout, 'kubelet')}",
    )
    pod_ip = ipaddress.ip_address(last["podIP"])
    if pod_ip not in ipaddress.ip_network(POD_CIDR):
        raise ClusterError(f"the smoke Pod got {pod_ip}, not an address from {POD_CIDR}")
    api.request("DELETE", f"{pods}/{SMOKE_POD}?gracePeriodSeconds=0")
