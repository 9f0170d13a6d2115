"""Session recordings judged by their readers: Debian's asciinema (``cat`` byte for byte,
``play``), byte-exact raw recordings of a large download, resizes, and a disk that is
slow (a FIFO nobody reads) or full (``/dev/full``) while sessions go on."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kuberun.audit.recording import MAX_QUEUED
from kuberun.audit.writer import CHUNK

from .chaos import Chaos, GatewayProcess, Options
from .clusters import open_cluster
from .conftest import Gateway, wait_for
from .test_audit_trail import read_events

pytestmark = pytest.mark.asyncio(loop_factories=["uvloop"])

MiB = 1 << 20


@pytest.fixture
def gateway_overrides(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    extra: dict[str, Any] = getattr(request, "param", {})
    return {"audit__directory": str(tmp_path / "audit"), "audit__recordings": "all", **extra}


def audit_dir(gateway: Gateway) -> Path:
    return gateway.workdir / "audit"


async def session_end(directory: Path, **fields: Any) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for event in read_events(directory):
            if event["event"] == "session.ended" and all(
                event.get(k) == v for k, v in fields.items()
            ):
                return event
        return None

    found: dict[str, Any] = await wait_for(find, 30, f"session.ended {fields}")
    return found


def under_a_terminal(command: str) -> subprocess.CompletedProcess[bytes]:
    """Run a shell command with a terminal of its own (``asciinema cat`` opens /dev/tty)."""
    return subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
        check=False,
    )


async def test_asciinema_cat_gives_back_the_pty_output(gateway: Gateway, tmp_path: Path) -> None:
    # UTF-8 (two-, three- and four-byte characters), colour and cursor escapes, a tab,
    # a carriage return, and enough of it to span many frames.
    script = (
        "printf 'plain \\033[1;31mred\\033[0m na\\303\\257ve \\342\\234\\223 "
        "\\360\\237\\230\\200\\ttab\\rCR\\n'; i=0; while [ $i -lt 400 ]; do "
        "printf '\\033[2K%05d \\316\\273\\342\\206\\222\\360\\237\\215\\225 "
        "\\033[7mrev\\033[m\\n' $i;"
        " i=$((i+1)); done"
    )
    assert shutil.which("asciinema"), "asciinema is missing: run scripts/system-deps.sh"
    code, out, err = await gateway.ssh(script, tty=True)
    assert code == 0, err
    assert "λ→🍕".encode() in out and b"\x1b[1;31mred" in out and len(out) > 10000
    ended = await session_end(audit_dir(gateway), how="exit")
    assert ended["recording"]["format"] == "asciicast-v2"
    assert ended["recording"]["bytes"] == len(out) and ended["recording"]["dropped_bytes"] == 0
    cast = audit_dir(gateway) / ended["recording"]["files"][0]
    header = json.loads(cast.read_text().splitlines()[0])
    assert header["env"]["TERM"] and header["command"] == script

    copy = tmp_path / "cat.out"
    result = under_a_terminal(f"asciinema cat {cast} > {copy}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert copy.read_bytes() == out

    result = under_a_terminal(f"asciinema play -s 100 {cast}")
    assert result.returncode == 0 and b"Traceback" not in result.stdout + result.stderr


async def test_resizes_are_recorded_where_the_client_resized(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as conn:
        proc = await conn.create_process(
            "stty size; read a; stty size; read b; stty size",
            term_type="xterm-256color",
            term_size=(80, 24),
            encoding=None,
        )
        assert (await proc.stdout.readuntil(b"\n")).strip() == b"24 80"
        proc.change_terminal_size(132, 43)
        await asyncio.sleep(0.3)
        proc.stdin.write(b"\n")
        assert (await proc.stdout.readuntil(b"43 132\r\n")).endswith(b"43 132\r\n")
        proc.change_terminal_size(100, 30)
        await asyncio.sleep(0.3)
        proc.stdin.write(b"\n")
        await proc.stdout.readuntil(b"30 100\r\n")
        assert (await proc.wait()).exit_status == 0
    ended = await session_end(audit_dir(gateway), how="exit")
    assert ended["window_changes"] == 2
    lines = (audit_dir(gateway) / ended["recording"]["files"][0]).read_text().splitlines()
    header = json.loads(lines[0])
    assert (header["width"], header["height"]) == (80, 24)
    assert header["env"] == {"TERM": "xterm-256color"}
    events = [json.loads(line) for line in lines[1:]]
    codes = [(e[1], e[2]) for e in events if e[1] == "r" or "stty" not in e[2]]
    resizes = [i for i, (code, _) in enumerate(codes) if code == "r"]
    assert [codes[i][1] for i in resizes] == ["132x43", "100x30"]
    # Each resize sits between the output before it and the output it caused.
    text = "".join(e[2] if e[1] == "o" else f"<{e[2]}>" for e in events)
    assert text.index("24 80") < text.index("<132x43>") < text.index("43 132")
    assert text.index("43 132") < text.index("<100x30>") < text.index("30 100")
    assert not any(e[1] == "i" for e in events)  # record_input is off


# `block`: the recording must be whole, however busy the machine is. (Under `drop`, a
# writer thread starved of CPU by other work on a shared machine leaves gaps, as it should.)
# (The Pod reads a file of this machine: devcluster's Pods are local processes.)
@pytest.mark.devcluster_only
@pytest.mark.parametrize("gateway_overrides", [{"audit__on_overflow": "block"}], indirect=True)
async def test_large_download_recorded_byte_exact(gateway: Gateway, tmp_path: Path) -> None:
    size = 128 * MiB
    source = tmp_path / "data.bin"
    with open(source, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    target = tmp_path / "received.bin"
    argv = gateway.ssh_args(f"cat {source}")
    with open(target, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, err
    assert hashlib.sha256(target.read_bytes()).hexdigest() == expected
    ended = await session_end(audit_dir(gateway), how="exit")
    recording = ended["recording"]
    assert recording["format"] == "raw" and recording["dropped_bytes"] == 0
    assert recording["files"] == [f"{ended['connection']}.s1.stdout"]
    recorded = audit_dir(gateway) / recording["files"][0]
    await wait_for(lambda: recorded.stat().st_size == size, 30, "the recording's last chunk")
    assert hashlib.sha256(recorded.read_bytes()).hexdigest() == expected
    assert ended["bytes"]["stdout"] == size == recording["bytes"]


@pytest.mark.parametrize("gateway_overrides", [{"audit__record_input": True}], indirect=True)
async def test_input_is_recorded_only_when_asked(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as conn:
        proc = await conn.create_process(
            "stty -echo; read line; echo got", term_type="xterm", encoding=None
        )
        await asyncio.sleep(0.5)
        proc.stdin.write(b"secret typed\n")
        assert b"got" in await proc.stdout.readuntil(b"got")
        assert (await proc.wait()).exit_status == 0
        result = await conn.run("wc -c", input=b"uploaded bytes\n", encoding=None)
        assert result.stdout.strip() == b"15"
    pty_end = await session_end(audit_dir(gateway), session="s1")
    lines = (audit_dir(gateway) / pty_end["recording"]["files"][0]).read_text().splitlines()
    typed = "".join(e[2] for e in map(json.loads, lines[1:]) if e[1] == "i")
    assert typed == "secret typed\n"
    raw_end = await session_end(audit_dir(gateway), session="s2")
    assert raw_end["recording"]["files"] == [
        f"{raw_end['connection']}.s2.stdout",
        f"{raw_end['connection']}.s2.stdin",
    ]
    stdin_file = audit_dir(gateway) / raw_end["recording"]["files"][1]
    await wait_for(lambda: stdin_file.read_bytes() == b"uploaded bytes\n", 10, "stdin file")


# -- slow and full disks (a gateway process, so its memory can be measured) --------------


PREFIX = "audtst"


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Chaos]:
    async with open_cluster() as cluster:
        yield Chaos(Options(), cluster, tmp_path)


async def start_gateway(harness: Chaos, overflow: str) -> tuple[GatewayProcess, Path]:
    workdir = harness.workdir / "gateway"
    workdir.mkdir()
    directory = harness.workdir / "audit"
    config = harness.gateway_config()
    config["audit"] = {"directory": str(directory), "recordings": "all", "on_overflow": overflow}
    gateway = GatewayProcess(
        workdir, config, "uvloop", "cython", extra_args=("--connection-prefix", PREFIX)
    )
    harness.gateway = gateway
    await gateway.start()
    return gateway, directory


def recording_path(directory: Path, gateway: GatewayProcess, connection: int) -> Path:
    return directory / f"{PREFIX}-{gateway.pid:x}-{connection}.s1.stdout"


async def download(harness: Chaos, size: int) -> int:
    async with harness.connect() as conn:
        proc = await conn.create_process(f"head -c {size} /dev/zero", encoding=None)
        got = 0
        while chunk := await proc.stdout.read(MiB):
            assert chunk.count(0) == len(chunk)
            got += len(chunk)
        assert (await proc.wait()).exit_status == 0
    return got


def drain_fifo(path: Path) -> threading.Thread:
    def run() -> None:
        with open(path, "rb") as f:
            while f.read(MiB):
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def test_a_disk_that_never_writes_drops_and_memory_stays_bounded(harness: Chaos) -> None:
    gateway, directory = await start_gateway(harness, "drop")
    try:
        assert await download(harness, 64 * MiB) == 64 * MiB  # warm-up, connection 1
        baseline = gateway.rss()
        # The writer thread opens this FIFO and waits there for a reader.
        fifo = recording_path(directory, gateway, 2)
        os.mkfifo(fifo)
        size = 256 * MiB
        peak = baseline

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, gateway.rss())
                await asyncio.sleep(0.2)

        sampler = asyncio.ensure_future(sample())
        try:
            got = await asyncio.wait_for(download(harness, size), 120)
        finally:
            sampler.cancel()
        assert got == size
        growth = peak - baseline
        print(f"RSS growth with a stalled audit disk: {growth / MiB:.1f} MiB")
        # At most MAX_QUEUED bytes of this recording wait for the disk, plus the allocator.
        assert growth < 64 * MiB
        dropped = await gateway.metric("kuberun_audit_dropped_bytes_total")
        assert dropped is not None and dropped >= size - MAX_QUEUED - CHUNK
        reader = drain_fifo(fifo)  # the disk comes back
        ended = await session_end(directory, connection=f"{PREFIX}-{gateway.pid:x}-2")
        assert ended["how"] == "exit" and ended["bytes"]["stdout"] == size
        rec = ended["recording"]
        assert rec["bytes"] + rec["dropped_bytes"] == size and rec["dropped_bytes"] > 0
    finally:
        assert await gateway.stop(60) == 0
    reader.join(10)
    assert not gateway.unhandled()


async def test_a_full_disk_is_counted_and_the_session_goes_on(harness: Chaos) -> None:
    gateway, directory = await start_gateway(harness, "drop")
    try:
        directory.mkdir(exist_ok=True)
        recording_path(directory, gateway, 1).symlink_to("/dev/full")
        assert await download(harness, 16 * MiB) == 16 * MiB
        ended = await session_end(directory, connection=f"{PREFIX}-{gateway.pid:x}-1")
        assert ended["how"] == "exit" and ended["exit_status"] == 0
        errors = await gateway.metric("kuberun_audit_write_errors_total")
        assert errors is not None and errors >= 1
        dropped = await gateway.metric("kuberun_audit_dropped_bytes_total")
        assert dropped == 16 * MiB  # every chunk failed to write
        # The gateway still works, and records the next session.
        assert await download(harness, MiB) == MiB
        second = recording_path(directory, gateway, 2)
        await wait_for(lambda: second.exists() and second.stat().st_size == MiB, 30, "recording")
    finally:
        assert await gateway.stop(60) == 0
    assert b"No space left on device" in bytes(gateway.stderr)
    assert not gateway.unhandled()


async def test_block_holds_the_session_until_the_disk_takes_it(harness: Chaos) -> None:
    gateway, directory = await start_gateway(harness, "block")
    try:
        fifo = recording_path(directory, gateway, 1)
        directory.mkdir(exist_ok=True)
        os.mkfifo(fifo)
        size = 64 * MiB
        task = asyncio.ensure_future(download(harness, size))
        await asyncio.sleep(3)
        assert not task.done()  # held: the recording cannot be written
        reader = drain_fifo(fifo)
        assert await asyncio.wait_for(task, 120) == size
        ended = await session_end(directory, connection=f"{PREFIX}-{gateway.pid:x}-1")
        assert ended["recording"]["dropped_bytes"] == 0
        assert ended["recording"]["bytes"] == size
    finally:
        assert await gateway.stop(60) == 0
    reader.join(10)
    assert not gateway.unhandled()
