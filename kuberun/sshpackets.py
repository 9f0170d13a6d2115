"""Two per-connection changes to asyncssh's packet layer that make bulk data cheaper.

Both are hooks on one connection object (instance attributes): asyncssh's
classes stay untouched, and so does every other connection in the process.
Measured on forwarded and exec transfers (``benchmarks/RESULTS.md``, "Port
forwarding"); nothing about what the client sees changes beyond the empty
``MSG_IGNORE`` packets it no longer gets.

**Reads parsed in slices** (:func:`slice_reads`). asyncssh appends each read to
a ``bytes`` buffer and, for every packet it takes off the front, slices the
rest into a new ``bytes`` twice (once after the first cipher block, once after
the packet). The copying grows with what the buffer holds: a full 256 KiB read
(uvloop's read size) carrying eight 32 KiB data packets is copied about ten
times over before its packets are decrypted, against about three times when
the parser gets it 32 KiB at a time. A busy gateway mostly gets full reads (the
socket fills while it works on the last one). The connection gets a
``data_received`` of its own that feeds the real one slice by slice, and is set
as its transport's protocol again: uvloop keeps the bound method it found when
the protocol was set, so an attribute set afterwards would otherwise go unseen.

**No empty ``MSG_IGNORE`` before every packet** (:func:`skip_ignore_padding`).
Once encryption is on, asyncssh sends an empty ``MSG_IGNORE`` ahead of every
packet after the key exchange: a second packet to build, encrypt, ``send()``
and for the client to decrypt, for each 32 KiB of data. It is the RFC 4251
(section 9.3.1) countermeasure for CBC ciphers, whose next IV is the last
ciphertext block; with CTR, GCM or ChaCha20-Poly1305 it protects nothing, and
OpenSSH's sshd sends no such packets. They are dropped unless the connection's
outgoing cipher is a CBC one.

``SSHConnection._transport`` and the ``send_packet`` recursion that inserts the
``MSG_IGNORE`` are private: ``pyproject.toml`` pins the asyncssh versions this was
checked against, and ``tests/unit/test_sshpackets.py`` fails when asyncssh changes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asyncssh.constants import MSG_IGNORE

__all__ = ["READ_SLICE", "skip_ignore_padding", "slice_reads", "tune_connection"]

#: Bytes given to the parser at a time: one full data packet (32 KiB of data,
#: asyncssh's and OpenSSH's largest) plus its framing needs two slices at most.
READ_SLICE = 32768

# The payload of the MSG_IGNORE asyncssh inserts: an empty SSH string.
_EMPTY_STRING = b"\x00\x00\x00\x00"


def tune_connection(conn: Any) -> None:
    """Both hooks, for a new ``asyncssh.SSHConnection`` (from its owner's ``connection_made``)."""
    slice_reads(conn)
    skip_ignore_padding(conn)


def slice_reads(conn: Any) -> bool:
    """Make ``conn`` parse its reads in slices of :data:`READ_SLICE` bytes.

    Returns False, changing nothing, when ``conn`` has no transport to re-register with.
    """
    transport = getattr(conn, "_transport", None)
    if transport is None or not hasattr(transport, "set_protocol"):
        return False
    feed: Callable[[Any], None] = conn.data_received
    is_closing = transport.is_closing

    def data_received(data: bytes, datatype: object = None) -> None:
        size = len(data)
        if size <= READ_SLICE:
            feed(data)
            return
        view = memoryview(data)
        for start in range(0, size, READ_SLICE):
            # A slice can end the connection (a disconnect, a bad MAC): the rest
            # of the read then goes where a closed transport's reads go.
            if start and is_closing():
                return
            feed(view[start : start + READ_SLICE])

    conn.data_received = data_received
    transport.set_protocol(conn)
    return True


def skip_ignore_padding(conn: Any) -> None:
    """Make ``conn`` send no empty ``MSG_IGNORE`` while its outgoing cipher is not CBC.

    asyncssh inserts them by calling ``send_packet`` from inside ``send_packet``,
    which finds this instance attribute; every other packet goes to the real method.
    """
    send: Callable[..., None] = conn.send_packet
    extra = conn.get_extra_info

    def send_packet(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if (
            pkttype == MSG_IGNORE
            and args == (_EMPTY_STRING,)
            and "-cbc" not in str(extra("send_cipher") or "-cbc")
        ):
            return
        send(pkttype, *args, handler=handler)

    conn.send_packet = send_packet
