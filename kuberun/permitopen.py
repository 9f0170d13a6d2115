"""Which forwarding destinations are allowed: ``ssh.permit_open`` and the Pod's own names.

Pure functions, no I/O, shared by the config loader (validation) and the SSH side
(``kuberun.forward``).

``ssh.permit_open`` has OpenSSH's ``PermitOpen`` syntax: ``host:port`` entries
(``[IPv6]:port`` for IPv6 addresses), where ``*`` as the host or the port allows
any host or port; or ``any`` alone (no restriction) or ``none`` alone (nothing).
As in OpenSSH, hosts are compared as written: no patterns beyond a whole ``*``,
no address lookups.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["LOCAL_HOSTS", "PermitOpen", "is_local_host", "names_the_pod"]

#: Destinations that mean "the Pod itself" whatever the Pod is called.
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0"})

_ANY = "*"


@dataclass(frozen=True)
class PermitOpen:
    """A parsed ``ssh.permit_open``: ``None`` entries mean no restriction."""

    entries: tuple[tuple[str, int | None], ...] | None

    @classmethod
    def parse(cls, values: Sequence[str], path: str = "ssh.permit_open") -> PermitOpen:
        """Parse and validate; errors name ``path`` and the entry.

        :raises ConfigError: for an empty list, a misplaced ``any``/``none``, or an
            entry that is not ``host:port``
        """
        if not values:
            raise ConfigError(path, 'expected at least one entry (["none"] refuses everything)')
        for i, value in enumerate(values):
            if value in ("any", "none") and len(values) > 1:
                raise ConfigError(f"{path}[{i}]", f"{value!r} must be the only entry")
        if values[0] == "any":
            return cls(None)
        if values[0] == "none":
            return cls(())
        return cls(tuple(_parse_entry(value, f"{path}[{i}]") for i, value in enumerate(values)))

    def allows(self, host: str, port: int) -> bool:
        """Whether ``host``:``port``, as the client asked for it, is permitted."""
        if self.entries is None:
            return True
        for allowed_host, allowed_port in self.entries:
            if allowed_port is not None and allowed_port != port:
                continue
            if allowed_host in (_ANY, host):
                return True
        return False


def _parse_entry(value: str, path: str) -> tuple[str, int | None]:
    if not value or any(c.isspace() for c in value):
        raise ConfigError(path, f"{value!r} is not host:port")
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1 : end + 2] != ":":
            raise ConfigError(path, f"{value!r} is not [IPv6-address]:port")
        host, port_text = value[1:end], value[end + 2 :]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ConfigError(path, f"{value!r} is not host:port (the port is missing)")
        if ":" in host:
            raise ConfigError(path, f"{value!r}: write an IPv6 address in brackets, [addr]:port")
    if not host:
        raise ConfigError(path, f"{value!r} has an empty host (use '*' for any host)")
    if port_text == _ANY:
        return host, None
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(path, f"{value!r}: the port must be 1..65535 or '*'")
    return host, int(port_text)


def is_local_host(host: str) -> bool:
    """Whether ``host`` means the Pod itself without naming it (``localhost``, ...)."""
    return host.lower() in LOCAL_HOSTS


def names_the_pod(host: str, pod_name: str, pod_ips: Iterable[str]) -> bool:
    """Whether ``host`` is a local name, the Pod's name, or one of its IPs."""
    lowered = host.lower()
    return (
        is_local_host(host)
        or lowered == pod_name.lower()
        or lowered in {ip.lower() for ip in pod_ips}
    )
