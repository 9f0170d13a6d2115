"""The HTTP/1.1 WebSocket upgrade for Kubernetes exec and port-forward: request builders
and response parser.

Pure functions, no I/O, so the parser can be fuzzed and unit-tested on its own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

from .errors import CommandStartError

__all__ = [
    "MAX_HEAD",
    "PORTFORWARD_SUBPROTOCOLS",
    "SUBPROTOCOLS",
    "UpgradeResponse",
    "accept_key",
    "build_request",
    "error_message",
    "exec_path",
    "new_key",
    "parse_response_head",
    "portforward_path",
]

#: Offered in one header, most capable first: v5 can deliver stdin EOF, v4 cannot.
SUBPROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")

#: Port-forward over WebSocket has one binary protocol (the kubelet takes no v5).
PORTFORWARD_SUBPROTOCOLS = ("v4.channel.k8s.io",)

#: Upper bound on the response head; a real API server sends a few hundred bytes.
MAX_HEAD = 64 * 1024

#: Longest API server explanation quoted in an error message.
MAX_MESSAGE = 1024

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass
class UpgradeResponse:
    """A parsed HTTP response head (status line and headers, names lower-cased)."""

    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")

    def content_length(self) -> int | None:
        """The ``Content-Length`` as an int; None when absent or not plain ASCII
        decimal (``str.isdigit`` alone accepts ``"²"``, which ``int`` rejects)."""
        value = self.header("content-length")
        if not value or len(value) > 18 or not (value.isascii() and value.isdigit()):
            return None
        return int(value)


def new_key() -> str:
    """A fresh ``Sec-WebSocket-Key`` (16 random bytes, base64)."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer ``key`` with (RFC 6455 §4.2.2)."""
    digest = hashlib.sha1(key.encode("ascii") + _WS_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def exec_path(
    prefix: str,
    namespace: str,
    pod: str,
    container: str,
    command: Sequence[str],
    *,
    stdin: bool,
    tty: bool,
) -> str:
    """The request target of a Pod exec, as kubectl builds it (false flags omitted)."""
    query: list[tuple[str, str]] = [("command", arg) for arg in command]
    query.append(("container", container))
    if stdin:
        query.append(("stdin", "true"))
    query.append(("stdout", "true"))
    if not tty:
        # With a tty the runtime merges stderr into the terminal; asking for
        # it is an error on a real API server.
        query.append(("stderr", "true"))
    else:
        query.append(("tty", "true"))
    base = prefix.rstrip("/")
    return (
        f"{base}/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(pod, safe='')}/exec?"
        + urlencode(query, quote_via=quote)
    )


def portforward_path(prefix: str, namespace: str, pod: str, port: int) -> str:
    """The request target of a port-forward to one port of a Pod."""
    base = prefix.rstrip("/")
    return (
        f"{base}/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(pod, safe='')}"
        f"/portforward?ports={int(port)}"
    )


def build_request(
    host_header: str,
    target: str,
    key: str,
    headers: Mapping[str, str] | None = None,
    subprotocols: Sequence[str] = SUBPROTOCOLS,
) -> bytes:
    """The complete upgrade request. ``headers`` carries Authorization and the like."""
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host_header}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        f"Sec-WebSocket-Protocol: {', '.join(subprotocols)}",
        "User-Agent: kuberun",
    ]
    for name, value in (headers or {}).items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise CommandStartError(f"header {name!r} contains a line break")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_response_head(head: bytes) -> UpgradeResponse:
    """Parse an HTTP/1.1 response head (without the final blank line).

    Raises :class:`CommandStartError` for anything that is not a well-formed
    HTTP/1.x response head; never another exception.
    """
    if len(head) > MAX_HEAD:
        raise CommandStartError("API server sent an oversized HTTP response head")
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes anything
        raise CommandStartError(f"undecodable HTTP response: {exc}")
    lines = text.split("\r\n")
    status_line = lines[0]
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise CommandStartError(f"API server sent a malformed status line: {status_line[:80]!r}")
    code = parts[1]
    if len(code) != 3 or not (code.isascii() and code.isdigit()):
        raise CommandStartError(f"API server sent a malformed status code: {code[:20]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t"):
            raise CommandStartError(f"API server sent a malformed header line: {line[:80]!r}")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return UpgradeResponse(int(code), parts[2] if len(parts) > 2 else "", headers)


def error_message(
    response: UpgradeResponse,
    body: bytes,
    what: str = "exec",
    subprotocols: Sequence[str] = SUBPROTOCOLS,
) -> str:
    """A human message for a refused upgrade, from the ``metav1.Status`` body when there is one.

    ``what`` names the request (``exec``, ``port forward``)."""
    text = ""
    if body:
        try:
            decoded = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            decoded = None
        if isinstance(decoded, dict) and decoded.get("message"):
            text = str(decoded["message"])[:MAX_MESSAGE]
        else:
            text = body[:512].decode("utf-8", errors="replace").strip()
    if not text:
        if response.status == 403:
            text = f"the API server accepts none of the offered {what} subprotocols " + ", ".join(
                subprotocols
            )
        else:
            text = response.reason or "no details"
    return f"{what} refused by the API server ({response.status}): {text[:MAX_MESSAGE]}"
