"""Socket reads handed to asyncssh's packet parser in slices of about one packet.

asyncssh appends each read to a ``bytes`` buffer and, for every packet it takes
off the front, slices the rest into a new ``bytes`` twice (once after the first
cipher block, once after the packet). The copying therefore grows with what the
buffer holds: a full 256 KiB read (uvloop's read size) carrying eight 32 KiB
data packets is copied about ten times over before its packets are decrypted,
against about three times when the parser gets it 32 KiB at a time. A busy
gateway mostly gets full reads (the socket fills while it works on the last
one), so the copies grew with the load; on an upload through a forward they
were a sixth of the gateway's CPU (``benchmarks/RESULTS.md``, "Port
forwarding").

:func:`slice_reads` gives one connection a ``data_received`` of its own that
feeds the real one slice by slice, and sets the connection as its transport's
protocol again: uvloop keeps the bound method it found when the protocol was
set, so an attribute set afterwards would otherwise go unseen. The parser sees
the same bytes in the same order; nothing else about the connection changes.

``SSHConnection._transport`` is private: ``pyproject.toml`` pins the asyncssh
versions this was checked against, and ``tests/unit/test_sshreads.py`` fails
when asyncssh no longer has it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["READ_SLICE", "slice_reads"]

#: Bytes given to the parser at a time: one full data packet (32 KiB of data,
#: asyncssh's and OpenSSH's largest) plus its framing needs two slices at most.
READ_SLICE = 32768


def slice_reads(conn: Any) -> bool:
    """Make ``conn`` (an ``asyncssh.SSHConnection``, from its owner's
    ``connection_made``) parse its reads in slices of :data:`READ_SLICE` bytes.

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
