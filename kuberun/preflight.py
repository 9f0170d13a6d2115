"""What ``serve`` needs from the host, checked before it starts: the one path that
``kuberun check`` and ``kuberun serve`` share.

The config's own validation (:mod:`kuberun.config`) looks at values; this looks
at what they point to: the listen hosts resolve, the audit directory is
writable, each host key is a private key (or can be generated in an existing
directory), the ``authorized_keys`` file exists. Errors are
:class:`~kuberun.errors.ConfigError` naming the key; what only may be a problem
(a missing ``authorized_keys`` file: nobody can log in with a key yet) comes
back as warnings.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import asyncssh

from .audit import check_directory
from .config import Config, parse_listen
from .errors import ConfigError

__all__ = ["check_host_key", "check_serving"]


def check_serving(config: Config) -> list[str]:
    """Check what ``serve`` needs beyond the config's values; return warnings.

    :raises ConfigError: naming the key of the first problem that would stop
        ``serve``
    """
    _check_resolves("ssh.listen", config.ssh.listen)
    if config.metrics.listen is not None:
        _check_resolves("metrics.listen", config.metrics.listen)
    if config.audit.directory is not None:
        problem = check_directory(config.audit.directory)
        if problem is not None:
            raise ConfigError("audit.directory", problem)
    for i, path in enumerate(config.ssh.host_keys):
        check_host_key(f"ssh.host_keys[{i}]", path)
    return _authorized_keys_warnings(config.ssh.authorized_keys)


def _check_resolves(key: str, listen: str) -> None:
    host, port = parse_listen(listen, key)
    try:
        socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(key, f"cannot resolve host {host!r}: {exc.strerror}") from None


def check_host_key(key: str, path: str) -> asyncssh.SSHKey | None:
    """The private key at ``path``, or None when it is missing and can be generated.

    :raises ConfigError: naming ``key`` when the file is a public key, not a
        key at all, unreadable, or missing in a directory that does not exist
        (kuberun generates a missing key but never creates directories)
    """
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        parent = p.parent
        if not parent.is_dir():
            raise ConfigError(
                key,
                f"{p} does not exist and cannot be generated: directory {parent} does not exist",
            ) from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(
                key, f"{p} does not exist and cannot be generated: {parent} is not writable"
            ) from None
        return None
    except OSError as exc:
        raise ConfigError(key, f"cannot read {p}: {exc.strerror}") from None
    try:
        return asyncssh.import_private_key(data)
    except (asyncssh.KeyImportError, ValueError) as exc:
        if _is_public_key(data):
            raise ConfigError(
                key, f"{p} is a public key; give the private key file (the one without .pub)"
            ) from None
        raise ConfigError(key, f"{p} is not a private key: {exc}") from None


def _is_public_key(data: bytes) -> bool:
    try:
        asyncssh.import_public_key(data)
    except (asyncssh.KeyImportError, ValueError):
        return False
    return True


def _authorized_keys_warnings(template: str | None) -> list[str]:
    if template is None:
        return []
    if "{username}" in template:
        directory = Path(template.split("{username}", 1)[0]).expanduser()
        if template.split("{username}", 1)[0].endswith("/") and not directory.is_dir():
            return [
                f"ssh.authorized_keys: directory {directory} does not exist; "
                "nobody can log in with a public key"
            ]
        return []
    path = Path(template).expanduser()
    if not path.exists():
        return [f"ssh.authorized_keys: {path} does not exist; nobody can log in with a public key"]
    try:
        asyncssh.import_authorized_keys(path.read_text())
    except OSError as exc:
        return [f"ssh.authorized_keys: cannot read {path}: {exc.strerror}"]
    except (asyncssh.KeyImportError, ValueError) as exc:
        return [f"ssh.authorized_keys: {path} is not an authorized_keys file: {exc}"]
    return []
