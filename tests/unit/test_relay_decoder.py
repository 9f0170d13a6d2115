"""ExecDecoder: the spec's test vectors, every feeding strategy, every malformed input."""

from __future__ import annotations

import array
import gc
from types import ModuleType
from typing import Any

import pytest

from kuberun.errors import ExecProtocolError
from tests.unit.test_relay_support import (
    MASK_KEY,
    SPLITTERS,
    RecordingSink,
    data,
    frame,
    normalize,
    run_decoder,
)

SUCCESS_JSON = b'{"metadata":{},"status":"Success"}'
EXIT3_V5_JSON = (
    b'{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: '
    b'command terminated with exit code 3","reason":"NonZeroExitCode","details":{"causes":'
    b'[{"reason":"ExitCode","message":"3"}]}}'
)
EXIT3_V4_JSON = (
    b'{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: '
    b'error executing command [sh -c exit 3], exit code 3","reason":"NonZeroExitCode",'
    b'"details":{"causes":[{"reason":"ExitCode","message":"3"}]}}'
)
EXIT3_V1_TEXT = (
    b"command terminated with non-zero exit code: error executing command [sh -c exit 3], "
    b"exit code 3"
)
INTERNAL_JSON = (
    b'{"metadata":{},"status":"Failure","message":"Internal error occurred: unable to upgrade '
    b'connection: container not found (\\"main\\")","reason":"InternalError","details":'
    b'{"causes":[{"message":"unable to upgrade connection: container not found (\\"main\\")"}]},'
    b'"code":500}'
)

# The exact bytes of the spec's section 5.2 failure vector (v5, exit code 3).
EXIT3_V5_FRAME = bytes.fromhex(
    """
    82 7e 00 d5 03 7b 22 6d 65 74 61 64 61 74 61 22 3a 7b 7d 2c 22 73 74 61 74 75 73 22 3a 22
    46 61 69 6c 75 72 65 22 2c 22 6d 65 73 73 61 67 65 22 3a 22 63 6f 6d 6d 61 6e 64 20 74 65
    72 6d 69 6e 61 74 65 64 20 77 69 74 68 20 6e 6f 6e 2d 7a 65 72 6f 20 65 78 69 74 20 63 6f
    64 65 3a 20 63 6f 6d 6d 61 6e 64 20 74 65 72 6d 69 6e 61 74 65 64 20 77 69 74 68 20 65 78
    69 74 20 63 6f 64 65 20 33 22 2c 22 72 65 61 73 6f 6e 22 3a 22 4e 6f 6e 5a 65 72 6f 45 78
    69 74 43 6f 64 65 22 2c 22 64 65 74 61 69 6c 73 22 3a 7b 22 63 61 75 73 65 73 22 3a 5b 7b
    22 72 65 61 73 6f 6e 22 3a 22 45 78 69 74 43 6f 64 65 22 2c 22 6d 65 73 73 61 67 65 22 3a
    22 33 22 7d 5d 7d 7d
    """
)
INTERNAL_FRAME_HEAD = bytes.fromhex("827e010b03")

BODY_199 = bytes(range(199))
BODY_32768 = bytes(i * 7 % 256 for i in range(32768))
BODY_69999 = bytes(i * 13 % 251 for i in range(69999))

# (name, stream, expected normalized sink calls, protocol)
VECTORS: list[tuple[str, bytes, list[tuple[Any, ...]], str]] = [
    ("initial-empty-stdout", bytes.fromhex("820101"), [], "v5.channel.k8s.io"),
    (
        "stdout-hello",
        bytes.fromhex("8207016865 6c6c6f0a"),
        [("stdout", b"hello\n")],
        "v5.channel.k8s.io",
    ),
    (
        "stderr-oops",
        bytes.fromhex("8206026f6f70730a"),
        [("stderr", b"oops\n")],
        "v5.channel.k8s.io",
    ),
    (
        "stdout-200",
        bytes.fromhex("827e00c801") + BODY_199,
        [("stdout", BODY_199)],
        "v5.channel.k8s.io",
    ),
    (
        "stdout-32769",
        bytes.fromhex("827e800101") + BODY_32768,
        [("stdout", BODY_32768)],
        "v4.channel.k8s.io",
    ),
    (
        "stdout-70000-64bit",
        bytes.fromhex("827f000000000001117001") + BODY_69999,
        [("stdout", BODY_69999)],
        "v5.channel.k8s.io",
    ),
    (
        "success-status",
        bytes.fromhex("822303") + SUCCESS_JSON,
        [("status", SUCCESS_JSON)],
        "v5.channel.k8s.io",
    ),
    ("close-1000", bytes.fromhex("880203e8"), [("close", 1000, "")], "v5.channel.k8s.io"),
    ("close-1002", bytes.fromhex("880203ea"), [("close", 1002, "")], "v4.channel.k8s.io"),
    ("pong-ignored", bytes.fromhex("8a00"), [], "v5.channel.k8s.io"),
    ("exit3-v5", EXIT3_V5_FRAME, [("status", EXIT3_V5_JSON)], "v5.channel.k8s.io"),
    (
        "exit3-v4",
        bytes.fromhex("827e00e503") + EXIT3_V4_JSON,
        [("status", EXIT3_V4_JSON)],
        "v4.channel.k8s.io",
    ),
    (
        "exit3-v1-text",
        bytes.fromhex("826003") + EXIT3_V1_TEXT,
        [("status", EXIT3_V1_TEXT)],
        "channel.k8s.io",
    ),
    (
        "internal-error-v5",
        INTERNAL_FRAME_HEAD + INTERNAL_JSON,
        [("status", INTERNAL_JSON)],
        "v5.channel.k8s.io",
    ),
    (
        # Section 5.5: sh -c 'echo hi; echo err >&2; exit 3'
        "session-v5",
        bytes.fromhex("820101 82040168690a 820502657272 0a")
        + EXIT3_V5_FRAME
        + bytes.fromhex("880203e8"),
        [
            ("stdout", b"hi\n"),
            ("stderr", b"err\n"),
            ("status", EXIT3_V5_JSON),
            ("close", 1000, ""),
        ],
        "v5.channel.k8s.io",
    ),
    (
        "ping-and-text-frames",
        frame(0x9, b"are you there")
        + frame(0x1, b"\x01text opcode carries data")
        + frame(0x9, b""),
        [("ping", b"are you there"), ("stdout", b"text opcode carries data"), ("ping", b"")],
        "v5.channel.k8s.io",
    ),
]


def test_vector_frames_match_their_json() -> None:
    # The hex in the spec and the JSON spelled out beside it must agree.
    assert bytes.fromhex("827e00d503") + EXIT3_V5_JSON == EXIT3_V5_FRAME
    assert len(EXIT3_V5_FRAME) == 217
    assert len(INTERNAL_FRAME_HEAD + INTERNAL_JSON) == 271


@pytest.mark.parametrize("via", ["feed", "buffer"])
@pytest.mark.parametrize("splitter", sorted(SPLITTERS))
@pytest.mark.parametrize(
    ("name", "stream", "expected", "protocol"), VECTORS, ids=[v[0] for v in VECTORS]
)
def test_vectors(
    relay_impl: ModuleType,
    via: str,
    splitter: str,
    name: str,
    stream: bytes,
    expected: list[tuple[Any, ...]],
    protocol: str,
) -> None:
    out = run_decoder(relay_impl, SPLITTERS[splitter](stream), via=via, protocol=protocol)
    assert out.error is None
    assert out.events == expected
    stdout = sum(len(e[1]) for e in expected if e[0] == "stdout")
    stderr = sum(len(e[1]) for e in expected if e[0] == "stderr")
    assert out.counters[:2] == (stdout, stderr)
    assert out.counters[3] == any(e[0] == "close" for e in expected)


def test_buffer_path_with_small_buffer(relay_impl: ModuleType) -> None:
    stream = data(1, bytes(5000)) + data(2, b"x" * 300)
    out = run_decoder(relay_impl, [stream], via="buffer", limits={"buffer_size": 64})
    assert out.events == [("stdout", bytes(5000)), ("stderr", b"x" * 300)]


@pytest.mark.parametrize("via", ["feed", "buffer"])
def test_drop_stdout(relay_impl: ModuleType, via: str) -> None:
    # A reader that went away: stdout from then on is discarded (still counted), a
    # frame cut in the middle included; stderr and the status go on.
    sink = RecordingSink()
    dec = relay_impl.ExecDecoder(sink, "v5.channel.k8s.io", buffer_size=4096)

    def push(chunk: bytes) -> None:
        if via == "feed":
            dec.feed(chunk)
            return
        while chunk:
            buf = dec.get_buffer(len(chunk))
            n = min(len(buf), len(chunk))
            buf[:n] = chunk[:n]
            dec.buffer_updated(n)
            chunk = chunk[n:]

    cut = data(1, b"b" * 3000)
    push(data(1, b"before") + cut[:1000])
    dec.drop_stdout()
    dec.drop_stdout()  # twice is harmless
    push(cut[1000:] + data(2, b"err") + data(1, b"after") + data(3, SUCCESS_JSON))
    dec.flush()
    stdout = b"".join(ev[1] for ev in sink.events if ev[0] == "stdout")
    assert stdout.startswith(b"before") and b"after" not in stdout
    assert len(stdout) <= len(b"before") + 1000
    assert [ev for ev in sink.events if ev[0] != "stdout"] == [
        ("stderr", b"err"),
        ("status", SUCCESS_JSON),
    ]
    assert dec.stdout_bytes == len(b"before") + 3000 + len(b"after")


# -- demultiplexing ----------------------------------------------------------------


def test_unknown_and_channel_only_messages(relay_impl: ModuleType) -> None:
    stream = (
        data(0, b"stdin echo?")
        + data(4, b'{"Width":1}')
        + data(255, b"\x00")
        + data(1)  # channel-only: ignored, not counted
        + data(2)
        + data(3)
        + data(0)  # channel-only on an unknown channel: counted, still ignored
        + frame(0x2, b"")  # no channel byte at all: ignored, not counted
        + data(1, b"ok")
    )
    out = run_decoder(relay_impl, [stream])
    assert out.events == [("stdout", b"ok")]
    assert out.counters == (2, 0, 4, False)


def test_fragmented_message_with_interleaved_control_frames(relay_impl: ModuleType) -> None:
    stream = (
        frame(0x2, b"\x01ab", fin=False)
        + frame(0x9, b"p1")
        + frame(0x0, b"cd", fin=False)
        + frame(0xA, b"ignored pong")
        + frame(0x0, b"", fin=False)
        + frame(0x0, b"ef", fin=True)
        + data(2, b"next")
    )
    for name, split in SPLITTERS.items():
        out = run_decoder(relay_impl, split(stream))
        assert out.error is None, name
        assert out.events == [
            ("stdout", b"ab"),
            ("ping", b"p1"),
            ("stdout", b"cdef"),
            ("stderr", b"next"),
        ], name


def test_channel_byte_in_a_continuation_frame(relay_impl: ModuleType) -> None:
    stream = frame(0x2, b"", fin=False) + frame(0x0, b"\x02er", fin=False) + frame(0x0, b"r")
    out = run_decoder(relay_impl, [stream])
    assert out.events == [("stderr", b"err")]


def test_fragmented_status_is_delivered_whole(relay_impl: ModuleType) -> None:
    body = SUCCESS_JSON
    stream = (
        frame(0x2, b"\x03" + body[:5], fin=False)
        + frame(0x9, b"")
        + frame(0x0, body[5:20], fin=False)
        + frame(0x0, body[20:])
    )
    for split in SPLITTERS.values():
        out = run_decoder(relay_impl, split(stream))
        assert out.events == [("ping", b""), ("status", body)]


def test_two_status_messages_are_delivered_separately(relay_impl: ModuleType) -> None:
    out = run_decoder(relay_impl, [data(3, b"a") + data(1, b"x") + data(3, b"b")])
    assert out.events == [("status", b"a"), ("stdout", b"x"), ("status", b"b")]


def test_status_exactly_at_the_limit(relay_impl: ModuleType) -> None:
    out = run_decoder(relay_impl, [data(3, b"s" * 100)], limits={"max_status": 100})
    assert out.events == [("status", b"s" * 100)]


def test_close_frames(relay_impl: ModuleType) -> None:
    assert run_decoder(relay_impl, [frame(0x8, b"")]).events == [("close", None, "")]
    reason = "bye \N{SNOWMAN}".encode()
    assert run_decoder(relay_impl, [frame(0x8, b"\x0f\xa0" + reason)]).events == [
        ("close", 4000, "bye \N{SNOWMAN}")
    ]


def test_interleaving_order_is_kept(relay_impl: ModuleType) -> None:
    pieces = []
    expected = []
    for i in range(200):
        chan = 1 + i % 2
        body = bytes([65 + i % 26]) * (i % 7 + 1)
        pieces.append(data(chan, body))
        expected.append(("stdout" if chan == 1 else "stderr", body))
    pieces.append(frame(0x9, b"x"))
    expected.append(("ping", b"x"))
    for split in SPLITTERS.values():
        assert run_decoder(relay_impl, split(b"".join(pieces))).events == normalize(expected)


def test_large_frame_is_streamed_not_buffered(relay_impl: ModuleType) -> None:
    body = bytes(i % 251 for i in range(1 << 20))
    stream = data(1, body)
    sink = RecordingSink()
    dec = relay_impl.ExecDecoder(sink)
    step = 65536
    dec.feed(stream[:step])
    # The first read's payload reached the sink before the rest of the frame arrived.
    assert sum(len(e[1]) for e in sink.events) == step - 10 - 1
    for pos in range(step, len(stream), step):
        dec.feed(stream[pos : pos + step])
    assert all(len(e[1]) <= step for e in sink.events)
    assert normalize(sink.events) == [("stdout", body)]
    assert dec.stdout_bytes == len(body)


def test_any_bytes_like_input(relay_impl: ModuleType) -> None:
    stream = data(1, b"abcdef") + data(2, b"gh")
    padded = stream + b"\x82\x00" * (len(stream) % 2)  # a whole number of 16-bit items
    expected = [("stdout", b"abcdef"), ("stderr", b"gh")]
    chunks: list[Any] = [bytearray(padded), memoryview(padded), array.array("H", padded)]
    for chunk in chunks:
        assert run_decoder(relay_impl, [chunk]).events == expected
    assert run_decoder(relay_impl, [memoryview(b"xx" + padded)[2:]]).events == expected


def test_get_buffer_contract(relay_impl: ModuleType) -> None:
    dec = relay_impl.ExecDecoder(RecordingSink(), buffer_size=4096)
    buf = dec.get_buffer(-1)
    assert isinstance(buf, memoryview) and not buf.readonly and len(buf) == 4096
    assert len(dec.get_buffer(1 << 20)) == 4096
    with pytest.raises(ValueError):
        dec.buffer_updated(4097)
    with pytest.raises(ValueError):
        dec.buffer_updated(-1)
    dec.buffer_updated(0)


def test_counters_and_flags_are_read_only(relay_impl: ModuleType) -> None:
    dec = relay_impl.ExecDecoder(RecordingSink())
    for name in ("stdout_bytes", "stderr_bytes", "unknown_frames", "closed", "protocol"):
        with pytest.raises(AttributeError):
            setattr(dec, name, 1)
    assert (dec.stdout_bytes, dec.stderr_bytes, dec.unknown_frames, dec.closed) == (0, 0, 0, False)
    assert dec.protocol == relay_impl.PROTOCOL_V5


def test_constructor_validation(relay_impl: ModuleType) -> None:
    sink = RecordingSink()
    for proto in (relay_impl.PROTOCOL_V5, relay_impl.PROTOCOL_V4, relay_impl.PROTOCOL_V1):
        assert relay_impl.ExecDecoder(sink, proto).protocol == proto
    with pytest.raises(ValueError):
        relay_impl.ExecDecoder(sink, "v4.base64.channel.k8s.io")
    with pytest.raises(ValueError):
        relay_impl.ExecDecoder(sink, max_payload=-1)
    with pytest.raises(ValueError):
        relay_impl.ExecDecoder(sink, max_status=-1)
    with pytest.raises(ValueError):
        relay_impl.ExecDecoder(sink, buffer_size=0)
    with pytest.raises(AttributeError):
        relay_impl.ExecDecoder(object())


# -- malformed input: one test per case ---------------------------------------------

BAD: list[tuple[str, bytes, dict[str, int], str]] = [
    ("masked", data(1, b"hi", mask=MASK_KEY), {}, "masked frame from the server"),
    ("rsv1", data(1, b"hi", rsv=4), {}, "RSV bits"),
    ("rsv2", data(1, b"hi", rsv=2), {}, "RSV bits"),
    ("rsv3", frame(0x9, b"", rsv=1), {}, "RSV bits"),
    *[(f"opcode-{op:x}", frame(op, b"\x01x"), {}, "reserved opcode") for op in (3, 4, 5, 6, 7)],
    *[
        (f"opcode-{op:x}", frame(op, b""), {}, "reserved opcode")
        for op in (0xB, 0xC, 0xD, 0xE, 0xF)
    ],
    (
        "control-126",
        frame(0x9, b"p" * 126, length_form=16),
        {},
        "control frame payload longer than 125",
    ),
    ("control-fragmented", frame(0x9, b"p", fin=False), {}, "fragmented control frame"),
    ("close-fragmented", frame(0x8, b"", fin=False), {}, "fragmented control frame"),
    ("continuation-first", frame(0x0, b"\x01x"), {}, "continuation frame without a started"),
    (
        "continuation-after-end",
        frame(0x2, b"\x01a", fin=False) + frame(0x0, b"b") + frame(0x0, b"c"),
        {},
        "continuation frame without a started",
    ),
    (
        "data-while-fragmented",
        frame(0x2, b"\x01a", fin=False) + data(1, b"b"),
        {},
        "new data frame while a fragmented message is open",
    ),
    (
        "text-while-fragmented",
        frame(0x2, b"\x01a", fin=False) + frame(0x1, b"\x01b"),
        {},
        "new data frame while a fragmented message is open",
    ),
    ("frame-too-large", data(1, b"x" * 100), {"max_payload": 100}, "exceeds the limit of 100"),
    (
        "message-too-large",
        frame(0x2, b"\x01" + b"x" * 60, fin=False) + frame(0x0, b"y" * 60),
        {"max_payload": 100},
        "message of 121 bytes exceeds the limit of 100",
    ),
    (
        "control-too-large",
        frame(0x9, b"p" * 20),
        {"max_payload": 10},
        "exceeds the limit of 10",
    ),
    (
        "length-msb",
        bytes.fromhex("827f8000000000000001") + b"\x01",
        {},
        "most significant bit",
    ),
    ("close-1-byte", frame(0x8, b"\x03"), {}, "1-byte payload"),
    ("close-bad-utf8", frame(0x8, b"\x03\xe8\xff\xfe"), {}, "not valid UTF-8"),
    ("close-surrogate", frame(0x8, b"\x03\xe8\xed\xa0\x80"), {}, "not valid UTF-8"),
    ("status-too-large", data(3, b"s" * 101), {"max_status": 100}, "status message exceeds"),
    (
        "status-too-large-fragmented",
        frame(0x2, b"\x03" + b"s" * 60, fin=False) + frame(0x0, b"t" * 41),
        {"max_status": 100},
        "status message exceeds",
    ),
    (
        "status-channel-in-continuation",
        frame(0x2, b"", fin=False) + frame(0x0, b"\x03" + b"s" * 101),
        {"max_status": 100},
        "status message exceeds",
    ),
    ("data-after-close", frame(0x8, b"") + data(1, b"late"), {}, "data after the close frame"),
    ("ping-after-close", frame(0x8, b"\x03\xe8") + frame(0x9, b""), {}, "data after the close"),
]


@pytest.mark.parametrize("via", ["feed", "buffer"])
@pytest.mark.parametrize("splitter", ["whole", "bytewise", "random0", "random1"])
@pytest.mark.parametrize(("name", "stream", "kwargs", "message"), BAD, ids=[b[0] for b in BAD])
def test_malformed_input(
    relay_impl: ModuleType,
    via: str,
    splitter: str,
    name: str,
    stream: bytes,
    kwargs: dict[str, int],
    message: str,
) -> None:
    good = data(1, b"before") + frame(0x9, b"")
    out = run_decoder(relay_impl, SPLITTERS[splitter](good + stream), via=via, limits=kwargs)
    assert out.error is not None and message in out.error[1], out
    # Everything before the bad bytes was delivered.
    assert out.events[:2] == [("stdout", b"before"), ("ping", b"")]


def test_oversized_frame_is_rejected_from_its_header_alone(relay_impl: ModuleType) -> None:
    dec = relay_impl.ExecDecoder(RecordingSink(), max_payload=1 << 20)
    with pytest.raises(ExecProtocolError, match="exceeds the limit"):
        dec.feed(bytes.fromhex("827f0000010000000000"))  # announces 1 TiB, sends nothing


def test_failed_decoder_stays_failed(relay_impl: ModuleType) -> None:
    sink = RecordingSink()
    dec = relay_impl.ExecDecoder(sink)
    with pytest.raises(ExecProtocolError, match="masked") as first:
        dec.feed(data(1, b"x", mask=MASK_KEY))
    for again in (b"", data(1, b"fine"), b"\x82"):
        with pytest.raises(ExecProtocolError) as exc:
            dec.feed(again)
        assert str(exc.value) == str(first.value)
    with pytest.raises(ExecProtocolError):
        dec.buffer_updated(0)
    assert sink.events == []


def test_closed_decoder_accepts_empty_input(relay_impl: ModuleType) -> None:
    dec = relay_impl.ExecDecoder(RecordingSink())
    dec.feed(frame(0x8, b""))
    assert dec.closed
    dec.feed(b"")
    with pytest.raises(ExecProtocolError, match="after the close"):
        dec.feed(b"\x82")
    assert dec.closed


class _RaisingSink(RecordingSink):
    def on_stderr(self, data: memoryview) -> None:
        raise KeyError("sink bug")


def test_sink_exception_propagates_and_fails_the_decoder(relay_impl: ModuleType) -> None:
    sink = _RaisingSink()
    dec = relay_impl.ExecDecoder(sink)
    with pytest.raises(KeyError):
        dec.feed(data(1, b"out") + data(2, b"err") + data(1, b"more"))
    assert sink.events == [("stdout", b"out")]
    with pytest.raises(ExecProtocolError, match="KeyError"):
        dec.feed(b"")


class _ReentrantSink(RecordingSink):
    decoder: object = None

    def on_stdout(self, data: memoryview) -> None:
        self.decoder.feed(b"")  # type: ignore[attr-defined]


def test_feed_is_not_reentrant(relay_impl: ModuleType) -> None:
    sink = _ReentrantSink()
    dec = relay_impl.ExecDecoder(sink)
    sink.decoder = dec
    with pytest.raises(RuntimeError, match="reentrant"):
        dec.feed(data(1, b"x"))


class _KeepingSink(RecordingSink):
    """Breaks the contract on purpose: keeps the views past the call."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[memoryview] = []

    def on_stdout(self, data: memoryview) -> None:
        self.kept.append(data)


def test_retained_views_stay_memory_safe(relay_impl: ModuleType) -> None:
    # Views are only valid during the call, but a sink that keeps one must not be able
    # to read freed memory: views always refer to live objects.
    sink = _KeepingSink()
    dec = relay_impl.ExecDecoder(sink)
    for body in (b"s" * 10, b"L" * 20000, b"t" * 100):
        chunk = bytearray(data(1, body))
        dec.feed(chunk)
        del chunk
    buf = dec.get_buffer(-1)
    frame_bytes = data(1, b"B" * 30000)
    buf[: len(frame_bytes)] = frame_bytes
    dec.buffer_updated(len(frame_bytes))
    del dec, buf
    gc.collect()
    assert sum(len(bytes(v)) for v in sink.kept) == 10 + 20000 + 100 + 30000


def _read(dec: Any, chunk: bytes) -> None:
    """One BufferedProtocol read of ``chunk`` (it must fit the buffer offered)."""
    buf = dec.get_buffer(-1)
    assert len(buf) >= len(chunk)
    buf[: len(chunk)] = chunk
    dec.buffer_updated(len(chunk))


def test_a_cut_output_frame_is_delivered_whole(relay_impl: ModuleType) -> None:
    """A read ending inside a frame of up to 64 KiB: the frame reaches the sink in one
    call once its end arrives (one SSH packet, not two), in order with what follows."""
    sink = RecordingSink()
    dec = relay_impl.ExecDecoder(sink)
    out = bytes(range(256)) * 128  # 32 KiB
    wire = data(1, out) + data(2, b"err") + data(1, b"x" * 40000)
    for cut in (7, 16384, len(data(1, out)) - 1):
        sink.events.clear()
        _read(dec, wire[:cut])
        assert sink.events == []  # held: nothing yet
        _read(dec, wire[cut:])
        assert sink.events == [("stdout", out), ("stderr", b"err"), ("stdout", b"x" * 40000)]
    assert dec.stdout_bytes == 3 * (len(out) + 40000)


def test_big_frames_are_streamed_not_held(relay_impl: ModuleType) -> None:
    sink = RecordingSink()
    dec = relay_impl.ExecDecoder(sink)
    out = b"b" * 100000  # over 64 KiB: streamed piece by piece as before
    wire = data(1, out)
    _read(dec, wire[:50000])
    assert normalize(sink.events) == [("stdout", wire[len(wire) - len(out) : 50000])]
    _read(dec, wire[50000:])
    assert normalize(sink.events) == [("stdout", out)]


def test_held_bytes_survive_wrapping_to_the_buffer_front(relay_impl: ModuleType) -> None:
    """In a small buffer the held bytes move to the front; every read is offered at least
    half the buffer, so a held frame always completes."""
    sink = RecordingSink()
    dec = relay_impl.ExecDecoder(sink, buffer_size=256)
    frames = [data(1 + i % 2, bytes([65 + i % 26]) * (30 + 7 * i % 90)) for i in range(200)]
    wire = b"".join(frames)
    pos = 0
    step = 0
    while pos < len(wire):
        buf = dec.get_buffer(-1)
        assert len(buf) >= 128
        step = (step * 31 + 17) % len(buf) + 1  # reads of varied sizes, up to all offered
        n = min(step, len(wire) - pos)
        buf[:n] = wire[pos : pos + n]
        dec.buffer_updated(n)
        pos += n
    dec.flush()
    assert normalize(sink.events) == normalize(run_decoder(relay_impl, [wire]).events)
    # Frames fitting half the buffer (128) were never cut: one call each.
    small = [f for f in frames if len(f) - 3 <= 128]
    assert len(sink.events) >= len(small) and all(len(e[1]) > 0 for e in sink.events)


def test_flush_delivers_held_bytes_and_the_frame_goes_on(relay_impl: ModuleType) -> None:
    sink = RecordingSink()
    dec = relay_impl.ExecDecoder(sink)
    wire = data(1, b"0123456789")
    _read(dec, wire[:6])
    assert sink.events == []
    dec.flush()  # e.g. the connection was lost
    assert sink.events == [("stdout", b"012")]
    dec.flush()  # nothing held: nothing happens
    _read(dec, wire[6:] + data(2, b"e"))  # if the rest comes after all, it follows
    assert normalize(sink.events) == [("stdout", b"0123456789"), ("stderr", b"e")]


def test_feed_after_a_hold_keeps_the_order(relay_impl: ModuleType) -> None:
    sink = RecordingSink()
    dec = relay_impl.ExecDecoder(sink)
    wire = data(1, b"abcdef")
    _read(dec, wire[:5])
    dec.feed(wire[5:])
    assert normalize(sink.events) == [("stdout", b"abcdef")]


def test_status_and_other_channels_are_never_held(relay_impl: ModuleType) -> None:
    """Only stdout/stderr are held; a cut frame on another channel is parsed as before."""
    sink = RecordingSink()
    dec = relay_impl.ExecDecoder(sink)
    wire = data(3, SUCCESS_JSON)
    _read(dec, wire[:10])
    assert len(dec.get_buffer(-1)) == 262144  # nothing held
    _read(dec, wire[10:])
    assert sink.events == [("status", SUCCESS_JSON)]
