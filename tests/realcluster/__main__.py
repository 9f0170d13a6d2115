"""Command line of the real cluster: ``python3 -m tests.realcluster {build,up,down,restart}``.

Run through ``scripts/realcluster``. Exit status 0 on success; 1 with the reason (and the tail of
the failing component's log) on stderr otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.realcluster.cluster import DAEMONS, build, down, restart, up
from tests.realcluster.common import ClusterError, log
from tests.realcluster.layout import Binaries, Layout


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
    sub = commands.add_parser("restart", help="stop and start daemons again, keeping state")
    sub.add_argument("dir", type=Path, help="the cluster's directory")
    sub.add_argument("daemons", nargs="+", metavar="DAEMON", help=", ".join(DAEMONS))
    args = parser.parse_args(argv)
    binaries = Binaries()
    try:
        if args.command == "build":
            build(binaries)
        else:
            layout = Layout(args.dir.resolve())
            if args.command == "up":
                up(layout, binaries)
            elif args.command == "down":
                down(layout)
            else:
                restart(layout, binaries, args.daemons)
    except ClusterError as exc:
        log(f"{args.command} failed: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
