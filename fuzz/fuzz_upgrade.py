#!/usr/bin/env python3
"""Fuzzing of the exec upgrade's response side with atheris: the HTTP response head
parser (``kuberun.upgrade.parse_response_head``, ``error_message``,
``UpgradeResponse.content_length``) and the handshake of ``ExecStream`` itself.

The API server (or anything pretending to be it) controls every byte of the
answer to kuberun's upgrade request. Properties checked for any input:

* ``parse_response_head`` returns a response with a three-digit status and
  lower-case, whitespace-free header names, or raises ``CommandStartError``; a
  parsed head printed back parses to the same response;
* ``content_length`` is None or a plain non-negative int; ``error_message`` is a
  bounded ``str`` naming the status;
* fed to an ``ExecStream`` in fuzzer-chosen pieces, then closed, the answer ends
  the open exactly once, with success (a 101 with the right accept key and a
  known subprotocol) or a ``CommandStartError``, and no exception escapes the
  protocol callbacks (an escaping one would reach the event loop's exception
  handler and leave the open hanging until its timeout).

Half of the inputs are structured: status line, headers (including a correct
``Sec-WebSocket-Accept``, which a fuzzer cannot guess) and body are chosen from
the fuzzer's bytes.

    python fuzz/fuzz_upgrade.py -max_total_time=15
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import atheris

import kuberun  # noqa: F401  (the package uninstrumented; the modules below instrumented)
from kuberun.errors import CommandStartError, KuberunError

# Re-import both modules under instrumentation (import_module, not "from kuberun
# import ...", which would hand back the package's uninstrumented attributes);
# upgrade first, so execstream's "from .upgrade import" gets the instrumented one.
for _name in ("kuberun.upgrade", "kuberun.execstream"):
    sys.modules.pop(_name, None)
with atheris.instrument_imports(include=["kuberun.upgrade", "kuberun.execstream"]):
    upgrade = importlib.import_module("kuberun.upgrade")
    execstream = importlib.import_module("kuberun.execstream")

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = upgrade.accept_key(KEY)
MAX_MESSAGE = upgrade.MAX_MESSAGE

_STATUS_LINES = (
    b"HTTP/1.1 101 Switching Protocols",
    b"HTTP/1.1 403 Forbidden",
    b"HTTP/1.1 500 Internal Server Error",
    b"HTTP/1.0 429",
    b"HTTP/1.1 200 OK",
    b"HTTP/2 101 x",
    b"HTTP/1.1 1O1 x",
    b"HTTP/1.1 \xb2\xb2\xb2 x",
    b"ICY 200 OK",
)
_NAMES = (
    b"Upgrade",
    b"Connection",
    b"Sec-WebSocket-Accept",
    b"Sec-WebSocket-Protocol",
    b"Content-Length",
    b"Retry-After",
    b"Content-Type",
    b"X",
)
_VALUES = (
    b"websocket",
    b"Upgrade",
    ACCEPT.encode(),
    b"v5.channel.k8s.io",
    b"v4.channel.k8s.io",
    b"channel.k8s.io",
    b"0",
    b"17",
    b"\xb2",
    b"9" * 30,
    b'{"message":"m"}',
    b"",
)


def structured(fdp: atheris.FuzzedDataProvider) -> bytes:
    lines = [fdp.PickValueInList(list(_STATUS_LINES))]
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        name = fdp.PickValueInList(list(_NAMES)) if fdp.ConsumeBool() else fdp.ConsumeBytes(6)
        value = fdp.PickValueInList(list(_VALUES)) if fdp.ConsumeBool() else fdp.ConsumeBytes(12)
        sep = (b": ", b":", b" : ", b":\t")[fdp.ConsumeIntInRange(0, 3)]
        lines.append(name + sep + value)
    head = b"\r\n".join(lines)
    end = b"\r\n\r\n" if fdp.ConsumeIntInRange(0, 7) else b"\r\n"
    body = bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300)))
    if fdp.ConsumeBool():  # a server frame right behind a 101
        body = b"\x82\x03\x01ok" + body
    return head + end + body


def check_parser(head: bytes) -> None:
    try:
        response = upgrade.parse_response_head(head)
    except CommandStartError as exc:
        assert str(exc)
        return
    assert 100 <= response.status <= 999
    for name in response.headers:
        assert name == name.lower() and name and not any(c in name for c in " \t:")
    length = response.content_length()
    assert length is None or (type(length) is int and length >= 0)
    assert response.header("X-NOPE") == ""
    for body in (b"", head[:600], b'{"message": "' + head[:100].replace(b'"', b"") + b'"}'):
        message = upgrade.error_message(response, body)
        assert message.startswith(f"exec refused by the API server ({response.status}): ")
        assert len(message) <= 64 + MAX_MESSAGE
    # Printed back (duplicate headers merged), the head parses to the same thing
    # (but for the blanks around merged values: "a, " when the last one was empty).
    printed = f"HTTP/1.1 {response.status} {response.reason}".encode("latin-1")
    for name, value in response.headers.items():
        printed += f"\r\n{name}: {value}".encode("latin-1")
    again = upgrade.parse_response_head(printed)
    stripped = {name: value.strip() for name, value in response.headers.items()}
    assert (again.status, again.headers) == (response.status, stripped), (head, printed)


class Listener:
    def __init__(self) -> None:
        self.out = bytearray()
        self.results: list[Any] = []
        self.exec_stdout = self.out.extend
        self.exec_stderr = self.out.extend

    def exec_pause_input(self) -> None:
        pass

    def exec_resume_input(self) -> None:
        pass

    def exec_finished(self, result: Any) -> None:
        self.results.append(result)


class Transport:
    """Just enough of a transport for ExecStream."""

    def __init__(self) -> None:
        self.closed = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        assert isinstance(data, (bytes, bytearray, memoryview))

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default  # plain bytes, no TLS object to look into

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def handshake(stream_bytes: bytes, cuts: list[int]) -> None:
    listener = Listener()
    proto = execstream.ExecStream(listener, KEY, 0)
    transport = Transport()
    proto.connection_made(transport)
    pos = 0
    pieces = [c for c in cuts if c > 0] + [len(stream_bytes)]
    for cut in pieces:
        chunk = stream_bytes[pos : pos + cut]
        pos += len(chunk)
        while chunk and not transport.closed:
            buf = proto.get_buffer(-1)
            n = min(len(buf), len(chunk))
            assert n > 0, "get_buffer returned an empty buffer"
            buf[:n] = chunk[:n]
            proto.buffer_updated(n)  # must not raise, whatever the bytes
            chunk = chunk[n:]
        if pos >= len(stream_bytes) or transport.closed:
            break
    await asyncio.sleep(0)  # deferred writes and closes
    proto.connection_lost(None)
    await asyncio.sleep(0)
    upgraded = proto._upgraded
    assert upgraded.done(), "the open would hang until its timeout"
    if upgraded.exception() is not None:
        assert isinstance(upgraded.exception(), CommandStartError), upgraded.exception()
        assert not listener.results
    else:
        assert proto.protocol in upgrade.SUBPROTOCOLS
        # After the upgrade the stream always ends with one result.
        assert len(listener.results) == 1, listener.results
        error = listener.results[0].error
        assert error is None or isinstance(error, KuberunError)


LOOP = asyncio.new_event_loop()


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    cuts = [fdp.ConsumeIntInRange(0, 300) for _ in range(fdp.ConsumeIntInRange(0, 6))]
    use_structure = fdp.ConsumeBool()
    raw = structured(fdp) if use_structure else bytes(fdp.ConsumeBytes(fdp.remaining_bytes()))
    head, sep, _ = raw.partition(b"\r\n\r\n")
    check_parser(head if sep else raw[: upgrade.MAX_HEAD])
    LOOP.run_until_complete(handshake(raw, cuts))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
