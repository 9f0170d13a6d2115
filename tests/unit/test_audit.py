"""The audit trail without a gateway: config, the schema, the writer
thread (rotation, errors, a stalled disk), sinks, and both recording formats."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from kuberun import cli
from kuberun.audit import EVENT_SCHEMA, Audit, recording, writer
from kuberun.audit.directio import AppendFile, aligned_buffer
from kuberun.audit.recording import CastRecording, RawRecording
from kuberun.audit.writer import AuditWriter, check_directory
from kuberun.config import AuditConfig, config_from_dict
from kuberun.errors import ConfigError, ExecStreamLost, PodStartError
from kuberun.metrics import Metrics

VALIDATOR = jsonschema.Draft202012Validator(EVENT_SCHEMA)


def events_in(directory: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(directory.glob("events-*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines()]
    return out


async def settle(audit: Audit) -> None:
    """Wait until the writer thread has written everything queued so far."""
    assert audit.writer is not None
    w = audit.writer
    for _ in range(500):
        with w._cond:
            if not w._jobs and w.queued_bytes == 0 and w._queued_events == 0:
                break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.02)


# -- configuration --------------------------------------------------------------


def test_audit_config_defaults_and_errors() -> None:
    assert config_from_dict({}).audit == AuditConfig(None, "pty", False, "drop")
    cfg = config_from_dict(
        {
            "audit": {
                "directory": "/a",
                "recordings": "all",
                "record_input": True,
                "on_overflow": "block",
            }
        }
    )
    assert cfg.audit == AuditConfig("/a", "all", True, "block")
    for data, path in [
        ({"recordings": "everything"}, "audit.recordings"),
        ({"on_overflow": "wait"}, "audit.on_overflow"),
        ({"record_input": "yes"}, "audit.record_input"),
        ({"directory": ""}, "audit.directory"),
        ({"directory": 5}, "audit.directory"),
        ({"recording": "pty"}, "audit.recording"),
    ]:
        with pytest.raises(ConfigError) as info:
            config_from_dict({"audit": data})
        assert info.value.path == path, info.value


def test_check_refuses_an_unwritable_directory(tmp_path: Path, capsys: Any) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = tmp_path / "config.yaml"
    config.write_text(f"audit:\n  directory: {blocker / 'audit'}\n")
    assert cli.main(["check", "--config", str(config)]) == 2
    assert "audit.directory: cannot create" in capsys.readouterr().err
    assert check_directory(tmp_path / "ok") is None
    assert (tmp_path / "ok").is_dir() and not list((tmp_path / "ok").iterdir())


# -- the events file --------------------------------------------------------------


class Ref:
    namespace, name, uid = "default", "kuberun-abc", "u-1"


class Stream:
    stdin_bytes, stdout_bytes, stderr_bytes = 3, 10, 2


async def test_events_from_every_helper_validate(tmp_path: Path) -> None:
    metrics = Metrics()
    audit = Audit(AuditConfig(str(tmp_path)), instance="gw", metrics=metrics)
    conn = audit.connection("c1")
    conn.opened(("192.0.2.1", 5000), ("10.0.0.1", 22))
    conn.auth("alice", "password", False)
    conn.auth("alice", "publickey", True, ("ssh-ed25519", "SHA256:abc"))
    pods = conn.pods("s1")
    pods.created(Ref, 1.5)
    pods.reused(Ref, "s2")
    pods.failed("ErrImagePull", "no such image", 2.0)
    pods.failed("Cancelled", "no longer wanted", 0.1, Ref)
    session = conn.session("s1")
    session.opened(
        "subsystem sftp", ["/usr/lib/sftp-server"], None, None, {"LANG": "C", "X-Y": "1"}, ["LANG"]
    )
    session.signal("TERM", True)
    session.resized(100, 30)
    session.ending_with(ExecStreamLost("gone"))
    session.ending("shutdown")  # the first word stays
    session.exit(252, None)
    session.ended(Stream())
    other = conn.session("s2")
    other.ending_with(PodStartError("no", "ErrImagePull"))
    other.ended(None)
    forward = conn.forward("localhost", 8080, ("127.0.0.1", 4000))
    forward.closed(10, 20, "client closed")
    pods.deleted(Ref, 0.5)
    conn.closed("client disconnected")
    conn.closed("twice")  # once only
    await audit.close()
    events = events_in(tmp_path)
    for event in events:
        VALIDATOR.validate(event)
    assert [e["event"] for e in events] == [
        "connection.opened",
        "auth",
        "auth",
        "pod.created",
        "pod.reused",
        "pod.failed",
        "pod.failed",
        "session.opened",
        "session.signal",
        "session.ended",
        "session.ended",
        "forward.opened",
        "forward.closed",
        "pod.deleted",
        "connection.closed",
    ]
    opened = events[7]
    assert (opened["kind"], opened["subsystem"], opened["command"]) == ("subsystem", "sftp", None)
    assert (opened["env"], opened["env_refused"]) == (["LANG"], ["X-Y"])
    ended = events[9]
    assert ended["how"] == "stream_lost" and ended["window_changes"] == 1
    assert ended["bytes"] == {"stdin": 3, "stdout": 10, "stderr": 2}
    assert events[10]["how"] == "failed"
    assert events[-1]["username"] == "alice" and events[-1]["sessions"] == 2
    assert {e["gateway"] for e in events} == {"gw"}
    assert metrics.audit_events.labels(event="auth")._value.get() == 2


async def test_events_file_rotates_by_size(tmp_path: Path) -> None:
    audit = Audit(AuditConfig(str(tmp_path)), instance="gw", max_file_bytes=2000)
    conn = audit.connection("c1")
    for i in range(60):
        conn.closed(f"reason {i}")
        conn._closed = False
        if i % 10 == 0:
            await settle(audit)
    await audit.close()
    files = sorted(tmp_path.glob("events-*.jsonl"))
    assert len(files) >= 3
    assert all(f.stat().st_size < 2000 + 400 for f in files)
    reasons = [e["reason"] for e in events_in(tmp_path)]
    assert sorted(reasons, key=lambda r: int(r.split()[1])) == [f"reason {i}" for i in range(60)]


async def test_unwritable_directory_is_counted_not_fatal(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    metrics = Metrics()
    audit = Audit(AuditConfig(str(blocker / "audit")), instance="gw", metrics=metrics)
    conn = audit.connection("c1")
    conn.closed("x")
    await settle(audit)
    assert metrics.audit_write_errors._value.get() >= 2  # the start-up check and the write
    # The disk comes back: events resume.
    blocker.unlink()
    conn._closed = False
    conn.closed("after")
    await audit.close()
    assert [e["reason"] for e in events_in(blocker / "audit")] == ["after"]


async def test_a_full_event_queue_drops_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "MAX_QUEUED_EVENTS", 5)
    metrics = Metrics()
    audit = Audit(AuditConfig(str(tmp_path)), instance="gw", metrics=metrics)
    assert audit.writer is not None
    gate = threading.Event()
    original = audit.writer._write_events

    def stalled(lines: list[bytes]) -> None:
        gate.wait()
        original(lines)

    audit.writer._write_events = stalled  # type: ignore[method-assign]
    conn = audit.connection("c1")
    conn.closed("first")  # the thread takes it and waits at the gate
    await asyncio.sleep(0.1)
    for i in range(20):
        conn._closed = False
        conn.closed(f"r{i}")
    gate.set()
    await audit.close()
    events = events_in(tmp_path)
    dropped = [e for e in events if e["event"] == "audit.dropped"]
    assert dropped and dropped[0]["events"] == 15
    VALIDATOR.validate(dropped[0])
    assert len(events) == 1 + 5 + 1
    assert metrics.audit_write_errors._value.get() == 15


async def test_sinks_receive_events_instead_of_files(tmp_path: Path) -> None:
    got: list[dict[str, Any]] = []
    audit = Audit(AuditConfig(), instance="gw", sink=got.append)
    audit.connection("c1").closed("bye")
    assert [e["event"] for e in got] == ["connection.closed"] and got[0]["gateway"] == "gw"

    class Sink:
        def __init__(self) -> None:
            self.events: list[dict[str, Any]] = []
            self.closed = False

        def emit(self, event: dict[str, Any]) -> None:
            if event["event"] == "auth":
                raise RuntimeError("shipper down")
            self.events.append(event)

        async def close(self) -> None:
            self.closed = True

    sink, metrics = Sink(), Metrics()
    audit = Audit(AuditConfig(), sink=sink, metrics=metrics)
    conn = audit.connection("c2")
    conn.auth("bob", "password", True)  # the sink fails: counted, not raised
    conn.closed("bye")
    await audit.close()
    assert [e["event"] for e in sink.events] == ["connection.closed"] and sink.closed
    assert metrics.audit_write_errors._value.get() == 1
    assert not list(tmp_path.iterdir())


def test_a_disabled_audit_does_nothing() -> None:
    audit = Audit.disabled()
    assert not audit.enabled and audit.writer is None and audit.recordings == "none"
    session = audit.connection("c").session("s1")
    session.opened("shell", ["/bin/sh"], "xterm", (80, 24), {}, [])
    assert session.record("shell", [], "xterm", (80, 24), on_full=print, on_drained=print) is None


# -- recordings -------------------------------------------------------------------


class Sinks:
    def __init__(self) -> None:
        self.out = bytearray()
        self.full = 0
        self.drained = 0

    def write(self, data: memoryview) -> None:
        self.out += data

    def on_full(self) -> None:
        self.full += 1

    def on_drained(self) -> None:
        self.drained += 1


async def test_cast_recording_keeps_split_characters_and_resizes(tmp_path: Path) -> None:
    metrics = Metrics()
    audit = Audit(AuditConfig(str(tmp_path), record_input=True), metrics=metrics)
    assert audit.writer is not None
    sinks = Sinks()
    rec = CastRecording(
        audit.writer,
        "c1.s1",
        width=120,
        height=40,
        term="xterm-256color",
        command="top",
        block=False,
        on_full=sinks.on_full,
        on_drained=sinks.on_drained,
    )
    rec.write_stdout = sinks.write
    text = "naïve café ✓ \x1b[1mbold\x1b[0m 😀\r\n".encode()
    # Cut in the middle of every multi-byte character.
    for i in range(0, len(text), 3):
        rec.stdout(memoryview(text[i : i + 3]))
    rec.resize(100, 30)
    rec.stdin(b"q")
    rec.stdout(memoryview(b"\xff end"))  # not UTF-8: U+FFFD, as asciinema does
    rec.close()
    await audit.close()
    assert bytes(sinks.out) == text + b"\xff end"
    lines = (tmp_path / "c1.s1.cast").read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2 and (header["width"], header["height"]) == (120, 40)
    assert header["env"] == {"TERM": "xterm-256color"} and header["command"] == "top"
    assert isinstance(header["timestamp"], int)
    events = [json.loads(line) for line in lines[1:]]
    assert all(len(e) == 3 and isinstance(e[0], float) for e in events)
    output = "".join(e[2] for e in events if e[1] == "o")
    assert output == text.decode() + "\ufffd end"
    assert ["r", "100x30"] in [e[1:] for e in events]
    assert ["i", "q"] in [e[1:] for e in events]
    times = [e[0] for e in events]
    assert times == sorted(times)
    assert rec.summary() == {
        "format": "asciicast-v2",
        "files": ["c1.s1.cast"],
        "bytes": len(text) + 5 + 1,
        "dropped_bytes": 0,
    }
    assert metrics.audit_recorded_bytes._value.get() == len(text) + 5 + 1


async def test_raw_recording_is_byte_exact_per_stream(tmp_path: Path) -> None:
    audit = Audit(AuditConfig(str(tmp_path), recordings="all"))
    assert audit.writer is not None
    sinks = Sinks()
    rec = RawRecording(
        audit.writer, "c1.s2", block=False, on_full=sinks.on_full, on_drained=sinks.on_drained
    )
    rec.write_stdout = sinks.write
    data = os.urandom(3 * writer.CHUNK + 1234)
    for i in range(0, len(data), 40000):
        rec.stdout(memoryview(data[i : i + 40000]))
    rec.stderr(memoryview(b"warning\n"))
    rec.close()
    await audit.close()
    assert (tmp_path / "c1.s2.stdout").read_bytes() == data == bytes(sinks.out)
    assert (tmp_path / "c1.s2.stderr").read_bytes() == b"warning\n"
    assert not (tmp_path / "c1.s2.stdin").exists()
    assert rec.files == ["c1.s2.stdout", "c1.s2.stderr"]


async def test_partial_chunks_are_written_after_a_short_delay(tmp_path: Path) -> None:
    audit = Audit(AuditConfig(str(tmp_path), recordings="all"))
    assert audit.writer is not None
    rec = RawRecording(audit.writer, "c.s", block=False, on_full=print, on_drained=print)
    rec.stdout(memoryview(b"prompt$ "))
    await asyncio.sleep(recording.FLUSH_DELAY + 0.3)
    assert (tmp_path / "c.s.stdout").read_bytes() == b"prompt$ "
    rec.close()
    await audit.close()


class Stall:
    """Holds the writer thread inside its next recording write until released."""

    def __init__(self, w: AuditWriter) -> None:
        self.gate = threading.Event()
        self.original = w._write_recording
        w._write_recording = self.write  # type: ignore[method-assign,assignment]

    def write(self, rec: Any, chunks: list[Any], nbytes: int, finish: bool) -> None:
        self.gate.wait()
        self.original(rec, chunks, nbytes, finish)


async def test_drop_when_the_disk_is_behind_and_mark_the_gap(tmp_path: Path) -> None:
    metrics = Metrics()
    audit = Audit(AuditConfig(str(tmp_path)), metrics=metrics)
    assert audit.writer is not None
    stall = Stall(audit.writer)
    sinks = Sinks()
    rec = CastRecording(
        audit.writer,
        "c.s",
        width=80,
        height=24,
        term="xterm",
        command=None,
        block=False,
        on_full=sinks.on_full,
        on_drained=sinks.on_drained,
    )
    rec.write_stdout = sinks.write
    frame = b"x" * 65536
    total = 10 * recording.MAX_QUEUED
    for _ in range(total // len(frame)):
        rec.stdout(memoryview(frame))
    assert len(sinks.out) == total  # the client got everything, at once
    assert rec.dropped >= total - recording.MAX_QUEUED
    assert rec.bytes + rec.dropped == total
    assert sinks.full == 0
    stall.gate.set()
    await settle(audit)
    rec.stdout(memoryview(b"after the gap"))
    rec.close()
    await audit.close()
    events = [json.loads(line) for line in (tmp_path / "c.s.cast").read_text().splitlines()[1:]]
    markers = [e for e in events if e[1] == "m"]
    assert len(markers) == 1 and str(rec.dropped) in markers[0][2]
    recorded = "".join(e[2] for e in events if e[1] == "o")
    assert len(recorded) == rec.bytes and recorded.endswith("after the gap")
    assert metrics.audit_dropped_bytes._value.get() == rec.dropped


async def test_block_pauses_the_session_until_the_writer_catches_up(tmp_path: Path) -> None:
    audit = Audit(AuditConfig(str(tmp_path), recordings="all", on_overflow="block"))
    assert audit.writer is not None
    stall = Stall(audit.writer)
    sinks = Sinks()
    rec = RawRecording(
        audit.writer, "c.s", block=True, on_full=sinks.on_full, on_drained=sinks.on_drained
    )
    rec.write_stdout = sinks.write
    frame = os.urandom(65536)
    sent = 0
    while not sinks.full:
        rec.stdout(memoryview(frame))
        sent += len(frame)
    assert sinks.full == 1 and rec.blocked
    assert sent <= recording.MAX_QUEUED + len(frame)
    # A paused stream may still deliver what it had read: taken, not dropped.
    rec.stdout(memoryview(frame))
    sent += len(frame)
    stall.gate.set()
    for _ in range(300):
        if sinks.drained:
            break
        await asyncio.sleep(0.01)
    assert sinks.drained == 1 and not rec.blocked
    rec.close()
    await audit.close()
    assert rec.dropped == 0
    assert (tmp_path / "c.s.stdout").read_bytes() == bytes(sinks.out)
    assert len(sinks.out) == sent


# -- direct writes ------------------------------------------------------------------


def _pieces(rng: random.Random, expect: bytearray) -> list[memoryview]:
    """Either full aligned buffers (maybe with a short last one), or one odd piece."""
    pieces = []
    if rng.random() < 0.5:
        for _ in range(rng.randint(1, 4)):
            buf = aligned_buffer(1 << 16)
            last = rng.random() < 0.3
            n = rng.randint(1, 1 << 16) if last else 1 << 16
            data = rng.randbytes(n)
            buf[:n] = data
            pieces.append(buf[:n])
            expect += data
            if last:
                break
    else:
        data = rng.randbytes(rng.randint(1, 9000))
        pieces.append(memoryview(data))
        expect += data
    return pieces


@pytest.mark.parametrize("direct", [True, False])
def test_append_file_holds_every_byte_after_every_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    if not direct:
        monkeypatch.delattr(os, "O_DIRECT")
    rng = random.Random(7)
    path = tmp_path / "out.bin"
    f = AppendFile(path)
    assert f.direct is direct
    expect = bytearray()
    for _ in range(120):
        f.write(_pieces(rng, expect))
        assert path.read_bytes() == expect
        assert f.size == len(expect)
    f.close()
    assert path.read_bytes() == expect


def test_append_file_goes_on_without_direct_writes_when_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(8)
    path = tmp_path / "out.bin"
    f = AppendFile(path)
    expect = bytearray()
    for _ in range(10):
        f.write(_pieces(rng, expect))

    def refuse(*args: Any) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(f, "_write_direct", refuse)
    for _ in range(10):
        f.write(_pieces(rng, expect))
    assert not f.direct
    f.close()
    assert path.read_bytes() == expect


async def test_raw_recording_after_a_partial_chunk_stays_exact(tmp_path: Path) -> None:
    """A partial chunk (the timer) leaves later full chunks unaligned in the file."""
    audit = Audit(AuditConfig(str(tmp_path), recordings="all"))
    assert audit.writer is not None
    rec = RawRecording(audit.writer, "c.s", block=True, on_full=print, on_drained=print)
    rec.stdout(memoryview(b"x" * 1000))
    await asyncio.sleep(recording.FLUSH_DELAY + 0.3)  # handed over: 1000 bytes
    data = os.urandom(3 * writer.CHUNK + 5)
    for i in range(0, len(data), 65536):
        rec.stdout(memoryview(data[i : i + 65536]))
        await asyncio.sleep(0)
    rec.close()
    await audit.close()
    assert (tmp_path / "c.s.stdout").read_bytes() == b"x" * 1000 + data
