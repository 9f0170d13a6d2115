"""Pieces of the relay codec that both implementations share.

Constants, the sink protocols, exec status decoding, the channel layouts
(exec and port-forward) and the validation of the rarely used client frames
live here in plain Python, so the Cython codec and its pure-Python twin cannot
disagree about them.
"""

from __future__ import annotations

import json
from typing import Protocol

from kuberun.errors import ExecError

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "DEFAULT_MAX_STATUS",
    "PROTOCOLS",
    "PROTOCOL_V1",
    "PROTOCOL_V4",
    "PROTOCOL_V5",
    "ROLE_ERR",
    "ROLE_IGNORE",
    "ROLE_OUT",
    "ROLE_PORT",
    "ROLE_STATUS",
    "ExecSink",
    "PortForwardSink",
    "channel_roles",
    "check_forward_port",
    "check_protocol",
    "close_payload",
    "control_payload",
    "decode_status",
    "discard",
    "port_header_error",
    "resize_payload",
]

PROTOCOL_V5 = "v5.channel.k8s.io"
PROTOCOL_V4 = "v4.channel.k8s.io"
PROTOCOL_V1 = "channel.k8s.io"
PROTOCOLS = (PROTOCOL_V5, PROTOCOL_V4, PROTOCOL_V1)

#: Largest frame payload, and largest reassembled message, the decoder accepts.
DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024
#: Largest channel-3 (status) message the decoder accepts.
DEFAULT_MAX_STATUS = 64 * 1024

# Close codes an endpoint must never put on the wire (RFC 6455 section 7.4.1).
_RESERVED_CLOSE_CODES = frozenset({1004, 1005, 1006, 1015})
_MALFORMED = "MalformedStatus"


def discard(data: memoryview) -> None:
    """Stands in for ``on_stdout`` once the decoder drops stdout (``drop_stdout``)."""


class ExecSink(Protocol):
    """What :class:`ExecDecoder` calls while it parses.

    Views passed to ``on_stdout``/``on_stderr`` are valid only during the call:
    copy what you keep (asyncssh's ``SSHServerChannel.write`` copies).
    """

    def on_stdout(self, data: memoryview) -> None:
        """A non-empty piece of stdout (channel 1)."""

    def on_stderr(self, data: memoryview) -> None:
        """A non-empty piece of stderr (channel 2)."""

    def on_status(self, data: bytes) -> None:
        """A complete, non-empty channel-3 message; see :func:`decode_status`."""

    def on_ping(self, payload: bytes) -> None:
        """The server pinged; answer with ``ExecEncoder.pong(payload)``."""

    def on_close(self, code: int | None, reason: str) -> None:
        """The server sent a close frame (``code`` is None for an empty one)."""


class PortForwardSink(Protocol):
    """What the decoder calls in the port-forward layout (``forward_port`` set).

    Views passed to ``on_data`` are valid only during the call.
    """

    def on_data(self, data: memoryview) -> None:
        """A non-empty piece of the Pod-side connection's bytes (data channel 0)."""

    def on_error(self, data: bytes) -> None:
        """A complete, non-empty message on the error channel 1: the kubelet's
        text saying why forwarding to the port failed."""

    def on_ping(self, payload: bytes) -> None:
        """The server pinged; answer with ``ExecEncoder.pong(payload)``."""

    def on_close(self, code: int | None, reason: str) -> None:
        """The server sent a close frame (``code`` is None for an empty one)."""


# What the decoder does with a message, by its channel byte (a 256-entry table
# per layout, so the hot path makes one lookup whatever the layout).
#: Dropped and counted in ``unknown_frames``.
ROLE_IGNORE = 0
#: Streamed to ``on_stdout`` (exec channel 1; port-forward data channel 0).
ROLE_OUT = 1
#: Streamed to ``on_stderr`` (exec channel 2).
ROLE_ERR = 2
#: Buffered whole, bounded by ``max_status``, then handed to ``on_status``
#: (exec channel 3; port-forward error channel 1).
ROLE_STATUS = 3
#: The port-forward header still expected on this channel: the first message
#: must be exactly the port, uint16 little-endian; after it the channel takes
#: its own role.
ROLE_PORT = 4

_EXEC_ROLES = bytes([ROLE_IGNORE, ROLE_OUT, ROLE_ERR, ROLE_STATUS] + [ROLE_IGNORE] * 252)
#: Port-forward roles for port index 0 before the headers: both channels await one.
_FORWARD_ROLES = bytes([ROLE_PORT, ROLE_PORT] + [ROLE_IGNORE] * 254)
#: The roles channels 0 and 1 take once their header has arrived.
FORWARD_ROLES_AFTER_HEADER = (ROLE_OUT, ROLE_STATUS)


def channel_roles(forward_port: int | None) -> bytes:
    """The channel-byte → role table of a layout: exec (``None``) or port-forward."""
    return _EXEC_ROLES if forward_port is None else _FORWARD_ROLES


def check_forward_port(forward_port: object, protocol: str) -> int | None:
    """Validate the decoder's ``forward_port`` argument (None, or 1..65535 with
    the ``v4.channel.k8s.io`` protocol, the only one a kubelet forwards with
    that the codec speaks)."""
    if forward_port is None:
        return None
    if not isinstance(forward_port, int) or isinstance(forward_port, bool):
        raise ValueError(f"forward_port must be an integer 1..65535, got {forward_port!r}")
    if not 1 <= forward_port <= 0xFFFF:
        raise ValueError(f"forward_port must be an integer 1..65535, got {forward_port!r}")
    if protocol != PROTOCOL_V4:
        raise ValueError(f"port-forward speaks {PROTOCOL_V4}, not {protocol!r}")
    return forward_port


def port_header_error(channel: int, header: bytes, port: int) -> str | None:
    """None if ``header`` (a channel's first message, channel byte excluded) names
    ``port``, else the protocol error to raise."""
    if len(header) == 2 and header[0] | header[1] << 8 == port:
        return None
    return (
        f"port-forward header on channel {channel} is {header.hex() or 'empty'}, "
        f"expected port {port} as {port.to_bytes(2, 'little').hex()}"
    )


def check_protocol(protocol: str) -> str:
    """Return ``protocol`` if the codec speaks it, else raise ValueError."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unsupported exec subprotocol {protocol!r}")
    return protocol


def _exit_code(details: object) -> int | None:
    """The exit code from a NonZeroExitCode Status's ``details``, or None if absent/invalid."""
    if not isinstance(details, dict):
        return None
    causes = details.get("causes")
    if not isinstance(causes, list):
        return None
    for cause in causes:
        if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
            text = cause.get("message")
            # client-go parses this with ParseUint(s, 10, 8): plain ASCII decimal, 0..255.
            if (
                isinstance(text, str)
                and 0 < len(text) <= 3
                and text.isascii()
                and text.isdigit()
                and int(text) <= 255
            ):
                return int(text)
            return None
    return None


def decode_status(data: bytes, protocol: str = PROTOCOL_V5) -> int:
    """Turn the channel-3 message of an exec into an exit code.

    v4/v5: ``{"status":"Success"}`` gives 0; a ``NonZeroExitCode`` failure gives
    the ``ExitCode`` cause. Any other failure raises :class:`ExecError` with the
    server's message and reason. Anything undecodable (bad JSON, wrong shapes,
    too large) raises ``ExecError(..., "MalformedStatus")``; no other exception
    escapes.

    v1 (``channel.k8s.io``): the status is plain text, sent only on failure, so
    empty data gives 0 and any text raises ``ExecError(text)``.
    """
    check_protocol(protocol)
    raw = bytes(data)
    if len(raw) > DEFAULT_MAX_STATUS:
        raise ExecError(f"exec status of {len(raw)} bytes is too large", _MALFORMED)
    if protocol == PROTOCOL_V1:
        if not raw:
            return 0
        raise ExecError(raw.decode("utf-8", "replace"))
    try:
        status = json.loads(raw)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError and UnicodeDecodeError; deep nesting
        # makes the json module raise RecursionError.
        raise ExecError("exec status is not valid JSON", _MALFORMED) from None
    if not isinstance(status, dict):
        raise ExecError("exec status is not a JSON object", _MALFORMED)
    state = status.get("status")
    if state == "Success":
        return 0
    message = status.get("message", "")
    reason = status.get("reason", "")
    if not isinstance(message, str) or not isinstance(reason, str):
        raise ExecError("exec status has a non-string message or reason", _MALFORMED)
    if state != "Failure":
        raise ExecError(f"exec status has unknown status {state!r}"[:200], _MALFORMED)
    if reason == "NonZeroExitCode":
        code = _exit_code(status.get("details"))
        if code is None:
            raise ExecError(message or "exec failed without a usable exit code", _MALFORMED)
        return code
    raise ExecError(message or "exec failed", reason)


def resize_payload(width: int, height: int) -> bytes:
    """Channel-4 payload (channel byte included) for a terminal size.

    Same bytes as client-go's ``json.Encoder``: capitalised keys, trailing newline.
    """
    w = int(width) if isinstance(width, int) and not isinstance(width, bool) else -1
    h = int(height) if isinstance(height, int) and not isinstance(height, bool) else -1
    if not (0 <= w <= 0xFFFF and 0 <= h <= 0xFFFF):
        raise ValueError(f"terminal size must be two integers 0..65535, got {width!r}x{height!r}")
    return b'\x04{"Width":%d,"Height":%d}\n' % (w, h)


def control_payload(payload: bytes) -> bytes:
    """Validate a ping/pong payload (at most 125 bytes) and return it as bytes."""
    raw = bytes(payload)
    if len(raw) > 125:
        raise ValueError(f"control frame payload of {len(raw)} bytes exceeds 125")
    return raw


def close_payload(code: int, reason: str) -> bytes:
    """Close frame payload: 2-byte code and UTF-8 reason, at most 125 bytes."""
    if (
        not isinstance(code, int)
        or isinstance(code, bool)
        or not 1000 <= code <= 4999
        or code in _RESERVED_CLOSE_CODES
    ):
        raise ValueError(f"invalid close code {code!r}")
    if not isinstance(reason, str):
        raise TypeError("close reason must be a str")
    raw = int(code).to_bytes(2, "big") + reason.encode("utf-8")
    if len(raw) > 125:
        raise ValueError("close reason is too long (close payload exceeds 125 bytes)")
    return raw
