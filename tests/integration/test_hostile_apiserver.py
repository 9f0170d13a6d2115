"""A hostile API server: exec streams that break the WebSocket or exec protocol.

devcluster's ``hostile_exec`` fault writes raw bytes after the upgrade (masked
server frames, impossible lengths, bad opcodes, garbage or huge statuses, a
close in the middle of a frame). Each such session must end with a ``kuberun:``
message on stderr and the documented exit status (README, "Exit statuses"),
keep the bytes that arrived before the violation, and leave every other
session, on the same connection or another, untouched.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

import asyncssh
import pytest

from kuberun.devcluster.apierrors import ApiError
from kuberun.devcluster.faults import HOSTILE_EXEC_MODES, Faults, hostile_exec_bytes
from kuberun.errors import EXIT_EXEC_ERROR, EXIT_STREAM_LOST

from .conftest import Gateway

#: mode -> (exit status, a piece of the message the client sees)
EXPECTED: dict[str, tuple[int, str]] = {
    "masked_frame": (EXIT_STREAM_LOST, "mask"),
    "impossible_length": (EXIT_STREAM_LOST, "length"),
    "oversized_length": (EXIT_STREAM_LOST, ""),
    "bad_opcode": (EXIT_STREAM_LOST, "opcode"),
    "reserved_bits": (EXIT_STREAM_LOST, ""),
    "fragmented_control": (EXIT_STREAM_LOST, ""),
    "bad_continuation": (EXIT_STREAM_LOST, ""),
    "close_mid_frame": (EXIT_STREAM_LOST, "lost"),
    "garbage_status": (EXIT_EXEC_ERROR, "not valid JSON"),
    "huge_status": (EXIT_STREAM_LOST, "status"),
    "nested_status": (EXIT_EXEC_ERROR, "not valid JSON"),
}


def test_every_mode_has_an_expectation() -> None:
    assert set(EXPECTED) == set(HOSTILE_EXEC_MODES)


def test_hostile_exec_fault_from_json() -> None:
    faults = Faults()
    fault = faults.from_json({"type": "hostile_exec", "mode": "bad_opcode", "afterBytes": 3})
    assert fault.as_dict()["mode"] == "bad_opcode"
    assert faults.exec_hostile("default", "p", ["sh"]) == hostile_exec_bytes("bad_opcode", 3)
    assert faults.exec_hostile("default", "p", ["sh"]) is None  # count=1: fired once
    with pytest.raises(ApiError):
        faults.hostile_exec("no-such-mode")


async def _echo_loop(conn: asyncssh.SSHClientConnection, rounds: int) -> None:
    """A session that stays interactive while the hostile ones fail around it."""
    proc = await conn.create_process("cat", encoding=None)
    sent = hashlib.sha256()
    got = hashlib.sha256()
    total = 0
    for i in range(rounds):
        chunk = os.urandom(1000 + i * 37)
        sent.update(chunk)
        proc.stdin.write(chunk)
        data = await asyncio.wait_for(proc.stdout.readexactly(len(chunk)), 30)
        got.update(data)
        total += len(chunk)
        await asyncio.sleep(0.02)
    proc.stdin.write_eof()
    result = await asyncio.wait_for(proc.wait(), 30)
    assert result.exit_status == 0, result.stderr
    assert got.hexdigest() == sent.hexdigest()


async def _hostile(conn: asyncssh.SSHClientConnection, mode: str) -> Any:
    return await asyncio.wait_for(
        conn.run(f"echo never-HOSTILE-{mode}", encoding=None, input=b""), 30
    )


@pytest.mark.devcluster_only  # injected faults
@pytest.mark.parametrize("gateway_overrides", [{"ssh__max_sessions": 20}])
async def test_hostile_exec_streams(gateway: Gateway) -> None:
    faults = gateway.cluster.dev.faults
    after = {mode: (i * 7919) % 50_000 for i, mode in enumerate(HOSTILE_EXEC_MODES)}
    for mode in HOSTILE_EXEC_MODES:
        faults.hostile_exec(mode, after_bytes=after[mode], command=f"HOSTILE-{mode}$")
    async with gateway.asyncssh_connect() as conn, gateway.asyncssh_connect() as other:
        # The Pods are ready before the hostile sessions start.
        assert (await conn.run("true")).exit_status == 0
        assert (await other.run("true")).exit_status == 0
        bystanders = [
            asyncio.ensure_future(_echo_loop(conn, 60)),
            asyncio.ensure_future(_echo_loop(other, 60)),
        ]
        try:
            results = await asyncio.gather(*(_hostile(conn, mode) for mode in HOSTILE_EXEC_MODES))
        except BaseException:
            for task in bystanders:
                task.cancel()
            await asyncio.gather(*bystanders, return_exceptions=True)
            raise
        problems: list[tuple[Any, ...]] = []
        for mode, result in zip(HOSTILE_EXEC_MODES, results, strict=True):
            status, words = EXPECTED[mode]
            stderr = result.stderr.decode(errors="replace")
            if result.exit_status != status or "kuberun: " not in stderr or words not in stderr:
                problems.append((mode, result.exit_status, stderr))
            # Output that arrived before the violation is delivered, byte for byte
            # (the decoder streams payloads, so a cut frame's first bytes too).
            partial = b"y" * 9 if mode == "close_mid_frame" else b""
            if result.stdout != b"x" * after[mode] + partial:
                problems.append((mode, "stdout", len(result.stdout), after[mode]))
        await asyncio.gather(*bystanders)
        assert not problems, problems
        # The connection is still fully usable.
        result = await conn.run("echo after; exit 7")
        assert (result.exit_status, result.stdout) == (7, "after\n")
    assert not [f for f in faults.list() if f.kind == "hostile_exec"], "a fault did not fire"
    await gateway.wait_no_pods()
