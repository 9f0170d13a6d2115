"""Differential tests: the Cython and pure-Python decoders must behave identically.

Random frame sequences (well-formed, fragmented, interleaved control frames and
broken ones) cut at random points must give the same sink calls (consecutive
stdout/stderr pieces joined), the same error and the same counters.
"""

from __future__ import annotations

from types import ModuleType

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_relay_support import MASK_KEY, frame, run_decoder

CHANNELS = st.sampled_from([1, 1, 1, 2, 2, 3, 0, 4, 255])


# Large bodies are patterns, not drawn byte by byte: drawing thousands of bytes is slow and
# their exact values matter less than their length.
_LARGE = st.builds(
    lambda n, seed: bytes((seed + i * 7) & 0xFF for i in range(n)),
    st.integers(2000, 5000),
    st.integers(0, 255),
)


def _body(draw: st.DrawFn) -> bytes:
    return draw(st.binary(max_size=300) | _LARGE)


@st.composite
def control_frame(draw: st.DrawFn, *, allow_close: bool = False) -> bytes:
    opcode = draw(st.sampled_from([0x9, 0x9, 0xA] + ([0x8] if allow_close else [])))
    if opcode == 0x8:
        payload = draw(
            st.sampled_from([b"", b"\x03\xe8", b"\x03"])
            | st.binary(min_size=2, max_size=20)
            | st.text(max_size=20).map(lambda t: b"\x03\xe8" + t.encode())
        )
    else:
        payload = draw(st.binary(max_size=125))
    return frame(opcode, payload)


@st.composite
def valid_stream(draw: st.DrawFn) -> bytes:
    """A mostly well-formed frame sequence: messages (some fragmented, some with the
    channel byte in a later frame) with control frames interleaved."""
    out = []
    msg_open = False
    for _ in range(draw(st.integers(0, 20))):
        if draw(st.integers(0, 4)) == 0:
            out.append(draw(control_frame()))
            continue
        form = draw(st.sampled_from([None, None, None, 16, 64]))
        fin = draw(st.integers(0, 3)) != 0
        if msg_open:
            out.append(frame(0x0, _body(draw), fin=fin, length_form=form))
        else:
            head = b"" if draw(st.integers(0, 9)) == 0 else bytes([draw(CHANNELS)])
            opcode = draw(st.sampled_from([0x2, 0x2, 0x1]))
            out.append(frame(opcode, head + _body(draw), fin=fin, length_form=form))
        msg_open = not fin
    return b"".join(out)


@st.composite
def bad_frame(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return frame(draw(st.sampled_from([3, 4, 7, 0xB, 0xF])), b"\x01x")
    if kind == 1:
        return frame(0x2, b"\x01x", rsv=draw(st.integers(1, 7)))
    if kind == 2:
        return frame(0x2, b"\x01masked", mask=MASK_KEY)
    if kind == 3:
        return bytes.fromhex("827f") + draw(st.binary(min_size=8, max_size=8))
    return draw(st.binary(min_size=1, max_size=12))


def stream_strategy() -> st.SearchStrategy[bytes]:
    """A valid prefix, then sometimes one broken element (a bad frame, a close frame, an
    out-of-place continuation or control frame) and more valid frames after it."""
    tail = st.one_of(
        st.just(b""),
        st.just(b""),
        bad_frame(),
        control_frame(allow_close=True),
        st.builds(lambda b: frame(0x0, b), st.binary(max_size=20)),
        st.builds(lambda b: frame(0x9, b, fin=False), st.binary(max_size=5)),
        st.builds(lambda b: frame(0x9, b, length_form=16), st.binary(min_size=126, max_size=130)),
    )
    return st.tuples(valid_stream(), tail, valid_stream()).map(b"".join)


@st.composite
def split_points(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    chunks = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        chunks.append(stream[prev:cut])
        prev = cut
    return chunks


LIMITS = st.fixed_dictionaries(
    {},
    optional={
        "max_payload": st.sampled_from([0, 1, 50, 300, 4000]),
        "max_status": st.sampled_from([0, 1, 40, 300]),
        "buffer_size": st.sampled_from([64, 100, 4096]),
    },
)


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), limits=LIMITS)
def test_implementations_agree(
    relay_pair: tuple[ModuleType, ModuleType], data: st.DataObject, limits: dict[str, int]
) -> None:
    py, cy = relay_pair
    stream = data.draw(stream_strategy(), label="stream")
    chunks = data.draw(split_points(stream), label="chunks")
    reference = run_decoder(py, [stream], limits=limits)
    for impl in (py, cy):
        for via in ("feed", "buffer"):
            got = run_decoder(impl, chunks, via=via, limits=limits)
            assert got.key() == reference.key(), (impl.__name__, via)


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=400), data=st.data())
def test_arbitrary_bytes_agree(
    relay_pair: tuple[ModuleType, ModuleType], blob: bytes, data: st.DataObject
) -> None:
    py, cy = relay_pair
    chunks = data.draw(split_points(blob), label="chunks")
    reference = run_decoder(py, [blob])
    assert run_decoder(cy, chunks).key() == reference.key()
    assert run_decoder(py, chunks, via="buffer").key() == reference.key()
