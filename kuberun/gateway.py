"""The ``kuberun serve`` gateway: asyncssh server, host keys, authorized_keys auth, shutdown.

Also used by ``kuberun demo``, which adds a one-time password.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh
from kubernetes_asyncio import client as k8s

from .config import Config
from .janitor import JANITOR_INTERVAL, PodOwnership
from .metrics import Metrics, start_metrics_server
from .preflight import check_host_key, check_serving
from .server import Gateway, SSHServer, server_options

__all__ = ["AuthorizedKeysServer", "GatewayRunner", "load_host_keys"]

_log = logging.getLogger("kuberun")

# Usernames that may be substituted into a path template.
_SAFE_USERNAME = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._@-]{0,127}")


def load_host_keys(paths: tuple[str, ...] | list[str]) -> list[asyncssh.SSHKey]:
    """Read the host keys, generating (and keeping) an ed25519 key for each missing path.

    :raises ConfigError: naming ``ssh.host_keys[i]`` for a public key, a file that is
        not a key, or a missing key whose directory does not exist (never created)
    """
    keys = []
    for i, path in enumerate(paths):
        key = check_host_key(f"ssh.host_keys[{i}]", path)
        if key is None:
            p = Path(path).expanduser()
            key = asyncssh.generate_private_key("ssh-ed25519")
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key.export_private_key())
            _log.info("generated host key %s", p)
        keys.append(key)
    return keys


class AuthorizedKeysServer(SSHServer):
    """Public-key auth from OpenSSH ``authorized_keys`` files, plus an optional password.

    ``authorized_keys`` may contain ``{username}``: one file per user. Without
    it one file serves every user. A missing file means no keys.
    """

    def __init__(
        self,
        gateway: Gateway,
        authorized_keys: str | None,
        password: str | None = None,
        extra_keys: str | None = None,
    ) -> None:
        super().__init__(gateway)
        self._template = authorized_keys
        self._password = password
        self._extra_keys = extra_keys

    def _key_files(self, username: str) -> list[Path]:
        files = []
        if self._template:
            if "{username}" in self._template:
                if _SAFE_USERNAME.fullmatch(username) and ".." not in username:
                    files.append(Path(self._template.replace("{username}", username)))
            else:
                files.append(Path(self._template))
        if self._extra_keys:
            files.append(Path(self._extra_keys))
        return [f.expanduser() for f in files]

    def begin_auth(self, username: str) -> bool:
        assert self.conn is not None
        banner = self.gateway.config.ssh.banner
        if banner:
            self.conn.send_auth_banner(banner if banner.endswith("\n") else banner + "\n")
        keys: asyncssh.SSHAuthorizedKeys | None = None
        for path in self._key_files(username):
            try:
                text = path.read_text()
            except OSError as exc:
                # As sshd: a user without a file has no keys (debug, not silence).
                _log.debug("no authorized_keys for %r: %s", username, exc)
                continue
            try:
                loaded = asyncssh.import_authorized_keys(text)
            except (ValueError, asyncssh.KeyImportError) as exc:
                _log.warning("ignoring unreadable authorized_keys %s: %s", path, exc)
                continue
            if keys is None:
                keys = loaded
            else:
                keys.load(text)
        if keys is not None:
            self.conn.set_authorized_keys(keys)
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return self._password is not None

    def validate_password(self, username: str, password: str) -> bool:
        return self._password is not None and hmac.compare_digest(
            password.encode(), self._password.encode()
        )


class GatewayRunner:
    """Runs a gateway until :meth:`stop` (or SIGTERM/SIGINT): the SSH listener,
    the metrics endpoint, graceful shutdown that deletes every Pod."""

    def __init__(
        self,
        config: Config,
        api_client: k8s.ApiClient,
        *,
        password: str | None = None,
        extra_authorized_keys: str | None = None,
        server_factory: Callable[[Gateway], SSHServer] | None = None,
        owner: dict[str, str] | None = None,
        ownership: PodOwnership | None = None,
        name: str | None = None,
        audit: Any = None,
        janitor_interval: float = JANITOR_INTERVAL,
    ) -> None:
        self.config = config
        self._janitor_interval = janitor_interval
        self.metrics = Metrics()
        self.gateway = Gateway(
            config,
            api_client,
            metrics=self.metrics,
            owner=owner,
            ownership=ownership,
            name=name,
            audit=audit,
        )
        self._password = password
        self._extra_keys = extra_authorized_keys
        self._factory = server_factory
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._metrics_server: Any = None
        self._stopped = asyncio.Event()
        self.port = 0

    def _new_server(self) -> SSHServer:
        if self._factory is not None:
            return self._factory(self.gateway)
        return AuthorizedKeysServer(
            self.gateway, self.config.ssh.authorized_keys, self._password, self._extra_keys
        )

    async def start(self) -> None:
        """Listen for SSH (and metrics). Returns once both accept connections."""
        host, port = self.config.ssh.listen_address
        # The checks `kuberun check` runs: a bad host key or listen host stops here,
        # naming its key; a missing authorized_keys file is worth a warning.
        for warning in check_serving(self.config):
            _log.warning("%s", warning)
        keys = load_host_keys(self.config.ssh.host_keys)
        # The janitor's first round: Pods an earlier run left; says so if the API
        # server cannot be reached (a warning: the cluster may come up later).
        await self.gateway.start(self._janitor_interval)
        self._acceptor = await asyncssh.create_server(
            self._new_server,
            host,
            port,
            server_host_keys=keys,
            reuse_address=True,
            **server_options(self.config),
        )
        if self.gateway.workspaces is not None:
            # User mode: heartbeat and idle reaper run from the start, users or not.
            self.gateway.workspaces.begin()
        sockets = self._acceptor.sockets
        self.port = sockets[0].getsockname()[1] if sockets else port
        if self.config.metrics.listen:
            self._metrics_server = await start_metrics_server(
                self.config.metrics.listen, self.metrics.registry
            )
        _log.info("kuberun gateway listening on %s:%d", host, self.port)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    def stop(self) -> None:
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def close(self) -> None:
        """Stop accepting, tell open sessions, delete every Pod within ``timeouts.pod_stop``
        (what is left then is logged by name)."""
        if self._acceptor is not None:
            self._acceptor.close()
        await self.gateway.drain()
        if self._acceptor is not None:
            await self._acceptor.wait_closed()
        await self.gateway.audit.close()
        if self._metrics_server is not None:
            await self._metrics_server.close()

    async def run(self) -> None:
        """start(), wait for a stop signal, close()."""
        await self.start()
        self.install_signal_handlers()
        try:
            await self.wait_stopped()
        finally:
            await self.close()
