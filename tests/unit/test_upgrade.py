"""The exec upgrade request builder and response parser."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kuberun.errors import CommandStartError
from kuberun.upgrade import (
    SUBPROTOCOLS,
    accept_key,
    build_request,
    error_message,
    exec_path,
    parse_response_head,
)


def test_accept_key_rfc6455_example() -> None:
    # RFC 6455 §1.3
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_exec_path_like_kubectl() -> None:
    path = exec_path(
        "", "ns", "pod-1", "shell", ["/bin/sh", "-c", "echo a b&c"], stdin=True, tty=False
    )
    assert path == (
        "/api/v1/namespaces/ns/pods/pod-1/exec?command=%2Fbin%2Fsh&command=-c&"
        "command=echo%20a%20b%26c&container=shell&stdin=true&stdout=true&stderr=true"
    )


def test_exec_path_tty_drops_stderr_and_keeps_prefix() -> None:
    path = exec_path("/proxy/", "ns", "p", "c", ["sh"], stdin=False, tty=True)
    assert path.startswith("/proxy/api/v1/namespaces/ns/pods/p/exec?")
    assert "stderr" not in path and "tty=true" in path and "stdin" not in path


def test_request_offers_v5_then_v4_in_one_header() -> None:
    req = build_request("example:6443", "/x", "a2V5", {"Authorization": "Bearer t"})
    lines = req.decode().split("\r\n")
    assert lines[0] == "GET /x HTTP/1.1"
    protos = [line for line in lines if line.startswith("Sec-WebSocket-Protocol:")]
    assert protos == ["Sec-WebSocket-Protocol: " + ", ".join(SUBPROTOCOLS)]
    assert SUBPROTOCOLS[0] == "v5.channel.k8s.io"
    assert "Authorization: Bearer t" in lines
    assert req.endswith(b"\r\n\r\n")


def test_request_rejects_header_injection() -> None:
    with pytest.raises(CommandStartError):
        build_request("h", "/x", "k", {"Authorization": "Bearer t\r\nX-Evil: 1"})


def test_parse_101() -> None:
    key = base64.b64encode(b"0123456789abcdef").decode()
    accept = base64.b64encode(
        hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    ).decode()
    head = (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: v5.channel.k8s.io"
    ).encode()
    resp = parse_response_head(head)
    assert resp.status == 101
    assert resp.header("Sec-WebSocket-Protocol") == "v5.channel.k8s.io"
    assert resp.header("sec-websocket-accept") == accept_key(key)


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"garbage",
        b"HTTP/1.1 1O1 x",
        b"HTTP/2 101 x",
        b"HTTP/1.1 101 ok\r\nno colon",
        b"HTTP/1.1 101 ok\r\nbad name: x",
        b"HTTP/1.1 101 ok\r\n: empty",
    ],
)
def test_parse_rejects_malformed(head: bytes) -> None:
    with pytest.raises(CommandStartError):
        parse_response_head(head)


@given(st.binary(max_size=512))
def test_parse_never_raises_anything_else(head: bytes) -> None:
    try:
        parse_response_head(head)
    except CommandStartError:
        pass


def test_error_message_from_status_body() -> None:
    resp = parse_response_head(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json")
    body = b'{"kind":"Status","status":"Failure","message":"pods \\"x\\" not found","code":404}\n'
    assert error_message(resp, body) == 'exec refused by the API server (404): pods "x" not found'


def test_error_message_for_subprotocol_refusal() -> None:
    resp = parse_response_head(b"HTTP/1.1 403 Forbidden")
    assert "v5.channel.k8s.io" in error_message(resp, b"")


def test_error_message_plain_text() -> None:
    resp = parse_response_head(b"HTTP/1.1 500 Internal Server Error")
    assert error_message(resp, b'container not found ("x")').endswith('container not found ("x")')
