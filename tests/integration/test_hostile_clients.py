"""Hostile SSH clients: each gets its documented refusal, nothing crashes, the next
client is served (README, "Limits and refusals")."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncssh
import pytest

from kuberun.manifests import ANNOTATION_USERNAME, LABEL_USERNAME, is_valid_label_value
from kuberun.server import MAX_ENV_REQUESTS
from kuberun.session import MAX_ENV_BYTES

from .conftest import STTY_LOOP, Gateway, sizes_until, wait_for


async def _served(gateway: Gateway) -> None:
    """The next client is served."""
    async with gateway.asyncssh_connect() as conn:
        result = await conn.run("echo served; exit 5")
        assert (result.exit_status, result.stdout) == (5, "served\n")


@pytest.fixture
async def exception_handler() -> AsyncIterator[list[dict[str, Any]]]:
    """Everything that reaches the loop's exception handler during the test."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
    finally:
        loop.set_exception_handler(previous)


# -- unauthenticated connections: ssh.max_startups -----------------------------------


@pytest.mark.parametrize("gateway_overrides", [{"ssh__max_startups": 3}])
async def test_max_startups(gateway: Gateway, exception_handler: list[Any]) -> None:
    async def hold() -> tuple[asyncio.StreamWriter, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        first = await asyncio.wait_for(reader.readline(), 10)
        return writer, first

    held = [await hold() for _ in range(3)]
    assert all(first.startswith(b"SSH-2.0-") for _, first in held)
    await wait_for(lambda: gateway.runner.gateway.unauthenticated == 3, 10, "3 counted")
    # Beyond the limit: closed before the version exchange, like OpenSSH's MaxStartups.
    for _ in range(3):
        writer, first = await hold()
        assert first == b""
        writer.close()
    with pytest.raises((asyncssh.Error, OSError)):
        async with gateway.asyncssh_connect():
            pass
    refused = gateway.runner.metrics.connections_refused.labels(reason="max_startups")
    assert refused._value.get() == 4
    # One slot frees up: the next client is served (and, authenticated, no longer counts).
    held.pop()[0].close()
    await wait_for(lambda: gateway.runner.gateway.unauthenticated == 2, 10, "slot released")
    async with gateway.asyncssh_connect() as conn:
        assert gateway.runner.gateway.unauthenticated == 2
        result = await conn.run("echo served")
        assert result.stdout == "served\n"
    for writer, _ in held:
        writer.close()
    await wait_for(lambda: gateway.runner.gateway.unauthenticated == 0, 10, "all released")
    await _served(gateway)
    await gateway.wait_no_pods()
    assert not exception_handler


async def test_garbage_instead_of_ssh(gateway: Gateway, exception_handler: list[Any]) -> None:
    for garbage in (b"GET / HTTP/1.1\r\n\r\n", b"\x00" * 70000, b"SSH-2.0-" + b"v" * 300 + b"\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(garbage)
        await asyncio.wait_for(reader.read(), 30)  # the server closes
        writer.close()
    await wait_for(lambda: gateway.runner.gateway.unauthenticated == 0, 10, "released")
    await _served(gateway)
    assert not exception_handler


async def test_probe_connections_are_not_logged_at_info(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """A TCP connect that closes without a version line (a readiness probe) is DEBUG only;
    one that said hello and was then cut is still worth an INFO line."""
    with caplog.at_level(logging.DEBUG, logger="kuberun"):
        for hello in (b"", b"SSH-2.0-probe\r\n"):
            _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(hello)
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.transport.abort()
            await wait_for(lambda: gateway.runner.gateway.connections == 0, 10, "closed")
    lost = [r for r in caplog.records if "connection lost" in r.getMessage()]
    assert [r.levelno for r in lost] == [logging.DEBUG, logging.INFO], lost


# -- sessions: ssh.max_sessions ---------------------------------------------------------


@pytest.mark.parametrize("gateway_overrides", [{"ssh__max_sessions": 3}])
async def test_max_sessions(gateway: Gateway, exception_handler: list[Any]) -> None:
    async with gateway.asyncssh_connect() as conn:
        procs = [await conn.create_process("cat") for _ in range(3)]
        with pytest.raises(asyncssh.ChannelOpenError) as info:
            await conn.create_process("echo too many")
        assert info.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
        assert "too many sessions" in info.value.reason and "max 3" in info.value.reason
        # The open sessions are unaffected.
        for i, proc in enumerate(procs):
            proc.stdin.write(f"line {i}\n")
            assert await asyncio.wait_for(proc.stdout.readline(), 20) == f"line {i}\n"
        procs[0].stdin.write_eof()
        assert (await asyncio.wait_for(procs[0].wait(), 20)).exit_status == 0
        await wait_for(lambda: _sessions(gateway) == 2, 10, "session released")
        result = await conn.run("echo again")
        assert result.stdout == "again\n"
        for proc in procs[1:]:
            proc.stdin.write_eof()
            await asyncio.wait_for(proc.wait(), 20)
    await gateway.wait_no_pods()
    assert not exception_handler


def _sessions(gateway: Gateway) -> float:
    return float(gateway.runner.metrics.sessions._value.get())


# -- env --------------------------------------------------------------------------------


async def test_huge_and_invalid_env(gateway: Gateway, exception_handler: list[Any]) -> None:
    big = "v" * 30_000
    env: dict[Any, Any] = {
        "KR_BIG": big,
        "KR_BIG2": big,
        "KR_" + "N" * 20_000: "x",  # a valid, enormous name, over the budget after two BIGs
        "1BAD": "x",
        "KR-DASH": "x",
        "KR_NUL": "a\x00b",
        "KR_EQ=": "x",
        "": "empty name",
        "KR_UTF": "ünï ✓ $(id) `id` \\ '\"",
        b"KR_BYTES": b"\xff\xfe",  # not UTF-8
    }
    async with gateway.asyncssh_connect() as conn:
        result = await conn.run(
            'printf "%s|%s|%s|%s" "${#KR_BIG}" "${#KR_BIG2}" "$KR_UTF" "$(env | grep -c "^KR_N")"',
            env=env,
        )
        assert result.exit_status == 0, result.stderr
        assert result.stdout == "30000|30000|ünï ✓ $(id) `id` \\ '\"|0"
    await _served(gateway)
    assert not exception_handler


async def test_env_flood_is_bounded(gateway: Gateway, exception_handler: list[Any]) -> None:
    # More env requests than OpenSSH's sshd accepts, and more bytes than MAX_ENV_BYTES.
    env = {f"KR_{i:04d}": "y" * 1000 for i in range(MAX_ENV_REQUESTS + 100)}
    async with gateway.asyncssh_connect() as conn:
        result = await conn.run('env | grep -c "^KR_"', env=env)
        assert result.exit_status == 0, result.stderr
        passed = int(result.stdout)
        assert 0 < passed <= MAX_ENV_BYTES // 1000 and passed <= MAX_ENV_REQUESTS
    await _served(gateway)
    assert not exception_handler


# -- terminal sizes ---------------------------------------------------------------------


async def test_terminal_sizes_zero_and_beyond_65535(
    gateway: Gateway, exception_handler: list[Any]
) -> None:
    async with gateway.asyncssh_connect() as conn:
        for size in ((0, 0), (70_000, 70_000), (2**32 - 1, 1)):
            result = await conn.run("stty size", term_type="xterm", term_size=size)
            assert result.exit_status == 0, (size, result.stderr)
            assert result.stdout.strip() == "0 0", size  # ignored, not mangled
        proc = await conn.create_process(STTY_LOOP, term_type="xterm", term_size=(80, 24))
        assert (await asyncio.wait_for(proc.stdout.readline(), 20)).strip() == "ready"
        for width, height in ((0, 0), (100_000, 5), (5, 2**32 - 1), (0, 40)):
            proc.change_terminal_size(width, height)
        proc.change_terminal_size(132, 43)
        sizes = await sizes_until(proc, "43 132", real=gateway.cluster.real)
        assert sizes[-1] == "43 132", sizes
        proc.stdin.write("q\n")
        await proc.wait()
    await _served(gateway)
    assert not exception_handler


# -- commands ---------------------------------------------------------------------------


class _TruthyStr(str):
    def __bool__(self) -> bool:
        return True


async def test_empty_and_enormous_commands(gateway: Gateway, exception_handler: list[Any]) -> None:
    async with gateway.asyncssh_connect() as conn:
        # The Pod first: while it starts, the first session's stderr shows its progress.
        assert (await conn.run("true")).exit_status == 0
        # asyncssh (like OpenSSH) asks for a shell when the command is empty; a
        # truthy empty string makes it send the exec request with "" instead.
        result = await asyncio.wait_for(conn.run(_TruthyStr(""), input=""), 20)
        assert (result.exit_status, result.stdout, result.stderr) == (0, "", "")
        word = "z" * 30_000
        result = await conn.run(f"printf %s {word} | wc -c")
        assert (result.exit_status, result.stdout.strip()) == (0, "30000"), result.stderr
    # A command larger than an SSH packet: asyncssh refuses the packet and drops
    # the connection (a protocol error, not kuberun's), and the gateway lives on.
    with pytest.raises((asyncssh.Error, OSError)):
        async with gateway.asyncssh_connect() as conn:
            await conn.run("echo " + "q" * 300_000)
    await _served(gateway)
    await gateway.wait_no_pods()
    assert not exception_handler


async def test_nul_bytes(gateway: Gateway, exception_handler: list[Any]) -> None:
    async with gateway.asyncssh_connect() as conn:
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.run("echo a\x00b")
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.run(subsystem="sftp\x00evil")
        # NUL in stdin is just data.
        result = await conn.run("od -An -c", input="a\x00b")
        assert result.exit_status == 0 and "\\0" in result.stdout
    await _served(gateway)
    assert not exception_handler


async def test_unknown_subsystem(gateway: Gateway, exception_handler: list[Any]) -> None:
    async with gateway.asyncssh_connect() as conn:
        for name in ("nope", "x" * 20_000, "../../bin/sh"):
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run(subsystem=name)
    await _served(gateway)
    assert not exception_handler


async def test_unknown_signals_and_break(gateway: Gateway, exception_handler: list[Any]) -> None:
    async with gateway.asyncssh_connect() as conn:
        proc = await conn.create_process("cat")
        for name in ("NOPE", "", "SIGTERM", "term", "X" * 20_000, "KILL\x00"):
            proc.send_signal(name)
        proc.send_break(100)  # no pty: refused
        proc.stdin.write("still here\n")
        assert await asyncio.wait_for(proc.stdout.readline(), 20) == "still here\n"
        proc.stdin.write_eof()
        result = await asyncio.wait_for(proc.wait(), 20)
        assert result.exit_status == 0
    await _served(gateway)
    assert not exception_handler


# -- usernames --------------------------------------------------------------------------


async def test_hostile_username(gateway: Gateway, exception_handler: list[Any]) -> None:
    # asyncssh's server refuses usernames of 1 KiB and more, or that SASLprep rejects
    # (control characters); tests/unit/test_security.py covers those in annotations.
    gateway.user = "evil $(id),x=y ü" + "u" * 980
    async with gateway.asyncssh_connect() as conn:
        process = await conn.create_process("sleep 30")
        pods = await wait_for(gateway.cluster.pods, 20, "Pod created")
        meta = pods[0]["metadata"]
        assert all(is_valid_label_value(v) for v in meta["labels"].values())
        assert meta["labels"][LABEL_USERNAME].startswith("evil-id-x-y-uuu")
        annotation = meta["annotations"][ANNOTATION_USERNAME]
        assert annotation == gateway.user
        process.terminate()
        process.close()
    await gateway.wait_no_pods()
    gateway.user = "alice"
    await _served(gateway)
    assert not exception_handler
