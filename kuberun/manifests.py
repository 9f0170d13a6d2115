"""Pure builders: the Pod manifest, label values and selectors, command wrappers.

Nothing here does I/O.  The command wrappers make a session behave as it does
under OpenSSH with nothing in the image but a POSIX ``sh``: environment
variables (and ``TERM``) are exported and the program's PID recorded for
signal delivery by a small fixed script that receives every value as a
positional argument, so no value is ever parsed as shell code.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import PodConfig

__all__ = [
    "ANNOTATION_CLIENT_ADDRESS",
    "ANNOTATION_USERNAME",
    "LABEL_CONNECTION_ID",
    "LABEL_GATEWAY",
    "LABEL_MANAGED_BY",
    "LABEL_SESSION_ID",
    "LABEL_USERNAME",
    "MANAGED_BY",
    "MAX_ANNOTATION",
    "SIGNAL_NAMES",
    "annotation_value",
    "build_pod",
    "dns_safe_username",
    "env_allowed",
    "exec_argv",
    "id_label_value",
    "is_valid_label_value",
    "kill_argv",
    "label_selector",
    "managed_selector",
    "pid_file_path",
    "sanitize_label_value",
    "substitute_username",
    "valid_env_name",
    "wrap_command",
]

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "kuberun"
LABEL_CONNECTION_ID = "kuberun.io/connection-id"
LABEL_SESSION_ID = "kuberun.io/session-id"
LABEL_USERNAME = "kuberun.io/username"
LABEL_GATEWAY = "kuberun.io/gateway"
ANNOTATION_CLIENT_ADDRESS = "kuberun.io/client-address"
ANNOTATION_USERNAME = "kuberun.io/username"

#: Signal names an SSH ``signal`` request may carry (RFC 4254 section 6.10).
SIGNAL_NAMES: frozenset[str] = frozenset(
    {
        "ABRT",
        "ALRM",
        "FPE",
        "HUP",
        "ILL",
        "INT",
        "KILL",
        "PIPE",
        "QUIT",
        "SEGV",
        "TERM",
        "USR1",
        "USR2",
    }
)

_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9_.-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DNS_SAFE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_NOT_DNS = re.compile(r"[^a-z0-9]+")
#: Longest :func:`dns_safe_username`; leaves room for a name prefix within 63 characters.
MAX_SAFE_USERNAME = 40
#: What ``{username}`` in ``pod.metadata`` and ``pod.spec`` string values becomes.
USERNAME_PLACEHOLDER = "{username}"
_MAX_LABEL = 63
#: Longest annotation value kuberun derives from client input.
MAX_ANNOTATION = 1024

# --------------------------------------------------------------------------
# Labels


def is_valid_label_value(value: str) -> bool:
    """Whether ``value`` is a valid Kubernetes label value.

    At most 63 characters from ``[A-Za-z0-9._-]``, beginning and ending with
    an alphanumeric character; the empty string is valid too.
    """
    return len(value) <= _MAX_LABEL and _LABEL_VALUE.fullmatch(value) is not None


def _trim(value: str) -> str:
    return value.strip("-_.")


def sanitize_label_value(value: str) -> str | None:
    """Turn an arbitrary string into a valid, non-empty label value.

    Each run of characters a label value cannot hold becomes one ``-``,
    leading and trailing punctuation is dropped and the result is cut to 63
    characters.  A value that is already valid comes back unchanged.  Returns
    None when nothing usable is left (``"@@@"``, ``""``): omit the label then.
    """
    if value and is_valid_label_value(value):
        return value
    cleaned = _trim(_UNSAFE_RUN.sub("-", value))
    cleaned = _trim(cleaned[:_MAX_LABEL])
    return cleaned or None


def id_label_value(value: str) -> str:
    """A label value for an identifier (connection, session, gateway).

    Unlike :func:`sanitize_label_value` this keeps distinct identifiers
    distinct, because Pods are selected (and deleted) by these labels: a
    valid value is kept as it is; any other gets a hash of the original
    appended to its sanitised form, so ``"a b"`` and ``"a-b"`` never collide.
    """
    if value and is_valid_label_value(value):
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    base = _trim(_UNSAFE_RUN.sub("-", value))[: _MAX_LABEL - len(digest) - 1]
    base = _trim(base)
    return f"{base}-{digest}" if base else digest


def dns_safe_username(username: str) -> str:
    """The DNS-safe form of a username: a lowercase RFC 1123 label of at most 40 characters.

    A username that already is one (and has no ``--``) is kept as it is. Any
    other is lowercased, each run of other characters becomes ``-``, and
    ``---`` plus 8 hex digits of its SHA-256 are appended: ``Jane.Doe`` becomes
    ``jane-doe---`` followed by the hash. Kept forms never contain ``--`` and
    hashed ones always do, so distinct usernames keep distinct forms (short of a
    32-bit hash collision between two names that both needed hashing).
    """
    if (
        _DNS_SAFE.fullmatch(username)
        and "--" not in username
        and len(username) <= MAX_SAFE_USERNAME
    ):
        return username
    digest = hashlib.sha256(username.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    slug = _NOT_DNS.sub("-", username.lower()).strip("-")[: MAX_SAFE_USERNAME - 11].strip("-")
    return f"{slug or 'u'}---{digest}"


def substitute_username(value: Any, safe_username: str) -> Any:
    """A deep copy of ``value`` with ``{username}`` replaced in every string value.

    Only string values change: mapping keys, numbers and booleans are kept, and
    nothing is parsed (no YAML, no shell, no format specs), so a username can
    never add structure to the manifest.
    """
    if isinstance(value, str):
        return value.replace(USERNAME_PLACEHOLDER, safe_username)
    if isinstance(value, Mapping):
        return {k: substitute_username(v, safe_username) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_username(v, safe_username) for v in value]
    return copy.deepcopy(value)


def annotation_value(value: str, limit: int = MAX_ANNOTATION) -> str:
    """An annotation value made of what a client sent: printable characters kept,
    others (control characters, terminal escapes) written as ``\\xNN``/``\\uNNNN``,
    and cut to ``limit`` characters (annotations share a 256 KiB budget per object).
    """
    if not value.isprintable():
        value = "".join(
            c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"
            for c in value
        )
    if len(value) > limit:
        value = value[: limit - 3] + "..."
    return value


def _check_label_key(key: str) -> None:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        raise ValueError(f"invalid label key prefix in {key!r}")
    if not _LABEL_NAME.fullmatch(name):
        raise ValueError(f"invalid label key {key!r}")


def label_selector(labels: Mapping[str, str] | None = None, /, **more: str) -> str:
    """An equality-based label selector (``"k1=v1,k2=v2"``).

    Keys with ``/`` or ``.`` go in the ``labels`` mapping; plain names may be
    keyword arguments.  Keys and values are validated, so a value can never
    smuggle in another requirement (``"x,other=y"``).

    :raises ValueError: for an invalid key or value.
    """
    merged = {**(labels or {}), **more}
    parts = []
    for key, value in merged.items():
        _check_label_key(key)
        if not is_valid_label_value(value):
            raise ValueError(f"invalid label value {value!r} for {key!r}")
        parts.append(f"{key}={value}")
    return ",".join(parts)


def managed_selector(connection_id: str | None = None, gateway: str | None = None) -> str:
    """The selector for Pods kuberun manages, optionally of one connection or gateway.

    The identifiers are mapped with :func:`id_label_value`, as :func:`build_pod`
    does, so the selector matches exactly the Pods built for them.
    """
    labels = {LABEL_MANAGED_BY: MANAGED_BY}
    if connection_id is not None:
        labels[LABEL_CONNECTION_ID] = id_label_value(connection_id)
    if gateway is not None:
        labels[LABEL_GATEWAY] = id_label_value(gateway)
    return label_selector(labels)


# --------------------------------------------------------------------------
# The Pod


def build_pod(
    pod: PodConfig,
    *,
    connection_id: str,
    username: str,
    client_address: str | None = None,
    gateway: str | None = None,
    owner: Mapping[str, str] | None = None,
    session_id: str | None = None,
) -> dict[str, Any]:
    """Build the Pod manifest for one connection (or one session in session mode).

    The template (``pod.metadata``, ``pod.spec``) is deep-copied, never
    modified; ``{username}`` in its string values becomes
    :func:`dns_safe_username` of ``username``.  User labels and annotations are kept; kuberun adds
    ``app.kubernetes.io/managed-by: kuberun``, ``kuberun.io/connection-id``,
    ``kuberun.io/session-id`` (if ``session_id``), ``kuberun.io/gateway`` (if
    ``gateway``) and a sanitised ``kuberun.io/username`` (omitted if nothing
    of it is usable).  The username and ``client_address`` go in
    annotations (through :func:`annotation_value`).  The console container runs
    ``pod.idle_command`` (its ``args`` are dropped) without stdin or tty.
    ``owner`` (``apiVersion``, ``kind``, ``name``, ``uid``) adds an
    ownerReference so Kubernetes collects the Pod if its owner goes away.

    :raises ConfigError: if the console container is not in the template.
    :raises ValueError: if ``owner`` lacks one of its four keys.
    """
    safe_username = dns_safe_username(username)
    metadata: dict[str, Any] = substitute_username(dict(pod.metadata), safe_username)
    spec: dict[str, Any] = substitute_username(dict(pod.spec), safe_username)

    labels = dict(metadata.get("labels") or {})
    labels[LABEL_MANAGED_BY] = MANAGED_BY
    labels[LABEL_CONNECTION_ID] = id_label_value(connection_id)
    if session_id is not None:
        labels[LABEL_SESSION_ID] = id_label_value(session_id)
    if gateway is not None:
        labels[LABEL_GATEWAY] = id_label_value(gateway)
    user_label = sanitize_label_value(username)
    if user_label is not None:
        labels[LABEL_USERNAME] = user_label
    else:
        # A template label must not claim a username the user does not have.
        labels.pop(LABEL_USERNAME, None)
    metadata["labels"] = labels

    annotations = dict(metadata.get("annotations") or {})
    annotations[ANNOTATION_USERNAME] = annotation_value(username)
    if client_address is not None:
        annotations[ANNOTATION_CLIENT_ADDRESS] = annotation_value(client_address)
    metadata["annotations"] = annotations

    if owner is not None:
        missing = [k for k in ("apiVersion", "kind", "name", "uid") if not owner.get(k)]
        if missing:
            raise ValueError(f"owner reference lacks {', '.join(missing)}")
        reference = {k: owner[k] for k in ("apiVersion", "kind", "name", "uid")}
        metadata["ownerReferences"] = [*(metadata.get("ownerReferences") or []), reference]

    containers = spec.get("containers") or []
    console = next(
        (c for c in containers if isinstance(c, dict) and c.get("name") == pod.console_container),
        None,
    )
    if console is None:
        raise ConfigError(
            "pod.console_container", f"no container named {pod.console_container!r} in pod.spec"
        )
    console["command"] = list(pod.idle_command)
    console.pop("args", None)
    # Sessions bring their own stdin and tty through exec; the idle command
    # must not hold a stdin of its own open.
    console["stdin"] = False
    console["stdinOnce"] = False
    console["tty"] = False

    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


# --------------------------------------------------------------------------
# Commands run through exec

# $0 is "kuberun"; $1 the PID file or ""; then NAME=value words; then "--";
# then the program's argv.  The script keeps no variables of its own (only
# functions and positional parameters; "p" is set before the first export and
# never read after it), so an exported name (even "n", "p" or "IFS") cannot
# change what it does next; "--" cannot be an env word, which
# always holds "=".  `export "$1"` hands the word to the builtin after
# expansion, so the value is taken literally, never re-read as shell code.
#
# Signals go to the program's process group, so they also reach what it
# starts (`sh -c 'a; b'`: dash does not exec a lone command, and the program
# may start children of its own).  The PID file holds "-PGID" when the program
# leads its own group, the bare PID when it cannot:
# - the exec already leads its group (`kill -0 -$$` finds a group with our
#   PID): runc, crun and devcluster start every exec in a new session, and a
#   pty always gets one.  The program is exec'd and keeps that PID.
# - otherwise, without a terminal, a shell whose job control works without one
#   (bash, ksh, zsh as /bin/sh) runs the program as a job, which gets a group
#   of its own; the shell waits and exits with its status.  dash and BusyBox
#   refuse `set -m` without a terminal: the program is exec'd and only it is
#   signalled.  (With a terminal a job would not be in the foreground.)
# The PID file is written before `exec` (after `&` for a job); failing to
# write it is not fatal (signal delivery then fails on its own; the session
# still works).  POSIX kill wants "--" before a negative PID, which BusyBox's
# kill refuses; the XSI `kill -SIG -PID` form works in all of them.  A
# relative PID file is in the container's $TMPDIR, else /tmp.
_WRAPPER = (
    'run() { while [ "$1" != -- ]; do export "$1"; shift; done; shift; exec "$@"; }; '
    'job() { shift; run "$@"; }; '
    "main() { "
    'if [ -z "$1" ]; then shift; run "$@"; fi; '
    'if kill -0 "-$$" 2>/dev/null; then { echo "-$$" > "$1"; } 2>/dev/null; shift; run "$@"; fi; '
    "if [ ! -t 0 ] && [ ! -t 1 ] && [ ! -t 2 ]; then set -m 2>/dev/null; fi; "
    'case $- in *m*) ;; *) { echo "$$" > "$1"; } 2>/dev/null; shift; run "$@";; esac; '
    'job "$@" & { echo "-$!" > "$1"; } 2>/dev/null; wait "$!"; }; '
    'case $1 in ""|/*) main "$@";; *) p="${TMPDIR:-/tmp}/$1"; shift; main "$p" "$@";; esac'
)

# A pty's first size.  The exec's first resize message travels beside the
# program's start, and a real node (kubelet, containerd) applies it
# asynchronously: the program can run before it lands and see a 0x0 terminal.
# So the wrapper of a pty session first gives its terminal the client's size
# itself, while the terminal has none yet ("0 0"; a size the runtime already
# applied, perhaps a newer one, is left alone); later changes still come as
# resize messages.  `stty` is the one external program used, before any
# exported word can change PATH; an image without it runs the program as
# before and leaves the size to the resize message.
_SET_SIZE = (
    'case $(stty size 2>/dev/null) in "0 0") stty rows {rows} cols {cols} 2>/dev/null;; esac; '
)

# $1 the signal name (checked against SIGNAL_NAMES first), $2 the PID file.
# Only builtins: `read` instead of `cat`, so nothing but sh is needed.  The
# file holds a PID or "-" and a process group id; digits without a leading
# zero and never 1: "-1", "0" or "1" in a tampered file would otherwise
# signal every process or the idle command's group.
_KILLER = (
    'case $2 in /*) read -r pid < "$2";; *) read -r pid < "${TMPDIR:-/tmp}/$2";; esac '
    "|| exit 1; "
    'case $pid in ""|-|*[!0-9-]*|?*-*|0*|-0*|1|-1) exit 1;; esac; '
    'kill -"$1" "$pid"'
)


def valid_env_name(name: str) -> bool:
    """Whether ``name`` is a portable environment variable name (``[A-Za-z_][A-Za-z0-9_]*``)."""
    return _ENV_NAME.fullmatch(name) is not None


def env_allowed(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches one of ``patterns`` (OpenSSH ``AcceptEnv`` style).

    ``*`` matches any run of characters, ``?`` any one; matching is case
    sensitive.  Names that are not valid variable names never match.
    """
    return valid_env_name(name) and any(fnmatchcase(name, p) for p in patterns)


def _check_arg(what: str, value: str) -> None:
    if "\0" in value:
        raise ValueError(f"{what} contains a NUL character")


def exec_argv(command: str) -> list[str]:
    """The argv for an SSH ``exec`` request: ``/bin/sh -c COMMAND``, as OpenSSH runs it.

    :raises ValueError: if ``command`` contains a NUL character.
    """
    _check_arg("the command", command)
    return ["/bin/sh", "-c", command]


def wrap_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    pid_file: str | None = None,
    term_size: tuple[int, int] | None = None,
) -> list[str]:
    """Wrap ``argv`` so that ``env`` is exported and its process group recorded in ``pid_file``.

    The result is ``["/bin/sh", "-c", SCRIPT, "kuberun", PID_FILE_OR_EMPTY,
    "NAME=value", ..., "--", *argv]``: the script exports each word with
    ``export "$1"`` and ``exec``-s the program.  ``pid_file`` gets ``-PGID``
    when the program leads its own process group (the exec already does, or
    the shell's job control gives the program a group of its own), the bare
    PID where neither is possible (dash or BusyBox without a terminal, in an
    exec that is not a group leader).  Values are data, never code.
    ``term_size`` (columns, rows) is for a pty session: the script first sets
    its terminal to that size unless the terminal already has one (see
    ``_SET_SIZE``).  With no env, no PID file and no size, ``argv`` is
    returned unchanged.

    :raises ValueError: for an empty argv, an invalid variable name, a
        terminal size that is not two positive integers, or a NUL character
        anywhere (argv strings cannot carry one).
    """
    if not argv:
        raise ValueError("empty argv")
    env = env or {}
    for i, arg in enumerate(argv):
        _check_arg(f"argv[{i}]", arg)
    script = _WRAPPER
    if term_size is not None:
        cols, rows = term_size
        if not all(type(n) is int and n > 0 for n in (cols, rows)):
            raise ValueError(f"invalid terminal size {term_size!r}")
        script = _SET_SIZE.format(rows=rows, cols=cols) + script
    elif not env and pid_file is None:
        return list(argv)
    words = []
    for name, value in env.items():
        if not valid_env_name(name):
            raise ValueError(f"invalid environment variable name {name!r}")
        _check_arg(f"the value of {name}", value)
        words.append(f"{name}={value}")
    if pid_file is not None:
        _check_arg("the PID file path", pid_file)
    return ["/bin/sh", "-c", script, "kuberun", pid_file or "", *words, "--", *argv]


def _file_part(value: str) -> str:
    """A file-name-safe, collision-free form of an identifier."""
    cleaned = _UNSAFE_RUN.sub("-", value).strip(".-")[:40]
    if cleaned == value:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{cleaned}-{digest}" if cleaned else digest


def pid_file_path(pid_dir: str | None, connection_id: str, channel_id: str) -> str:
    """Where the wrapper records the PID of one channel's program inside the Pod.

    The identifiers are reduced to file-name-safe characters (with a hash
    when that changes them), so they cannot escape ``pid_dir``. With
    ``pid_dir`` None the path is relative: the wrapper and :func:`kill_argv`
    put it in the container's ``$TMPDIR``, else ``/tmp``.
    """
    name = f"kuberun-{_file_part(connection_id)}-{_file_part(channel_id)}.pid"
    if pid_dir is None:
        return name
    return f"{pid_dir.rstrip('/')}/{name}"


def kill_argv(signal_name: str, pid_file: str) -> list[str]:
    """The argv of an exec that sends ``signal_name`` to what :func:`wrap_command`
    recorded in ``pid_file``: the program's process group, or its PID alone.

    ``signal_name`` is an RFC 4254 name without ``SIG`` (``"TERM"``,
    ``"USR1"``, see :data:`SIGNAL_NAMES`).  Both values reach ``sh`` as
    positional arguments, never as script text.  The exec exits 0 when the
    signal was sent, non-zero when the file is missing or does not hold a
    plausible PID or group, or the process (group) is gone.

    :raises ValueError: for a signal name outside :data:`SIGNAL_NAMES`.
    """
    if signal_name not in SIGNAL_NAMES:
        raise ValueError(f"unknown signal name {signal_name!r}")
    _check_arg("the PID file path", pid_file)
    return ["/bin/sh", "-c", _KILLER, "kuberun", signal_name, pid_file]
