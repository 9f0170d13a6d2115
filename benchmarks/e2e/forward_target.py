"""The server behind the forwards of the port-forward benchmark, in a process of its own.

``python -m benchmarks.e2e.forward_target [PORT]``: listens on 127.0.0.1 (a port of every
devcluster Pod, which shares the host's network, and of the direct server's
host), prints ``{"port": ..., "pid": ...}``, then serves each connection by its
first byte:

* ``D`` + 8-byte big-endian N: sends N zero bytes, then closes;
* ``U`` + 8-byte big-endian N: reads N bytes, answers ``ok``, then closes;
* ``E``: echoes every byte back until EOF (the latency probe).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading

__all__ = ["main"]

CHUNK = 1 << 20


def _exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = conn.recv(n - len(data))
        if not more:
            raise ConnectionError("closed early")
        data += more
    return data


def _serve(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        kind = _exactly(conn, 1)
        if kind == b"E":
            while data := conn.recv(65536):
                conn.sendall(data)
            return
        (size,) = struct.unpack(">Q", _exactly(conn, 8))
        if kind == b"D":
            zeros = memoryview(bytes(CHUNK))
            while size:
                n = min(size, CHUNK)
                conn.sendall(zeros[:n])
                size -= n
        elif kind == b"U":
            buf = bytearray(CHUNK)
            while size:
                n = conn.recv_into(buf, min(size, CHUNK))
                if not n:
                    raise ConnectionError("closed early")
                size -= n
            conn.sendall(b"ok")


def _guarded(conn: socket.socket) -> None:
    try:
        _serve(conn)
    except OSError:
        pass


def main() -> int:
    server = socket.create_server(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0))
    print(json.dumps({"port": server.getsockname()[1], "pid": os.getpid()}), flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_guarded, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
