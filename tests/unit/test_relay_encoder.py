"""ExecEncoder: the spec's client vectors, frame structure, masking against a naive reference."""

from __future__ import annotations

import random
import struct
from types import ModuleType

import pytest

from tests.unit.test_relay_support import fixed_random, naive_mask


def parse_client_frames(wire: bytes) -> list[tuple[int, bytes, bytes]]:
    """Split masked client frames, checking each header; return (opcode, key, unmasked payload)."""
    frames = []
    pos = 0
    while pos < len(wire):
        b0, b1 = wire[pos], wire[pos + 1]
        assert b0 & 0x80, "FIN must be set: client messages are never fragmented"
        assert not b0 & 0x70, "RSV bits must be clear"
        assert b1 & 0x80, "client frames must be masked"
        n = b1 & 0x7F
        pos += 2
        if n == 126:
            (n,) = struct.unpack_from(">H", wire, pos)
            assert n >= 126, "length must use the shortest form"
            pos += 2
        elif n == 127:
            (n,) = struct.unpack_from(">Q", wire, pos)
            assert n >= 0x10000, "length must use the shortest form"
            pos += 8
        key = wire[pos : pos + 4]
        pos += 4
        payload = wire[pos : pos + n]
        assert len(payload) == n, "truncated frame"
        pos += n
        frames.append((b0 & 0x0F, key, naive_mask(key, payload)))
    return frames


# Section 5.3 of the protocol spec, with mask key 37 fa 21 3d.
CLIENT_VECTORS = [
    ("stdin-ls", lambda e: e.stdin(b"ls\n"), "82 84 37 fa 21 3d 37 96 52 37"),
    (
        "resize-80x24",
        lambda e: e.resize(80, 24),
        "82 9a 37 fa 21 3d 33 81 03 6a 5e 9e 55 55 15 c0 19 0d 1b d8 69 58 5e 9d 49 49 15 c0"
        " 13 09 4a f0",
    ),
    ("close-stdin", lambda e: e.close_stdin(), "82 82 37 fa 21 3d c8 fa"),
    ("empty-ping", lambda e: e.ping(), "89 80 37 fa 21 3d"),
    ("close-1000", lambda e: e.close(), "88 82 37 fa 21 3d 34 12"),
]


@pytest.mark.parametrize(
    ("name", "call", "expected"), CLIENT_VECTORS, ids=[v[0] for v in CLIENT_VECTORS]
)
def test_client_vectors(relay_impl: ModuleType, name: str, call: object, expected: str) -> None:
    enc = relay_impl.ExecEncoder(random_bytes=fixed_random)
    out = call(enc)  # type: ignore[operator]
    assert type(out) is bytes
    assert out == bytes.fromhex(expected)


def test_control_frames_and_messages(relay_impl: ModuleType) -> None:
    enc = relay_impl.ExecEncoder()
    [(op, _, payload)] = parse_client_frames(enc.pong(b"abc"))
    assert (op, payload) == (0xA, b"abc")
    [(op, _, payload)] = parse_client_frames(enc.ping(b"x" * 125))
    assert (op, payload) == (0x9, b"x" * 125)
    [(op, _, payload)] = parse_client_frames(enc.close(4001, "bye \N{SNOWMAN}"))
    assert (op, payload) == (0x8, b"\x0f\xa1" + "bye \N{SNOWMAN}".encode())
    [(op, _, payload)] = parse_client_frames(enc.resize(65535, 0))
    assert (op, payload) == (0x2, b'\x04{"Width":65535,"Height":0}\n')
    [(op, _, payload)] = parse_client_frames(enc.close_stdin())
    assert (op, payload) == (0x2, b"\xff\x00")


def test_invalid_arguments(relay_impl: ModuleType) -> None:
    enc = relay_impl.ExecEncoder()
    for bad in (-1, 65536, 1.5, True, "80"):
        with pytest.raises(ValueError):
            enc.resize(bad, 24)
        with pytest.raises(ValueError):
            enc.resize(80, bad)
    with pytest.raises(ValueError):
        enc.ping(b"x" * 126)
    with pytest.raises(ValueError):
        enc.pong(b"x" * 126)
    for code in (0, 999, 1005, 1006, 5000, True):
        with pytest.raises(ValueError):
            enc.close(code)
    with pytest.raises(ValueError):
        enc.close(1000, "x" * 124)
    with pytest.raises(TypeError):
        enc.stdin("text is not bytes")
    for size in (0, -1):
        with pytest.raises(ValueError):
            relay_impl.ExecEncoder(max_frame_payload=size)


@pytest.mark.parametrize("max_frame", [1, 3, 100, 125, 126, 65535, 65536])
def test_stdin_frames(relay_impl: ModuleType, max_frame: int) -> None:
    rng = random.Random(max_frame)
    enc = relay_impl.ExecEncoder(max_frame_payload=max_frame)
    total = 0
    lengths = [0, 1, 2, 3, 4, 5, 7, 8, 9, 124, 125, 126, 127, 65534, 65535, 65536, 65537, 140000]
    for n in lengths:
        if n // max_frame > 2000:
            continue  # keep the tiny-frame cases quick
        payload = rng.randbytes(n)
        wire = enc.stdin(payload)
        if n == 0:
            assert wire == b""
            continue
        frames = parse_client_frames(wire)
        assert len(frames) == -(-n // max_frame)
        assert all(op == 0x2 and p[:1] == b"\x00" for op, _, p in frames)
        assert all(len(p) - 1 <= max_frame for _, _, p in frames)
        assert b"".join(p[1:] for _, _, p in frames) == payload
        total += n
        assert enc.stdin_bytes == total
    with pytest.raises(AttributeError):
        enc.stdin_bytes = 0


def test_masking_matches_naive_reference(relay_impl: ModuleType) -> None:
    keys = iter([bytes.fromhex(k) for k in ("00000000", "ffffffff", "37fa213d", "01020304")])
    rng = random.Random(1)
    backing = bytearray(rng.randbytes(400))
    for key in keys:
        enc = relay_impl.ExecEncoder(random_bytes=lambda n, key=key: key * (n // 4))
        for offset in range(8):  # input alignment
            for n in range(0, 300):
                view = memoryview(backing)[offset : offset + n]
                wire = enc.stdin(view)
                if not n:
                    continue
                head = 2 if n + 1 < 126 else 4
                assert wire[head : head + 4] == key
                assert wire[head + 4 :] == naive_mask(key, b"\x00" + bytes(view))


def test_mask_keys_come_from_a_pool(relay_impl: ModuleType) -> None:
    calls: list[int] = []
    stream = random.Random(7)

    def random_bytes(n: int) -> bytes:
        calls.append(n)
        return stream.randbytes(n)

    enc = relay_impl.ExecEncoder(random_bytes=random_bytes)
    keys = [parse_client_frames(enc.stdin(b"x"))[0][1] for _ in range(1025)]
    assert calls == [4096, 4096]
    expected = random.Random(7)
    pool = expected.randbytes(4096) + expected.randbytes(4096)
    assert keys == [pool[4 * i : 4 * i + 4] for i in range(1025)]


def test_bad_random_source(relay_impl: ModuleType) -> None:
    enc = relay_impl.ExecEncoder(random_bytes=lambda n: b"\x00" * (n - 1))
    with pytest.raises(ValueError):
        enc.stdin(b"x")


def test_outputs_are_fresh_objects(relay_impl: ModuleType) -> None:
    enc = relay_impl.ExecEncoder(random_bytes=fixed_random)
    data = bytearray(b"y" * 70000)
    first = enc.stdin(data)
    data[:] = b"z" * 70000  # reusing the caller's buffer must not change earlier frames
    assert first != enc.stdin(data)
    assert parse_client_frames(first)[0][2][1:] == b"y" * 65536


def test_both_implementations_agree_byte_for_byte(
    relay_pair: tuple[ModuleType, ModuleType],
) -> None:
    outputs = []
    for impl in relay_pair:
        rng = random.Random(3)
        enc = impl.ExecEncoder(max_frame_payload=1000, random_bytes=rng.randbytes)
        src = random.Random(4)
        wire = [enc.stdin(src.randbytes(src.randint(0, 5000))) for _ in range(50)]
        wire += [
            enc.resize(120, 40),
            enc.close_stdin(),
            enc.ping(b"p"),
            enc.pong(b"q"),
            enc.close(),
        ]
        outputs.append(wire)
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("max_frame", [1, 3, 7, 100, 126, 65536])
def test_stdin_many_is_stdin_of_the_join(relay_impl: ModuleType, max_frame: int) -> None:
    """Chunk lists of every shape (empty chunks, chunks spanning frame boundaries,
    odd offsets, mixed buffer types) give the bytes ``stdin(b"".join(...))`` gives,
    mask keys included, and count the same stdin bytes."""
    rng = random.Random(max_frame)
    joined = relay_impl.ExecEncoder(max_frame_payload=max_frame, random_bytes=rng.randbytes)
    rng2 = random.Random(max_frame)
    gathered = relay_impl.ExecEncoder(max_frame_payload=max_frame, random_bytes=rng2.randbytes)
    shapes = [
        [],
        [0],
        [0, 0],
        [1],
        [5, 0, 3],
        [1] * 9,
        [3, 4, 5, 6],
        [65536, 1],
        [70000, 7, 0, 65530],
    ]
    src = random.Random(9)
    for _ in range(30):
        shapes.append(
            [src.choice([0, 1, 2, 3, 8, 31, 125, 4000, 65535]) for _ in range(src.randint(2, 9))]
        )
    for lengths in shapes:
        if sum(lengths) // max_frame > 3000:
            continue  # keep the tiny-frame cases quick
        chunks: list[bytes | bytearray | memoryview] = []
        for i, n in enumerate(lengths):
            data = src.randbytes(n + 3)
            kind = i % 3  # bytes, bytearray, and an unaligned memoryview slice
            chunks.append(
                data[:n]
                if kind == 0
                else bytearray(data[:n])
                if kind == 1
                else memoryview(data)[3:]
            )
        expected = joined.stdin(b"".join(bytes(c) for c in chunks))
        assert gathered.stdin_many(chunks) == expected, lengths
        assert gathered.stdin_bytes == joined.stdin_bytes
    frames = parse_client_frames(gathered.stdin_many([b"ab", b"", b"cd"]))
    assert b"".join(p[1:] for _, _, p in frames) == b"abcd"


def test_stdin_many_rejects_what_stdin_rejects(relay_impl: ModuleType) -> None:
    enc = relay_impl.ExecEncoder(random_bytes=fixed_random)
    with pytest.raises(TypeError):
        enc.stdin_many([b"ok", "text is not bytes"])
    with pytest.raises(TypeError):
        enc.stdin_many([b"ok", 3])
    assert enc.stdin_bytes == 0
    assert enc.stdin_many([]) == b""
    # The buffers taken before the bad chunk were released: they can be resized again.
    grow = bytearray(b"x")
    with pytest.raises(TypeError):
        enc.stdin_many([grow, None])
    grow += b"y" * 100


def test_default_random_source_is_urandom(relay_impl: ModuleType) -> None:
    enc = relay_impl.ExecEncoder()
    keys = {parse_client_frames(enc.stdin(b"x"))[0][1] for _ in range(64)}
    assert len(keys) > 60  # 64 random 32-bit keys practically never collide
