"""devcluster's pods/portforward judged by the official ``kubernetes`` Python client
(``kubernetes.stream.portforward``, WebSocket ``v4.channel.k8s.io``).

The client is strict: the first message on every channel must be exactly the
3-byte port header, any opcode but binary/ping/pong/close is an error, and text
on an error channel closes that port's socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import portforward

from kuberun.devcluster import DevCluster

from .conftest import pod_manifest
from .test_python_client import _api, _wait_running

# An echo server, run as the Pod's process (devcluster Pods share the host's network):
# echoes each connection until EOF, then closes it.
ECHO_SERVER = """
import socket, sys, threading
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
def serve(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _recv_exactly(sock: Any, n: int, timeout: float = 30) -> bytes:
    sock.settimeout(timeout)
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(65536, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def _portforward(kubeconfig: Path) -> None:
    api = _api(kubeconfig)
    port, other, closed = free_port(), free_port(), free_port()
    for name, p in (("py-pf", port), ("py-pf2", other)):
        manifest = pod_manifest(name, command=[sys.executable, "-c", ECHO_SERVER, str(p)])
        api.create_namespaced_pod("default", cast(Any, manifest))
    _wait_running(api, "py-pf")
    _wait_listening(port)
    _wait_listening(other)

    pf = portforward(
        api.connect_get_namespaced_pod_portforward,
        "py-pf",
        "default",
        ports=f"{port},{closed},{other}",
    )
    assert pf.connected
    good = pf.socket(port)
    good.sendall(b"hello")
    assert _recv_exactly(good, 5) == b"hello"
    # A refused port: its socket closes and the error names it; the others go on.
    refused = pf.socket(closed)
    refused.settimeout(30)
    assert refused.recv(10) == b""
    error = pf.error(closed)
    assert error is not None
    assert f"error forwarding port {closed}" in error and "connection refused" in error
    assert pf.error(port) is None
    # A second port in the same stream, and bulk data both ways, byte-exact.
    blob = bytes(range(256)) * 4096 * 2  # 2 MiB
    second = pf.socket(other)
    second.sendall(blob)
    echoed = _recv_exactly(second, len(blob))
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(blob).hexdigest()
    good.sendall(b"still there")
    assert _recv_exactly(good, 11) == b"still there"
    for sock in (good, second, refused):
        sock.close()
    deadline = time.monotonic() + 20
    while pf.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pf.connected, "the WebSocket stayed open after every port closed"

    with pytest.raises(ApiException) as info:
        portforward(api.connect_get_namespaced_pod_portforward, "nope", "default", ports="80")
    # The client reports a refused handshake with the status in its message.
    assert "404" in str(info.value)


async def test_portforward(kubeconfig: Path, cluster: DevCluster) -> None:
    await asyncio.to_thread(_portforward, kubeconfig)
    assert [r.status for r in cluster.requests.where(verb="portforward", name="py-pf")] == [101]
