"""Kubernetes exec and port-forward relay codec, pure-Python implementation.

The reference twin of the Cython module ``kuberun._relay``: same API, same
observable behaviour (the same sink calls, up to how consecutive payload pieces
of one channel are grouped, and the same errors), checked by differential tests
and fuzzing. It is used when the extension is not built or when
``KUBERUN_NO_EXTENSIONS=1``.

Frame format (RFC 6455 section 5.2), as sent by the API server::

    byte 0: FIN | RSV1-3 | opcode    byte 1: MASK | 7-bit length
    then a 16-bit (126) or 64-bit (127) big-endian length, then the payload.

Each Kubernetes message starts with one channel byte. Exec: 1 stdout, 2
stderr, 3 status; other channels are counted and dropped. Port-forward (one
port per WebSocket): 0 data, 1 error, each opened by a 2-byte port header.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Final

from kuberun._relay_common import (
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_MAX_STATUS,
    FORWARD_ROLES_AFTER_HEADER,
    PROTOCOL_V1,
    PROTOCOL_V4,
    PROTOCOL_V5,
    ROLE_ERR,
    ROLE_OUT,
    ROLE_PORT,
    ROLE_STATUS,
    ExecSink,
    PortForwardSink,
    channel_roles,
    check_forward_port,
    check_protocol,
    close_payload,
    control_payload,
    decode_status,
    discard,
    port_header_error,
    resize_payload,
)
from kuberun.errors import ExecProtocolError

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "DEFAULT_MAX_STATUS",
    "PROTOCOL_V1",
    "PROTOCOL_V4",
    "PROTOCOL_V5",
    "ExecDecoder",
    "ExecEncoder",
    "decode_status",
]

# Parser states.
_HEADER: Final = 0
_PAYLOAD: Final = 1
_CONTROL: Final = 2
_CLOSED: Final = 3

_OP_CONT: Final = 0x0
_OP_CLOSE: Final = 0x8
_OP_PING: Final = 0x9
_OP_PONG: Final = 0xA
_OP_BINARY: Final = 0x2
_KNOWN_OPCODES: Final = frozenset({0x0, 0x1, 0x2, 0x8, 0x9, 0xA})

_MIN_BUFFER: Final = 64
# A stdout/stderr frame of at most this many payload bytes that a read cuts in two
# is held in the receive buffer until its end arrives, then delivered whole: one
# SSH packet instead of two.
_HOLD_MAX: Final = 65536
_MASK_POOL: Final = 4096  # bytes of randomness fetched per refill: 1024 mask keys
_INT_MASK_MAX: Final = 256  # below this, masking through one big int is cheapest


def _ext_len(b1: int) -> int:
    """Number of extended payload length bytes announced by header byte 1."""
    n = b1 & 0x7F
    return 2 if n == 126 else 8 if n == 127 else 0


class ExecDecoder:
    """Sans-IO parser of server->client WebSocket frames plus Kubernetes channel demux.

    Feed it bytes with :meth:`feed` (or, as an ``asyncio.BufferedProtocol``,
    through :meth:`get_buffer`/:meth:`buffer_updated`); it calls the sink's
    methods as data arrives. Stdout/stderr are streamed: a frame spanning many
    reads is delivered piece by piece, never buffered whole. One exception, in
    the BufferedProtocol path only: a read that ends inside a frame of at most
    64 KiB (and half the receive buffer) leaves that frame's bytes in the buffer
    until the rest arrives, so it is delivered in one piece; :meth:`flush`
    delivers them when no more input will come.

    Any protocol violation raises :class:`~kuberun.errors.ExecProtocolError`;
    from then on (and also after a sink method raised) every call raises
    ``ExecProtocolError`` again. After a close frame the stream is over: more
    input bytes are a protocol error.

    With ``forward_port`` set it decodes a ``pods/portforward`` stream of that
    one port instead (protocol ``v4.channel.k8s.io``), calling a
    :class:`PortForwardSink`: channel 0 is streamed to ``on_data`` like stdout,
    channel 1 is buffered like a status and handed to ``on_error``, and the
    first message on each of them must be the port's 2-byte header (anything
    else is a protocol error). ``stdout_bytes`` then counts data bytes.
    """

    def __init__(
        self,
        sink: ExecSink | PortForwardSink,
        protocol: str = PROTOCOL_V5,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_status: int = DEFAULT_MAX_STATUS,
        buffer_size: int = 262144,
        forward_port: int | None = None,
    ) -> None:
        self._protocol = check_protocol(protocol)
        self._forward_port = check_forward_port(forward_port, protocol)
        for name, value, low in (
            ("max_payload", max_payload, 0),
            ("max_status", max_status, 0),
            ("buffer_size", buffer_size, _MIN_BUFFER),
        ):
            if not isinstance(value, int) or not low <= value <= 2**62:
                raise ValueError(f"{name} must be an integer in {low}..2**62, got {value!r}")
        self._max_payload = max_payload
        self._max_status = max_status
        if self._forward_port is None:
            exec_sink: ExecSink = sink  # type: ignore[assignment]
            self._on_stdout = exec_sink.on_stdout
            self._on_stderr = exec_sink.on_stderr
            self._on_status = exec_sink.on_status
        else:
            forward_sink: PortForwardSink = sink  # type: ignore[assignment]
            self._on_stdout = self._on_stderr = forward_sink.on_data
            self._on_status = forward_sink.on_error
        self._roles = bytearray(channel_roles(self._forward_port))
        self._on_ping = sink.on_ping
        self._on_close = sink.on_close
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._hold_limit = min(_HOLD_MAX, buffer_size // 2)
        self._held_off = 0  # a cut frame's payload bytes kept in _buf ...
        self._held_len = 0  # ... (0: none), parsed again with the next read
        self._may_hold = False  # parsing _buf (not feed()'s input)

        self._state = _HEADER
        self._hdr = bytearray()  # a header split across reads
        self._opcode = 0  # opcode of the frame being read
        self._remaining = 0  # payload bytes of that frame not yet read
        self._fin = False  # FIN bit of the current data frame
        self._msg_open = False  # a fragmented data message awaits continuation frames
        self._chan = -1  # role of the current message; -1 until its first payload byte
        self._raw_chan = 0  # its channel byte
        self._msg_len = 0  # payload bytes of the current message so far
        self._status = bytearray()
        self._ctrl = bytearray()
        self._error: str | None = None
        self._busy = False

        self._stdout_bytes = 0
        self._stderr_bytes = 0
        self._unknown_frames = 0
        self._closed = False

    # -- read-only state -------------------------------------------------

    @property
    def protocol(self) -> str:
        """The negotiated subprotocol this decoder was created for."""
        return self._protocol

    @property
    def forward_port(self) -> int | None:
        """The forwarded port (port-forward layout), or None (exec layout)."""
        return self._forward_port

    @property
    def stdout_bytes(self) -> int:
        """Stdout (port-forward: data) payload bytes delivered to the sink so far."""
        return self._stdout_bytes

    @property
    def stderr_bytes(self) -> int:
        """Stderr payload bytes delivered to the sink so far."""
        return self._stderr_bytes

    @property
    def unknown_frames(self) -> int:
        """Messages on channels the layout does not use (ignored): exec: not 1, 2
        or 3; port-forward: not 0 or 1."""
        return self._unknown_frames

    @property
    def closed(self) -> bool:
        """True once a close frame was received."""
        return self._closed

    # -- input -----------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Parse ``data`` (any bytes-like object), calling the sink as needed."""
        if self._held_len:
            self.flush()  # held bytes come first
        self._enter()
        try:
            view = memoryview(data)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            self._run(view, 0)
        finally:
            self._busy = False

    def get_buffer(self, sizehint: int) -> memoryview:
        """``asyncio.BufferedProtocol.get_buffer``: the decoder's receive buffer, or
        the part after a held frame's bytes."""
        if self._busy:
            raise RuntimeError("ExecDecoder.get_buffer called while parsing")
        held = self._held_len
        if not held:
            return self._view
        size = len(self._buf)
        if size - self._held_off - held < size // 2:
            # Move the held bytes to the front: the next read gets at least half
            # the buffer, more than the held frame still needs.
            off = self._held_off
            self._buf[:held] = bytes(self._view[off : off + held])  # may overlap
            self._held_off = 0
        return self._view[self._held_off + held :]

    def buffer_updated(self, nbytes: int) -> None:
        """``asyncio.BufferedProtocol.buffer_updated``: parse ``nbytes`` from the buffer."""
        start = self._held_off
        held = self._held_len
        if not 0 <= nbytes <= len(self._buf) - start - held:
            raise ValueError(f"buffer_updated({nbytes}) outside the receive buffer")
        self._enter()
        self._parse_recv(start, held + nbytes, may_hold=True)

    def drop_stdout(self) -> None:
        """Discard stdout from now on instead of passing it to the sink (it is still
        counted in ``stdout_bytes``); stderr, the status and control frames go on as
        before. For a reader that has gone away (SSH ``eow@openssh.com``)."""
        self._on_stdout = discard

    def flush(self) -> None:
        """Deliver stdout/stderr bytes held back for a frame's end (see the class
        docstring). Call it when the input has ended: the connection closed or was
        lost. Nothing happens if nothing is held or the decoder has failed."""
        start = self._held_off
        held = self._held_len
        if not held or self._error is not None:
            return
        self._enter()
        # The frame is not over: its remaining bytes, if they ever come, follow.
        self._parse_recv(start, held, may_hold=False)

    def _parse_recv(self, start: int, n: int, *, may_hold: bool) -> None:
        """Parse ``n`` bytes of the receive buffer from ``start`` (after _enter())."""
        try:
            self._held_len = 0
            self._held_off = 0
            self._may_hold = may_hold
            self._run(self._view[: start + n], start)
        finally:
            self._may_hold = False
            self._busy = False

    def _enter(self) -> None:
        if self._busy:
            raise RuntimeError("ExecDecoder is not reentrant")
        if self._error is not None:
            raise ExecProtocolError(self._error)
        self._busy = True

    def _run(self, view: memoryview, start: int) -> None:
        try:
            self._parse(view, start)
        except ExecProtocolError as exc:
            self._error = str(exc)
            raise
        except BaseException as exc:
            self._error = f"exec decoder unusable after {type(exc).__name__} in the sink"
            raise

    def _fail(self, message: str) -> ExecProtocolError:
        return ExecProtocolError(message)

    # -- the state machine ---------------------------------------------------

    def _parse(self, mv: memoryview, pos: int) -> None:
        end = len(mv)
        while pos < end:
            state = self._state
            if state == _PAYLOAD:
                take = end - pos
                if take > self._remaining:
                    take = self._remaining
                if self._chan < 0:
                    self._set_channel(mv[pos])
                    pos += 1
                    take -= 1
                    self._remaining -= 1
                if (
                    self._may_hold
                    and take
                    and pos + take == end
                    and take < self._remaining <= self._hold_limit
                    and self._chan in (ROLE_OUT, ROLE_ERR)
                ):
                    # The read ends inside a small output frame: keep its bytes
                    # where they are and parse them again with the rest.
                    self._held_off = pos
                    self._held_len = take
                    break
                if take:
                    chan = self._chan
                    if chan == ROLE_OUT:
                        self._stdout_bytes += take
                        self._on_stdout(mv[pos : pos + take])
                    elif chan == ROLE_ERR:
                        self._stderr_bytes += take
                        self._on_stderr(mv[pos : pos + take])
                    elif chan >= ROLE_STATUS:
                        self._status += mv[pos : pos + take]
                    pos += take
                    self._remaining -= take
                if not self._remaining:
                    self._end_data_frame()
            elif state == _HEADER:
                hdr = self._hdr
                if not hdr and end - pos >= 2:
                    # Fast path: the whole header is in this read.
                    b0 = mv[pos]
                    b1 = mv[pos + 1]
                    self._check_head(b0, b1)
                    ext = _ext_len(b1)
                    if end - pos >= 2 + ext:
                        length = (
                            b1 & 0x7F
                            if not ext
                            else int.from_bytes(mv[pos + 2 : pos + 2 + ext], "big")
                        )
                        pos += 2 + ext
                        self._start_frame(b0, length)
                        continue
                # Slow path: collect the header bytes across reads.
                if len(hdr) < 2:
                    take = min(2 - len(hdr), end - pos)
                    hdr += mv[pos : pos + take]
                    pos += take
                    if len(hdr) < 2:
                        continue
                    self._check_head(hdr[0], hdr[1])
                need = 2 + _ext_len(hdr[1])
                if len(hdr) < need:
                    take = min(need - len(hdr), end - pos)
                    hdr += mv[pos : pos + take]
                    pos += take
                    if len(hdr) < need:
                        continue
                b0 = hdr[0]
                length = hdr[1] & 0x7F if need == 2 else int.from_bytes(hdr[2:need], "big")
                hdr.clear()
                self._start_frame(b0, length)
            elif state == _CONTROL:
                take = min(end - pos, self._remaining)
                self._ctrl += mv[pos : pos + take]
                pos += take
                self._remaining -= take
                if not self._remaining:
                    payload = bytes(self._ctrl)
                    self._ctrl.clear()
                    self._state = _HEADER
                    self._control(self._opcode, payload)
            else:  # _CLOSED
                raise self._fail("data after the close frame")

    def _check_head(self, b0: int, b1: int) -> None:
        """Checks decidable from the first two header bytes, in a fixed order."""
        if b0 & 0x70:
            raise self._fail("frame with RSV bits set")
        opcode = b0 & 0x0F
        if opcode not in _KNOWN_OPCODES:
            raise self._fail(f"frame with reserved opcode 0x{opcode:x}")
        if opcode >= 8:
            if not b0 & 0x80:
                raise self._fail("fragmented control frame")
            if (b1 & 0x7F) > 125:
                raise self._fail("control frame payload longer than 125 bytes")
        if b1 & 0x80:
            raise self._fail("masked frame from the server")
        if opcode == _OP_CONT:
            if not self._msg_open:
                raise self._fail("continuation frame without a started message")
        elif opcode < 8 and self._msg_open:
            raise self._fail("new data frame while a fragmented message is open")

    def _start_frame(self, b0: int, length: int) -> None:
        if length >> 63:
            raise self._fail("64-bit payload length with the most significant bit set")
        if length > self._max_payload:
            raise self._fail(
                f"frame payload of {length} bytes exceeds the limit of {self._max_payload}"
            )
        opcode = b0 & 0x0F
        self._opcode = opcode
        if opcode >= 8:
            if length:
                self._remaining = length
                self._state = _CONTROL
            else:
                self._control(opcode, b"")
            return
        if opcode != _OP_CONT:
            self._chan = -1
            self._msg_len = 0
        self._msg_len += length
        if self._msg_len > self._max_payload:
            raise self._fail(
                f"message of {self._msg_len} bytes exceeds the limit of {self._max_payload}"
            )
        if self._chan >= ROLE_STATUS:
            self._check_status(length)
        fin = bool(b0 & 0x80)
        self._fin = fin
        self._msg_open = not fin
        if length:
            self._remaining = length
            self._state = _PAYLOAD
        else:
            self._end_data_frame()

    def _check_status(self, incoming: int) -> None:
        if self._chan == ROLE_PORT:
            if len(self._status) + incoming > 2:
                raise self._fail(
                    f"port-forward header on channel {self._raw_chan} is longer than 2 bytes"
                )
        elif len(self._status) + incoming > self._max_status:
            raise self._fail(f"status message exceeds the limit of {self._max_status} bytes")

    def _set_channel(self, chan: int) -> None:
        role = self._roles[chan]
        self._chan = role
        self._raw_chan = chan
        if role >= ROLE_STATUS:
            # The rest of this frame is buffered: bound it before buffering any.
            self._check_status(self._remaining - 1)
        elif role != ROLE_OUT and role != ROLE_ERR:
            self._unknown_frames += 1

    def _end_data_frame(self) -> None:
        self._state = _HEADER
        if self._fin:
            if self._chan == ROLE_PORT:
                self._end_port_header()
            elif self._chan == ROLE_STATUS and self._status:
                data = bytes(self._status)
                self._status.clear()
                self._chan = -1
                self._on_status(data)
            self._chan = -1

    def _end_port_header(self) -> None:
        chan = self._raw_chan
        assert self._forward_port is not None
        problem = port_header_error(chan, bytes(self._status), self._forward_port)
        if problem is not None:
            raise self._fail(problem)
        self._status.clear()
        self._roles[chan] = FORWARD_ROLES_AFTER_HEADER[chan]

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == _OP_PING:
            self._on_ping(payload)
        elif opcode == _OP_CLOSE:
            if len(payload) == 1:
                raise self._fail("close frame with a 1-byte payload")
            code: int | None = None
            reason = ""
            if payload:
                code = int.from_bytes(payload[:2], "big")
                try:
                    reason = payload[2:].decode("utf-8")
                except UnicodeDecodeError:
                    raise self._fail("close frame reason is not valid UTF-8") from None
            self._closed = True
            self._state = _CLOSED
            self._on_close(code, reason)
        # A pong needs nothing: the server never pings unprompted and pongs carry no data.


# One 256-byte XOR table per key byte, for the translate-based masking trick.
_XOR_TABLES: Final = tuple(bytes(b ^ k for b in range(256)) for k in range(256))


def _mask(key: bytes, data: bytes) -> bytes | bytearray:
    """XOR ``data`` with the 4-byte ``key`` repeated (RFC 6455 section 5.3)."""
    n = len(data)
    if n < _INT_MASK_MAX:
        keys = (key * (n // 4 + 1))[:n]
        return (int.from_bytes(data, "little") ^ int.from_bytes(keys, "little")).to_bytes(
            n, "little"
        )
    out = bytearray(n)
    for i in range(4):
        out[i::4] = data[i::4].translate(_XOR_TABLES[key[i]])
    return out


def _header(opcode: int, length: int) -> bytes:
    """Client frame header: FIN, ``opcode``, MASK bit and the shortest length form."""
    if length < 126:
        return bytes((0x80 | opcode, 0x80 | length))
    if length < 0x10000:
        return bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    return bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")


class ExecEncoder:
    """Client->server frames: always masked, FIN set, never fragmented.

    Every method returns a fresh ``bytes`` object to hand to ``transport.write``.
    Mask keys come from ``random_bytes`` (``os.urandom`` by default), fetched
    4096 bytes at a time and used 4 bytes per frame.
    """

    def __init__(
        self,
        *,
        max_frame_payload: int = 65536,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not isinstance(max_frame_payload, int) or not 1 <= max_frame_payload <= 2**62:
            raise ValueError(f"max_frame_payload must be 1..2**62, got {max_frame_payload!r}")
        self._max_frame = max_frame_payload
        self._random_bytes = random_bytes
        self._pool = b""
        self._pool_pos = 0
        self._stdin_bytes = 0

    @property
    def stdin_bytes(self) -> int:
        """Stdin data bytes encoded so far (channel bytes and headers excluded)."""
        return self._stdin_bytes

    def _key(self) -> bytes:
        pos = self._pool_pos
        if pos + 4 > len(self._pool):
            pool = bytes(self._random_bytes(_MASK_POOL))
            if len(pool) != _MASK_POOL:
                raise ValueError(f"random_bytes({_MASK_POOL}) returned {len(pool)} bytes")
            self._pool = pool
            pos = 0
        self._pool_pos = pos + 4
        return self._pool[pos : pos + 4]

    def _frame(self, opcode: int, payload: bytes) -> bytes:
        key = self._key()
        return _header(opcode, len(payload)) + key + _mask(key, payload)

    def stdin(self, data: bytes | bytearray | memoryview) -> bytes:
        """Frames carrying ``data`` on channel 0, split into frames of at most
        ``max_frame_payload`` data bytes, joined into one ``bytes``.

        Empty data gives ``b""`` (an empty message would mean nothing to the server).
        """
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = len(view)
        if not n:
            return b""
        step = self._max_frame
        parts = []
        for start in range(0, n, step):
            chunk = view[start : start + step]
            parts.append(self._frame(_OP_BINARY, b"\x00" + chunk))
        self._stdin_bytes += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def stdin_many(self, chunks: Sequence[bytes | bytearray | memoryview]) -> bytes:
        """Exactly ``stdin(b"".join(chunks))`` (the compiled relay masks each chunk
        straight into the frames instead of joining first)."""
        if len(chunks) == 1:
            return self.stdin(chunks[0])
        return self.stdin(b"".join(chunks))

    def resize(self, width: int, height: int) -> bytes:
        """A channel-4 terminal size message ``{"Width":W,"Height":H}`` (columns, rows)."""
        return self._frame(_OP_BINARY, resize_payload(width, height))

    def close_stdin(self) -> bytes:
        """The v5 CLOSE message for stdin (``ff 00``): EOF for the process."""
        return self._frame(_OP_BINARY, b"\xff\x00")

    def ping(self, payload: bytes = b"") -> bytes:
        """A ping frame (payload at most 125 bytes)."""
        return self._frame(_OP_PING, control_payload(payload))

    def pong(self, payload: bytes) -> bytes:
        """The pong answering a ping with ``payload``."""
        return self._frame(_OP_PONG, control_payload(payload))

    def close(self, code: int = 1000, reason: str = "") -> bytes:
        """A close frame with ``code`` and a UTF-8 ``reason``."""
        return self._frame(_OP_CLOSE, close_payload(code, reason))
