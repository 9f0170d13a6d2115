"""Fixtures for devcluster's own tests: a cluster, a raw HTTP/WebSocket client, a JSON client.

The raw client is written here on purpose (not kuberun's relay codec): byte-level
checks of devcluster must not share code with the client side they judge.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import struct
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from kuberun.devcluster import DevCluster


@pytest.fixture
async def cluster() -> AsyncIterator[DevCluster]:
    async with DevCluster() as c:
        yield c


def client_ssl(cluster: DevCluster) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=cluster.ca_pem.decode())
    return ctx


class Api:
    """A thin JSON client (aiohttp) for exact status codes, headers and bodies."""

    def __init__(self, cluster: DevCluster, session: aiohttp.ClientSession) -> None:
        self.cluster = cluster
        self.session = session
        self.ssl = client_ssl(cluster)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = "default",
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any, CIMultiDictProxy[str]]:
        hdrs = dict(headers or {})
        if token == "default":
            token = self.cluster.token
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        async with self.session.request(
            method, self.cluster.url + path, data=data, headers=hdrs, ssl=self.ssl
        ) as resp:
            content = await resp.read()
            try:
                parsed: Any = json.loads(content) if content else None
            except ValueError:
                parsed = content
            return resp.status, parsed, resp.headers

    async def raw_body(self, method: str, path: str) -> tuple[int, bytes]:
        async with self.session.request(
            method,
            self.cluster.url + path,
            headers={"Authorization": f"Bearer {self.cluster.token}"},
            ssl=self.ssl,
        ) as resp:
            return resp.status, await resp.read()

    async def create_pod(self, manifest: dict[str, Any], namespace: str = "default") -> Any:
        status, body, _ = await self.request(
            "POST", f"/api/v1/namespaces/{namespace}/pods", manifest
        )
        assert status == 201, body
        return body

    async def wait_pod(
        self, name: str, check: Any, namespace: str = "default", timeout: float = 20
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            pod = self.cluster.pod(name, namespace)
            if pod is not None and check(pod):
                return pod
            if loop.time() > deadline:
                raise AssertionError(f"pod {name} never matched: {pod}")
            await asyncio.sleep(0.02)

    async def running(self, name: str, namespace: str = "default") -> dict[str, Any]:
        return await self.wait_pod(name, is_ready, namespace)


def is_ready(pod: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


@pytest.fixture
async def api(cluster: DevCluster) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(cluster, session)


def pod(name: str, command: list[str] | None = None, **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "busybox"}
    if command is not None:
        container["command"] = command
    containers = spec.pop("containers", [container])
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": containers, **spec},
    }


class RawWebSocket:
    """A minimal RFC 6455 client over TLS that exposes the server's bytes unchanged."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.header_lines: list[str] = []
        self.body = b""

    @classmethod
    async def connect(
        cls,
        cluster: DevCluster,
        path: str,
        params: list[tuple[str, str]],
        protocols: list[str] | None,
        *,
        method: str = "GET",
        token: str | None = None,
        extra: list[str] | None = None,
        upgrade: bool = True,
    ) -> RawWebSocket:
        host, port = cluster.address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(
            host.strip("[]"), int(port), ssl=client_ssl(cluster), server_hostname="localhost"
        )
        ws = cls(reader, writer)
        target = path + ("?" + urlencode(params) if params else "")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {cluster.address}"]
        if upgrade:
            key = base64.b64encode(os.urandom(16)).decode()
            lines += [
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key}",
                "Sec-WebSocket-Version: 13",
            ]
        for proto in protocols or []:
            lines.append(f"Sec-WebSocket-Protocol: {proto}")
        lines.append(f"Authorization: Bearer {token or cluster.token}")
        lines += extra or []
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        text = head.decode("latin-1").split("\r\n")
        ws.status = int(text[0].split()[1])
        for line in text[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                ws.headers[name.strip().lower()] = value.strip()
                ws.header_lines.append(line)
        if ws.status != 101:
            length = int(ws.headers.get("content-length", "0") or 0)
            ws.body = await reader.readexactly(length) if length else b""
        return ws

    async def frame(self, timeout: float = 20) -> tuple[int, bytes, bytes]:
        """(opcode, payload, header bytes) of the next server frame."""
        head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        assert head[0] & 0x80, "server frames are never fragmented"
        assert not head[1] & 0x80, "server frames are never masked"
        size = head[1] & 0x7F
        extra = b""
        if size == 126:
            extra = await self.reader.readexactly(2)
            size = struct.unpack("!H", extra)[0]
        elif size == 127:
            extra = await self.reader.readexactly(8)
            size = struct.unpack("!Q", extra)[0]
        payload = await self.reader.readexactly(size)
        return head[0] & 0x0F, payload, head + extra

    def send(self, payload: bytes, opcode: int = 0x2) -> None:
        """A masked client frame."""
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
        elif size < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)

    async def messages_until_close(
        self, timeout: float = 20
    ) -> tuple[list[tuple[int, bytes]], bytes | None]:
        """All data messages, then the Close payload; asserts the TCP close follows.
        The payload is None when the TCP connection closed without a Close frame
        (as exec streams end, like the kubelet's)."""
        out: list[tuple[int, bytes]] = []
        while True:
            try:
                opcode, payload, _ = await self.frame(timeout)
            except asyncio.IncompleteReadError as exc:
                assert exc.partial == b"", "the connection closed mid-frame"
                return out, None
            if opcode == 0x8:
                rest = await asyncio.wait_for(self.reader.read(), timeout)
                assert rest == b"", "nothing may follow the Close frame"
                return out, payload
            out.append((opcode, payload))

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


def exec_params(command: list[str], **flags: bool | str) -> list[tuple[str, str]]:
    params = [("command", c) for c in command]
    for key, value in flags.items():
        params.append((key, value if isinstance(value, str) else ("true" if value else "false")))
    return params
