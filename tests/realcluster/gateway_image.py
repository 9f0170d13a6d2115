"""The gateway's container image for the real cluster, built from this checkout.

``kuberun.local/kuberun:<key>``: the ``kuberun.local/debian:bookworm`` layer (python3 is in it)
with kuberun and its dependencies installed from a wheel built from the repository, run as
uid 10001. ``<key>`` is a hash of the package's sources, so every change gets its own reference
(a Deployment pointed at it rolls; ``IfNotPresent`` never sees a stale image under an old name),
and an unchanged tree reuses the tarball cached outside the clone.

The ``Dockerfile`` at the top of the repository builds the same thing for everyone with a
container builder; this module exists because none runs here (no registry, no daemon).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tests.realcluster.common import CACHE, REPO, log, run
from tests.realcluster.images import DEBIAN_IMAGE, _versioned, ensure_images, write_oci_archive
from tests.realcluster.layout import Binaries, Layout

GATEWAY_REPOSITORY = "kuberun.local/kuberun"
GATEWAY_UID = 10001
# What goes into the wheel; anything else (tests, docs) does not change the image.
_SOURCES = ("kuberun", "pyproject.toml", "setup.py", "MANIFEST.in")
_ENTRYPOINT = """#!/bin/sh
exec /usr/bin/python3 -m kuberun "$@"
"""


def source_key(repo: Path = REPO) -> str:
    """A hash of the package's tracked sources as they are in the working tree."""
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--", *_SOURCES],
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    digest = hashlib.sha256()
    for name in sorted(p for p in listed if p):
        path = repo / name.decode()
        if path.is_file():
            digest.update(name + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _debian_layer(archive: Path, into: Path) -> None:
    """Unpack the single layer of the cached Debian image tarball into ``into``."""
    with tarfile.open(archive) as oci:

        def member(name: str) -> bytes:
            f = oci.extractfile(name)
            assert f is not None, name
            return f.read()

        index = json.loads(member("index.json"))
        manifest_digest = index["manifests"][0]["digest"].split(":", 1)[1]
        manifest = json.loads(member(f"blobs/sha256/{manifest_digest}"))
        layer = manifest["layers"][0]["digest"].split(":", 1)[1]
        oci.extract(f"blobs/sha256/{layer}", into.parent, filter="fully_trusted")
    blob = into.parent / "blobs" / "sha256" / layer
    into.mkdir()
    # GNU tar again, as the layer was written: owners, modes, links exactly as they were.
    run(["tar", "--numeric-owner", "--xattrs", "-C", str(into), "-xf", str(blob)])
    blob.unlink()


def _install_kuberun(rootfs: Path, work: Path, repo: Path) -> None:
    """Build kuberun's wheel and install it with its dependencies under /opt/kuberun."""
    wheels = work / "wheels"
    pip = [sys.executable, "-m", "pip"]
    run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(repo)])
    (wheel,) = wheels.glob("kuberun-*.whl")
    site = rootfs / "opt" / "kuberun"
    run([*pip, "install", "--no-warn-script-location", "--target", str(site), str(wheel)])
    # The host's console scripts name the host's interpreter; the image has its own.
    for leftover in ("bin",):
        run(["rm", "-rf", str(site / leftover)])
    pth = rootfs / "usr" / "local" / "lib" / "python3.11" / "dist-packages" / "kuberun.pth"
    pth.parent.mkdir(parents=True, exist_ok=True)
    pth.write_text("/opt/kuberun\n")
    script = rootfs / "usr" / "local" / "bin" / "kuberun"
    script.write_text(_ENTRYPOINT)
    script.chmod(0o755)
    # A named user for the uid the image runs as (tools that look the user up find one).
    with (rootfs / "etc" / "passwd").open("a") as passwd:
        passwd.write(f"kuberun:x:{GATEWAY_UID}:{GATEWAY_UID}::/var/lib/kuberun:/usr/sbin/nologin\n")
    with (rootfs / "etc" / "group").open("a") as group:
        group.write(f"kuberun:x:{GATEWAY_UID}:\n")


def ensure_gateway_image(cache: Path = CACHE, repo: Path = REPO) -> tuple[str, Path]:
    """The gateway image's reference and its OCI tarball, built unless cached."""
    key = source_key(repo)
    name = f"{GATEWAY_REPOSITORY}:{key}"
    images = cache / "images"
    images.mkdir(parents=True, exist_ok=True)
    out = _versioned(images, "kuberun", key)  # older trees' archives (~300 MB each) go
    if out.exists():
        return name, out
    debian = ensure_images(cache)[DEBIAN_IMAGE]
    log(f"building {name} from {repo}")
    with tempfile.TemporaryDirectory(dir=images) as tmp:
        rootfs = Path(tmp) / "rootfs"
        _debian_layer(debian, rootfs)
        _install_kuberun(rootfs, Path(tmp), repo)
        write_oci_archive(
            rootfs,
            name,
            out,
            {
                "Env": [
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "KUBERUN_REQUIRE_EXTENSIONS=1",
                ],
                "Entrypoint": ["/usr/local/bin/kuberun"],
                "Cmd": ["serve", "--config", "/etc/kuberun/config.yaml"],
                "User": f"{GATEWAY_UID}:{GATEWAY_UID}",
                "WorkingDir": "/",
                "ExposedPorts": {"2222/tcp": {}, "9100/tcp": {}},
            },
        )
    return name, out


def import_image(cluster_dir: Path, archive: Path) -> None:
    """Import an image tarball into the running cluster's containerd (the CRI namespace)."""
    ctr = Binaries().runtime / "ctr"
    socket = Layout(cluster_dir).containerd_socket
    run([str(ctr), "--address", str(socket), "-n", "k8s.io", "images", "import", str(archive)])


def main() -> int:
    """``python -m tests.realcluster.gateway_image [DIR]``: build (cached), import, print it."""
    name, archive = ensure_gateway_image()
    if len(sys.argv) > 1:
        import_image(Path(sys.argv[1]).resolve(), archive)
        log(f"imported {name}")
    print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
