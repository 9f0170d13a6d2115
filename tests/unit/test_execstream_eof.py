"""An API server that closes the connection right after the status, while kuberun has
paused reading (the SSH client is slow): every byte and the status still arrive.

A real kube-apiserver ends an exec this way (no Close handshake). The TLS layers of
asyncio and uvloop keep reading the socket while the protocol's reading is paused,
and used to see the EOF with output still buffered: uvloop then shut down at once,
asyncio after one more buffer, and the rest of the output and the status were lost
("exec stream lost" on the real cluster, about one 64 MiB download in two).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client as k8s

from kuberun.devcluster.tls import generate_certificates
from kuberun.execstream import ExecConnector, ExecResult
from kuberun.upgrade import accept_key

OUTPUT = 8 * 1024 * 1024
FRAME = 32 * 1024


def _frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes([0x82, n]) + payload
    if n < 65536:
        return bytes([0x82, 126]) + struct.pack("!H", n) + payload
    return bytes([0x82, 127]) + struct.pack("!Q", n) + payload


def _serve(listener: socket.socket, context: ssl.SSLContext, count: int) -> None:
    """A blocking TLS server in a thread: Go's way of ending, the socket closed as
    soon as the last byte is written (no TLS close_notify, no waiting for the peer)."""
    for _ in range(count):
        raw, _ = listener.accept()
        with context.wrap_socket(raw, server_side=True) as conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            key = next(
                line.split(b":", 1)[1].strip().decode()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                + accept_key(key).encode()
                + b"\r\nSec-WebSocket-Protocol: v5.channel.k8s.io\r\n\r\n"
                + _frame(b"\x01")
            )
            chunk = _frame(b"\x01" + bytes(FRAME))
            for _ in range(OUTPUT // FRAME):
                conn.sendall(chunk)
            conn.sendall(_frame(b'\x03{"metadata":{},"status":"Success"}'))
        # the with block closes the socket: FIN at once


class _SlowReader:
    """Pauses the stream near the end of the output until the server has closed:
    what is left then (less than the TLS layer's read buffer) is read by the TLS
    transport, the EOF after it too, while the protocol's reading is paused."""

    def __init__(self) -> None:
        self.stream: Any = None
        self.received = 0
        self.paused = False
        self.resumer: asyncio.Task[None] | None = None
        self.result: asyncio.Future[ExecResult] = asyncio.get_running_loop().create_future()

    def exec_stdout(self, data: memoryview) -> None:
        self.received += len(data)
        if not self.paused and self.received >= OUTPUT - 160 * 1024 and self.stream is not None:
            self.paused = True
            self.stream.pause_output()
            self.resumer = asyncio.ensure_future(self._resume_later())

    async def _resume_later(self) -> None:
        await asyncio.sleep(0.5)  # the server has written the rest and closed meanwhile
        self.stream.resume_output()

    def exec_stderr(self, data: memoryview) -> None:
        pass

    def exec_pause_input(self) -> None:
        pass

    def exec_resume_input(self) -> None:
        pass

    def exec_finished(self, result: ExecResult) -> None:
        if not self.result.done():
            self.result.set_result(result)


async def test_output_and_status_survive_a_close_while_paused(tmp_path: Path) -> None:
    certs = generate_certificates(["127.0.0.1"])
    (tmp_path / "cert.pem").write_bytes(certs.cert_pem + certs.ca_pem)
    (tmp_path / "key.pem").write_bytes(certs.key_pem)
    (tmp_path / "ca.pem").write_bytes(certs.ca_pem)
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    rounds = 3
    server = threading.Thread(target=_serve, args=(listener, server_ssl, rounds), daemon=True)
    server.start()
    conf = k8s.Configuration(host=f"https://127.0.0.1:{port}")
    conf.ssl_ca_cert = str(tmp_path / "ca.pem")
    try:
        for _ in range(rounds):
            reader = _SlowReader()
            stream = await ExecConnector(conf).open(
                "ns", "pod", "c", ["cat"], reader, stdin=False, timeout=10
            )
            reader.stream = stream
            result = await asyncio.wait_for(reader.result, 30)
            assert reader.paused
            assert result.error is None, result.error
            assert (result.exit_status, reader.received) == (0, OUTPUT)
    finally:
        listener.close()
        await asyncio.get_running_loop().run_in_executor(None, server.join, 10)
