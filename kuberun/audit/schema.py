"""The audit event schema: event kinds, their fields, and a JSON Schema for them.

Every event is one JSON object with the envelope fields ``time`` (RFC 3339,
UTC, microseconds), ``event`` (the kind), ``gateway`` (the instance that wrote
it) and ``connection`` (the SSH connection id), plus the fields of its kind.
:data:`EVENT_SCHEMA` (JSON Schema 2020-12) states all of it; the README shows
one example of each kind.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ENDINGS", "EVENT_KINDS", "EVENT_SCHEMA"]

#: How a session ended (``session.ended`` field ``how``).
ENDINGS = (
    "exit",  # the program exited (or was killed by a signal)
    "client_closed",  # the client closed the channel or went away first
    "shutdown",  # the gateway stopped
    "stream_lost",  # the exec stream to the API server broke
    "failed",  # the Pod or the program could not be started
)

_STR = {"type": "string"}
_INT = {"type": "integer", "minimum": 0}
_SECONDS = {"type": "number", "minimum": 0}
_ADDRESS = {
    "type": ["object", "null"],
    "required": ["address", "port"],
    "properties": {"address": _STR, "port": {"type": "integer", "minimum": 0, "maximum": 65535}},
    "additionalProperties": False,
}
_POD = {
    "type": "object",
    "required": ["namespace", "name", "uid"],
    "properties": {"namespace": _STR, "name": _STR, "uid": _STR},
    "additionalProperties": False,
}
_SESSION_ID = {"type": ["string", "null"]}
_BYTES_STDIO = {
    "type": "object",
    "required": ["stdin", "stdout", "stderr"],
    "properties": {"stdin": _INT, "stdout": _INT, "stderr": _INT},
    "additionalProperties": False,
}

#: Fields of each event kind besides the envelope: (required fields, properties).
_KINDS: dict[str, dict[str, Any]] = {
    "connection.opened": {
        "client": _ADDRESS,
        "server": _ADDRESS,
    },
    "auth": {
        "username": _STR,
        "method": {"enum": ["publickey", "password", "keyboard-interactive", "hostbased", "none"]},
        "result": {"enum": ["success", "failure"]},
        "key": {
            "type": ["object", "null"],
            "required": ["type", "fingerprint"],
            "properties": {"type": _STR, "fingerprint": {"type": "string", "pattern": "^SHA256:"}},
            "additionalProperties": False,
        },
    },
    "pod.created": {"pod": _POD, "session": _SESSION_ID, "seconds": _SECONDS},
    "pod.reused": {"pod": _POD, "session": _SESSION_ID, "seconds": _SECONDS},
    "pod.deleted": {"pod": _POD, "seconds": _SECONDS},
    "pod.failed": {
        "pod": {"anyOf": [_POD, {"type": "null"}]},
        "session": _SESSION_ID,
        "reason": _STR,
        "message": _STR,
        "seconds": _SECONDS,
    },
    "session.opened": {
        "session": _STR,
        "kind": {"enum": ["shell", "exec", "subsystem"]},
        "command": {"type": ["string", "null"]},
        "subsystem": {"type": ["string", "null"]},
        "pty": {
            "type": ["object", "null"],
            "required": ["term", "width", "height"],
            "properties": {"term": _STR, "width": _INT, "height": _INT},
            "additionalProperties": False,
        },
        "env": {"type": "array", "items": _STR},
        "env_refused": {"type": "array", "items": _STR},
    },
    "session.signal": {
        "session": _STR,
        "signal": _STR,
        "delivered": {"type": "boolean"},
    },
    "session.ended": {
        "session": _STR,
        "how": {"enum": list(ENDINGS)},
        "exit_status": {"type": ["integer", "null"]},
        "exit_signal": {"type": ["string", "null"]},
        "bytes": _BYTES_STDIO,
        "seconds": _SECONDS,
        "window_changes": _INT,
        "recording": {
            "type": ["object", "null"],
            "required": ["format", "files", "bytes", "dropped_bytes"],
            "properties": {
                "format": {"enum": ["asciicast-v2", "raw"]},
                "files": {"type": "array", "items": _STR},
                "bytes": _INT,
                "dropped_bytes": _INT,
            },
            "additionalProperties": False,
        },
    },
    "forward.opened": {
        "forward": _STR,
        "host": _STR,
        "port": {"type": "integer", "minimum": 0, "maximum": 65535},
        "originator": _ADDRESS,
    },
    "forward.closed": {
        "forward": _STR,
        "host": _STR,
        "port": {"type": "integer", "minimum": 0, "maximum": 65535},
        "bytes": {
            "type": "object",
            "required": ["to_pod", "from_pod"],
            "properties": {"to_pod": _INT, "from_pod": _INT},
            "additionalProperties": False,
        },
        "seconds": _SECONDS,
        "reason": _STR,
    },
    "connection.closed": {
        "username": {"type": ["string", "null"]},
        "reason": _STR,
        "seconds": _SECONDS,
        "sessions": _INT,
    },
    "audit.dropped": {
        "events": _INT,
    },
}

#: Every event kind, in the order a connection meets them.
EVENT_KINDS: tuple[str, ...] = tuple(_KINDS)

_ENVELOPE = {
    "time": {
        "type": "string",
        "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$",
    },
    "gateway": _STR,
    "connection": _STR,
}


def _kind_schema(kind: str, props: dict[str, Any]) -> dict[str, Any]:
    properties = {**_ENVELOPE, "event": {"const": kind}, **props}
    return {
        "type": "object",
        "required": ["time", "event", "gateway", "connection", *props],
        "properties": properties,
        "additionalProperties": False,
    }


#: JSON Schema (2020-12) of one audit event line.
EVENT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://kuberun.invalid/schemas/audit-event.json",
    "title": "kuberun audit event",
    "type": "object",
    "required": ["event"],
    "properties": {"event": {"enum": list(EVENT_KINDS)}},
    "oneOf": [_kind_schema(kind, props) for kind, props in _KINDS.items()],
}
