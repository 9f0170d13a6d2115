"""The processes of devcluster Pods, read from /proc: devcluster Pods are local processes,
and each exec runs in a process group of its own, whose id kuberun's wrapper records in
``pod.pid_dir`` (as ``-PGID``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from pathlib import Path

from .conftest import wait_for


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
    # devcluster starts every exec in a session of its own, as runc does.
    assert text.startswith("-"), text
    return int(text[1:])
