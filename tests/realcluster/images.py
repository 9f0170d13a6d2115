"""Container images built from Debian packages and written as OCI image-layout tarballs.

No registry is reachable, so the cluster's images are made here and imported into containerd:

- ``kuberun.local/debian:bookworm``: ``debootstrap --variant=minbase`` plus the packages the
  gateway needs inside a Pod (procps for ``ps``, openssh-sftp-server, rsync, python3);
- the pause image: a static C program (``pause.c``) alone in a layer, under the name containerd
  asks for by default so no ``sandbox`` setting is needed.

Each image is one uncompressed layer (containerd accepts ``layer.v1.tar``; compressing a
~200 MB rootfs would cost a minute of CPU on every cold build for no benefit locally).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from tests.realcluster.common import HERE, log, run

DEBIAN_IMAGE = "kuberun.local/debian:bookworm"
# containerd 2.4's default sandbox image; importing ours under this name needs no config.
PAUSE_IMAGE = "registry.k8s.io/pause:3.10.2"
DEBIAN_PACKAGES = ("procps", "openssh-sftp-server", "rsync", "python3")

_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_CONFIG = "application/vnd.oci.image.config.v1+json"
_LAYER = "application/vnd.oci.image.layer.v1.tar"
_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]
_PLATFORM = {"architecture": _ARCH, "os": "linux"}


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (debootstrap then works wherever apt does)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            # "deb [OPTIONS] URL SUITE ...", skipping the security archive (not a full bookworm).
            parts = [p for p in line.split() if not (p.startswith("[") or p.endswith("]"))]
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[1]:
                return parts[1]
    return "http://deb.debian.org/debian"


def build_debian_rootfs(rootfs: Path) -> None:
    """debootstrap a minimal bookworm with the gateway's packages into ``rootfs``."""
    if rootfs.exists():
        shutil.rmtree(rootfs)
    run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=" + ",".join(DEBIAN_PACKAGES),
            "bookworm",
            str(rootfs),
            apt_mirror(),
        ]
    )
    # Package caches and lists only make the layer bigger; the image is never apt-upgraded.
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / junk).glob("*"):
            if entry.is_file():
                entry.unlink()
    # /dev, /proc and /sys are provided by the runtime; debootstrap's device nodes would only
    # be shadowed (and some cannot be created inside the container's user of the layer anyway).
    for mount_point in ("dev", "proc", "sys"):
        shutil.rmtree(rootfs / mount_point, ignore_errors=True)
        (rootfs / mount_point).mkdir(mode=0o755)


def build_pause(out: Path) -> None:
    """Compile the static pause binary (needs gcc and libc6-dev's static libc)."""
    run(["gcc", "-Os", "-Wall", "-Werror", "-static", "-o", str(out), str(HERE / "pause.c")])
    run(["strip", str(out)])


def _tar_directory(src: Path, out: Path) -> None:
    # GNU tar keeps hard links, symlinks, modes and numeric owners exactly as debootstrap made them.
    run(["tar", "--numeric-owner", "--xattrs", "-C", str(src), "-cf", str(out), "."])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_oci_archive(layer_dir: Path, name: str, out: Path, config: dict[str, object]) -> None:
    """Write an OCI image-layout tarball of one layer made from ``layer_dir``.

    ``name`` goes into the ``io.containerd.image.name`` annotation, which ``ctr images import``
    uses verbatim as the image reference.
    """
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        layout = Path(tmp)
        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        layer = layout / "layer.tar"
        _tar_directory(layer_dir, layer)
        layer_digest = _sha256(layer)
        layer_size = layer.stat().st_size
        layer.rename(blobs / layer_digest)

        def blob(data: dict[str, object]) -> tuple[str, int]:
            raw = json.dumps(data, sort_keys=True).encode()
            hexdigest = hashlib.sha256(raw).hexdigest()
            (blobs / hexdigest).write_bytes(raw)
            return "sha256:" + hexdigest, len(raw)

        config_digest, config_size = blob(
            {
                **_PLATFORM,
                "config": config,
                "rootfs": {"type": "layers", "diff_ids": ["sha256:" + layer_digest]},
            }
        )
        manifest_digest, manifest_size = blob(
            {
                "schemaVersion": 2,
                "mediaType": _MANIFEST,
                "config": {"mediaType": _CONFIG, "digest": config_digest, "size": config_size},
                "layers": [
                    {"mediaType": _LAYER, "digest": "sha256:" + layer_digest, "size": layer_size}
                ],
            }
        )
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": _MANIFEST,
                    "digest": manifest_digest,
                    "size": manifest_size,
                    # ctr import keeps only manifests for its platform; say which one this is.
                    "platform": _PLATFORM,
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
                    },
                }
            ],
        }
        (layout / "index.json").write_text(json.dumps(index))
        (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        partial = out.with_suffix(".partial")
        with tarfile.open(partial, "w") as archive:
            for entry in ("oci-layout", "index.json", "blobs"):
                archive.add(layout / entry, arcname=entry)
        partial.rename(out)


def _versioned(images: Path, stem: str, inputs: str) -> Path:
    """``images/STEM-HASH.oci.tar`` for these inputs; archives of older inputs are deleted."""
    current = images / f"{stem}-{hashlib.sha256(inputs.encode()).hexdigest()[:12]}.oci.tar"
    for old in images.glob(f"{stem}*.oci.tar"):
        if old != current:
            old.unlink()
    return current


def ensure_images(cache: Path) -> dict[str, Path]:
    """Build the image tarballs missing from ``cache`` and return them by image name."""
    images = cache / "images"
    images.mkdir(parents=True, exist_ok=True)
    # Named after what went into them, so changing the package list or pause.c rebuilds.
    debian = _versioned(images, "debian-bookworm", ",".join(DEBIAN_PACKAGES))
    pause = _versioned(images, "pause", (HERE / "pause.c").read_text())
    if not debian.exists():
        log(f"building {DEBIAN_IMAGE} with debootstrap (a few minutes)")
        rootfs = images / "debian-rootfs"
        build_debian_rootfs(rootfs)
        write_oci_archive(
            rootfs,
            DEBIAN_IMAGE,
            debian,
            {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/bin/sh"],
                "WorkingDir": "/",
            },
        )
        shutil.rmtree(rootfs)
    if not pause.exists():
        log(f"building {PAUSE_IMAGE} from pause.c")
        with tempfile.TemporaryDirectory(dir=images) as tmp:
            layer = Path(tmp) / "layer"
            layer.mkdir()
            build_pause(layer / "pause")
            write_oci_archive(
                layer,
                PAUSE_IMAGE,
                pause,
                {"Entrypoint": ["/pause"], "User": "65535:65535", "WorkingDir": "/"},
            )
    return {DEBIAN_IMAGE: debian, PAUSE_IMAGE: pause}
