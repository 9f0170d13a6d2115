"""Command line of the real cluster: ``python3 -m tests.realcluster {build,up,down} [DIR]``.

Run through ``scripts/realcluster``. Exit status 0 on success; 1 with the reason (and the tail of
the failing component's log) on stderr otherwise.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from pathlib import Path

from tests.realcluster.cluster import build, down, up
from tests.realcluster.common import CACHE, ClusterError, log
from tests.realcluster.layout import Binaries, Layout

# One `up` or `down` at a time on a machine: the cluster's ports, bridge and cgroups are
# machine-wide. Builds are serialized per cache instead (two builds would race on it), so a
# build into another cache (KUBERUN_REALCLUSTER_CACHE) never waits for a cluster's start.
# Each lock dies with the process holding it.
MACHINE_LOCK = Path("/run/kuberun-realcluster.lock")


def _serialize(path: Path, what: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ClusterError(f"cannot open {path} (needs root): {exc}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"waiting for another scripts/realcluster run holding the {what} lock ({path})")
        fcntl.flock(lock, fcntl.LOCK_EX)
    # The descriptor stays open (and locked) until this process exits.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/realcluster",
        description="A real single-node Kubernetes cluster for kuberun's test tiers.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build the binaries and images (cached), start nothing")
    for name, text in (
        ("up", "build what is missing, start the cluster, wait until a Pod runs"),
        ("down", "stop the cluster and remove its containers, mounts, devices and state"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("dir", type=Path, help="the cluster's directory (kubeconfig, logs)")
    args = parser.parse_args(argv)
    binaries = Binaries()
    try:
        if args.command != "build":
            _serialize(MACHINE_LOCK, "machine")
        if args.command != "down":
            _serialize(CACHE / "build.lock", "cache")
        if args.command == "build":
            build(binaries)
        else:
            layout = Layout(args.dir.resolve())
            if args.command == "up":
                up(layout, binaries)
            else:
                down(layout)
    except ClusterError as exc:
        log(f"{args.command} failed: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
