"""Helpers shared by the relay tests: frame builders, a recording sink, feeding strategies.

Also used by the fuzz harness's structured mode, which is why it has no pytest imports.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any

from kuberun.errors import ExecProtocolError

Event = tuple[Any, ...]

MASK_KEY = bytes.fromhex("37fa213d")  # the RFC 6455 example key used by the spec's vectors


def fixed_random(n: int) -> bytes:
    """A ``random_bytes`` replacement that makes every mask key ``37 fa 21 3d``."""
    return MASK_KEY * (n // 4)


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
    length_form: int | None = None,
    declared_length: int | None = None,
) -> bytes:
    """Build one WebSocket frame. ``length_form`` forces 7/16/64-bit lengths (7, 16, 64);
    ``declared_length`` writes a length that differs from the payload (for bad frames)."""
    n = len(payload) if declared_length is None else declared_length
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if mask is not None else 0
    form = length_form or (7 if n < 126 else 16 if n < 0x10000 else 64)
    if form == 7:
        head = bytes((b0, mbit | n))
    elif form == 16:
        head = bytes((b0, mbit | 126)) + struct.pack(">H", n)
    else:
        head = bytes((b0, mbit | 127)) + struct.pack(">Q", n)
    if mask is not None:
        return head + mask + naive_mask(mask, payload)
    return head + payload


def data(channel: int, payload: bytes = b"", **kw: Any) -> bytes:
    """A binary data frame carrying a Kubernetes channel message."""
    return frame(0x2, bytes((channel,)) + payload, **kw)


def naive_mask(key: bytes, payload: bytes, phase: int = 0) -> bytes:
    """The obvious byte-at-a-time XOR masking (the reference for the fast versions)."""
    return bytes(b ^ key[(i + phase) % 4] for i, b in enumerate(payload))


class RecordingSink:
    """Records sink calls, checking the contract: stdout/stderr get non-empty memoryviews,
    status and ping get bytes, close gets (int | None, str)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def on_stdout(self, data: memoryview) -> None:
        assert isinstance(data, memoryview) and data.nbytes > 0, data
        self.events.append(("stdout", bytes(data)))

    def on_stderr(self, data: memoryview) -> None:
        assert isinstance(data, memoryview) and data.nbytes > 0, data
        self.events.append(("stderr", bytes(data)))

    def on_status(self, data: bytes) -> None:
        assert type(data) is bytes and data
        self.events.append(("status", data))

    def on_ping(self, payload: bytes) -> None:
        assert type(payload) is bytes
        self.events.append(("ping", payload))

    def on_close(self, code: int | None, reason: str) -> None:
        assert code is None or isinstance(code, int)
        assert isinstance(reason, str)
        self.events.append(("close", code, reason))


class ForwardRecordingSink(RecordingSink):
    """The port-forward sink: data pieces are recorded as ``data``, error messages as
    ``error``; the exec-only methods must never be called."""

    def on_data(self, data: memoryview) -> None:
        assert isinstance(data, memoryview) and data.nbytes > 0, data
        self.events.append(("data", bytes(data)))

    def on_error(self, data: bytes) -> None:
        assert type(data) is bytes and data
        self.events.append(("error", data))

    def on_stdout(self, data: memoryview) -> None:
        raise AssertionError("on_stdout called in the port-forward layout")

    def on_stderr(self, data: memoryview) -> None:
        raise AssertionError("on_stderr called in the port-forward layout")

    def on_status(self, data: bytes) -> None:
        raise AssertionError("on_status called in the port-forward layout")


def normalize(events: Iterable[Event]) -> list[Event]:
    """Join consecutive stdout (or stderr, or data) pieces: how pieces are grouped is
    not specified."""
    out: list[Event] = []
    for ev in events:
        if ev[0] in ("stdout", "stderr", "data") and out and out[-1][0] == ev[0]:
            out[-1] = (ev[0], out[-1][1] + ev[1])
        else:
            out.append(ev)
    return out


def splits_whole(stream: bytes) -> list[bytes]:
    return [stream]


def splits_bytewise(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


def splits_random(stream: bytes, seed: int, max_chunk: int = 64) -> list[bytes]:
    rng = random.Random(seed)
    chunks = []
    pos = 0
    while pos < len(stream):
        n = rng.randint(0, max_chunk)  # empty chunks are legal input too
        chunks.append(stream[pos : pos + n])
        pos += n
    return chunks


def _random_splitter(seed: int, max_chunk: int = 64) -> Callable[[bytes], list[bytes]]:
    def split(stream: bytes) -> list[bytes]:
        return splits_random(stream, seed, max_chunk)

    return split


SPLITTERS: dict[str, Callable[[bytes], list[bytes]]] = {
    "whole": splits_whole,
    "bytewise": splits_bytewise,
    **{f"random{seed}": _random_splitter(seed) for seed in range(4)},
    "random-large": _random_splitter(99, max_chunk=5000),
}


class Outcome:
    """What a decoder did with a stream: normalized sink calls, the error, the counters."""

    def __init__(self, events: list[Event], error: tuple[str, str] | None, decoder: Any):
        self.events = events
        self.error = error
        self.counters = (
            decoder.stdout_bytes,
            decoder.stderr_bytes,
            decoder.unknown_frames,
            decoder.closed,
        )

    def key(self) -> tuple[Any, ...]:
        return (self.events, self.error, self.counters)

    def __repr__(self) -> str:
        return f"Outcome(events={self.events!r}, error={self.error!r}, counters={self.counters})"


def run_decoder(
    impl: ModuleType,
    chunks: Sequence[Any],
    *,
    via: str = "feed",
    protocol: str | None = None,
    limits: dict[str, int] | None = None,
    forward_port: int | None = None,
) -> Outcome:
    """Feed ``chunks`` to a fresh decoder (``via`` "feed" or "buffer") until the first error.

    With ``forward_port``, the decoder is in the port-forward layout (protocol v4)."""
    sink: RecordingSink = RecordingSink()
    extra: dict[str, Any] = dict(limits or {})
    if forward_port is not None:
        sink = ForwardRecordingSink()
        protocol = protocol or "v4.channel.k8s.io"
        extra["forward_port"] = forward_port
    args = (sink,) if protocol is None else (sink, protocol)
    dec = impl.ExecDecoder(*args, **extra)
    error: tuple[str, str] | None = None
    try:
        for chunk in chunks:
            if via == "feed":
                dec.feed(chunk)
                continue
            pos = 0
            while True:  # one buffer_updated per chunk, or several if it exceeds the buffer
                buf = dec.get_buffer(len(chunk) - pos)
                n = min(len(buf), len(chunk) - pos)
                buf[:n] = chunk[pos : pos + n]
                dec.buffer_updated(n)
                pos += n
                if pos >= len(chunk):
                    break
        dec.flush()  # the input has ended: bytes held for a frame's end come out
    except ExecProtocolError as exc:
        error = (type(exc).__name__, str(exc))
    return Outcome(normalize(sink.events), error, dec)
