"""The processes of the tests' Pods. Each exec runs in a process group of its own, whose
id kuberun's wrapper records in ``pod.pid_dir`` (as ``-PGID``; the test's directory, which
real-cluster Pods mount at the same path). devcluster Pods are local processes, read from
/proc; in any Pod, ``ps`` run through the gateway sees them."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

from .clusters import REAL
from .conftest import Gateway, wait_for


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, process group, command name) of ``pid``, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[2]), comm


def group_members(pgid: int) -> dict[int, str]:
    """Live (non-zombie) processes of process group ``pgid``: PID -> command name."""
    members = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == pgid and stat[0] != "Z":
                members[int(entry)] = stat[2]
    return members


def group_gone(pgid: int) -> Callable[[], bool]:
    """A condition for :func:`wait_for`: process group ``pgid`` has no live process left."""
    return lambda: not group_members(pgid)


async def recorded_group(pid_dir: Path, before: Collection[str]) -> int:
    """The process group recorded in the one PID file of ``pid_dir`` not in ``before``."""
    new = await wait_for(lambda: set(os.listdir(pid_dir)) - set(before), 20, "no PID file")
    assert len(new) == 1, new
    path = pid_dir / new.pop()
    text = await wait_for(lambda: path.read_text().strip(), 20, "empty PID file")
    # devcluster and runc start every exec in a session of its own.
    assert text.startswith("-"), text
    return int(text[1:])


async def pod_group_members(conn: Any, pgid: int) -> dict[int, str]:
    """Live processes of process group ``pgid`` in the Pod of ``conn`` (an asyncssh
    connection to the gateway), read with ``ps`` in the Pod: the same on devcluster and
    on a real cluster, whose Pods have a PID namespace of their own."""
    result = await conn.run("ps -e -o pid=,pgid=,stat=,comm=", check=True)
    members = {}
    for line in str(result.stdout).splitlines():
        pid, group, stat, comm = line.split(None, 3)
        if int(group) == pgid and not stat.startswith("Z"):
            members[int(pid)] = comm
    return members


def pod_group_gone(conn: Any, pgid: int) -> Callable[[], Awaitable[bool]]:
    """A condition for :func:`wait_for`: no live process of ``pgid`` in the Pod of ``conn``."""

    async def gone() -> bool:
        return not await pod_group_members(conn, pgid)

    return gone


def program_gone(gateway: Gateway, pgid: int) -> Callable[[], Any]:
    """A condition for :func:`wait_for` once the client's connection is over: on devcluster
    the program's process group has no process left; on a real cluster, whose processes
    this machine cannot name, the connection's Pod is gone (and all in it)."""
    if REAL:

        async def no_pods() -> bool:
            return not await gateway.cluster.pods()

        return no_pods
    return group_gone(pgid)
