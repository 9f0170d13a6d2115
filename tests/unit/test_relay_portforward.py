"""The decoder's port-forward layout (``forward_port``), under both implementations,
and differentially: the Cython and pure-Python decoders must agree on random
port-forward streams as they do on exec streams.

The layout, as a kubelet sends it for one port P: ``[0, lo, hi]`` and
``[1, lo, hi]`` (the port, uint16 little-endian) right after the upgrade, then
the Pod connection's bytes on channel 0 and, only if forwarding failed, one
text message on channel 1.
"""

from __future__ import annotations

import struct
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kuberun._relay_common import (
    ROLE_ERR,
    ROLE_IGNORE,
    ROLE_OUT,
    ROLE_PORT,
    ROLE_STATUS,
    channel_roles,
)
from tests.unit.test_relay_differential import LIMITS, control_frame, split_points
from tests.unit.test_relay_support import SPLITTERS, Outcome, data, frame, run_decoder

PORT = 8080
V4 = "v4.channel.k8s.io"


def header(channel: int, port: int = PORT) -> bytes:
    return data(channel, struct.pack("<H", port))


HEADERS = header(0) + header(1)


def run(
    impl: ModuleType, stream: bytes, splitter: str = "whole", limits: dict[str, int] | None = None
) -> Outcome:
    return run_decoder(impl, SPLITTERS[splitter](stream), forward_port=PORT, limits=limits)


@pytest.mark.parametrize("splitter", sorted(SPLITTERS))
@pytest.mark.parametrize("via", ["feed", "buffer"])
def test_headers_then_data_then_close(relay_impl: ModuleType, splitter: str, via: str) -> None:
    body = bytes(range(256)) * 300
    stream = HEADERS + data(0, b"hello ") + data(0, body) + frame(0x8, b"\x03\xe8")
    out = run_decoder(relay_impl, SPLITTERS[splitter](stream), via=via, forward_port=PORT)
    assert out.error is None
    assert out.events == [("data", b"hello " + body), ("close", 1000, "")]
    assert out.counters == (6 + len(body), 0, 0, True)


def test_error_channel_message_is_delivered_whole(relay_impl: ModuleType) -> None:
    text = (
        b"error forwarding port 8080 to pod abc, uid : "
        b"dial tcp4 127.0.0.1:8080: connect: connection refused"
    )
    stream = HEADERS + frame(0x2, b"\x01" + text[:20], fin=False) + frame(0x0, text[20:])
    out = run(relay_impl, stream, "bytewise")
    assert out.error is None
    assert out.events == [("error", text)]


def test_headers_in_either_order_and_fragmented(relay_impl: ModuleType) -> None:
    stream = (
        header(1)
        + frame(0x2, b"\x00", fin=False)
        + frame(0x0, b"\x90", fin=False)
        + frame(0x9, b"p")  # a ping between the fragments
        + frame(0x0, b"\x1f")
        + data(0, b"x")
    )
    out = run(relay_impl, stream)
    assert out.error is None
    assert out.events == [("ping", b"p"), ("data", b"x")]


def test_a_second_port_header_is_data(relay_impl: ModuleType) -> None:
    # Only the first message on a channel is its header: later ones are payload.
    out = run(relay_impl, HEADERS + header(0))
    assert out.events == [("data", struct.pack("<H", PORT))]


def test_channels_beyond_the_port_are_ignored(relay_impl: ModuleType) -> None:
    out = run(relay_impl, HEADERS + data(2, b"a") + data(3, b"b") + data(255, b"c") + data(0, b"d"))
    assert out.error is None
    assert out.events == [("data", b"d")]
    assert out.counters == (1, 0, 3, False)


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (data(0, b"GET"), "port-forward header on channel 0 is longer than 2 bytes"),
        (header(0, 80), "port-forward header on channel 0 is 5000, expected port 8080 as 901f"),
        (data(1, b"\x90"), "port-forward header on channel 1 is 90, expected port 8080 as 901f"),
        (data(0), "port-forward header on channel 0 is empty, expected port 8080 as 901f"),
        (
            frame(0x2, b"\x00\x90", fin=False) + frame(0x0, b"\x1f\x00"),
            "port-forward header on channel 0 is longer than 2 bytes",
        ),
    ],
)
def test_bad_headers_are_protocol_errors(
    relay_impl: ModuleType, stream: bytes, message: str
) -> None:
    for splitter in ("whole", "bytewise"):
        out = run(relay_impl, stream + data(0, b"after"), splitter)
        assert out.error == ("ExecProtocolError", message)
        assert out.events == []


def test_error_message_is_bounded_by_max_status(relay_impl: ModuleType) -> None:
    out = run(relay_impl, HEADERS + data(1, b"x" * 41), limits={"max_status": 40})
    assert out.error == ("ExecProtocolError", "status message exceeds the limit of 40 bytes")


def test_exec_layout_is_unchanged_by_the_table(relay_impl: ModuleType) -> None:
    status = b'{"status":"Success"}'
    out = run_decoder(relay_impl, [data(0, b"a") + data(1, b"b") + data(3, status)])
    assert out.events == [("stdout", b"b"), ("status", b'{"status":"Success"}')]
    assert out.counters == (1, 0, 1, False)


class _Sink:
    def on_data(self, data: memoryview) -> None: ...
    def on_error(self, data: bytes) -> None: ...
    def on_ping(self, payload: bytes) -> None: ...
    def on_close(self, code: int | None, reason: str) -> None: ...


@pytest.mark.parametrize("port", [0, 65536, -1, True, 80.0, "80"])
def test_forward_port_must_be_a_port(relay_impl: ModuleType, port: object) -> None:
    with pytest.raises(ValueError, match=r"forward_port must be an integer 1\.\.65535"):
        relay_impl.ExecDecoder(_Sink(), V4, forward_port=port)


@pytest.mark.parametrize("protocol", ["v5.channel.k8s.io", "channel.k8s.io"])
def test_forward_port_needs_v4(relay_impl: ModuleType, protocol: str) -> None:
    with pytest.raises(ValueError, match=r"port-forward speaks v4\.channel\.k8s\.io"):
        relay_impl.ExecDecoder(_Sink(), protocol, forward_port=80)


def test_forward_port_property(relay_impl: ModuleType) -> None:
    assert relay_impl.ExecDecoder(_Sink(), V4, forward_port=1).forward_port == 1
    assert relay_impl.ExecDecoder(_Sink(), V4, forward_port=65535).forward_port == 65535


def test_role_tables() -> None:
    exec_roles = channel_roles(None)
    assert (exec_roles[0], exec_roles[1], exec_roles[2], exec_roles[3]) == (
        ROLE_IGNORE,
        ROLE_OUT,
        ROLE_ERR,
        ROLE_STATUS,
    )
    forward = channel_roles(PORT)
    assert (forward[0], forward[1], forward[2]) == (ROLE_PORT, ROLE_PORT, ROLE_IGNORE)
    assert len(exec_roles) == len(forward) == 256


# -- differential ------------------------------------------------------------

_FORWARD_CHANNELS = st.sampled_from([0, 0, 0, 0, 1, 2, 7])


@st.composite
def forward_stream(draw: st.DrawFn) -> bytes:
    """Usually the two headers first (sometimes wrong or missing), then messages on
    the port's channels and others, some fragmented, with control frames between."""
    out = []
    kind = draw(st.integers(0, 9))
    if kind < 7:
        first = [0, 1] if draw(st.booleans()) else [1, 0]
        out += [header(c) for c in first]
    elif kind == 7:
        out.append(header(draw(st.sampled_from([0, 1])), draw(st.integers(1, 65535))))
    msg_open = False
    for _ in range(draw(st.integers(0, 15))):
        if draw(st.integers(0, 4)) == 0:
            out.append(draw(control_frame()))
            continue
        fin = draw(st.integers(0, 3)) != 0
        body = draw(st.binary(max_size=300) | st.binary(min_size=2000, max_size=3000))
        if msg_open:
            out.append(frame(0x0, body, fin=fin))
        else:
            head = b"" if draw(st.integers(0, 9)) == 0 else bytes([draw(_FORWARD_CHANNELS)])
            out.append(frame(0x2, head + body, fin=fin))
        msg_open = not fin
    if draw(st.integers(0, 3)) == 0:
        out.append(draw(control_frame(allow_close=True)))
    return b"".join(out)


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data_=st.data(), limits=LIMITS)
def test_implementations_agree_on_port_forward_streams(
    relay_pair: tuple[ModuleType, ModuleType], data_: st.DataObject, limits: dict[str, int]
) -> None:
    py, cy = relay_pair
    stream = data_.draw(forward_stream(), label="stream")
    chunks = data_.draw(split_points(stream), label="chunks")
    reference = run_decoder(py, [stream], limits=limits, forward_port=PORT)
    for impl in (py, cy):
        for via in ("feed", "buffer"):
            got = run_decoder(impl, chunks, via=via, limits=limits, forward_port=PORT)
            assert got.key() == reference.key(), (impl.__name__, via)
