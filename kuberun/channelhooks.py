"""What kuberun needs from asyncssh channels that asyncssh has no public API for.

asyncssh dispatches a channel request named ``NAME`` to the channel's method
``_process_<map_handler_name(NAME)>_request(packet)`` (``@`` becomes ``_at_``, ``.``
``_dot_``, ``-`` ``_``), and a global request to the connection's
``_process_<...>_global_request``. A channel request handler returns True or False
(the reply, sent only if one is wanted); a global request handler reports its reply
with ``_report_global_response``, which also serves the next queued request. A
handler set on one instance is the least invasive hook: nothing else changes, and
the class stays untouched. The queued output is asyncssh's
``_send_buf`` list of ``(bytearray, datatype)`` with its length in ``_send_buf_len``.

All of this is private: ``pyproject.toml`` pins the asyncssh versions it was checked
against, and ``tests/unit/test_channelhooks.py`` fails loudly when asyncssh changes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asyncssh.misc import map_handler_name

__all__ = [
    "EOW_REQUEST",
    "NO_MORE_SESSIONS_REQUEST",
    "drop_queued",
    "on_channel_request",
    "on_global_request",
]

#: Sent by OpenSSH clients when they can no longer write a session's output (its
#: reader is gone); no reply wanted. Only to servers whose version starts with OpenSSH.
EOW_REQUEST = "eow@openssh.com"

#: Sent by OpenSSH clients that will open no further session channels on a connection.
NO_MORE_SESSIONS_REQUEST = "no-more-sessions@openssh.com"


def on_channel_request(chan: Any, request: str, handler: Callable[[], bool]) -> None:
    """Call ``handler()`` when ``chan`` receives the channel request ``request``
    (one without payload); its result is the reply."""

    def process(packet: Any) -> bool:
        packet.check_end()  # a malformed request is a protocol error, as for asyncssh's own
        return handler()

    setattr(chan, f"_process_{map_handler_name(request)}_request", process)


def on_global_request(conn: Any, request: str, handler: Callable[[], bool]) -> None:
    """Call ``handler()`` when ``conn`` receives the global request ``request``
    (one without payload); its result is the reply."""

    def process(packet: Any) -> None:
        packet.check_end()
        conn._report_global_response(handler())

    setattr(conn, f"_process_{map_handler_name(request)}_global_request", process)


def drop_queued(chan: Any, *, stderr: bool = False) -> int:
    """Drop the output ``chan`` holds for a client that will discard it: its stdout,
    and with ``stderr`` its stderr too (otherwise stderr stays queued, in order).
    Returns the number of bytes dropped."""
    queued = chan._send_buf
    kept = [] if stderr else [(data, kind) for data, kind in queued if kind is not None]
    if len(kept) == len(queued):
        return 0
    kept_len = sum(len(data) for data, _ in kept)
    dropped = int(chan._send_buf_len - kept_len)
    queued[:] = kept
    chan._send_buf_len = kept_len
    # Sends what the window allows now, a pending EOF or close, and tells the
    # session to resume writing if the buffer fell below its low-water mark.
    chan._flush_send_buf()
    return dropped
