"""One exec-stream consumer in its own process (so ``/proc/PID/stat`` measures it alone).

``python -m benchmarks.e2e.stream_proc --kubeconfig K --pod P --variant cython``

The ``streams`` phase (:mod:`benchmarks.e2e.streams`) starts one of these per
variant. It prints one JSON line (``{"pid": ..., "implementation": ...}``) once it
is ready, then answers one JSON request per stdin line with one JSON line on
stdout, until stdin closes:

* ``{"op": "down", "size": N}``: exec ``head -c N /dev/zero``, count stdout;
* ``{"op": "up", "size": N}``: exec ``sh -c 'cat >/dev/null'``, write N bytes of
  stdin, then stdin EOF;
* ``{"op": "verify", "size": N}``: both, checked byte for byte (not timed).

Variants (the consumer side of the exec WebSocket):

* ``cython``/``python``: :class:`kuberun.execstream.ExecStream` with the Cython or
  the pure-Python relay (the parent sets ``KUBERUN_REQUIRE_EXTENSIONS=1`` or
  ``KUBERUN_NO_EXTENSIONS=1``, which :mod:`kuberun.relay` reads at import);
* ``aiohttp``: the kubernetes-asyncio/aiohttp baseline of
  :mod:`benchmarks.e2e.aiohttp_stream`;
* ``floor``: the same TLS connection and WebSocket upgrade, then no per-byte work
  in Python at all: a 256 KiB :class:`asyncio.BufferedProtocol` that only counts
  what arrives, and pre-built, pre-masked 64 KiB stdin frames written again and
  again. What is left is what any client must pay to move these bytes over TLS.

Every variant sees the same stdin pattern: 32 KiB ``bytes`` chunks, at most 8 per
event-loop iteration (what asyncssh delivers from one 256 KiB socket read), not
one more once the stream asks to pause input, more again when it resumes. The
floor writes the same 256 KiB per iteration as four 64 KiB frames.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from kuberun import relay
from kuberun.cli import run_async
from kuberun.config import KubernetesConfig, make_api_client
from kuberun.errors import CommandStartError
from kuberun.execstream import WRITE_HIGH_WATER, ExecConnector, ExecResult
from kuberun.upgrade import (
    accept_key,
    build_request,
    exec_path,
    new_key,
    parse_response_head,
)

__all__ = ["VARIANTS", "exec_connector", "main"]

VARIANTS = ("floor", "cython", "python", "aiohttp")

NAMESPACE = "default"
CONTAINER = "shell"

#: What asyncssh hands a session per SSH packet, and how many one socket read holds.
CHUNK = 32 * 1024
CHUNKS_PER_ITERATION = 8
#: The floor's stdin frames: as large as kuberun's encoder makes them.
FRAME_DATA = 64 * 1024
#: The floor's receive buffer (the size of the reads uvloop makes into it).
READ_BUFFER = 256 * 1024
#: What devcluster sends on channel 3 when the command exited with 0.
SUCCESS = b'{"metadata":{},"status":"Success"}'
TAIL = 256


async def exec_connector(kubeconfig: str) -> tuple[Any, ExecConnector]:
    """A kubernetes-asyncio ApiClient for devcluster and an ExecConnector on its configuration.

    The caller closes the ApiClient (``await api.close()``).
    """
    api = await make_api_client(KubernetesConfig(kubeconfig=kubeconfig, context="devcluster"))
    return api, ExecConnector(api.configuration)


def _command(op: str, size: int, verify: bool) -> list[str]:
    if op == "down":
        return ["head", "-c", str(size), "/dev/zero"]
    if verify:
        # The exit status says whether exactly ``size`` bytes arrived.
        return ["sh", "-c", f'[ "$(wc -c)" -eq {size} ]']
    return ["sh", "-c", "cat >/dev/null"]


class Feeder:
    """Writes ``size`` bytes of stdin in units, a few per event-loop iteration.

    ``write_unit(n)`` sends ``n`` bytes (at most one unit). It stops before the next
    unit as soon as :meth:`pause` is called (which may happen from inside
    ``write_unit``, when the transport's buffer fills up) and goes on after
    :meth:`resume`; ``done`` is set once everything is written.
    """

    def __init__(
        self, write_unit: Callable[[int], None], unit: int, per_iteration: int, size: int
    ) -> None:
        self._write_unit = write_unit
        self._unit = unit
        self._per_iteration = per_iteration
        self._left = size
        self._paused = False
        self._scheduled = False
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self._loop.create_future()

    def start(self) -> None:
        self._schedule()

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and not self.done.done():
            self._scheduled = True
            self._loop.call_soon(self._iteration)

    def _iteration(self) -> None:
        self._scheduled = False
        for _ in range(self._per_iteration):
            if self._paused or self._left <= 0:
                break
            n = min(self._unit, self._left)
            self._left -= n
            self._write_unit(n)
        if self._left <= 0:
            if not self.done.done():
                self.done.set_result(None)
        elif not self._paused:
            self._schedule()


class _Feeds:
    """Passes the stream's pause/resume of input on to the :class:`Feeder`, if any."""

    feeder: Feeder | None = None

    def pause_feeder(self) -> None:
        if self.feeder is not None:
            self.feeder.pause()

    def resume_feeder(self) -> None:
        if self.feeder is not None:
            self.feeder.resume()


class CountingListener(_Feeds):
    """An ExecListener that discards output (counting it) and never pauses the stream."""

    def __init__(self) -> None:
        self.stdout = 0
        self.stderr = 0
        self.result: ExecResult | None = None

    def exec_stdout(self, data: memoryview) -> None:
        self.stdout += len(data)

    def exec_stderr(self, data: memoryview) -> None:
        self.stderr += len(data)

    exec_pause_input = _Feeds.pause_feeder
    exec_resume_input = _Feeds.resume_feeder

    def exec_finished(self, result: ExecResult) -> None:
        self.result = result


async def stream_transfer(
    connector: ExecConnector, variant: str, pod: str, op: str, size: int, verify: bool
) -> dict[str, Any]:
    """One transfer through kuberun's ExecStream (either relay) or the aiohttp baseline."""
    listener = CountingListener()
    command = _command(op, size, verify)
    if variant == "aiohttp":
        from .aiohttp_stream import open_baseline

        stream: Any = await open_baseline(
            connector, NAMESPACE, pod, CONTAINER, command, listener, stdin=op == "up"
        )
    else:
        stream = await connector.open(
            NAMESPACE, pod, CONTAINER, command, listener, stdin=op == "up"
        )
    if op == "up":
        chunk = bytes(CHUNK)

        def write_unit(n: int) -> None:
            stream.write_stdin(chunk if n == CHUNK else chunk[:n])

        listener.feeder = Feeder(write_unit, CHUNK, CHUNKS_PER_ITERATION, size)
        listener.feeder.start()
        # The stream may end early (an error): do not wait for the feeder forever then.
        ended = asyncio.ensure_future(stream.wait())
        await asyncio.wait([listener.feeder.done, ended], return_when=asyncio.FIRST_COMPLETED)
        if not ended.done():
            stream.close_stdin()
    result: ExecResult = await stream.wait()
    if result.exit_status != 0:
        raise RuntimeError(f"{variant} {op}: exec ended with {result}")
    if op == "down" and listener.stdout != size:
        raise RuntimeError(f"{variant} down: {listener.stdout} stdout bytes, expected {size}")
    return {"stdout_bytes": listener.stdout, "stderr_bytes": listener.stderr, "exit_status": 0}


class FloorProtocol(_Feeds, asyncio.BufferedProtocol):
    """The WebSocket upgrade, then bytes counted as they arrive: no frame parsing.

    Keeps the last :data:`TAIL` bytes (a copy per read, not per byte) so the end of
    the stream (the channel-3 status, then Close) can be checked; with ``keep`` it
    keeps everything, for :func:`floor_transfer`'s untimed verification.
    """

    def __init__(self, key: str, keep: bool) -> None:
        loop = asyncio.get_running_loop()
        self._key = key
        self._buf = bytearray(READ_BUFFER)
        self._view = memoryview(self._buf)
        self._head = bytearray()
        self.transport: asyncio.Transport | None = None
        self.upgraded: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.wire_bytes = 0
        self.tail = b""
        self.kept: bytearray | None = bytearray() if keep else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Same high-water mark as ExecStream, so pauses come at the same points.
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[union-attr]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        if self.upgraded.done():
            self._count(nbytes)
            return
        self._head += self._view[:nbytes]
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            return
        try:
            response = parse_response_head(bytes(self._head[:end]))
            if response.status != 101:
                raise CommandStartError(f"upgrade refused: {response.status} {response.reason}")
            if response.header("sec-websocket-accept") != accept_key(self._key):
                raise CommandStartError("bad Sec-WebSocket-Accept")
            if response.header("sec-websocket-protocol") != relay.PROTOCOL_V5:
                raise CommandStartError("the floor needs v5.channel.k8s.io (stdin EOF)")
        except CommandStartError as exc:
            self.upgraded.set_exception(exc)
            if self.transport is not None:
                self.transport.abort()
            return
        rest = bytes(self._head[end + 4 :])
        self._head = bytearray()
        self.upgraded.set_result(None)
        self._view[: len(rest)] = rest
        self._count(len(rest))

    def _count(self, nbytes: int) -> None:
        self.wire_bytes += nbytes
        if nbytes >= TAIL:
            self.tail = bytes(self._view[nbytes - TAIL : nbytes])
        else:
            self.tail = (self.tail + self._view[:nbytes])[-TAIL:]
        if self.kept is not None:
            self.kept += self._view[:nbytes]

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(CommandStartError(f"closed during the upgrade: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    pause_writing = _Feeds.pause_feeder
    resume_writing = _Feeds.resume_feeder


def _fixed_mask(n: int) -> bytes:
    """One mask key for every frame: masking happens once, before the transfer."""
    return b"\x5a\xa5\x3c\xc3" * (n // 4)


def _decode_kept(data: bytes) -> tuple[int, int]:
    """(stdout bytes, exit status) of a whole recorded stream, through kuberun's decoder."""
    status: list[bytes] = []
    counts = [0]

    class Sink:
        def on_stdout(self, view: memoryview) -> None:
            counts[0] += len(view)

        def on_stderr(self, view: memoryview) -> None:
            pass

        def on_status(self, payload: bytes) -> None:
            status.append(payload)

        def on_ping(self, payload: bytes) -> None:
            pass

        def on_close(self, code: int | None, reason: str) -> None:
            pass

    relay.ExecDecoder(Sink(), relay.PROTOCOL_V5).feed(data)
    return counts[0], relay.decode_status(b"".join(status), relay.PROTOCOL_V5)


async def floor_transfer(
    connector: ExecConnector, pod: str, op: str, size: int, verify: bool
) -> dict[str, Any]:
    """One transfer over the same TLS connection and upgrade, with no per-byte work."""
    loop = asyncio.get_running_loop()
    key = new_key()
    target = exec_path(
        connector._prefix,
        NAMESPACE,
        pod,
        CONTAINER,
        _command(op, size, verify),
        stdin=op == "up",
        tty=False,
    )
    request = build_request(connector._host_header, target, key, await connector._auth_headers())
    _transport, proto = await loop.create_connection(
        lambda: FloorProtocol(key, keep=verify),
        connector._host,
        connector._port,
        ssl=connector._ssl,
        server_hostname=connector._server_hostname if connector._ssl else None,
    )
    transport = proto.transport
    assert transport is not None
    transport.write(request)
    await proto.upgraded
    if op == "up":
        encoder = relay.ExecEncoder(random_bytes=_fixed_mask)
        # Built and masked once; every write hands the transport the same object.
        frame = encoder.stdin(bytes(FRAME_DATA))
        last = encoder.stdin(bytes(size % FRAME_DATA or FRAME_DATA))

        def write_unit(n: int) -> None:
            transport.write(frame if n == FRAME_DATA else last)

        proto.feeder = Feeder(
            write_unit, FRAME_DATA, CHUNK * CHUNKS_PER_ITERATION // FRAME_DATA, size
        )
        proto.feeder.start()
        await asyncio.wait([proto.feeder.done, proto.closed], return_when=asyncio.FIRST_COMPLETED)
        if not transport.is_closing():
            transport.write(encoder.close_stdin())
    # devcluster sends the status and Close 1000, then closes TCP without
    # waiting for our Close: reading until then is all the floor does.
    await proto.closed
    out: dict[str, Any] = {"wire_bytes": proto.wire_bytes}
    if proto.kept is not None:
        stdout, exit_status = _decode_kept(bytes(proto.kept))
        if exit_status != 0 or (op == "down" and stdout != size):
            raise RuntimeError(f"floor {op}: {stdout} stdout bytes, exit status {exit_status}")
        out |= {"stdout_bytes": stdout, "exit_status": exit_status}
        return out
    # Timed runs check what they can without parsing: the status at the end, and
    # at least as many bytes on the wire as the payload.
    if SUCCESS not in proto.tail:
        raise RuntimeError(f"floor {op}: no success status at the end: {proto.tail[-80:]!r}")
    if op == "down" and proto.wire_bytes < size:
        raise RuntimeError(f"floor down: only {proto.wire_bytes} bytes, expected > {size}")
    out["exit_status"] = 0
    return out


async def transfer(
    connector: ExecConnector, variant: str, pod: str, op: str, size: int, verify: bool = False
) -> dict[str, Any]:
    """One transfer in ``variant``; its wall time is measured here, around everything.

    ``self_cpu`` is this process's CPU time over the transfer at nanosecond
    resolution, a cross-check of the parent's ``/proc`` figure (10 ms ticks).
    """
    started, cpu = time.perf_counter(), time.process_time()
    if variant == "floor":
        out = await floor_transfer(connector, pod, op, size, verify)
    else:
        out = await stream_transfer(connector, variant, pod, op, size, verify)
    out["seconds"] = time.perf_counter() - started
    out["self_cpu"] = time.process_time() - cpu
    return out


async def serve(args: argparse.Namespace) -> int:
    api, connector = await exec_connector(args.kubeconfig)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    ready = {
        "pid": os.getpid(),
        "variant": args.variant,
        "implementation": relay.IMPLEMENTATION,
        "loop": type(loop).__module__.split(".")[0],
    }
    print(json.dumps(ready), flush=True)
    try:
        while line := await reader.readline():
            request = json.loads(line)
            op, size = request["op"], int(request["size"])
            out: dict[str, Any]
            try:
                if op == "verify":
                    out = {
                        o: await transfer(connector, args.variant, args.pod, o, size, verify=True)
                        for o in ("down", "up")
                    }
                else:
                    out = await transfer(connector, args.variant, args.pod, op, size)
                out["ok"] = True
            except Exception as exc:
                out = {"ok": False, "error": repr(exc)}
            print(json.dumps(out), flush=True)
    finally:
        await api.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--pod", required=True)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    args = parser.parse_args(argv)
    return run_async(serve(args))


if __name__ == "__main__":
    sys.exit(main())
