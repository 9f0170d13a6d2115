"""The real-cluster driver's parts that need neither root nor a cluster: OCI archives,
certificates and kubeconfigs, the components' configuration, and daemon start/stop.

The cluster itself is exercised by `scripts/realcluster up` (which fails unless a Pod runs)
and by `make test-real`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.realcluster import processes
from tests.realcluster.common import ClusterError
from tests.realcluster.configs import command_lines, write_configs
from tests.realcluster.images import write_oci_archive
from tests.realcluster.layout import Binaries, Layout
from tests.realcluster.pki import ensure_pki


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_oci_archive_is_a_consistent_image_layout(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "bin").mkdir(parents=True)
    (layer / "bin" / "hello").write_text("#!/bin/sh\necho hi\n")
    (layer / "bin" / "hello").chmod(0o755)
    (layer / "bin" / "again").hardlink_to(layer / "bin" / "hello")
    out = tmp_path / "image.tar"
    write_oci_archive(layer, "kuberun.local/test:v1", out, {"Cmd": ["/bin/hello"]})

    with tarfile.open(out) as archive:
        blobs = {
            Path(m.name).name: archive.extractfile(m).read()  # type: ignore[union-attr]
            for m in archive.getmembers()
            if m.isfile() and m.name.startswith("blobs/")
        }
        index = json.loads(archive.extractfile("index.json").read())  # type: ignore[union-attr]
        layout = json.loads(archive.extractfile("oci-layout").read())  # type: ignore[union-attr]
    assert layout == {"imageLayoutVersion": "1.0.0"}
    (descriptor,) = index["manifests"]
    # ctr import names the image from this annotation and keeps only its own platform.
    assert descriptor["annotations"]["io.containerd.image.name"] == "kuberun.local/test:v1"
    assert descriptor["platform"]["os"] == "linux"
    # Every descriptor's digest and size match the blob it names.
    manifest_raw = blobs[descriptor["digest"].split(":")[1]]
    assert _sha256(manifest_raw) == descriptor["digest"]
    assert len(manifest_raw) == descriptor["size"]
    manifest = json.loads(manifest_raw)
    config_raw = blobs[manifest["config"]["digest"].split(":")[1]]
    assert _sha256(config_raw) == manifest["config"]["digest"]
    (layer_descriptor,) = manifest["layers"]
    layer_raw = blobs[layer_descriptor["digest"].split(":")[1]]
    assert _sha256(layer_raw) == layer_descriptor["digest"]
    assert len(layer_raw) == layer_descriptor["size"]
    config = json.loads(config_raw)
    # The layer is uncompressed, so its diff_id is its digest.
    assert config["rootfs"] == {"type": "layers", "diff_ids": [layer_descriptor["digest"]]}
    assert config["config"] == {"Cmd": ["/bin/hello"]}
    with tarfile.open(fileobj=io.BytesIO(layer_raw)) as rootfs:
        members = {m.name: m for m in rootfs.getmembers()}
    assert members["./bin/hello"].mode & 0o111
    assert members["./bin/again"].islnk()  # hard links survive, as debootstrap makes them


def test_certificates_chain_to_the_ca_and_name_the_node(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    ensure_pki(pki, "node-a", "192.0.2.7", "10.96.0.1")
    for stem in (
        "apiserver",
        "apiserver-kubelet-client",
        "admin",
        "controller-manager",
        "scheduler",
        "node",
    ):
        verified = subprocess.run(
            ["openssl", "verify", "-CAfile", str(pki / "ca.crt"), str(pki / f"{stem}.crt")],
            capture_output=True,
            text=True,
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-text", "-in", str(pki / "node.crt")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # The Node authorizer and the apiserver's kubelet-serving check need exactly these.
    assert "CN = system:node:node-a" in text and "O = system:nodes" in text
    assert "IP Address:192.0.2.7" in text
    assert "TLS Web Server Authentication" in text and "TLS Web Client Authentication" in text
    apiserver = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(pki / "apiserver.crt")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "IP Address:10.96.0.1" in apiserver and "DNS:kubernetes.default.svc" in apiserver
    # A second run keeps what exists, so kubeconfigs handed out stay valid.
    before = {p.name: p.read_bytes() for p in pki.iterdir()}
    ensure_pki(pki, "node-a", "192.0.2.7", "10.96.0.1")
    assert {p.name: p.read_bytes() for p in pki.iterdir()} == before
    assert (pki / "ca.key").stat().st_mode & 0o077 == 0


def test_configs_and_command_lines_point_into_the_cluster_dir(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "rc")
    ensure_pki(layout.pki, "node-a", "192.0.2.7", "10.96.0.1")
    binaries = Binaries(tmp_path / "bin")
    write_configs(layout, binaries, "192.0.2.7")

    kubeconfig: dict[str, Any] = json.loads(layout.kubeconfig.read_text())
    (cluster,) = kubeconfig["clusters"]
    assert cluster["cluster"]["server"] == "https://127.0.0.1:6443"
    ca = base64.b64decode(cluster["cluster"]["certificate-authority-data"])
    assert ca == (layout.pki / "ca.crt").read_bytes()
    (user,) = kubeconfig["users"]
    key = base64.b64decode(user["user"]["client-key-data"])
    assert key == (layout.pki / "admin.key").read_bytes()

    kubelet = json.loads((layout.conf / "kubelet.json").read_text())
    assert kubelet["failCgroupV1"] is False and kubelet["cgroupDriver"] == "cgroupfs"
    assert kubelet["containerRuntimeEndpoint"] == f"unix://{layout.containerd_socket}"
    containerd = (layout.conf / "containerd.toml").read_text()
    assert "SystemdCgroup = false" in containerd and "restrict_oom_score_adj = true" in containerd
    conflist = json.loads((layout.cni_conf_dir / "10-kuberun.conflist").read_text())
    assert [p["type"] for p in conflist["plugins"]] == ["bridge", "portmap"]

    argvs = command_lines(layout, binaries, "192.0.2.7", "node-a")
    assert list(argvs) == [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "containerd",
        "kubelet",
    ]
    for name, argv in argvs.items():
        # Every file a daemon reads or writes is under DIR or the binaries (down finds it all).
        for flag in argv[1:]:
            value = flag.split("=", 1)[-1]
            if value.startswith("/"):
                assert value.startswith((str(layout.root), str(binaries.root))), (name, flag)
    assert "--hostname-override=node-a" in argvs["kubelet"]
    assert "--kubelet-preferred-address-types=InternalIP" in argvs["kube-apiserver"]


def test_daemons_outlive_their_starter_and_stop_on_term(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "rc")
    layout.root.mkdir()
    # The DIR on the command line is what marks the process as this cluster's.
    program = "import time; print('started', flush=True); time.sleep(60)"
    pid = processes.start(layout, "sleeper", [sys.executable, "-c", program, str(layout.root)])
    deadline = time.monotonic() + 10
    while "started" not in (layout.logs / "sleeper.log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert processes.running_pid(layout, "sleeper") == pid
    # Its own session: a signal to this test's process group does not reach it.
    assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3] == str(pid)
    processes.check_alive(layout, ["sleeper"])
    processes.stop(layout, ["sleeper"], timeout=10)
    assert processes.running_pid(layout, "sleeper") is None
    assert not (layout.pids / "sleeper.pid").exists()
    with pytest.raises(ClusterError, match="sleeper exited"):
        processes.check_alive(layout, ["sleeper"])


def test_a_pid_file_naming_another_program_is_not_ours(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "rc")
    layout.pids.mkdir(parents=True)
    # PID 1 is alive but its command line does not mention DIR: a stale pid file after reuse.
    (layout.pids / "etcd.pid").write_text("1\n")
    assert processes.running_pid(layout, "etcd") is None
    (layout.pids / "etcd.pid").write_text("not a pid\n")
    assert processes.running_pid(layout, "etcd") is None
