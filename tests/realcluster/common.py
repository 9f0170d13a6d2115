"""Helpers shared by the real-cluster driver: where things live, logging, running commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
# Everything expensive to rebuild lives outside the clone so a fresh clone on a warm machine
# (CI) reuses it: Go module and build caches, the built binaries, the image tarballs.
CACHE = Path(
    os.environ.get("KUBERUN_REALCLUSTER_CACHE", Path.home() / ".cache" / "kuberun-realcluster")
)


class ClusterError(Exception):
    """The cluster could not be built, started or stopped; the message says what failed."""


def log(message: str) -> None:
    """One progress line on stderr (stdout stays free for callers that capture it)."""
    print(f"realcluster: {message}", file=sys.stderr, flush=True)


def run(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    quiet: bool = True,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise ClusterError carrying the tail of its output.

    Output is captured so a successful ``up`` stays quiet in CI, and shown only when it matters.
    """
    result = subprocess.run(
        argv,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if quiet else None,
        stderr=subprocess.STDOUT if quiet else None,
        text=True,
    )
    if check and result.returncode != 0:
        tail = "\n".join((result.stdout or "").splitlines()[-40:])
        raise ClusterError(f"{' '.join(argv[:4])} ... exited {result.returncode}\n{tail}")
    return result
