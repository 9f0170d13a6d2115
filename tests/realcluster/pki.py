"""The cluster's certificates and kubeconfigs, made with the openssl command line tool.

One CA signs everything (the layout of "Kubernetes the hard way"): the apiserver's serving
certificate, one client certificate per component, the node's certificate (client towards the
apiserver and server for the kubelet's :10250), and a service-account key pair. ECDSA P-256
keys: generating them is instant, and every component accepts them.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from tests.realcluster.common import run

# Ten years: a test cluster must never fail because a certificate expired under it.
_DAYS = "3650"


@dataclass(frozen=True)
class Identity:
    """A certificate to issue: file stem, subject and extensions."""

    stem: str
    common_name: str
    organization: str | None = None
    server: bool = False
    alt_names: tuple[str, ...] = ()


def _key(path: Path) -> None:
    run(
        [
            "openssl",
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            str(path),
        ]
    )
    path.chmod(0o600)


def _subject(identity: Identity) -> str:
    subject = f"/CN={identity.common_name}"
    if identity.organization:
        subject += f"/O={identity.organization}"
    return subject


def _issue(pki: Path, identity: Identity) -> None:
    key, csr, crt = (pki / f"{identity.stem}.{ext}" for ext in ("key", "csr", "crt"))
    ext = pki / f"{identity.stem}.ext"
    _key(key)
    run(["openssl", "req", "-new", "-key", str(key), "-subj", _subject(identity), "-out", str(csr)])
    usages = "serverAuth,clientAuth" if identity.server else "clientAuth"
    lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={usages}",
    ]
    if identity.alt_names:
        lines.append("subjectAltName=" + ",".join(identity.alt_names))
    ext.write_text("\n".join(lines) + "\n")
    run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(pki / "ca.crt"),
            "-CAkey",
            str(pki / "ca.key"),
            "-CAcreateserial",
            "-days",
            _DAYS,
            "-sha256",
            "-extfile",
            str(ext),
            "-out",
            str(crt),
        ]
    )
    csr.unlink()
    ext.unlink()


def identities(node_name: str, node_ip: str, service_ip: str) -> list[Identity]:
    """Every certificate the cluster needs, for a node called ``node_name`` at ``node_ip``."""
    return [
        Identity(
            "apiserver",
            "kubernetes",
            server=True,
            alt_names=(
                "IP:127.0.0.1",
                f"IP:{node_ip}",
                f"IP:{service_ip}",
                "DNS:localhost",
                "DNS:kubernetes",
                "DNS:kubernetes.default",
                "DNS:kubernetes.default.svc",
                "DNS:kubernetes.default.svc.cluster.local",
            ),
        ),
        # system:masters: the apiserver may exec/port-forward/read logs on the kubelet without
        # an extra RBAC binding (kubeadm gives its apiserver-kubelet-client the same group).
        Identity("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"),
        Identity("admin", "admin", "system:masters"),
        Identity("controller-manager", "system:kube-controller-manager"),
        Identity("scheduler", "system:kube-scheduler"),
        # The Node authorizer and NodeRestriction know the kubelet by this exact CN and group;
        # the apiserver checks the same CN on the kubelet's serving side.
        Identity(
            "node",
            f"system:node:{node_name}",
            "system:nodes",
            server=True,
            alt_names=(f"IP:{node_ip}", "IP:127.0.0.1", f"DNS:{node_name}"),
        ),
    ]


def ensure_pki(pki: Path, node_name: str, node_ip: str, service_ip: str) -> None:
    """Create the CA, the certificates and the service-account key pair that are missing.

    Existing files are kept, so a second ``up`` leaves kubeconfigs handed out earlier valid.
    """
    pki.mkdir(parents=True, exist_ok=True)
    pki.chmod(0o700)
    if not (pki / "ca.crt").exists():
        _key(pki / "ca.key")
        run(
            [
                "openssl",
                "req",
                "-x509",
                "-new",
                "-key",
                str(pki / "ca.key"),
                "-sha256",
                "-subj",
                "/CN=kuberun-realcluster-ca",
                "-days",
                _DAYS,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
                "-out",
                str(pki / "ca.crt"),
            ]
        )
    for identity in identities(node_name, node_ip, service_ip):
        if not (pki / f"{identity.stem}.crt").exists():
            _issue(pki, identity)
    if not (pki / "sa.pub").exists():
        _key(pki / "sa.key")
        run(["openssl", "pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub")])


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(out: Path, pki: Path, stem: str, server: str) -> None:
    """A kubeconfig for the certificate ``stem``, with the CA and key embedded.

    Embedded data keeps the file usable on its own (copied elsewhere, or after ``pki`` moved).
    JSON is valid YAML, so every client reads it.
    """
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "realcluster",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": _b64(pki / "ca.crt"),
                },
            }
        ],
        "users": [
            {
                "name": stem,
                "user": {
                    "client-certificate-data": _b64(pki / f"{stem}.crt"),
                    "client-key-data": _b64(pki / f"{stem}.key"),
                },
            }
        ],
        "contexts": [{"name": "realcluster", "context": {"cluster": "realcluster", "user": stem}}],
        "current-context": "realcluster",
    }
    partial = out.with_suffix(".partial")
    partial.write_text(json.dumps(config, indent=2) + "\n")
    partial.chmod(0o600)
    partial.rename(out)
