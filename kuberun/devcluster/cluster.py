"""The :class:`DevCluster` facade: one object, one process, one fake Kubernetes cluster.

devcluster is a test double, NOT a production runtime: Pods are plain local
processes of the calling user, without isolation, resource limits or images.
"""

from __future__ import annotations

import base64
import copy
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from aiohttp import web

from .events import EventRecorder
from .execws import ExecHandler
from .faults import Faults, RequestLog
from .kubelet import Kubelet
from .leases import LeaseRegistry
from .pods import now_rfc3339
from .portforward import PortForwardHandler
from .registry import PodRegistry
from .rest import Resources
from .runtime import Runtime
from .server import build_app
from .store import Store
from .tls import Certificates, generate_certificates, server_ssl_context

__all__ = ["DevCluster"]

log = logging.getLogger("kuberun.devcluster")

Obj = dict[str, Any]


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class DevCluster:
    """A single-process Kubernetes API server whose Pods are local processes.

    ``host``/``port`` say where to listen (port 0: a free port); ``token`` is the
    bearer token clients must send (None: a random one). ``workdir`` is where Pod
    scratch directories go (None: a temporary directory removed on stop); each
    Pod's containers start in their own empty directory, which is also ``HOME``
    and holds their ``TMPDIR``. A ``workdir`` given is also the cluster's state
    directory: its CA and token are kept there and reused when the cluster is
    started again, so clients (a running gateway) keep trusting it.

    Use ``async with DevCluster() as cluster:`` or :meth:`start`/:meth:`stop`.
    Everything runs on the current event loop (asyncio or uvloop).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        *,
        workdir: str | os.PathLike[str] | None = None,
        bookmark_interval: float = 60.0,
    ) -> None:
        self.host = host
        self.port = port
        self.token: str = token if token is not None else secrets.token_urlsafe(32)
        self._token_given = token is not None
        self.bookmark_interval = bookmark_interval
        self.store = Store()
        self.runtime = Runtime()
        self.faults: Faults = Faults(compact=self.store.compact)
        """Fault injection (see :class:`kuberun.devcluster.faults.Faults`)."""
        self.requests: RequestLog = RequestLog()
        """Every API request served, oldest first (see :class:`RequestLog`)."""
        self.ca_pem: bytes = b""
        self.url: str = ""
        self.address = ""
        self.created = now_rfc3339()
        self.stopping = False
        self._workdir_arg = workdir
        self._own_workdir = False
        self._runner: web.AppRunner | None = None
        self.workdir = ""
        self.events = EventRecorder(self.store)
        self.kubelet = Kubelet(self.store, self.events, self.runtime, self.faults, "")
        self.registry = PodRegistry(self.store, self.kubelet)
        self.leases = LeaseRegistry(self.store)
        self.exec_handler = ExecHandler(self)
        self.portforward_handler = PortForwardHandler(self)
        self.resources = Resources(self)

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Generate TLS material and start listening; requests are accepted on return."""
        if self._runner is not None:
            raise RuntimeError("DevCluster already started")
        self._prepare_workdir()
        certs = self._certificates()
        self.ca_pem = certs.ca_pem
        runner = web.AppRunner(build_app(self), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(
            runner, self.host or None, self.port, ssl_context=server_ssl_context(certs), backlog=512
        )
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self.address = f"{_url_host(self.host)}:{self.port}"
        self.url = f"https://{self.address}"
        log.info("devcluster listening on %s", self.url)

    def _prepare_workdir(self) -> None:
        if self._workdir_arg is None:
            self.workdir = tempfile.mkdtemp(prefix="devcluster-")
            self._own_workdir = True
        else:
            self.workdir = str(self._workdir_arg)
            Path(self.workdir).mkdir(parents=True, exist_ok=True)
        self.kubelet.workdir_root = self.workdir

    def _certificates(self) -> Certificates:
        """TLS material; with a ``workdir`` of the caller's, its CA and token are kept
        there (``ca.crt``, ``ca.key``, ``token``) and reused by the next start, so
        clients of a restarted cluster keep trusting it and keep their kubeconfig."""
        if self._own_workdir:
            return generate_certificates([self.host])
        state = Path(self.workdir)
        ca_crt, ca_key, token = state / "ca.crt", state / "ca.key", state / "token"
        if not self._token_given:
            if token.exists():
                self.token = token.read_text().strip() or self.token
            else:
                _write_private(token, self.token.encode())
        if ca_crt.exists() and ca_key.exists():
            return generate_certificates([self.host], (ca_crt.read_bytes(), ca_key.read_bytes()))
        certs = generate_certificates([self.host])
        _write_private(ca_key, certs.ca_key_pem)
        ca_crt.write_bytes(certs.ca_pem)
        return certs

    async def stop(self) -> None:
        """Stop serving and kill every process the cluster started."""
        if self._runner is None:
            return
        self.stopping = True
        self.store.close_watchers()
        await self.registry.shutdown()
        await self.kubelet.shutdown()
        await self.runtime.stop_all(grace=1.0)
        self.exec_handler.sessions.abort_all()
        self.portforward_handler.sessions.abort_all()
        runner, self._runner = self._runner, None
        await runner.cleanup()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def __aenter__(self) -> DevCluster:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ---- client configuration ------------------------------------------------------------
    def kubeconfig(self) -> Obj:
        """A kubeconfig (context, cluster and user all named ``devcluster``)."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "devcluster",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(self.ca_pem).decode(),
                    },
                }
            ],
            "users": [{"name": "devcluster", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "devcluster",
                    "context": {
                        "cluster": "devcluster",
                        "user": "devcluster",
                        "namespace": "default",
                    },
                }
            ],
            "current-context": "devcluster",
            "preferences": {},
        }

    def write_kubeconfig(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`kubeconfig` to ``path`` (mode 0600, replaced atomically)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".kubeconfig-", dir=str(target.parent))
        try:
            with os.fdopen(fd, "w") as fh:
                yaml.safe_dump(self.kubeconfig(), fh, default_flow_style=False, sort_keys=False)
            os.chmod(tmp, 0o600)
            os.replace(tmp, target)
        except BaseException:
            with_suppress_unlink(tmp)
            raise

    # ---- inspection ------------------------------------------------------------------------
    def pods(self, namespace: str | None = None) -> list[Obj]:
        """Current Pod objects (copies), in one namespace or all."""
        return [copy.deepcopy(p) for p in self.store.list("pods", namespace)]

    def pod(self, name: str, namespace: str = "default") -> Obj | None:
        """One Pod object (a copy), or None."""
        obj = self.store.get("pods", namespace, name)
        return copy.deepcopy(obj) if obj is not None else None

    def lease_list(self, namespace: str | None = None) -> list[Obj]:
        """Current Lease objects (copies), in one namespace or all."""
        return [copy.deepcopy(x) for x in self.store.list("leases", namespace)]

    def event_list(self, namespace: str | None = None) -> list[Obj]:
        """Current Event objects (copies)."""
        return [copy.deepcopy(e) for e in self.store.list("events", namespace)]

    def process_count(self) -> int:
        """Processes (containers and execs) started by the cluster and still running."""
        return len(self.runtime.processes)


def with_suppress_unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
