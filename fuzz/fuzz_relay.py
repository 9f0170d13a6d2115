#!/usr/bin/env python3
"""Differential fuzzing of the exec relay codec with atheris (libFuzzer).

Each input drives both decoders (the Cython extension and the instrumented
pure-Python twin) over the same byte stream, cut at fuzzer-chosen points, via
``feed`` and via ``get_buffer``/``buffer_updated``. They must make the same sink
calls (consecutive stdout/stderr pieces joined) and raise the same
``ExecProtocolError``; no other exception may escape, and the Python twin's
internal buffers must stay within their bounds. ``decode_status`` must return
an int or raise ``ExecError``, and both encoders must produce identical,
correctly masked stdin frames.

A quarter of the inputs use the port-forward layout (``forward_port``), most
of them opened by the two 2-byte port headers a kubelet sends first.

Half of the inputs are "structured": the fuzzer's bytes choose frames (opcode,
flags, channel, length form, body) rather than raw bytes, which reaches
fragmented messages and status reassembly far sooner.

Usage (libFuzzer flags pass through)::

    python fuzz/fuzz_relay.py -max_total_time=30
    python fuzz/fuzz_relay.py CORPUS_DIR -max_total_time=600 -rss_limit_mb=2048
"""

from __future__ import annotations

import os
import struct
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import atheris

# The package's __init__ pulls in the whole gateway (asyncssh, aiohttp, ...): import it
# uninstrumented, then re-import just the pure-Python codec under instrumentation so
# coverage feedback is about the codec alone.
import kuberun
from kuberun import _relay  # native code: not instrumented
from kuberun.errors import ExecError, ExecProtocolError

for _name in ("kuberun._relay_py", "kuberun._relay_common"):
    sys.modules.pop(_name, None)
with atheris.instrument_imports(include=["kuberun._relay_py", "kuberun._relay_common"]):
    from kuberun import _relay_common, _relay_py

assert kuberun.errors.ExecProtocolError is ExecProtocolError

IMPLS = (_relay_py, _relay)
MAX_PAYLOADS = (_relay_common.DEFAULT_MAX_PAYLOAD, 0, 1, 64, 300, 5000)
MAX_STATUSES = (_relay_common.DEFAULT_MAX_STATUS, 0, 1, 40)
BUFFER_SIZES = (64, 100, 262144)
FORWARD_PORT = 8080
FORWARD_HEADER_DATA = bytes((0x82, 3, 0)) + struct.pack("<H", FORWARD_PORT)
FORWARD_HEADER_ERROR = bytes((0x82, 3, 1)) + struct.pack("<H", FORWARD_PORT)


class Sink:
    """Records sink calls, asserting the sink contract."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def _piece(self, name: str, data: memoryview) -> None:
        if not isinstance(data, memoryview) or not data.nbytes:
            raise AssertionError(f"{name} got {data!r}")
        ev = self.events
        if ev and ev[-1][0] == name:  # pieces of one channel run are joined
            ev[-1] = (name, ev[-1][1] + bytes(data))
        else:
            ev.append((name, bytes(data)))

    def on_stdout(self, data: memoryview) -> None:
        self._piece("stdout", data)

    def on_stderr(self, data: memoryview) -> None:
        self._piece("stderr", data)

    def on_status(self, data: bytes) -> None:
        if type(data) is not bytes or not data:
            raise AssertionError(f"on_status got {data!r}")
        self.events.append(("status", data))

    # The port-forward layout's names for the same two paths.
    def on_data(self, data: memoryview) -> None:
        self._piece("data", data)

    def on_error(self, data: bytes) -> None:
        if type(data) is not bytes or not data:
            raise AssertionError(f"on_error got {data!r}")
        self.events.append(("error", data))

    def on_ping(self, payload: bytes) -> None:
        self.events.append(("ping", bytes(payload)))

    def on_close(self, code: int | None, reason: str) -> None:
        self.events.append(("close", code, reason))


def run(impl: Any, chunks: list[bytes], via: str, kwargs: dict[str, Any]) -> tuple[Any, ...]:
    sink = Sink()
    dec = impl.ExecDecoder(
        sink, kwargs["protocol"], forward_port=kwargs["forward_port"], **kwargs["limits"]
    )
    error = None
    try:
        for chunk in chunks:
            if via == "feed":
                dec.feed(chunk)
            else:
                pos = 0
                while True:
                    buf = dec.get_buffer(-1)
                    n = min(len(buf), len(chunk) - pos)
                    buf[:n] = chunk[pos : pos + n]
                    dec.buffer_updated(n)
                    pos += n
                    if pos >= len(chunk):
                        break
            if impl is _relay_py:
                # Memory stays bounded whatever the input.
                assert len(dec._status) <= max(
                    2, kwargs["limits"].get("max_status", _relay_common.DEFAULT_MAX_STATUS)
                )
                assert len(dec._ctrl) <= 125 and len(dec._hdr) <= 10
        dec.flush()  # the input has ended: bytes held for a frame's end come out
    except ExecProtocolError as exc:
        error = str(exc)
        # A failed decoder stays failed, with the same message.
        try:
            dec.feed(b"")
        except ExecProtocolError as again:
            assert str(again) == error
        else:
            raise AssertionError("decoder accepted input after an error") from None
    return (
        sink.events,
        error,
        dec.stdout_bytes,
        dec.stderr_bytes,
        dec.unknown_frames,
        dec.closed,
    )


def build_frame(fdp: atheris.FuzzedDataProvider) -> bytes:
    """One frame chosen by the fuzzer; mostly well formed, sometimes not."""
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind == 0:
        return bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 12)))  # raw bytes
    flags = fdp.ConsumeIntInRange(0, 15)
    fin = 0x80 if flags & 0x7 else 0
    rsv = 0x10 if flags == 15 else 0
    if kind <= 6:
        opcode = (0x2, 0x2, 0x1, 0x0)[fdp.ConsumeIntInRange(0, 3)]
        head = (
            b"" if flags == 14 else bytes([(0, 1, 1, 2, 2, 3, 4, 255)[fdp.ConsumeIntInRange(0, 7)]])
        )
        body = head + bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300)))
    else:
        opcode = (0x9, 0xA, 0x8)[kind - 7]
        fin = 0x80 if flags != 13 else 0
        body = bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 127)))
    n = len(body)
    form = fdp.ConsumeIntInRange(0, 7)
    b0 = fin | rsv | opcode
    if n < 126 and form < 5:
        head = bytes((b0, n))
    elif n < 0x10000 and form < 7:
        head = bytes((b0, 126)) + struct.pack(">H", n)
    else:
        head = bytes((b0, 127)) + struct.pack(">Q", n)
    return head + body


def _pattern(n: int) -> bytes:
    """Deterministic "randomness" so both encoders pick the same mask keys."""
    return bytes(range(256)) * (n // 256)


def check_encoders(payload: bytes, max_frame: int) -> None:
    outputs = []
    for impl in IMPLS:
        enc = impl.ExecEncoder(max_frame_payload=max_frame, random_bytes=_pattern)
        outputs.append(enc.stdin(payload))
        assert enc.stdin_bytes == len(payload)
    assert outputs[0] == outputs[1]
    wire = outputs[0]
    pos = 0
    data = bytearray()
    while pos < len(wire):
        n = wire[pos + 1] & 0x7F
        pos += 2
        if n == 126:
            (n,) = struct.unpack_from(">H", wire, pos)
            pos += 2
        elif n == 127:
            (n,) = struct.unpack_from(">Q", wire, pos)
            pos += 8
        key = wire[pos : pos + 4]
        pos += 4
        unmasked = bytes(b ^ key[i % 4] for i, b in enumerate(wire[pos : pos + n]))
        assert unmasked[:1] == b"\x00" and 1 < len(unmasked) <= max_frame + 1
        data += unmasked[1:]
        pos += n
    assert bytes(data) == payload


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    structured = fdp.ConsumeBool()
    limits: dict[str, int] = {}
    choice = fdp.ConsumeIntInRange(0, 63)
    if choice & 1:
        limits["max_payload"] = MAX_PAYLOADS[(choice >> 1) % len(MAX_PAYLOADS)]
    if choice & 8:
        limits["max_status"] = MAX_STATUSES[(choice >> 4) % len(MAX_STATUSES)]
    if choice & 32:
        limits["buffer_size"] = BUFFER_SIZES[choice % len(BUFFER_SIZES)]
    protocol = _relay_common.PROTOCOLS[fdp.ConsumeIntInRange(0, 2)]
    layout = fdp.ConsumeIntInRange(0, 7)
    forward_port = FORWARD_PORT if layout < 2 else None
    if forward_port is not None:
        protocol = _relay_common.PROTOCOL_V4
    cuts = [fdp.ConsumeIntInRange(0, 400) for _ in range(fdp.ConsumeIntInRange(0, 12))]
    if structured:
        frames: list[bytes] = []
        if layout == 0:
            frames += [FORWARD_HEADER_DATA, FORWARD_HEADER_ERROR]
        while fdp.remaining_bytes() and len(frames) < 40:
            frames.append(build_frame(fdp))
        stream = b"".join(frames)
    else:
        stream = bytes(fdp.ConsumeBytes(fdp.remaining_bytes()))

    chunks = []
    pos = 0
    for cut in cuts:
        chunks.append(stream[pos : pos + cut])
        pos += cut
    chunks.append(stream[pos:])

    kwargs = {"protocol": protocol, "limits": limits, "forward_port": forward_port}
    reference = run(_relay_py, [stream], "feed", kwargs)
    for impl, via in ((_relay, "feed"), (_relay, "buffer"), (_relay_py, "buffer")):
        got = run(impl, chunks, via, kwargs)
        if got != reference:
            raise AssertionError(
                f"{impl.__name__} via {via} differs:\n{got!r}\nreference:\n{reference!r}"
            )

    for status in (stream[:2048], stream[1:2048]):
        try:
            code = _relay_common.decode_status(status, protocol)
        except ExecError:
            pass
        else:
            assert isinstance(code, int) and 0 <= code <= 255

    if not structured:
        check_encoders(stream[:3000], 1 + (cuts[0] if cuts else 1000))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
