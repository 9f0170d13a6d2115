"""Signals reach the command and what it started: the asyncssh client signals programs
whose PID is not the one the exec started with (dash does not exec a lone command) and
programs with children of their own; closing the channel ends all of them.

The Pod's process groups are read with ``ps`` in the Pod, so this runs on devcluster and
on a real cluster alike.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from .conftest import Gateway, wait_for
from .podprocs import pod_group_gone, pod_group_members, recorded_group

PROGRAMS = {
    "lone": "sleep 30",
    "list": "sleep 30; echo after",
    "job": "sh -c 'sleep 30 & wait'",
}
SIGNALS = {"TERM": 15, "INT": 2, "HUP": 1, "KILL": 9}


@dataclass
class Started:
    name: str
    proc: Any
    pgid: int


async def start(conn: asyncssh.SSHClientConnection, pid_dir: Path, name: str, pty: bool) -> Started:
    """Start ``PROGRAMS[name]`` and wait until its ``sleep`` runs in its own group."""
    before = os.listdir(pid_dir)
    proc = await conn.create_process(
        PROGRAMS[name], term_type="xterm" if pty else None, encoding=None
    )
    pgid = await recorded_group(pid_dir, before)

    async def sleeping() -> bool:
        return "sleep" in (await pod_group_members(conn, pgid)).values()

    await wait_for(sleeping, 20, f"{name}: no sleep")
    return Started(name, proc, pgid)


@pytest.fixture
def gateway_overrides(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "pids").mkdir()
    return {"pod__pid_dir": str(tmp_path / "pids"), "ssh__max_sessions": 16}


@pytest.mark.parametrize("pty", [False, True], ids=["no-pty", "pty"])
async def test_signals_reach_the_whole_program(gateway: Gateway, pty: bool) -> None:
    pid_dir = gateway.workdir / "pids"
    async with gateway.asyncssh_connect() as conn:
        runs = {
            (name, sig): await start(conn, pid_dir, name, pty)
            for name in PROGRAMS
            for sig in SIGNALS
        }
        for (_, sig), run in runs.items():
            run.proc.send_signal(sig)
        # A job of a non-interactive shell ignores SIGINT (POSIX). Without a pty, the
        # shells die, the sleep holds the output open and the session runs on until
        # the channel is closed, which sends TERM to the group. With a pty, the death
        # of the terminal's controlling process hangs up its foreground group: all end.
        ignored = ("job", "INT") if not pty else None
        for (name, sig), run in runs.items():
            if (name, sig) == ignored:
                continue
            result = await asyncio.wait_for(run.proc.wait(), 10)
            # The program died of the signal: exit-signal, as sshd reports it.
            assert result.exit_signal is not None, (name, sig, result.exit_status)
            assert result.exit_signal[0] == sig, (name, sig, result.exit_signal)
            assert b"after" not in result.stdout
            await wait_for(pod_group_gone(conn, run.pgid), 10, f"{name}/{sig} left")
        if ignored is not None:
            run = runs[ignored]

            async def only_sleep_left() -> bool:
                return set((await pod_group_members(conn, run.pgid)).values()) == {"sleep"}

            await wait_for(only_sleep_left, 10, "the shells did not die of SIGINT")
            await asyncio.sleep(1)
            assert run.proc.exit_status is None and run.proc.exit_signal is None
            run.proc.close()
            await wait_for(pod_group_gone(conn, run.pgid), 10, "job/INT left after close")


@pytest.mark.parametrize("pty", [False, True], ids=["no-pty", "pty"])
async def test_channel_close_ends_the_whole_program(gateway: Gateway, pty: bool) -> None:
    pid_dir = gateway.workdir / "pids"
    async with gateway.asyncssh_connect() as conn:
        runs = [await start(conn, pid_dir, name, pty) for name in PROGRAMS]
        for run in runs:
            run.proc.close()
        for run in runs:
            await wait_for(pod_group_gone(conn, run.pgid), 10, f"{run.name} left")
        # The connection and its Pod are still in use.
        result = await conn.run("echo still-here")
        assert result.stdout == "still-here\n"
