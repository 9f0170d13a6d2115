"""Configuration files and command lines of the cluster's processes.

Each component gets the smallest configuration that makes it behave like a production node on
this kind of machine: cgroup v1 (hybrid) with the cgroupfs driver because PID 1 is not systemd,
one CNI bridge, no registry. Every path points into the cluster's DIR.
"""

from __future__ import annotations

import json

from tests.realcluster.images import PAUSE_IMAGE
from tests.realcluster.layout import (
    APISERVER_PORT,
    BRIDGE,
    ETCD_CLIENT_PORT,
    ETCD_PEER_PORT,
    POD_CIDR,
    SERVICE_CIDR,
    Binaries,
    Layout,
)
from tests.realcluster.pki import write_kubeconfig

APISERVER_URL = f"https://127.0.0.1:{APISERVER_PORT}"


def write_configs(layout: Layout, binaries: Binaries, node_ip: str) -> None:
    """Write every configuration file and kubeconfig the processes read."""
    conf = layout.conf
    conf.mkdir(parents=True, exist_ok=True)
    layout.cni_conf_dir.mkdir(exist_ok=True)
    for stem in ("controller-manager", "scheduler", "node"):
        write_kubeconfig(conf / f"{stem}.kubeconfig", layout.pki, stem, APISERVER_URL)
    # The cluster-admin kubeconfig handed to tests and users (on this machine, hence 127.0.0.1).
    write_kubeconfig(layout.kubeconfig, layout.pki, "admin", APISERVER_URL)
    (conf / "containerd.toml").write_text(_containerd_toml(layout, binaries))
    (conf / "kubelet.json").write_text(json.dumps(_kubelet_config(layout), indent=2) + "\n")
    (conf / "scheduler.json").write_text(
        json.dumps(
            {
                "apiVersion": "kubescheduler.config.k8s.io/v1",
                "kind": "KubeSchedulerConfiguration",
                "clientConnection": {"kubeconfig": str(conf / "scheduler.kubeconfig")},
                "leaderElection": {"leaderElect": False},
            },
            indent=2,
        )
        + "\n"
    )
    (layout.cni_conf_dir / "10-kuberun.conflist").write_text(json.dumps(_cni(layout), indent=2))


def _cni(layout: Layout) -> dict[str, object]:
    # ipMasq off: Pods talk to the node and to each other; nothing here needs them to reach
    # beyond the machine, and masquerading would need iptables rules that down must undo.
    return {
        "cniVersion": "1.0.0",
        "name": "kuberun",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    # Leases live in DIR, so down forgets them with the rest of the state.
                    "dataDir": str(layout.state / "cni-ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def _containerd_toml(layout: Layout, binaries: Binaries) -> str:
    state = layout.state
    return f"""\
version = 3
root = "{state / "containerd-root"}"
state = "{state / "containerd-state"}"
# Its own socket path: a containerd the machine may run elsewhere is left alone.
[grpc]
  address = "{layout.containerd_socket}"
[ttrpc]
  address = "{layout.containerd_socket}.ttrpc"

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "{PAUSE_IMAGE}"

[plugins.'io.containerd.cri.v1.runtime']
  # Network namespaces mounted under DIR so down finds and unmounts every one of them.
  netns_mounts_under_state_dir = true
  # These machines withhold CAP_SYS_RESOURCE even from root, so no process may lower its
  # oom_score_adj below its parent's: clamp the kubelet's requests (-998 for sandboxes) at
  # containerd's own score instead of failing every sandbox with EACCES.
  restrict_oom_score_adj = true
  tolerate_missing_hugetlb_controller = true
  disable_hugetlb_controller = true
[plugins.'io.containerd.cri.v1.runtime'.containerd]
  default_runtime_name = "runc"
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  BinaryName = "{binaries.runtime / "runc"}"
  Root = "{layout.runc_root}"
  # PID 1 is not systemd: cgroupfs, matching the kubelet's cgroupDriver.
  SystemdCgroup = false
[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ["{binaries.cni}"]
  conf_dir = "{layout.cni_conf_dir}"

# NRI would listen on a fixed machine-wide socket; nothing here uses it.
[plugins.'io.containerd.nri.v1.nri']
  disable = true
"""


def _kubelet_config(layout: Layout) -> dict[str, object]:
    pki = layout.pki
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # The machine mounts cgroups in hybrid (v1) mode; kubelets since 1.35 refuse v1
        # unless told otherwise. The override is still honoured in 1.37.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "containerRuntimeEndpoint": f"unix://{layout.containerd_socket}",
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(pki / "node.crt"),
        "tlsPrivateKeyFile": str(pki / "node.key"),
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "readOnlyPort": 0,
        # Without CAP_SYS_RESOURCE (see the containerd config) the default -999 cannot be set.
        "oomScoreAdj": 0,
        "healthzBindAddress": "127.0.0.1",
        "podLogsDir": str(layout.state / "pod-logs"),
        # Images come only from ctr import: never let image GC delete them under a test,
        # and keep evicting for real disk/memory pressure only.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "2%",
            "imagefs.available": "2%",
            "nodefs.inodesFree": "2%",
        },
        "imagePullCredentialsVerificationPolicy": "NeverVerifyPreloadedImages",
    }


def command_lines(
    layout: Layout, binaries: Binaries, node_ip: str, node: str
) -> dict[str, list[str]]:
    """Each process's argv, in start order."""
    pki, conf, state = layout.pki, layout.conf, layout.state

    def cmd(name: str, *flags: str) -> list[str]:
        return [str(binaries.component(name)), *flags]

    return {
        "etcd": cmd(
            "etcd",
            f"--data-dir={state / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{ETCD_CLIENT_PORT}",
            f"--advertise-client-urls=http://127.0.0.1:{ETCD_CLIENT_PORT}",
            f"--listen-peer-urls=http://127.0.0.1:{ETCD_PEER_PORT}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{ETCD_PEER_PORT}",
            f"--initial-cluster=default=http://127.0.0.1:{ETCD_PEER_PORT}",
            # A test cluster: losing the last writes on a machine crash is fine, and fsync on a
            # shared disk would make every API write slow.
            "--unsafe-no-fsync",
            "--quota-backend-bytes=2147483648",
        ),
        "kube-apiserver": cmd(
            "kube-apiserver",
            f"--etcd-servers=http://127.0.0.1:{ETCD_CLIENT_PORT}",
            f"--secure-port={APISERVER_PORT}",
            f"--advertise-address={node_ip}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            # The node's InternalIP is what its serving certificate names.
            "--kubelet-preferred-address-types=InternalIP",
        ),
        "kube-controller-manager": cmd(
            "kube-controller-manager",
            f"--kubeconfig={conf / 'controller-manager.kubeconfig'}",
            f"--authentication-kubeconfig={conf / 'controller-manager.kubeconfig'}",
            f"--authorization-kubeconfig={conf / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            "--use-service-account-credentials=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
        ),
        "kube-scheduler": cmd(
            "kube-scheduler",
            f"--config={conf / 'scheduler.json'}",
            f"--authentication-kubeconfig={conf / 'scheduler.kubeconfig'}",
            f"--authorization-kubeconfig={conf / 'scheduler.kubeconfig'}",
            "--bind-address=127.0.0.1",
        ),
        "containerd": [
            str(binaries.runtime / "containerd"),
            f"--config={conf / 'containerd.toml'}",
        ],
        "kubelet": cmd(
            "kubelet",
            f"--config={conf / 'kubelet.json'}",
            f"--kubeconfig={conf / 'node.kubeconfig'}",
            f"--root-dir={state / 'kubelet'}",
            f"--node-ip={node_ip}",
            f"--hostname-override={node}",
        ),
    }
