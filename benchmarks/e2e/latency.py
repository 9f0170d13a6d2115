"""Keystroke round trips: one byte into ``cat`` on a pty, its echo back, gateway versus direct.

Each target gets one asyncssh client connection with a pty session running
``stty raw -echo; exec cat`` (so ``cat`` itself echoes every byte at once).
Round trips are taken in blocks, alternating between the targets, so a burst
of load from elsewhere on the machine hits them alike. Two more endpoints split
the gateway's figure: a bare kuberun exec stream into one of the gateways' Pods
(the API-server hop without SSH) and a local pty with ``cat`` (no network).
"""

from __future__ import annotations

import asyncio
import os
import pty
import statistics
import subprocess
import time
import tty
import types
from collections.abc import Callable, Coroutine
from typing import Any, cast

import asyncssh

from .services import CIPHER, Service

__all__ = ["percentile", "run"]

BLOCK = 50
WARMUP = 50


class _Echo(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.want = 0
        self.waiter: asyncio.Future[None] | None = None

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done() and len(self.buf) >= self.want:
            self.waiter.set_result(None)

    async def expect(self, n: int) -> bytes:
        self.want = n
        if len(self.buf) < n:
            self.waiter = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self.waiter, 60)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def until(self, marker: bytes) -> None:
        while marker not in self.buf:
            self.want = len(self.buf) + 1
            self.waiter = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self.waiter, 120)
        del self.buf[: self.buf.index(marker) + len(marker)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def _session(port: int, key: str) -> tuple[Any, Any, _Echo]:
    conn = await asyncssh.connect(
        "127.0.0.1",
        port,
        username="bench",
        client_keys=[key],
        known_hosts=None,
        encryption_algs=[CIPHER],
        agent_path=None,
    )
    chan, base_session = await conn.create_session(
        _Echo,
        "stty raw -echo; echo READY; exec cat",
        term_type="xterm",
        term_size=(80, 24),
        encoding=None,
    )
    # create_session is typed to return the base SSHClientSession; the factory made an _Echo.
    session = cast(_Echo, base_session)
    await session.until(b"READY")
    await asyncio.sleep(0.2)
    session.buf.clear()  # the newline after the marker
    return conn, chan, session


class _ExecEcho(_Echo):
    """The same echo over a bare kuberun exec stream (an ExecListener), no SSH."""

    def exec_stdout(self, data: memoryview) -> None:
        self.data_received(bytes(data), None)

    exec_stderr = exec_stdout

    def exec_pause_input(self) -> None:
        pass

    def exec_resume_input(self) -> None:
        pass

    def exec_finished(self, result: Any) -> None:
        pass


async def _exec_endpoint(kubeconfig: str, pod: str) -> tuple[Any, Any, _Echo]:
    """``stty raw -echo; exec cat`` in ``pod`` through kuberun's ExecStream (Cython relay)."""
    from kuberun import _relay, execstream

    from .stream_proc import exec_connector

    # execstream binds ``relay`` by ``from . import relay`` without re-exporting it.
    execstream.relay = _relay  # type: ignore[attr-defined]
    api, connector = await exec_connector(kubeconfig)
    echo = _ExecEcho()
    stream = await connector.open(
        "default",
        pod,
        "shell",
        ["/bin/sh", "-c", "stty raw -echo; echo READY; exec cat"],
        echo,
        tty=True,
    )
    await echo.until(b"READY")
    await asyncio.sleep(0.2)
    echo.buf.clear()

    class Closer:
        def close(self) -> None:
            stream.abort()

        async def wait_closed(self) -> None:
            await api.close()

    return Closer(), types.SimpleNamespace(write=stream.write_stdin), echo


async def _pty_endpoint() -> tuple[Any, Any, _Echo]:
    """A local pty with ``cat`` behind it, read from the event loop: no network at all."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    proc = subprocess.Popen(
        ["cat"], stdin=slave, stdout=slave, stderr=slave, start_new_session=True
    )
    os.close(slave)
    os.set_blocking(master, False)
    echo = _Echo()
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = os.read(master, 65536)
        except OSError:
            data = b""
        if data:
            echo.data_received(data, None)

    loop.add_reader(master, readable)

    class Closer:
        def close(self) -> None:
            loop.remove_reader(master)
            proc.kill()
            os.close(master)

        async def wait_closed(self) -> None:
            proc.wait()

    return Closer(), types.SimpleNamespace(write=lambda b: os.write(master, b)), echo


async def _measure(
    targets: dict[str, int],
    key: str,
    round_trips: int,
    exec_pod: Callable[[], tuple[str, str] | None] = lambda: None,
) -> dict[str, list[float]]:
    sessions = {name: await _session(port, key) for name, port in targets.items()}
    where = exec_pod()  # asked once the sessions (and so their Pods) are up
    if where is not None:
        sessions["exec stream only"] = await _exec_endpoint(*where)
        sessions["local pty only"] = await _pty_endpoint()
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    try:
        for _conn, chan, session in sessions.values():
            for _ in range(WARMUP):
                chan.write(b"w")
                await session.expect(1)
        done = 0
        while done < round_trips:
            n = min(BLOCK, round_trips - done)
            for name, (_conn, chan, session) in sessions.items():
                for _ in range(n):
                    t0 = time.perf_counter_ns()
                    chan.write(b"x")
                    got = await session.expect(1)
                    samples[name].append((time.perf_counter_ns() - t0) / 1e6)
                    if got != b"x":
                        raise RuntimeError(f"{name}: echoed {got!r}")
            done += n
    finally:
        for conn, _chan, _echo in sessions.values():
            conn.close()
            await conn.wait_closed()
    return samples


def run(bench: Any, args: Any) -> dict[str, Any]:
    """Round trips against the direct server and every gateway variant already running."""
    targets: dict[str, int] = {}
    services: dict[str, Service] = {s.name: s for s in bench.services}
    if "direct" not in services:
        services["direct"] = bench.direct()
    targets["direct"] = services["direct"].port
    for relay in args.variants:
        name = f"gateway-{relay}"
        if name not in services:
            services[name] = bench.gateway(relay)
        targets[relay] = services[name].port

    def exec_pod() -> tuple[str, str] | None:
        """One of the gateways' Pods, for the exec-stream-only round trips."""
        pods = bench.cluster.pod_names()
        return (str(bench.cluster.kubeconfig), pods[0]) if pods else None

    run_loop: Callable[[Coroutine[Any, Any, dict[str, list[float]]]], dict[str, list[float]]]
    try:
        import uvloop

        run_loop = uvloop.run
    except ImportError:  # pragma: no cover
        run_loop = asyncio.run
    samples = run_loop(_measure(targets, str(bench.key), args.round_trips, exec_pod))
    out: dict[str, Any] = {"round_trips": args.round_trips, "targets": {}}
    for name, values in samples.items():
        out["targets"][name] = {
            "p50_ms": statistics.median(values),
            "p99_ms": percentile(values, 0.99),
            "mean_ms": statistics.fmean(values),
            "samples_ms": values,
        }
    return out
