# cython: language_level=3
"""Kubernetes exec and port-forward relay codec, Cython implementation (the hot path).

Same API and observable behaviour as the pure-Python twin ``kuberun._relay_py``
(differential tests and a fuzzer hold them together). What differs is cost:
frames are parsed from raw pointers with no per-frame Python objects, and small
stdout/stderr pieces parsed in one call are gathered into one staging buffer so
the sink (asyncssh's ``write``) is called once per run of a channel instead of
once per frame. Large pieces go to the sink as views of the input, uncopied.

Instances are not thread-safe; use one per connection, on one thread.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport (
    PyByteArray_AS_STRING,
    PyByteArray_FromStringAndSize,
    PyByteArray_GET_SIZE,
    PyByteArray_Resize,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint64_t
from libc.string cimport memcpy, memmove

import os

from kuberun._relay_common import (
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_MAX_STATUS,
    PROTOCOL_V1,
    PROTOCOL_V4,
    PROTOCOL_V5,
    FORWARD_ROLES_AFTER_HEADER,
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


cdef enum _State:
    ST_HEADER = 0    # collecting a frame header
    ST_PAYLOAD = 1   # inside a data frame's payload
    ST_CONTROL = 2   # collecting a control frame's payload (at most 125 bytes)
    ST_CLOSED = 3    # a close frame was received: nothing may follow


# Channel roles: the values of kuberun._relay_common.ROLE_* (the differential
# tests of the port-forward layout would tell them apart).
cdef enum:
    ROLE_IGNORE = 0
    ROLE_OUT = 1
    ROLE_ERR = 2
    ROLE_STATUS = 3
    ROLE_PORT = 4


cdef enum:
    OP_CONT = 0x0
    OP_BINARY = 0x2
    OP_CLOSE = 0x8
    OP_PING = 0x9
    OP_PONG = 0xA
    MIN_BUFFER = 64
    # Stdout/stderr pieces shorter than this are copied into the staging buffer
    # and delivered together: a memcpy of a few hundred bytes is far cheaper than
    # a Python call. Longer pieces are handed over as views, uncopied.
    STAGE_PIECE_MAX = 8192
    STAGE_SIZE = 65536
    # A stdout/stderr frame of at most this many payload bytes that a read cuts in
    # two is held in the receive buffer until its end arrives, then delivered
    # whole: one SSH packet instead of two (the second costing as much again).
    HOLD_MAX = 65536
    MASK_POOL = 4096   # randomness fetched per refill: 1024 mask keys


cdef inline Py_ssize_t _ext_len(unsigned char b1) noexcept nogil:
    """Number of extended payload length bytes announced by header byte 1."""
    b1 &= 0x7F
    if b1 == 126:
        return 2
    if b1 == 127:
        return 8
    return 0


cdef inline unsigned long long _read_length(const unsigned char* h, Py_ssize_t ext) noexcept nogil:
    """Payload length from a complete header at ``h`` with ``ext`` extended bytes."""
    cdef unsigned long long length = 0
    cdef Py_ssize_t i
    if ext == 0:
        return h[1] & 0x7F
    for i in range(ext):
        length = (length << 8) | h[2 + i]
    return length


@cython.final
cdef class ExecDecoder:
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
    ``PortForwardSink``: channel 0 is streamed to ``on_data`` like stdout,
    channel 1 is buffered like a status and handed to ``on_error``, and the
    first message on each of them must be the port's 2-byte header (anything
    else is a protocol error). ``stdout_bytes`` then counts data bytes.
    """

    cdef object _on_stdout
    cdef object _on_stderr
    cdef object _on_status
    cdef object _on_ping
    cdef object _on_close
    cdef readonly str protocol
    cdef readonly object forward_port
    cdef readonly unsigned long long stdout_bytes
    cdef readonly unsigned long long stderr_bytes
    cdef readonly unsigned long long unknown_frames
    cdef readonly bint closed

    cdef _State _state
    cdef unsigned char _hdr[10]       # a header split across reads (server frames: <= 10 bytes)
    cdef Py_ssize_t _hdr_len
    cdef int _opcode                  # opcode of the frame being read
    cdef unsigned long long _remaining   # payload bytes of that frame not yet read
    cdef bint _fin                    # FIN bit of the current data frame
    cdef bint _msg_open               # a fragmented data message awaits continuation frames
    cdef int _chan                    # role of the current message; -1 until its first byte
    cdef int _raw_chan                # its channel byte
    cdef unsigned char _roles[256]    # channel byte -> role (ROLE_*), by layout
    cdef unsigned long long _msg_len  # payload bytes of the current message so far
    cdef unsigned long long _max_payload
    cdef unsigned long long _max_status
    cdef unsigned char _ctrl[125]
    cdef Py_ssize_t _ctrl_len
    cdef bytearray _status

    cdef bytearray _recv              # receive buffer for the BufferedProtocol path
    cdef object _recv_view
    cdef Py_ssize_t _recv_size
    cdef Py_ssize_t _hold_limit       # largest frame remainder worth holding back
    cdef Py_ssize_t _held_off         # a cut frame's payload bytes kept in _recv ...
    cdef Py_ssize_t _held_len         # ... (0: none), re-parsed with the next read
    cdef bint _may_hold               # parsing _recv (not feed()'s input)
    cdef bytearray _stage             # small pieces gathered for one sink call
    cdef object _stage_view
    cdef unsigned char* _stage_ptr
    cdef Py_ssize_t _stage_len
    cdef int _stage_chan

    cdef object _src_obj              # what is being parsed: feed()'s argument or _recv
    cdef object _src_view             # byte view of _src_obj, made on first use
    cdef const unsigned char* _src_base
    cdef str _error
    cdef bint _busy

    def __init__(
        self,
        sink,
        protocol=PROTOCOL_V5,
        *,
        max_payload=DEFAULT_MAX_PAYLOAD,
        max_status=DEFAULT_MAX_STATUS,
        buffer_size=262144,
        forward_port=None,
    ):
        cdef bytes roles
        self.protocol = check_protocol(protocol)
        self.forward_port = check_forward_port(forward_port, protocol)
        for name, value, low in (
            ("max_payload", max_payload, 0),
            ("max_status", max_status, 0),
            ("buffer_size", buffer_size, MIN_BUFFER),
        ):
            if not isinstance(value, int) or not low <= value <= 2**62:
                raise ValueError(f"{name} must be an integer in {low}..2**62, got {value!r}")
        self._max_payload = max_payload
        self._max_status = max_status
        if self.forward_port is None:
            self._on_stdout = sink.on_stdout
            self._on_stderr = sink.on_stderr
            self._on_status = sink.on_status
        else:
            self._on_stdout = self._on_stderr = sink.on_data
            self._on_status = sink.on_error
        roles = channel_roles(self.forward_port)
        memcpy(self._roles, PyBytes_AS_STRING(roles), 256)
        self._on_ping = sink.on_ping
        self._on_close = sink.on_close
        # Both buffers are left uninitialised (bytearray(n) would zero them): pages
        # nothing has written to yet are not resident, so an idle or interactive
        # session costs the few KiB it has received, not the whole buffers.
        self._recv = PyByteArray_FromStringAndSize(NULL, buffer_size)
        self._recv_view = memoryview(self._recv)
        self._recv_size = buffer_size
        self._hold_limit = min(HOLD_MAX, buffer_size // 2)
        self._held_off = 0
        self._held_len = 0
        self._may_hold = False
        self._stage = PyByteArray_FromStringAndSize(NULL, STAGE_SIZE)
        self._stage_view = memoryview(self._stage)
        self._stage_ptr = <unsigned char*>PyByteArray_AS_STRING(self._stage)
        self._stage_len = 0
        self._stage_chan = -1
        self._status = bytearray()
        self._state = ST_HEADER
        self._hdr_len = 0
        self._ctrl_len = 0
        self._chan = -1
        self._raw_chan = 0
        self._msg_open = False
        self._msg_len = 0
        self._remaining = 0
        self._error = None
        self._busy = False
        self.closed = False

    # -- input -----------------------------------------------------------

    def feed(self, data):
        """Parse ``data`` (any bytes-like object), calling the sink as needed."""
        cdef Py_buffer buf
        if self._held_len:
            self.flush()  # held bytes come first
        self._enter()
        try:
            PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
            try:
                self._src_obj = data
                self._run(<const unsigned char*>buf.buf, 0, buf.len)
            finally:
                PyBuffer_Release(&buf)
        finally:
            self._src_obj = None
            self._src_view = None
            self._busy = False

    def get_buffer(self, Py_ssize_t sizehint):
        """``asyncio.BufferedProtocol.get_buffer``: the decoder's receive buffer, or
        the part after a held frame's bytes."""
        cdef char* base
        if self._busy:
            raise RuntimeError("ExecDecoder.get_buffer called while parsing")
        if not self._held_len:
            return self._recv_view
        if self._recv_size - self._held_off - self._held_len < self._recv_size // 2:
            # Move the held bytes to the front: the next read gets at least half
            # the buffer, more than the held frame still needs.
            base = PyByteArray_AS_STRING(self._recv)
            memmove(base, base + self._held_off, <size_t>self._held_len)
            self._held_off = 0
        return self._recv_view[self._held_off + self._held_len:]

    def buffer_updated(self, Py_ssize_t nbytes):
        """``asyncio.BufferedProtocol.buffer_updated``: parse ``nbytes`` from the buffer."""
        cdef Py_ssize_t start = self._held_off
        cdef Py_ssize_t held = self._held_len
        if not 0 <= nbytes <= self._recv_size - start - held:
            raise ValueError(f"buffer_updated({nbytes}) outside the receive buffer")
        self._enter()
        self._parse_recv(start, held + nbytes, True)

    def drop_stdout(self):
        """Discard stdout from now on instead of passing it to the sink (it is still
        counted in ``stdout_bytes``); stderr, the status and control frames go on as
        before. For a reader that has gone away (SSH ``eow@openssh.com``)."""
        self._on_stdout = discard

    def flush(self):
        """Deliver stdout/stderr bytes held back for a frame's end (see the class
        docstring). Call it when the input has ended: the connection closed or was
        lost. Nothing happens if nothing is held or the decoder has failed."""
        cdef Py_ssize_t start = self._held_off
        cdef Py_ssize_t held = self._held_len
        if not held or self._error is not None:
            return
        self._enter()
        # The frame is not over: its remaining bytes, if they ever come, follow.
        self._parse_recv(start, held, False)

    cdef int _parse_recv(self, Py_ssize_t start, Py_ssize_t n, bint may_hold) except -1:
        """Parse ``n`` bytes of the receive buffer from ``start`` (after _enter())."""
        try:
            self._src_obj = self._recv
            self._src_view = self._recv_view
            self._held_len = 0
            self._held_off = 0
            self._may_hold = may_hold
            self._run(<const unsigned char*>PyByteArray_AS_STRING(self._recv), start, n)
        finally:
            self._may_hold = False
            self._src_obj = None
            self._src_view = None
            self._busy = False
        return 0

    cdef int _enter(self) except -1:
        if self._busy:
            raise RuntimeError("ExecDecoder is not reentrant")
        if self._error is not None:
            raise ExecProtocolError(self._error)
        self._busy = True
        return 0

    cdef int _run(self, const unsigned char* base, Py_ssize_t start, Py_ssize_t n) except -1:
        """Parse ``n`` bytes at ``base + start`` (``base``: where the input object starts)."""
        self._src_base = base
        try:
            self._parse(base + start, n)
            self._flush()
        except ExecProtocolError as exc:
            self._error = str(exc)
            # Pieces parsed before the bad bytes are valid output; the Python
            # twin has delivered them already, so deliver them here too.
            self._flush()
            raise
        except BaseException as exc:
            self._error = f"exec decoder unusable after {type(exc).__name__} in the sink"
            self._stage_len = 0
            raise
        return 0

    # -- delivery ----------------------------------------------------------

    cdef object _slice(self, const unsigned char* p, Py_ssize_t k):
        """A view of ``k`` input bytes at ``p``; it keeps the input object alive."""
        cdef Py_ssize_t off = p - self._src_base
        if self._src_view is None:
            view = memoryview(self._src_obj)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            self._src_view = view
        return self._src_view[off:off + k]

    cdef int _deliver(self, int chan, object view, Py_ssize_t k) except -1:
        if chan == ROLE_OUT:
            self.stdout_bytes += <unsigned long long>k
            self._on_stdout(view)
        else:
            self.stderr_bytes += <unsigned long long>k
            self._on_stderr(view)
        return 0

    cdef int _flush(self) except -1:
        cdef Py_ssize_t k = self._stage_len
        if k:
            # Reset first: the sink may raise, and the staged bytes are then gone anyway.
            self._stage_len = 0
            self._deliver(self._stage_chan, self._stage_view[:k], k)
        return 0

    cdef int _data(self, const unsigned char* p, Py_ssize_t k) except -1:
        """Route ``k`` > 0 payload bytes of the current message by its role."""
        cdef int chan = self._chan
        cdef Py_ssize_t old
        if chan == ROLE_OUT or chan == ROLE_ERR:
            if k < STAGE_PIECE_MAX:
                if self._stage_len and (
                    self._stage_chan != chan or self._stage_len + k > STAGE_SIZE
                ):
                    self._flush()
                memcpy(self._stage_ptr + self._stage_len, p, <size_t>k)
                self._stage_len += k
                self._stage_chan = chan
            else:
                self._flush()
                self._deliver(chan, self._slice(p, k), k)
        elif chan >= ROLE_STATUS:
            # Bounded (max_status, or 2 for a port header): checked before any
            # byte of a frame is accepted.
            old = PyByteArray_GET_SIZE(self._status)
            PyByteArray_Resize(self._status, old + k)
            memcpy(PyByteArray_AS_STRING(self._status) + old, p, <size_t>k)
        return 0

    # -- the state machine ---------------------------------------------------

    cdef int _parse(self, const unsigned char* buf, Py_ssize_t n) except -1:
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t take, ext, need
        cdef unsigned char b0, b1
        cdef unsigned long long length
        cdef bytes payload
        while pos < n:
            if self._state == ST_PAYLOAD:
                take = n - pos
                if <unsigned long long>take > self._remaining:
                    take = <Py_ssize_t>self._remaining
                if self._chan < 0:
                    self._set_channel(buf[pos])
                    pos += 1
                    take -= 1
                    self._remaining -= 1
                if (
                    self._may_hold
                    and take > 0
                    and pos + take == n
                    and <unsigned long long>take < self._remaining
                    and self._remaining <= <unsigned long long>self._hold_limit
                    and (self._chan == ROLE_OUT or self._chan == ROLE_ERR)
                ):
                    # The read ends inside a small output frame: keep its bytes
                    # where they are and parse them again with the rest.
                    self._held_off = (buf + pos) - self._src_base
                    self._held_len = take
                    break
                if take > 0:
                    self._data(buf + pos, take)
                    pos += take
                    self._remaining -= <unsigned long long>take
                if self._remaining == 0:
                    self._end_data_frame()
            elif self._state == ST_HEADER:
                if self._hdr_len == 0 and n - pos >= 2:
                    # Fast path: the whole header is in this read.
                    b0 = buf[pos]
                    b1 = buf[pos + 1]
                    self._check_head(b0, b1)
                    ext = _ext_len(b1)
                    if n - pos >= 2 + ext:
                        length = _read_length(buf + pos, ext)
                        pos += 2 + ext
                        self._start_frame(b0, length)
                        continue
                # Slow path: collect the header bytes across reads.
                if self._hdr_len < 2:
                    take = min(2 - self._hdr_len, n - pos)
                    memcpy(self._hdr + self._hdr_len, buf + pos, <size_t>take)
                    self._hdr_len += take
                    pos += take
                    if self._hdr_len < 2:
                        continue
                    self._check_head(self._hdr[0], self._hdr[1])
                need = 2 + _ext_len(self._hdr[1])
                if self._hdr_len < need:
                    take = min(need - self._hdr_len, n - pos)
                    memcpy(self._hdr + self._hdr_len, buf + pos, <size_t>take)
                    self._hdr_len += take
                    pos += take
                    if self._hdr_len < need:
                        continue
                self._hdr_len = 0
                self._start_frame(self._hdr[0], _read_length(self._hdr, need - 2))
            elif self._state == ST_CONTROL:
                take = n - pos
                if <unsigned long long>take > self._remaining:
                    take = <Py_ssize_t>self._remaining
                memcpy(self._ctrl + self._ctrl_len, buf + pos, <size_t>take)
                self._ctrl_len += take
                pos += take
                self._remaining -= <unsigned long long>take
                if self._remaining == 0:
                    payload = PyBytes_FromStringAndSize(<char*>self._ctrl, self._ctrl_len)
                    self._ctrl_len = 0
                    self._state = ST_HEADER
                    self._control(self._opcode, payload)
            else:
                raise ExecProtocolError("data after the close frame")
        return 0

    cdef int _check_head(self, unsigned char b0, unsigned char b1) except -1:
        """Checks decidable from the first two header bytes, in a fixed order."""
        cdef int opcode = b0 & 0x0F
        if b0 & 0x70:
            raise ExecProtocolError("frame with RSV bits set")
        if not (opcode <= 2 or 8 <= opcode <= 10):
            raise ExecProtocolError(f"frame with reserved opcode 0x{opcode:x}")
        if opcode >= 8:
            if not b0 & 0x80:
                raise ExecProtocolError("fragmented control frame")
            if (b1 & 0x7F) > 125:
                raise ExecProtocolError("control frame payload longer than 125 bytes")
        if b1 & 0x80:
            raise ExecProtocolError("masked frame from the server")
        if opcode == OP_CONT:
            if not self._msg_open:
                raise ExecProtocolError("continuation frame without a started message")
        elif opcode < 8 and self._msg_open:
            raise ExecProtocolError("new data frame while a fragmented message is open")
        return 0

    cdef int _start_frame(self, unsigned char b0, unsigned long long length) except -1:
        cdef int opcode = b0 & 0x0F
        if length >> 63:
            raise ExecProtocolError("64-bit payload length with the most significant bit set")
        if length > self._max_payload:
            raise ExecProtocolError(
                f"frame payload of {length} bytes exceeds the limit of {self._max_payload}"
            )
        self._opcode = opcode
        if opcode >= 8:
            if length:
                self._remaining = length
                self._state = ST_CONTROL
            else:
                self._control(opcode, b"")
            return 0
        if opcode != OP_CONT:
            self._chan = -1
            self._msg_len = 0
        self._msg_len += length
        if self._msg_len > self._max_payload:
            raise ExecProtocolError(
                f"message of {self._msg_len} bytes exceeds the limit of {self._max_payload}"
            )
        if self._chan >= ROLE_STATUS:
            self._check_status(length)
        self._fin = (b0 & 0x80) != 0
        self._msg_open = not self._fin
        if length:
            self._remaining = length
            self._state = ST_PAYLOAD
        else:
            self._end_data_frame()
        return 0

    cdef int _check_status(self, unsigned long long incoming) except -1:
        cdef unsigned long long have = <unsigned long long>PyByteArray_GET_SIZE(self._status)
        if self._chan == ROLE_PORT:
            if have + incoming > 2:
                raise ExecProtocolError(
                    f"port-forward header on channel {self._raw_chan} is longer than 2 bytes"
                )
        elif have + incoming > self._max_status:
            raise ExecProtocolError(
                f"status message exceeds the limit of {self._max_status} bytes"
            )
        return 0

    cdef int _set_channel(self, unsigned char chan) except -1:
        cdef int role = self._roles[chan]
        self._chan = role
        self._raw_chan = chan
        if role >= ROLE_STATUS:
            # The rest of this frame is buffered: bound it before buffering any.
            self._check_status(self._remaining - 1)
        elif role != ROLE_OUT and role != ROLE_ERR:
            self.unknown_frames += 1
        return 0

    cdef int _end_port_header(self) except -1:
        cdef int chan = self._raw_chan
        problem = port_header_error(chan, bytes(self._status), self.forward_port)
        if problem is not None:
            raise ExecProtocolError(problem)
        PyByteArray_Resize(self._status, 0)
        self._roles[chan] = FORWARD_ROLES_AFTER_HEADER[chan]
        return 0

    cdef int _end_data_frame(self) except -1:
        self._state = ST_HEADER
        if self._fin:
            if self._chan == ROLE_PORT:
                self._end_port_header()
            elif self._chan == ROLE_STATUS and PyByteArray_GET_SIZE(self._status):
                data = PyBytes_FromStringAndSize(
                    PyByteArray_AS_STRING(self._status), PyByteArray_GET_SIZE(self._status)
                )
                PyByteArray_Resize(self._status, 0)
                self._chan = -1
                self._flush()
                self._on_status(data)
            self._chan = -1
        return 0

    cdef int _control(self, int opcode, bytes payload) except -1:
        cdef object code
        cdef str reason
        if opcode == OP_PING:
            self._flush()
            self._on_ping(payload)
        elif opcode == OP_CLOSE:
            if len(payload) == 1:
                raise ExecProtocolError("close frame with a 1-byte payload")
            code = None
            reason = ""
            if payload:
                code = int.from_bytes(payload[:2], "big")
                try:
                    reason = payload[2:].decode("utf-8")
                except UnicodeDecodeError:
                    raise ExecProtocolError("close frame reason is not valid UTF-8") from None
            self.closed = True
            self._state = ST_CLOSED
            self._flush()
            self._on_close(code, reason)
        # A pong needs nothing: the server never pings unprompted and pongs carry no data.
        return 0


# -- encoder ---------------------------------------------------------------


cdef inline void _mask_copy(
    unsigned char* dst,
    const unsigned char* src,
    Py_ssize_t n,
    const unsigned char* key,
    Py_ssize_t phase,
) noexcept nogil:
    """dst[i] = src[i] ^ key[(phase + i) % 4], eight bytes at a time.

    The words go through memcpy into locals: no unaligned pointer casts, and
    compilers turn each memcpy into one plain load or store.
    """
    cdef unsigned char m[8]
    cdef uint64_t m64, w0, w1, w2, w3
    cdef Py_ssize_t i
    for i in range(8):
        m[i] = key[(phase + i) & 3]
    memcpy(&m64, m, 8)
    i = 0
    while i + 32 <= n:
        memcpy(&w0, src + i, 8)
        memcpy(&w1, src + i + 8, 8)
        memcpy(&w2, src + i + 16, 8)
        memcpy(&w3, src + i + 24, 8)
        w0 ^= m64
        w1 ^= m64
        w2 ^= m64
        w3 ^= m64
        memcpy(dst + i, &w0, 8)
        memcpy(dst + i + 8, &w1, 8)
        memcpy(dst + i + 16, &w2, 8)
        memcpy(dst + i + 24, &w3, 8)
        i += 32
    while i + 8 <= n:
        memcpy(&w0, src + i, 8)
        w0 ^= m64
        memcpy(dst + i, &w0, 8)
        i += 8
    while i < n:
        # i is a multiple of 8 plus the tail index, and m repeats every 4 bytes.
        dst[i] = src[i] ^ m[i & 7]
        i += 1


cdef inline Py_ssize_t _frame_size(Py_ssize_t plen) noexcept nogil:
    """Bytes of a masked client frame with a ``plen``-byte payload."""
    if plen < 126:
        return 2 + 4 + plen
    if plen < 0x10000:
        return 4 + 4 + plen
    return 10 + 4 + plen


cdef inline Py_ssize_t _write_header(
    unsigned char* dst, int opcode, Py_ssize_t plen
) noexcept nogil:
    """Write a FIN, masked client frame header; return its length (mask key excluded)."""
    cdef int i
    dst[0] = <unsigned char>(0x80 | opcode)
    if plen < 126:
        dst[1] = <unsigned char>(0x80 | plen)
        return 2
    if plen < 0x10000:
        dst[1] = 0x80 | 126
        dst[2] = <unsigned char>(plen >> 8)
        dst[3] = <unsigned char>plen
        return 4
    dst[1] = 0x80 | 127
    for i in range(8):
        dst[2 + i] = <unsigned char>((<unsigned long long>plen) >> (8 * (7 - i)))
    return 10


@cython.final
cdef class ExecEncoder:
    """Client->server frames: always masked, FIN set, never fragmented.

    Every method returns a fresh ``bytes`` object to hand to ``transport.write``.
    Mask keys come from ``random_bytes`` (``os.urandom`` by default), fetched
    4096 bytes at a time and used 4 bytes per frame.
    """

    cdef Py_ssize_t _max_frame
    cdef object _random_bytes
    cdef bytes _pool
    cdef Py_ssize_t _pool_pos
    cdef readonly unsigned long long stdin_bytes

    def __init__(self, *, max_frame_payload=65536, random_bytes=os.urandom):
        if not isinstance(max_frame_payload, int) or not 1 <= max_frame_payload <= 2**62:
            raise ValueError(f"max_frame_payload must be 1..2**62, got {max_frame_payload!r}")
        self._max_frame = max_frame_payload
        self._random_bytes = random_bytes
        self._pool = b""
        self._pool_pos = 0
        self.stdin_bytes = 0

    cdef int _next_key(self, unsigned char* dst) except -1:
        """Write the next 4-byte mask key to ``dst``."""
        cdef bytes pool
        if self._pool_pos + 4 > PyBytes_GET_SIZE(self._pool):
            pool = bytes(self._random_bytes(MASK_POOL))
            if PyBytes_GET_SIZE(pool) != MASK_POOL:
                raise ValueError(f"random_bytes({MASK_POOL}) returned {len(pool)} bytes")
            self._pool = pool
            self._pool_pos = 0
        memcpy(dst, PyBytes_AS_STRING(self._pool) + self._pool_pos, 4)
        self._pool_pos += 4
        return 0

    cdef bytes _frame(self, int opcode, bytes payload):
        cdef Py_ssize_t plen = PyBytes_GET_SIZE(payload)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, _frame_size(plen))
        cdef unsigned char* dst = <unsigned char*>PyBytes_AS_STRING(out)
        dst += _write_header(dst, opcode, plen)
        self._next_key(dst)
        _mask_copy(dst + 4, <const unsigned char*>PyBytes_AS_STRING(payload), plen, dst, 0)
        return out

    def stdin(self, data):
        """Frames carrying ``data`` on channel 0, split into frames of at most
        ``max_frame_payload`` data bytes, joined into one ``bytes``.

        Empty data gives ``b""`` (an empty message would mean nothing to the server).
        """
        cdef Py_buffer buf
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        try:
            return self._stdin_gather(&buf, 1, buf.len)
        finally:
            PyBuffer_Release(&buf)

    def stdin_many(self, chunks):
        """Exactly ``stdin(b"".join(chunks))``, without the join: each chunk is
        masked straight into the frames, so queued stdin is copied once, not twice.
        """
        cdef Py_ssize_t count = len(chunks)
        cdef Py_buffer* bufs
        cdef Py_ssize_t got = 0
        cdef Py_ssize_t i, n = 0
        if count == 1:
            return self.stdin(chunks[0])
        bufs = <Py_buffer*>PyMem_Malloc(<size_t>(count if count else 1) * sizeof(Py_buffer))
        if bufs == NULL:
            raise MemoryError()
        try:
            for i in range(count):
                PyObject_GetBuffer(chunks[i], &bufs[i], PyBUF_SIMPLE)
                got += 1
                n += bufs[i].len
            return self._stdin_gather(bufs, count, n)
        finally:
            for i in range(got):
                PyBuffer_Release(&bufs[i])
            PyMem_Free(bufs)

    @cython.cdivision(True)  # step >= 1, n >= 0: C division is exact here
    cdef bytes _stdin_gather(self, Py_buffer* bufs, Py_ssize_t count, Py_ssize_t n):
        cdef Py_ssize_t step = self._max_frame
        cdef Py_ssize_t full, last, total, left, take, done, i
        cdef Py_ssize_t idx = 0      # chunk being copied
        cdef Py_ssize_t pos = 0      # bytes of it already copied
        cdef unsigned char* dst
        cdef unsigned char* key
        cdef bytes out
        if n == 0:
            return b""
        full = n // step
        last = n - full * step
        total = full * _frame_size(step + 1)
        if last:
            total += _frame_size(last + 1)
        out = PyBytes_FromStringAndSize(NULL, total)
        dst = <unsigned char*>PyBytes_AS_STRING(out)
        left = n
        while left > 0:
            take = left if left < step else step
            dst += _write_header(dst, OP_BINARY, take + 1)
            self._next_key(dst)
            key = dst
            dst[4] = key[0]  # the channel byte 0, masked
            dst += 5
            done = 0
            while done < take:
                # Skip empty chunks; `take` bytes remain, so idx stays in range.
                while pos == bufs[idx].len:
                    idx += 1
                    pos = 0
                i = bufs[idx].len - pos
                if i > take - done:
                    i = take - done
                # Data byte j of a frame has mask phase 1 + j (the channel byte is phase 0).
                _mask_copy(dst, <const unsigned char*>bufs[idx].buf + pos, i, key, 1 + done)
                dst += i
                done += i
                pos += i
            left -= take
        self.stdin_bytes += <unsigned long long>n
        return out

    def resize(self, width, height):
        """A channel-4 terminal size message ``{"Width":W,"Height":H}`` (columns, rows)."""
        return self._frame(OP_BINARY, resize_payload(width, height))

    def close_stdin(self):
        """The v5 CLOSE message for stdin (``ff 00``): EOF for the process."""
        return self._frame(OP_BINARY, b"\xff\x00")

    def ping(self, payload=b""):
        """A ping frame (payload at most 125 bytes)."""
        return self._frame(OP_PING, control_payload(payload))

    def pong(self, payload):
        """The pong answering a ping with ``payload``."""
        return self._frame(OP_PONG, control_payload(payload))

    def close(self, code=1000, reason=""):
        """A close frame with ``code`` and a UTF-8 ``reason``."""
        return self._frame(OP_CLOSE, close_payload(code, reason))
