"""Many asyncssh client connections from one process (the load for the scale phase).

``python -m benchmarks.e2e.scale_client hold --port P --key K --count N``
opens N connections, each with a shell session that has answered ``echo``,
prints ``{"opened": ...}``, waits for a line on stdin, closes them all and
prints ``{"closed": ...}``.

``python -m benchmarks.e2e.scale_client churn --port P --key K --count N``
runs N short connections (connect, exec ``true``, exit status, disconnect),
``--concurrency`` at a time, and prints ``{"done": ...}`` with per-connection times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

import asyncssh

__all__ = ["main"]

CIPHER = "aes128-gcm@openssh.com"


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "username": "bench",
        "client_keys": [args.key],
        "known_hosts": None,
        "encryption_algs": [CIPHER],
        "compression_algs": None,
        "agent_path": None,
        "connect_timeout": 300,
    }


class Shell(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.buf += data
        if b"ready" in self.buf and not self.ready.done():
            self.ready.set_result(None)
            self.buf.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("session closed"))


async def _open_one(args: argparse.Namespace) -> tuple[Any, Any]:
    conn = await asyncssh.connect("127.0.0.1", args.port, **_options(args))
    chan, session = await conn.create_session(Shell, encoding=None)
    chan.write(b"echo ready\n")
    # create_session is typed to return the base SSHClientSession; the factory made a Shell.
    await asyncio.wait_for(cast(Shell, session).ready, 300)
    return conn, chan


async def hold(args: argparse.Namespace) -> int:
    sem = asyncio.Semaphore(args.concurrency)
    conns: list[Any] = []
    failures: list[str] = []

    async def one() -> None:
        async with sem:
            try:
                conns.append(await _open_one(args))
            except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
                failures.append(repr(exc))

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(args.count)))
    print(
        json.dumps(
            {
                "opened": len(conns),
                "failed": len(failures),
                "errors": failures[:5],
                "seconds": time.perf_counter() - started,
            }
        ),
        flush=True,
    )
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    started = time.perf_counter()
    for conn, _chan in conns:
        conn.close()
    await asyncio.gather(*(conn.wait_closed() for conn, _chan in conns), return_exceptions=True)
    print(json.dumps({"closed": len(conns), "seconds": time.perf_counter() - started}), flush=True)
    return 0


async def churn(args: argparse.Namespace) -> int:
    sem = asyncio.Semaphore(args.concurrency)
    times: list[float] = []
    failures: list[str] = []

    async def one() -> None:
        async with sem:
            t0 = time.perf_counter()
            try:
                async with asyncssh.connect("127.0.0.1", args.port, **_options(args)) as conn:
                    result = await conn.run("true", check=False)
                    if result.exit_status != 0:
                        failures.append(f"exit {result.exit_status}: {result.stderr!r}")
                        return
            except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
                failures.append(repr(exc))
                return
            times.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(args.count)))
    print(
        json.dumps(
            {
                "done": len(times),
                "failed": len(failures),
                "errors": failures[:5],
                "seconds": time.perf_counter() - started,
                "times": times,
            }
        ),
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("hold", "churn"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args(argv)
    run: Callable[[Coroutine[Any, Any, int]], int]
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    return int(run(hold(args) if args.mode == "hold" else churn(args)))


if __name__ == "__main__":
    sys.exit(main())
