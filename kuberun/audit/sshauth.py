"""Auth results from an asyncssh server connection, for the ``auth`` event.

asyncssh has no hook that reports an authentication attempt and its result
(keys from ``set_authorized_keys`` are even checked inside asyncssh). So, as
``server._limit_env_requests`` does for env requests, :func:`watch_auth` wraps
the connection instance's own ``validate_*`` coroutines, which every auth
method goes through, and reports what they answered. A public-key query
without a signature that is refused counts as a failed attempt with that key
(a key that is accepted is reported once, when its signature is checked).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import asyncssh
from asyncssh.public_key import decode_ssh_certificate, decode_ssh_public_key

from .trail import ConnectionAudit

__all__ = ["key_identity", "watch_auth"]


def key_identity(key_data: bytes) -> tuple[str, str] | None:
    """(key type, ``SHA256:`` fingerprint) of an SSH public key or certificate blob."""
    try:
        key = decode_ssh_public_key(key_data)
        return str(key.get_algorithm()), key.get_fingerprint("sha256")
    except (asyncssh.KeyImportError, ValueError):
        pass
    try:
        cert = decode_ssh_certificate(key_data)
        algorithm = cert.get_algorithm()
        name = algorithm.decode() if isinstance(algorithm, bytes) else str(algorithm)
        return name, cert.key.get_fingerprint("sha256")
    except (asyncssh.KeyImportError, ValueError):
        return None


def watch_auth(conn: Any, audit: ConnectionAudit) -> None:
    """Report every completed auth attempt on ``conn`` to ``audit`` (if it is enabled)."""
    if not audit.enabled:
        return

    def wrap(name: str, report: Callable[[tuple[Any, ...], Any], None]) -> None:
        original = getattr(conn, name, None)
        if original is None:
            return

        @functools.wraps(original)
        async def watched(*args: Any) -> Any:
            result = await original(*args)
            try:
                report(args, result)
            except Exception:  # the audit must never break a login
                pass
            return result

        setattr(conn, name, watched)

    def public_key(args: tuple[Any, ...], ok: Any) -> None:
        username, key_data, msg = args[0], args[1], args[2]
        if ok and not msg:
            return  # "would this key do?": the signed attempt follows
        audit.auth(username, "publickey", bool(ok), key_identity(key_data))

    def password(args: tuple[Any, ...], ok: Any) -> None:
        audit.auth(args[0], "password", bool(ok))

    def kbdint(args: tuple[Any, ...], result: Any) -> None:
        if isinstance(result, bool):  # otherwise: another challenge follows
            audit.auth(args[0], "keyboard-interactive", result)

    def hostbased(args: tuple[Any, ...], ok: Any) -> None:
        audit.auth(args[0], "hostbased", bool(ok))

    wrap("validate_public_key", public_key)
    wrap("validate_password", password)
    wrap("validate_kbdint_response", kbdint)
    wrap("validate_host_based_auth", hostbased)
