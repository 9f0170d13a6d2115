"""The few apiserver calls ``up`` makes while waiting, over HTTPS with the admin certificate.

Standard library only: the driver runs before (and without) the project's virtualenv.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.realcluster.common import ClusterError

T = TypeVar("T")


class Api:
    """A cluster-admin client for one apiserver (``host:port``)."""

    def __init__(self, host: str, port: int, pki: Path) -> None:
        self._host, self._port = host, port
        self._tls = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self._tls.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        """One call; returns (status, decoded JSON or text). Connection errors raise OSError."""
        conn = http.client.HTTPSConnection(self._host, self._port, context=self._tls, timeout=10)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload else {}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read().decode()
        finally:
            conn.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw

    def probe(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """Like request, but an unreachable apiserver reads as status 0 (for wait loops)."""
        try:
            return self.request(method, path, body)
        except OSError as exc:
            return 0, str(exc)


def wait_for(
    what: str,
    check: Callable[[], T | None],
    timeout: float,
    diagnose: Callable[[], str] = lambda: "",
) -> T:
    """Poll ``check`` until it returns a value; past ``timeout`` raise naming ``what``.

    ``diagnose`` adds the last thing observed (a Pod's waiting reason, a log tail) to the error.
    ``check`` may raise ClusterError itself to give up early (a component died).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}\n{diagnose()}")
        time.sleep(0.5)
