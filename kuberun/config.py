"""Typed, strict gateway configuration.

The configuration is a tree of frozen dataclasses, one per YAML section::

    config = load_config("/etc/kuberun/config.yaml")
    config.pod.console_container        # "shell"
    config.timeouts.pod_start           # 60.0

Loading is strict on purpose: an unknown or misplaced key, a value of the
wrong type or out of range is a :class:`~kuberun.errors.ConfigError` whose
``path`` names the offending key in full (``pod.spek``,
``pod.spec.containers[0].name``) and, for a file, the line it is on.  A typo
therefore stops the gateway at start-up instead of silently running with a
default.

``pod.metadata`` and ``pod.spec`` are plain Kubernetes objects (camelCase, as
in any manifest) and are checked only as far as kuberun itself relies on them.

The Kubernetes client is built by :func:`make_api_client`; its loaders live in
:mod:`kuberun._kubeclient`.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import math
import os
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ._configread import Section, describe, join, read_yaml_file, with_line
from ._kubeclient import make_api_client, make_client_configuration
from .errors import ConfigError
from .permitopen import PermitOpen

__all__ = [
    "DEFAULT_CIPHERS",
    "DEFAULT_IDLE_COMMAND",
    "AuditConfig",
    "Config",
    "KubernetesConfig",
    "LoggingConfig",
    "MetricsConfig",
    "PodConfig",
    "SSHConfig",
    "TimeoutsConfig",
    "config_from_dict",
    "load_config",
    "make_api_client",
    "make_client_configuration",
    "parse_listen",
]

#: The version the SSH server announces (``ssh.server_version``). OpenSSH clients send
#: ``eow@openssh.com`` (their reader went away) only to a server whose version starts
#: with ``OpenSSH``; versions before 8.0 get bug workarounds, so this claims a current one.
DEFAULT_SERVER_VERSION = "OpenSSH_9.9 kuberun"
_MAX_SERVER_VERSION = 255 - len("SSH-2.0-\r\n")
_BUGGY_OPENSSH = re.compile(r"OpenSSH_[0-7](\D|$)")

#: Ciphers offered when ``ssh.ciphers`` is null.  AES-GCM comes first: with
#: AES-NI it moves about twice the bytes per CPU second of chacha20 in asyncssh.
DEFAULT_CIPHERS: tuple[str, ...] = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)

#: The console container's command by default: a POSIX ``sh`` loop that
#: reaps orphans (``wait``) and exits promptly on TERM/INT, so Pod deletion
#: does not wait for the whole grace period.
DEFAULT_IDLE_COMMAND: tuple[str, ...] = (
    "/bin/sh",
    "-c",
    "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait; done",
)

#: Values of ``pod.mode``.
MODES: tuple[Literal["connection", "session", "user"], ...] = ("connection", "session", "user")

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_ENV_PATTERN = re.compile(r"[A-Za-z0-9_*?]+")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_HOSTNAME = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_PORT = re.compile(r"[0-9]{1,5}")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


# --------------------------------------------------------------------------
# Value checks shared by the dataclasses and the parser


def parse_listen(value: str, path: str) -> tuple[str, int]:
    """Split a ``"HOST:PORT"`` listen address.

    IPv6 hosts go in brackets (``"[::1]:2222"``); the brackets are removed
    from the returned host.  Port 0 asks the OS for a free port.

    :raises ConfigError: naming ``path`` when the value is malformed.
    """
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string 'HOST:PORT', got {describe(value)}")
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ConfigError(path, f"expected '[IPv6]:PORT', got {value!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(path, f"{host!r} is not an IPv6 address")
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ConfigError(path, f"expected 'HOST:PORT' (the port is required), got {value!r}")
        if ":" in host:
            raise ConfigError(path, f"put an IPv6 address in brackets, e.g. '[{host}]:{port}'")
        if not _HOSTNAME.fullmatch(host) or len(host) > 253:
            raise ConfigError(path, f"{host!r} is not a host name or IPv4 address")
    if not _PORT.fullmatch(port) or int(port) > 65535:
        raise ConfigError(path, f"the port must be a number from 0 to 65535, got {port!r}")
    return host, int(port)


def _check_seconds(path: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, f"expected a number of seconds, got {describe(value)}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(path, f"must be a finite number of seconds {bound}, got {value!r}")


def _check_int(path: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, f"expected an integer, got {describe(value)}")
    if value < minimum:
        raise ConfigError(path, f"must be at least {minimum}, got {value}")


def _check_argv(path: str, argv: tuple[str, ...]) -> None:
    if not argv:
        raise ConfigError(path, "must be a non-empty list of strings (an argv)")
    for i, arg in enumerate(argv):
        if not isinstance(arg, str):
            raise ConfigError(f"{path}[{i}]", f"expected a string, got {describe(arg)}")
        if "\0" in arg:
            raise ConfigError(f"{path}[{i}]", "must not contain a NUL character")
    if not argv[0]:
        raise ConfigError(f"{path}[0]", "the program must not be empty")


def _check_choice(path: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ConfigError(path, f"expected one of {listed}, got {describe(value)}")


# --------------------------------------------------------------------------
# The configuration tree


@dataclass(frozen=True)
class SSHConfig:
    """The ``ssh`` section: the SSH server the CLI gateway runs.

    ``authorized_keys`` is an OpenSSH ``authorized_keys`` path; ``{username}``
    in it is replaced by the login name (one file per user), without it one
    file serves everyone.  ``accept_env`` lists OpenSSH ``AcceptEnv``-style
    patterns (``*`` and ``?`` wildcards).  ``ciphers`` None means
    :data:`DEFAULT_CIPHERS`.  ``allow_tcp_forwarding`` and ``permit_open``
    (OpenSSH ``PermitOpen`` syntax) govern ``ssh -L``/``-D``/``-W`` into the Pod.
    """

    listen: str = "0.0.0.0:2222"
    host_keys: tuple[str, ...] = ("/etc/kuberun/ssh_host_ed25519_key",)
    authorized_keys: str | None = None
    accept_env: tuple[str, ...] = ("LANG", "LC_*")
    max_sessions: int = 10
    max_startups: int = 100
    login_grace_time: float = 120
    ciphers: tuple[str, ...] | None = None
    banner: str | None = None
    server_version: str | None = DEFAULT_SERVER_VERSION
    allow_tcp_forwarding: bool = True
    permit_open: tuple[str, ...] = ("any",)

    def __post_init__(self) -> None:
        parse_listen(self.listen, "ssh.listen")
        if not isinstance(self.allow_tcp_forwarding, bool):
            raise ConfigError("ssh.allow_tcp_forwarding", "expected true or false")
        PermitOpen.parse(self.permit_open)
        if not self.host_keys:
            raise ConfigError("ssh.host_keys", "at least one host key path is required")
        for i, key in enumerate(self.host_keys):
            if not isinstance(key, str) or not key:
                raise ConfigError(f"ssh.host_keys[{i}]", "expected a non-empty path")
        if self.authorized_keys is not None:
            _check_key_template(self.authorized_keys)
        for i, pattern in enumerate(self.accept_env):
            if not isinstance(pattern, str) or not _ENV_PATTERN.fullmatch(pattern):
                raise ConfigError(
                    f"ssh.accept_env[{i}]",
                    f"{pattern!r} is not a variable name pattern (letters, digits, '_', "
                    "and the wildcards '*' and '?')",
                )
        _check_int("ssh.max_sessions", self.max_sessions, 1)
        _check_int("ssh.max_startups", self.max_startups, 1)
        _check_seconds("ssh.login_grace_time", self.login_grace_time)
        if self.ciphers is not None:
            _check_ciphers(self.ciphers)
        if self.server_version is not None:
            _check_server_version(self.server_version)

    @property
    def effective_ciphers(self) -> tuple[str, ...]:
        """The ciphers to offer: ``ciphers``, or :data:`DEFAULT_CIPHERS` when None."""
        return self.ciphers if self.ciphers is not None else DEFAULT_CIPHERS

    @property
    def permitted_opens(self) -> PermitOpen:
        """``permit_open``, parsed."""
        return PermitOpen.parse(self.permit_open)

    @property
    def listen_address(self) -> tuple[str, int]:
        """``listen`` split into ``(host, port)``."""
        return parse_listen(self.listen, "ssh.listen")


def _check_key_template(template: str) -> None:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(
            "ssh.authorized_keys", f"{exc}; write '{{{{' and '}}}}' for literal braces"
        )
    for _, name, spec, conversion in parsed:
        if name is not None and (name != "username" or spec or conversion):
            raise ConfigError(
                "ssh.authorized_keys",
                f"only '{{username}}' is substituted, found '{{{name}}}'; "
                "write '{{' and '}}' for literal braces",
            )
    if not template:
        raise ConfigError("ssh.authorized_keys", "expected a path, got an empty string")


def _check_server_version(version: str) -> None:
    # RFC 4253 section 4.2: SSH-2.0-softwareversion SP comments CR LF, at most 255
    # characters in all; the software version has no spaces and no minus sign.
    key = "ssh.server_version"
    if not isinstance(version, str):
        raise ConfigError(key, f"expected a string or null, got {describe(version)}")
    if len(version) > _MAX_SERVER_VERSION:
        raise ConfigError(
            key, f"longer than {_MAX_SERVER_VERSION} characters (RFC 4253 allows 255 in all)"
        )
    if any(not " " <= c <= "~" for c in version):
        raise ConfigError(key, f"{version!r}: only printable ASCII is allowed (RFC 4253)")
    software, _, _ = version.partition(" ")
    if not software or "-" in software:
        raise ConfigError(
            key,
            f"{version!r}: the software version (before the first space) must be non-empty "
            "and without '-' (RFC 4253); put other words after a space",
        )
    old = _BUGGY_OPENSSH.match(software)
    if old:
        raise ConfigError(
            key,
            f"{software!r}: OpenSSH clients work around bugs of OpenSSH before 8.0 "
            "(compat.c); claim a later version",
        )


def _check_ciphers(ciphers: tuple[str, ...]) -> None:
    # Imported here: asyncssh is heavy, and only a configured cipher list needs it.
    from asyncssh.encryption import get_encryption_algs

    if not ciphers:
        raise ConfigError("ssh.ciphers", "must list at least one cipher (or be null for defaults)")
    supported = [name.decode("ascii") for name in get_encryption_algs()]
    for i, name in enumerate(ciphers):
        if name not in supported:
            close = difflib.get_close_matches(str(name), supported, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"ssh.ciphers[{i}]",
                f"unsupported cipher {name!r}{hint}; supported: {', '.join(supported)}",
            )
    if len(set(ciphers)) != len(ciphers):
        raise ConfigError("ssh.ciphers", "lists a cipher twice")


@dataclass(frozen=True)
class KubernetesConfig:
    """The ``kubernetes`` section: how to reach the API server.

    With ``kubeconfig`` null kuberun uses the in-cluster service account when
    ``KUBERNETES_SERVICE_HOST`` is set, else ``$KUBECONFIG``, else
    ``~/.kube/config``.  ``verify_tls: false`` turns off verification of the
    API server's certificate (logged as a warning at every start).
    ``ping_interval`` is the seconds between WebSocket pings on exec streams.
    ``gateway_id`` names this gateway instance in the ``kuberun.io/gateway``
    label of its Pods (None: derived, see :func:`kuberun.janitor.gateway_id`).
    """

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str = "default"
    verify_tls: bool = True
    ping_interval: float = 30.0
    gateway_id: str | None = None

    def __post_init__(self) -> None:
        if self.kubeconfig is not None and not self.kubeconfig:
            raise ConfigError("kubernetes.kubeconfig", "expected a path or null, got ''")
        if self.context is not None and not self.context:
            raise ConfigError("kubernetes.context", "expected a context name or null, got ''")
        if not isinstance(self.namespace, str) or not _DNS_LABEL.fullmatch(self.namespace):
            raise ConfigError(
                "kubernetes.namespace",
                f"{self.namespace!r} is not a valid namespace name (lower-case letters, "
                "digits and '-', at most 63 characters)",
            )
        _check_seconds("kubernetes.ping_interval", self.ping_interval)
        if self.gateway_id is not None and (
            not _LABEL_VALUE.fullmatch(self.gateway_id) or len(self.gateway_id) > 63
        ):
            raise ConfigError(
                "kubernetes.gateway_id",
                f"{self.gateway_id!r} is not a valid label value (1 to 63 letters, digits, "
                "'-', '_' or '.', beginning and ending with a letter or digit)",
            )


def _default_metadata() -> dict[str, Any]:
    return {"generateName": "kuberun-", "labels": {}, "annotations": {}}


def _default_spec() -> dict[str, Any]:
    return {"containers": [{"name": "shell", "image": "debian:stable-slim"}]}


def _default_subsystems() -> dict[str, tuple[str, ...]]:
    return {"sftp": ("/usr/lib/openssh/sftp-server",)}


@dataclass(frozen=True)
class PodConfig:
    """The ``pod`` section: the Pod template and the commands run in it.

    ``metadata`` and ``spec`` are the Pod's ``metadata`` and ``spec`` as in
    any manifest; ``console_container`` names the container sessions exec
    into, whose ``command`` becomes ``idle_command``.  ``mode`` is
    ``"connection"`` (one Pod per SSH connection), ``"session"`` (one Pod
    per session channel) or ``"user"`` (one Pod per user, shared by all of its
    connections on every gateway replica, deleted ``idle_timeout`` seconds after
    the last one closed; ``lease_duration`` bounds how long the claims of a
    replica that died keep a Pod, see :mod:`kuberun.workspace`).  ``subsystems``
    maps an SSH subsystem name to an argv.  ``signals`` enables SSH signal
    delivery, which records each program's PID in a file under ``pid_dir``
    inside the Pod (None: the container's ``$TMPDIR``, else ``/tmp``).
    """

    mode: Literal["connection", "session", "user"] = "connection"
    metadata: dict[str, Any] = field(default_factory=_default_metadata)
    spec: dict[str, Any] = field(default_factory=_default_spec)
    console_container: str = "shell"
    idle_command: tuple[str, ...] = DEFAULT_IDLE_COMMAND
    shell_command: tuple[str, ...] = ("/bin/sh",)
    subsystems: Mapping[str, tuple[str, ...]] = field(default_factory=_default_subsystems)
    signals: bool = True
    pid_dir: str | None = None
    idle_timeout: float = 1800
    lease_duration: float = 15

    def __post_init__(self) -> None:
        _check_choice("pod.mode", self.mode, MODES)
        _check_metadata(self.metadata)
        _check_seconds("pod.idle_timeout", self.idle_timeout, allow_zero=True)
        _check_seconds("pod.lease_duration", self.lease_duration)
        if self.lease_duration < 1:
            raise ConfigError(
                "pod.lease_duration", f"must be at least 1 second, got {self.lease_duration!r}"
            )
        name = self.metadata.get("name")
        if self.mode == "user" and name is not None and "{username}" not in name:
            raise ConfigError(
                "pod.metadata.name",
                f"{name!r} would give every user the same Pod in user mode: put '{{username}}' "
                "in it, or use generateName (the prefix of each user's Pod name)",
            )
        _check_spec(self.spec, self.console_container)
        _check_argv("pod.idle_command", self.idle_command)
        _check_argv("pod.shell_command", self.shell_command)
        for name, argv in self.subsystems.items():
            if not isinstance(name, str) or not name or "\0" in name:
                raise ConfigError("pod.subsystems", f"invalid subsystem name {name!r}")
            _check_argv(f"pod.subsystems.{name}", argv)
        if self.pid_dir is None:
            pass
        elif not isinstance(self.pid_dir, str) or not self.pid_dir.startswith("/"):
            raise ConfigError("pod.pid_dir", f"expected an absolute path, got {self.pid_dir!r}")
        elif "\0" in self.pid_dir:
            raise ConfigError("pod.pid_dir", "must not contain a NUL character")

    def console(self) -> dict[str, Any]:
        """The console container's entry in ``spec["containers"]``."""
        for container in self.spec["containers"]:
            if container.get("name") == self.console_container:
                return dict(container)
        raise ConfigError("pod.console_container", f"no container named {self.console_container!r}")


def _check_string_map(path: str, value: object) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected a mapping, got {describe(value)}")
    for key, item in value.items():
        if not isinstance(key, str):
            raise ConfigError(path, f"keys must be strings, got {describe(key)}")
        if not isinstance(item, str):
            # YAML turns `tier: 1` or `debug: true` into non-strings; the API
            # server would reject them with a far less helpful message.
            raise ConfigError(join(path, key), f"expected a string, got {describe(item)}")


def _check_metadata(metadata: object) -> None:
    if not isinstance(metadata, Mapping):
        raise ConfigError("pod.metadata", f"expected a mapping, got {describe(metadata)}")
    names = [k for k in ("name", "generateName") if k in metadata]
    if not names:
        raise ConfigError("pod.metadata", "needs 'name' or 'generateName'")
    for key in names:
        if not isinstance(metadata[key], str) or not metadata[key]:
            raise ConfigError(
                f"pod.metadata.{key}", f"expected a non-empty string, got {describe(metadata[key])}"
            )
    for key in ("labels", "annotations"):
        if metadata.get(key) is not None:
            _check_string_map(f"pod.metadata.{key}", metadata[key])


def _check_spec(spec: object, console_container: str) -> None:
    if not isinstance(spec, Mapping):
        raise ConfigError("pod.spec", f"expected a mapping, got {describe(spec)}")
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise ConfigError("pod.spec.containers", "must be a non-empty list of containers")
    names = []
    for i, container in enumerate(containers):
        if not isinstance(container, Mapping):
            raise ConfigError(
                f"pod.spec.containers[{i}]", f"expected a mapping, got {describe(container)}"
            )
        name = container.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"pod.spec.containers[{i}].name", "every container needs a name")
        names.append(name)
    if not isinstance(console_container, str) or console_container not in names:
        raise ConfigError(
            "pod.console_container",
            f"no container named {console_container!r} in pod.spec.containers "
            f"(found: {', '.join(repr(n) for n in names)})",
        )


@dataclass(frozen=True)
class TimeoutsConfig:
    """The ``timeouts`` section, in seconds.

    ``pod_start`` bounds creating a Pod and waiting until it is ready (in both
    modes); ``pod_stop`` bounds deleting it; ``command_start`` bounds opening
    one exec stream.
    """

    pod_start: float = 60
    pod_stop: float = 30
    command_start: float = 30

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_seconds(f"timeouts.{f.name}", getattr(self, f.name))


@dataclass(frozen=True)
class MetricsConfig:
    """The ``metrics`` section: where Prometheus ``/metrics`` is served (None: off)."""

    listen: str | None = "127.0.0.1:9100"

    def __post_init__(self) -> None:
        if self.listen is not None:
            parse_listen(self.listen, "metrics.listen")


@dataclass(frozen=True)
class LoggingConfig:
    """The ``logging`` section: ``format`` is ``"text"`` or ``"json"``."""

    format: Literal["text", "json"] = "text"
    level: str = "INFO"

    def __post_init__(self) -> None:
        _check_choice("logging.format", self.format, ("text", "json"))
        _check_choice("logging.level", self.level, _LOG_LEVELS)


@dataclass(frozen=True)
class AuditConfig:
    """The ``audit`` section: the audit trail and session recordings (:mod:`kuberun.audit`).

    ``directory`` None turns auditing off; otherwise events (JSON lines) and
    recordings are written there.  ``recordings`` is ``"none"``, ``"pty"``
    (asciicast v2 of every pty session) or ``"all"`` (non-pty sessions too, as
    raw byte streams).  ``record_input`` adds what the client typed (passwords
    included, so off by default).  ``on_overflow`` says what happens when the
    disk is slower than a session: ``"drop"`` recording bytes (noted in the
    recording) or ``"block"`` the session until the writer catches up.
    """

    directory: str | None = None
    recordings: Literal["none", "pty", "all"] = "pty"
    record_input: bool = False
    on_overflow: Literal["drop", "block"] = "drop"

    def __post_init__(self) -> None:
        if self.directory is not None:
            if not isinstance(self.directory, str) or not self.directory:
                raise ConfigError("audit.directory", "expected a directory path or null, got ''")
            if "\0" in self.directory:
                raise ConfigError("audit.directory", "must not contain a NUL character")
        _check_choice("audit.recordings", self.recordings, ("none", "pty", "all"))
        if not isinstance(self.record_input, bool):
            raise ConfigError(
                "audit.record_input", f"expected true or false, got {describe(self.record_input)}"
            )
        _check_choice("audit.on_overflow", self.on_overflow, ("drop", "block"))

    @property
    def enabled(self) -> bool:
        """Whether events are written (``directory`` is set)."""
        return self.directory is not None


@dataclass(frozen=True)
class Config:
    """The whole gateway configuration."""

    ssh: SSHConfig = field(default_factory=SSHConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)
    pod: PodConfig = field(default_factory=PodConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def __post_init__(self) -> None:
        namespace = self.pod.metadata.get("namespace")
        if namespace is not None and namespace != self.kubernetes.namespace:
            raise ConfigError(
                "pod.metadata.namespace",
                f"{namespace!r} differs from kubernetes.namespace "
                f"({self.kubernetes.namespace!r}); set the namespace there and omit it here",
            )


# --------------------------------------------------------------------------
# Reading plain data into the tree


def _read_ssh(sec: Section) -> SSHConfig:
    return SSHConfig(
        listen=sec.string("listen", SSHConfig.listen),
        host_keys=sec.strings("host_keys", SSHConfig.host_keys),
        authorized_keys=sec.optional_string("authorized_keys", None),
        accept_env=sec.strings("accept_env", SSHConfig.accept_env),
        max_sessions=sec.integer("max_sessions", SSHConfig.max_sessions),
        max_startups=sec.integer("max_startups", SSHConfig.max_startups),
        login_grace_time=sec.number("login_grace_time", SSHConfig.login_grace_time),
        ciphers=sec.optional_strings("ciphers", None),
        banner=sec.optional_string("banner", None),
        server_version=sec.optional_string("server_version", DEFAULT_SERVER_VERSION),
        allow_tcp_forwarding=sec.boolean("allow_tcp_forwarding", SSHConfig.allow_tcp_forwarding),
        permit_open=sec.strings("permit_open", SSHConfig.permit_open),
    )


def _read_kubernetes(sec: Section) -> KubernetesConfig:
    return KubernetesConfig(
        kubeconfig=sec.optional_string("kubeconfig", None),
        context=sec.optional_string("context", None),
        namespace=sec.string("namespace", KubernetesConfig.namespace),
        verify_tls=sec.boolean("verify_tls", KubernetesConfig.verify_tls),
        ping_interval=sec.number("ping_interval", KubernetesConfig.ping_interval),
        gateway_id=sec.optional_string("gateway_id", None),
    )


def _read_pod(sec: Section) -> PodConfig:
    subsystems: Mapping[str, tuple[str, ...]] = _default_subsystems()
    if sec.has("subsystems"):
        table = sec.section("subsystems", keys=None)
        subsystems = {name: table.strings(name, ()) for name in table}
    mode = sec.string("mode", PodConfig.mode)
    _check_choice("pod.mode", mode, MODES)
    return PodConfig(
        mode=next(m for m in MODES if m == mode),
        metadata=copy.deepcopy(dict(sec.mapping("metadata", _default_metadata()))),
        spec=copy.deepcopy(dict(sec.mapping("spec", _default_spec()))),
        console_container=sec.string("console_container", PodConfig.console_container),
        idle_command=sec.strings("idle_command", DEFAULT_IDLE_COMMAND),
        shell_command=sec.strings("shell_command", PodConfig.shell_command),
        subsystems=subsystems,
        signals=sec.boolean("signals", PodConfig.signals),
        pid_dir=sec.optional_string("pid_dir", None),
        idle_timeout=sec.number("idle_timeout", PodConfig.idle_timeout),
        lease_duration=sec.number("lease_duration", PodConfig.lease_duration),
    )


def _read_timeouts(sec: Section) -> TimeoutsConfig:
    return TimeoutsConfig(
        pod_start=sec.number("pod_start", TimeoutsConfig.pod_start),
        pod_stop=sec.number("pod_stop", TimeoutsConfig.pod_stop),
        command_start=sec.number("command_start", TimeoutsConfig.command_start),
    )


def _read_metrics(sec: Section) -> MetricsConfig:
    return MetricsConfig(listen=sec.optional_string("listen", MetricsConfig.listen))


def _read_logging(sec: Section) -> LoggingConfig:
    fmt = sec.string("format", LoggingConfig.format)
    _check_choice("logging.format", fmt, ("text", "json"))
    level = sec.string("level", LoggingConfig.level)
    return LoggingConfig(
        format="json" if fmt == "json" else "text",
        level=level.upper() if level.upper() in _LOG_LEVELS else level,
    )


def _read_audit(sec: Section) -> AuditConfig:
    recordings = sec.string("recordings", AuditConfig.recordings)
    _check_choice("audit.recordings", recordings, ("none", "pty", "all"))
    on_overflow = sec.string("on_overflow", AuditConfig.on_overflow)
    _check_choice("audit.on_overflow", on_overflow, ("drop", "block"))
    return AuditConfig(
        directory=sec.optional_string("directory", None),
        recordings="none" if recordings == "none" else "all" if recordings == "all" else "pty",
        record_input=sec.boolean("record_input", AuditConfig.record_input),
        on_overflow="block" if on_overflow == "block" else "drop",
    )


_READERS = {
    "ssh": (SSHConfig, _read_ssh),
    "kubernetes": (KubernetesConfig, _read_kubernetes),
    "pod": (PodConfig, _read_pod),
    "timeouts": (TimeoutsConfig, _read_timeouts),
    "metrics": (MetricsConfig, _read_metrics),
    "logging": (LoggingConfig, _read_logging),
    "audit": (AuditConfig, _read_audit),
}

#: Every known key per section, for "unknown key" hints.
SCHEMA: dict[str, tuple[str, ...]] = {
    name: tuple(f.name for f in fields(cls)) for name, (cls, _) in _READERS.items()
}


def config_from_dict(data: Mapping[str, Any] | None) -> Config:
    """Build a :class:`Config` from plain data (as parsed from YAML or JSON).

    Missing keys take their defaults; ``None`` or ``{}`` gives the default
    configuration.  The input is not modified and not referenced afterwards.

    :raises ConfigError: for the first problem found, naming its key path.
    """
    root = Section(data, "", SCHEMA, SCHEMA)
    parts = {
        name: reader(root.section(name, keys=SCHEMA[name]))
        for name, (_, reader) in _READERS.items()
    }
    return Config(**parts)  # type: ignore[arg-type]


def load_config(path: str | os.PathLike[str]) -> Config:
    """Load a YAML configuration file.

    An empty file gives the default configuration.

    :raises ConfigError: if the file cannot be read, is not valid YAML (the
        error names the file, line and column), or holds an invalid
        configuration (the error names the key path, file and line).
    """
    fspath = os.fspath(path)
    data, lines = read_yaml_file(fspath)
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(fspath, f"expected a mapping of sections, got {describe(data)}")
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise with_line(exc, fspath, lines) from None
