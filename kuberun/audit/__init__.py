"""Audit trail and session recordings.

With ``audit.directory`` set, the gateway writes JSON-lines events there
(connections, auth results, Pods, sessions, signals, forwards; the schema is
:data:`EVENT_SCHEMA`, with examples in the README) and records sessions
(``audit.recordings``): asciicast v2 for pty sessions, raw byte streams for
the others. Disk writes happen in one background thread, never on the event
loop; the relay only copies output into bounded chunks.

An embedding server can send the events elsewhere with its own sink::

    class Shipper:
        def emit(self, event: dict) -> None:      # on the event loop; must not block
            queue.put_nowait(event)

    gateway = kuberun.Gateway(config, api_client, audit=Shipper())

A plain callable taking the event dict works too.
"""

from .recording import CastRecording, RawRecording, Recording, recording_stem
from .schema import ENDINGS, EVENT_KINDS, EVENT_SCHEMA
from .sshauth import key_identity, watch_auth
from .trail import (
    Audit,
    AuditSink,
    ConnectionAudit,
    ForwardAudit,
    PodAudit,
    SessionAudit,
    utc_timestamp,
)
from .writer import AuditWriter, check_directory

__all__ = [
    "ENDINGS",
    "EVENT_KINDS",
    "EVENT_SCHEMA",
    "Audit",
    "AuditSink",
    "AuditWriter",
    "CastRecording",
    "ConnectionAudit",
    "ForwardAudit",
    "PodAudit",
    "RawRecording",
    "Recording",
    "SessionAudit",
    "check_directory",
    "key_identity",
    "recording_stem",
    "utc_timestamp",
    "watch_auth",
]
