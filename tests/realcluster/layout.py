"""Where a cluster keeps its files, and the fixed facts about its network.

Everything a cluster writes lives under its DIR, so ``down`` can remove it all and find every
mount of it by path. Ports are the components' defaults (fixed), so one cluster runs per machine.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from tests.realcluster.common import CACHE, ClusterError

# Pods get addresses from this range on the cni0 bridge; Services (no kube-proxy runs, so only
# the apiserver's own "kubernetes" Service exists) from the other.
POD_CIDR = "10.88.0.0/16"
SERVICE_CIDR = "10.96.0.0/24"
SERVICE_IP = "10.96.0.1"
BRIDGE = "cni0"
APISERVER_PORT = 6443
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
# A machine-wide note of which DIR runs the cluster: the ports, cni0 and the kubepods cgroups
# are shared, so a second DIR must not start (or tear down) the first one's cluster.
ACTIVE_MARKER = Path("/run/kuberun-realcluster.dir")


def node_ip() -> str:
    """The address of the interface holding the default route (the kubelet refuses loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            # connect() on UDP sends nothing; it only picks the outgoing interface's address.
            probe.connect(("203.0.113.1", 9))  # TEST-NET-3: routed via the default route
        except OSError as exc:
            raise ClusterError(f"cannot find this machine's IPv4 address: {exc}") from None
        address: str = probe.getsockname()[0]
    if address.startswith("127."):
        raise ClusterError("this machine has no non-loopback IPv4 address for the node")
    return address


def node_name() -> str:
    """The node is named after the machine, as a kubelet without overrides would be."""
    return socket.gethostname().split(".")[0].lower()


@dataclass(frozen=True)
class Layout:
    """The paths of one cluster rooted at ``root`` (the DIR of ``up``/``down``)."""

    root: Path

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def conf(self) -> Path:
        return self.root / "conf"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def containerd_socket(self) -> Path:
        return self.state / "containerd.sock"

    @property
    def runc_root(self) -> Path:
        return self.state / "runc"

    @property
    def cni_conf_dir(self) -> Path:
        return self.conf / "cni"

    def cleanup_paths(self) -> list[Path]:
        """What ``down`` deletes: everything but the logs, which explain a failed run."""
        return [self.kubeconfig, self.pki, self.conf, self.pids, self.state]


@dataclass(frozen=True)
class Binaries:
    """The built executables, in the cache outside the clone."""

    root: Path = CACHE / "bin"

    def component(self, name: str) -> Path:
        """kube-apiserver, etcd, ...: symlinks to the multi-call binary, so ps shows the name."""
        return self.root / name

    @property
    def runtime(self) -> Path:
        return self.root / "runtime"

    @property
    def cni(self) -> Path:
        return self.root / "cni"
