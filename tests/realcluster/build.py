"""Building the cluster's programs from their Go modules, into the cache outside the clone.

- ``realcluster`` (this directory's Go module): etcd and the Kubernetes components in one
  CGO_ENABLED=0 binary, linked under each component's name so ``ps`` tells them apart.
- containerd, ctr and the runc shim; runc (cgo, seccomp); the CNI plugins. Each is built by
  ``go install module@version`` outside the Kubernetes module, so their dependency versions
  never have to agree with Kubernetes'.

A build is skipped when a stamp next to its output records the same inputs (versions, flags,
the wrapper module's files), so a warm ``up`` does not even start the go tool.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

from tests.realcluster.common import CACHE, HERE, ClusterError, log, run
from tests.realcluster.layout import Binaries

KUBERNETES_VERSION = "v1.37.2"
CONTAINERD_VERSION = "v2.4.2"
RUNC_VERSION = "v1.5.3"
CNI_PLUGINS_VERSION = "v1.10.0"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet")
CNI_PLUGINS = ("main/bridge", "main/loopback", "ipam/host-local", "meta/portmap")
# The date stamped into the binaries; fixed so relinking is reproducible and the stamp stable.
_BUILD_DATE = "2026-01-01T00:00:00Z"


def go_env() -> dict[str, str]:
    """The go tool's environment: caches under CACHE, read-write module cache (deletable)."""
    env = dict(os.environ)
    env.update(
        GOMODCACHE=str(CACHE / "gomod"),
        GOCACHE=str(CACHE / "gocache"),
        GOFLAGS="-buildvcs=false -modcacherw",
    )
    return env


def _kubernetes_ldflags() -> str:
    # Both version packages, as upstream's hack/lib/version.sh sets them: without this the
    # components report v0.0.0-master and `kubectl version` shows it.
    flags = ["-s", "-w"]
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {package}.gitVersion={KUBERNETES_VERSION}",
            f"-X {package}.gitMajor={major}",
            f"-X {package}.gitMinor={minor}",
            f"-X {package}.gitTreeState=clean",
            f"-X {package}.buildDate={_BUILD_DATE}",
        ]
    return " ".join(flags)


def _stamp_of(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _fresh(stamp_file: Path, stamp: str, outputs: list[Path]) -> bool:
    try:
        return stamp_file.read_text() == stamp and all(p.exists() for p in outputs)
    except OSError:
        return False


def build_kubernetes(binaries: Binaries) -> None:
    """Build the multi-call binary and link each component name to it."""
    binary = binaries.root / "realcluster"
    ldflags = _kubernetes_ldflags()
    tags = "selinux,notest,grpcnotrace"  # upstream's tags: no test hooks, no grpc tracing
    sources = [HERE / name for name in ("go.mod", "go.sum", "main.go")]
    stamp = _stamp_of(ldflags, tags, *(p.read_text() for p in sources))
    stamp_file = binaries.root / "realcluster.stamp"
    links = [binaries.component(name) for name in COMPONENTS]
    if _fresh(stamp_file, stamp, [binary, *links]):
        return
    binaries.root.mkdir(parents=True, exist_ok=True)
    log(f"building Kubernetes {KUBERNETES_VERSION} and etcd (cold: 30-60 minutes on 2 cores)")
    started = time.monotonic()
    env = go_env()
    env["CGO_ENABLED"] = "0"
    partial = binaries.root / "realcluster.partial"
    run(
        ["go", "build", "-trimpath", "-tags", tags, "-ldflags", ldflags, "-o", str(partial), "."],
        env=env,
        cwd=HERE,
    )
    partial.rename(binary)
    for link in links:
        link.unlink(missing_ok=True)
        link.symlink_to(binary.name)
    stamp_file.write_text(stamp)
    log(f"built Kubernetes in {time.monotonic() - started:.0f}s")


def build_runtime(binaries: Binaries) -> None:
    """Build containerd, ctr, the shim, runc and the CNI plugins if missing."""
    stamp = _stamp_of(CONTAINERD_VERSION, RUNC_VERSION, CNI_PLUGINS_VERSION)
    stamp_file = binaries.runtime / "versions.stamp"
    outputs = [
        binaries.runtime / name for name in ("containerd", "ctr", "containerd-shim-runc-v2", "runc")
    ]
    outputs += [binaries.cni / Path(plugin).name for plugin in CNI_PLUGINS]
    if _fresh(stamp_file, stamp, outputs):
        return
    log("building containerd, runc and the CNI plugins (cold: several minutes)")
    started = time.monotonic()
    for directory in (binaries.runtime, binaries.cni):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    env = go_env()
    env.update(GOBIN=str(binaries.runtime), CGO_ENABLED="0")
    containerd = "github.com/containerd/containerd/v2"
    run(
        [
            "go",
            "install",
            "-trimpath",
            # btrfs needs cgo, devmapper and zfs need machine support this cluster never uses.
            "-tags",
            "no_btrfs,no_devmapper,no_zfs",
            "-ldflags",
            f"-s -w -X {containerd}/version.Version={CONTAINERD_VERSION}",
            *(
                f"{containerd}/cmd/{cmd}@{CONTAINERD_VERSION}"
                for cmd in ("containerd", "ctr", "containerd-shim-runc-v2")
            ),
        ],
        env=env,
    )
    # runc needs cgo (its nsenter is C); seccomp so Pods asking for a profile get one.
    env["CGO_ENABLED"] = "1"
    run(
        [
            "go",
            "install",
            "-trimpath",
            "-tags",
            "seccomp,urfave_cli_no_docs",
            "-ldflags",
            f"-s -w -X main.version={RUNC_VERSION.lstrip('v')}",
            f"github.com/opencontainers/runc@{RUNC_VERSION}",
        ],
        env=env,
    )
    env.update(GOBIN=str(binaries.cni), CGO_ENABLED="0")
    plugins = "github.com/containernetworking/plugins/plugins"
    run(
        [
            "go",
            "install",
            "-trimpath",
            "-ldflags",
            "-s -w",
            *(f"{plugins}/{plugin}@{CNI_PLUGINS_VERSION}" for plugin in CNI_PLUGINS),
        ],
        env=env,
    )
    stamp_file.write_text(stamp)
    log(f"built the runtime in {time.monotonic() - started:.0f}s")


def ensure_system() -> None:
    """Install missing Debian packages; check the Go toolchain the machines are meant to have."""
    run(["bash", str(HERE / "system-deps.sh")], quiet=False)
    if shutil.which("go") is None:
        raise ClusterError("the go tool (>= 1.26) is not on PATH")


def ensure_binaries(binaries: Binaries) -> None:
    """Everything ``up`` executes, built if missing."""
    ensure_system()
    build_runtime(binaries)
    build_kubernetes(binaries)
