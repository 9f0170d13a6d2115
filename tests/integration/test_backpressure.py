"""Bounded gateway memory under backpressure, measured as the RSS of a gateway process.

Three cases, each against Pods that write (or would read) as fast as they can:
clients that stop reading altogether, clients that read slowly, and clients that
upload into Pods that do not read yet. The gateway's RSS is sampled throughout;
its growth over the warm baseline must stay within ``LIMIT`` (the target: 64 MiB
after 10 s of a Pod flooding a stalled reader). Afterwards every stream must
still deliver its bytes, so a stall is a pause, never a loss.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import asyncssh
import pytest

from kuberun.execstream import ExecConnector, ExecListener, ExecStream

from .chaos import Chaos, GatewayProcess, Options
from .clusters import REAL, open_cluster
from .conftest import Gateway, wait_for
from .test_forwarding import flood

pytestmark = pytest.mark.asyncio(loop_factories=["uvloop"])

LIMIT = 64 * 1024 * 1024
SESSIONS = 4
STALL = 10.0
MiB = 1 << 20


class Sampler:
    """The gateway's RSS over its warm baseline, sampled twice a second."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        self.baseline = gateway.rss()
        self.peak = self.baseline

    async def run_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.peak = max(self.peak, self.gateway.rss())
            await asyncio.sleep(0.5)
        self.peak = max(self.peak, self.gateway.rss())

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


@pytest.fixture
async def chaos(tmp_path: Path) -> AsyncIterator[Chaos]:
    async with open_cluster() as cluster:
        harness = Chaos(Options(), cluster, tmp_path)
        workdir = tmp_path / "gateway"
        workdir.mkdir()
        harness.gateway = GatewayProcess(workdir, harness.gateway_config(), "uvloop", "cython")
        await harness.gateway.start()
        try:
            # Warm up both directions once, so allocator pools exist before the baseline.
            async with harness.connect() as conn:
                result = await conn.run(f"head -c {64 * MiB} /dev/zero", encoding=None)
                assert len(result.stdout) == 64 * MiB
                result = await conn.run("wc -c", input=bytes(64 * MiB), encoding=None)
                assert result.stdout.strip() == str(64 * MiB).encode()
            yield harness
        finally:
            assert await harness.gateway.stop(60) == 0
            assert not harness.gateway.unhandled()


async def _drain(proc: asyncssh.SSHClientProcess[bytes], limit: int) -> int:
    """Read up to ``limit`` bytes (all zeros) and return how many arrived."""
    got = 0
    while got < limit:
        chunk = await proc.stdout.read(min(1 << 20, limit - got))
        if not chunk:
            break
        assert chunk.count(0) == len(chunk)
        got += len(chunk)
    return got


async def test_stalled_readers(chaos: Chaos) -> None:
    assert chaos.gateway is not None
    async with chaos.connect() as conn:
        procs = [await conn.create_process("cat /dev/zero", encoding=None) for _ in range(SESSIONS)]
        sampler = Sampler(chaos.gateway)
        await sampler.run_for(STALL)  # nobody reads: the Pods write as fast as they can
        print(f"stalled readers: +{sampler.growth / MiB:.1f} MiB for {SESSIONS} sessions")
        assert sampler.growth <= LIMIT
        # The stall was a pause: every stream still flows, byte-exact.
        counts = await asyncio.gather(*(_drain(p, 32 * MiB) for p in procs))
        assert counts == [32 * MiB] * SESSIONS
        for proc in procs:
            proc.close()


async def test_a_pause_that_comes_before_the_stream_is_not_lost(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Output flows as soon as the API server has switched protocols, so the SSH channel
    can fill before the session holds the exec stream; asyncssh asks to pause only once,
    and that request must still stop the reading (else memory grows without bound)."""
    handed_over: list[ExecStream] = []
    original = ExecConnector.open

    async def open_late(
        self: ExecConnector,
        namespace: str,
        pod: str,
        container: str,
        command: Any,
        listener: ExecListener,
        **kwargs: Any,
    ) -> ExecStream:
        stream = await original(self, namespace, pod, container, command, listener, **kwargs)
        # Hand the stream over only once the client's window is spent and the channel
        # has asked to pause.
        await wait_for(lambda: getattr(listener, "_ssh_full", False), 60, "channel full")
        handed_over.append(stream)
        return stream

    monkeypatch.setattr(ExecConnector, "open", open_late)
    async with gateway.asyncssh_connect() as conn:
        proc = await conn.create_process("cat /dev/zero", encoding=None)  # never read
        await wait_for(lambda: handed_over, 90, "the exec handed over")
        # The session went on in the same step as the hand-over: it has paused already.
        assert handed_over[0]._output_paused
        proc.close()
    await gateway.wait_no_pods()


async def test_slow_readers(chaos: Chaos) -> None:
    assert chaos.gateway is not None
    size = 256 * MiB
    async with chaos.connect() as conn:
        procs = [
            await conn.create_process(f"head -c {size} /dev/zero", encoding=None)
            for _ in range(SESSIONS)
        ]
        sampler = Sampler(chaos.gateway)

        async def slowly(proc: asyncssh.SSHClientProcess[bytes]) -> int:
            got = 0
            end = time.monotonic() + 5
            while time.monotonic() < end:
                got += len(await proc.stdout.read(16384))
                await asyncio.sleep(0.01)
            return got + await _drain(proc, size - got)

        counts, _ = await asyncio.gather(
            asyncio.gather(*(slowly(p) for p in procs)), sampler.run_for(5)
        )
        print(f"slow readers: +{sampler.growth / MiB:.1f} MiB for {SESSIONS} sessions")
        results = [await proc.wait() for proc in procs]
        assert sampler.growth <= LIMIT
        for result in results:
            assert result.exit_status == 0, (result.exit_status, result.stderr)
        if REAL and counts != [size] * SESSIONS:
            # A loaded real node can end a slowly read output short, with Success, before
            # anything reaches kuberun (kuberun/devcluster/README.md, "Differences from a
            # real cluster"; suspected: the kubelet's SPDY stream from containerd). Only
            # that exact outcome is excused: memory and exit statuses were checked above.
            pytest.xfail(f"the real node ended outputs short with Success: {counts}")
        assert counts == [size] * SESSIONS, [(r.exit_status, r.stderr) for r in results]


async def test_uploads_into_pods_that_do_not_read(chaos: Chaos) -> None:
    assert chaos.gateway is not None
    size = 128 * MiB
    async with chaos.connect() as conn:
        procs = [
            await conn.create_process("sleep 5; wc -c", encoding=None) for _ in range(SESSIONS)
        ]
        sampler = Sampler(chaos.gateway)

        async def upload(proc: asyncssh.SSHClientProcess[bytes]) -> bytes:
            chunk = bytes(MiB)
            for _ in range(size // MiB):
                proc.stdin.write(chunk)
                await proc.stdin.drain()  # as fast as the gateway lets us
            proc.stdin.write_eof()
            # encoding=None: stdout is bytes (typed ``str | bytes | None``).
            return cast("bytes | None", (await proc.wait()).stdout) or b""

        async def sample_until(done: asyncio.Future[list[bytes]]) -> None:
            while not done.done():
                await sampler.run_for(0.5)

        uploads = asyncio.ensure_future(asyncio.gather(*(upload(p) for p in procs)))
        await sample_until(uploads)
        outputs = await uploads
        print(f"fast uploads: +{sampler.growth / MiB:.1f} MiB for {SESSIONS} sessions")
        assert sampler.growth <= LIMIT
        assert [o.strip() for o in outputs] == [str(size).encode()] * SESSIONS


async def _local_server(handler: Any) -> tuple[asyncio.AbstractServer, int]:
    """A server on the host's loopback: a port of every devcluster Pod."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


@pytest.mark.devcluster_only  # servers on the host are Pod ports only there
async def test_stalled_forward_readers(chaos: Chaos) -> None:
    server, port = await _local_server(flood)
    try:
        async with chaos.connect() as conn:
            streams = [await conn.open_connection("localhost", port) for _ in range(SESSIONS)]
            assert chaos.gateway is not None
            sampler = Sampler(chaos.gateway)
            await sampler.run_for(STALL)  # nobody reads: the Pod side floods
            print(f"stalled forwards: +{sampler.growth / MiB:.1f} MiB for {SESSIONS} forwards")
            assert sampler.growth <= LIMIT

            async def drain(reader: asyncssh.SSHReader[bytes]) -> int:
                got = 0
                while got < 32 * MiB:
                    chunk = await reader.read(min(MiB, 32 * MiB - got))
                    assert chunk and chunk.count(0) == len(chunk)
                    got += len(chunk)
                return got

            counts = await asyncio.gather(*(drain(r) for r, _ in streams))
            assert counts == [32 * MiB] * SESSIONS
            for _, writer in streams:
                writer.close()
    finally:
        server.close()


@pytest.mark.devcluster_only  # servers on the host are Pod ports only there
async def test_forward_uploads_into_a_server_that_does_not_read(chaos: Chaos) -> None:
    size = 128 * MiB

    async def late_counter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)
        total = 0
        while total < size:
            total += len(await reader.read(MiB))
        writer.write(str(total).encode())
        await writer.drain()
        writer.close()

    server, port = await _local_server(late_counter)
    try:
        async with chaos.connect() as conn:
            assert chaos.gateway is not None
            sampler = Sampler(chaos.gateway)

            async def upload() -> bytes:
                reader, writer = await conn.open_connection("localhost", port)
                chunk = bytes(MiB)
                for _ in range(size // MiB):
                    writer.write(chunk)
                    await writer.drain()
                # The answer comes after the client's EOF, and then the server closes.
                writer.write_eof()
                return cast(bytes, await reader.read())

            async def sample_until(done: asyncio.Future[list[bytes]]) -> None:
                while not done.done():
                    await sampler.run_for(0.5)

            uploads = asyncio.gather(*(upload() for _ in range(SESSIONS)))
            await sample_until(uploads)
            outputs = await uploads
            print(f"forward uploads: +{sampler.growth / MiB:.1f} MiB for {SESSIONS} forwards")
            assert sampler.growth <= LIMIT
            assert outputs == [str(size).encode()] * SESSIONS
    finally:
        server.close()
