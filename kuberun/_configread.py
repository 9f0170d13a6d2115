"""Strict reading of plain configuration data, with key paths and line numbers.

Private helpers of :mod:`kuberun.config`: a typed accessor over one mapping
(:class:`Section`) that rejects unknown keys with a hint, and a YAML reader
that remembers the line of every key so errors can point at it.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["Section", "describe", "join", "read_yaml_file", "with_line"]

# Pod fields users put directly under `pod:` instead of `pod.spec` / `pod.metadata`.
_POD_SPEC_FIELDS = frozenset(
    {
        "containers",
        "initContainers",
        "volumes",
        "nodeSelector",
        "nodeName",
        "affinity",
        "tolerations",
        "serviceAccountName",
        "serviceAccount",
        "securityContext",
        "restartPolicy",
        "terminationGracePeriodSeconds",
        "activeDeadlineSeconds",
        "imagePullSecrets",
        "hostNetwork",
        "hostPID",
        "hostIPC",
        "dnsPolicy",
        "dnsConfig",
        "priorityClassName",
        "runtimeClassName",
        "automountServiceAccountToken",
        "shareProcessNamespace",
        "hostname",
        "subdomain",
        "enableServiceLinks",
        "topologySpreadConstraints",
        "schedulerName",
    }
)
_CONTAINER_FIELDS = frozenset(
    {
        "image",
        "imagePullPolicy",
        "resources",
        "env",
        "envFrom",
        "command",
        "args",
        "workingDir",
        "volumeMounts",
        "ports",
        "livenessProbe",
        "readinessProbe",
    }
)
_METADATA_FIELDS = frozenset({"name", "generateName", "labels", "annotations"})
# ContainerSSH names with a different kuberun spelling.
_RENAMED = {
    "podSpec": "spec",
    "consoleContainerNumber": "console_container",
    "timeout": "timeouts.pod_start",
    "podStart": "pod_start",
    "podStop": "pod_stop",
    "commandStart": "command_start",
    "insecure": "kubernetes.verify_tls",
}
_MAX_DEPTH = 64


def join(path: str, key: str) -> str:
    """``path.key``, or ``key`` at the top level."""
    return f"{path}.{key}" if path else key


def describe(value: object) -> str:
    """Name a value's YAML type for an error message, with a short excerpt."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        text = repr(value) if len(value) <= 40 else repr(value[:37]) + "..."
        return f"a string ({text})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"


def _snake(key: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower()


def _hint(
    path: str, key: str, allowed: Collection[str], schema: Mapping[str, Collection[str]]
) -> str:
    """Suggest what an unknown key was meant to be."""
    if key in _RENAMED:
        return f" (did you mean {_RENAMED[key]!r}?)"
    if _snake(key) in allowed:
        return f" (did you mean {_snake(key)!r}? keys are snake_case)"
    if path == "pod":
        if key == "namespace":
            return " (the namespace is set by 'kubernetes.namespace')"
        if key in _METADATA_FIELDS:
            return f" (did you mean 'pod.metadata.{key}'?)"
        if key in _POD_SPEC_FIELDS:
            return f" (did you mean 'pod.spec.{key}'?)"
        if key in _CONTAINER_FIELDS:
            return " (container fields go in a container under 'pod.spec.containers')"
    elsewhere = [
        join(section, _snake(key))
        for section, keys in schema.items()
        if section != path and _snake(key) in keys
    ]
    if path and key in schema:
        elsewhere.append(key)
    if elsewhere:
        return f" (did you mean {' or '.join(repr(p) for p in elsewhere)}?)"
    close = difflib.get_close_matches(key, list(allowed), n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return ""


def _check_plain(path: str, value: object, depth: int = 0) -> None:
    """Reject what JSON cannot carry to the API server (dates, non-string keys, NaN)."""
    if depth > _MAX_DEPTH:
        raise ConfigError(path, "nested too deeply (a recursive YAML alias?)")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(path, f"keys must be strings, got {describe(key)}")
            _check_plain(join(path, key), item, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(f"{path}[{i}]", item, depth + 1)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(path, f"expected a finite number, got {value}")
    elif not (value is None or isinstance(value, (str, int, bool))):
        problem = f"unsupported value {describe(value)}; quote it to make it a string"
        raise ConfigError(path, problem)


class Section:
    """Typed, strict access to one mapping of the configuration.

    ``keys`` lists the keys allowed in it (None: any string key); any other
    key is a :class:`ConfigError` naming its full path, with a hint drawn
    from ``schema`` (section name → keys) when the key looks misplaced.
    """

    def __init__(
        self,
        data: object,
        path: str,
        keys: Collection[str] | None,
        schema: Mapping[str, Collection[str]] | None = None,
    ) -> None:
        self.path = path
        self.schema: Mapping[str, Collection[str]] = schema if schema is not None else {}
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            where = path or "configuration"
            raise ConfigError(path, f"expected a mapping for {where}, got {describe(data)}")
        for key in data:
            if not isinstance(key, str):
                raise ConfigError(path, f"keys must be strings, got {describe(key)}")
            if keys is not None and key not in keys:
                hint = _hint(path, key, keys, self.schema)
                raise ConfigError(join(path, key), f"unknown key{hint}")
        self.data: Mapping[str, Any] = data

    def has(self, key: str) -> bool:
        """Whether ``key`` is present (even if null)."""
        return key in self.data

    def __iter__(self) -> Iterator[str]:
        """The keys present, in order."""
        return iter(self.data)

    def section(self, key: str, *, keys: Collection[str] | None) -> Section:
        """The nested mapping at ``key`` (missing or null: empty)."""
        return Section(self.data.get(key), join(self.path, key), keys, self.schema)

    def _get(self, key: str, default: Any) -> tuple[Any, str]:
        return self.data.get(key, default), join(self.path, key)

    def string(self, key: str, default: str) -> str:
        """A required string (a present null is an error)."""
        value, path = self._get(key, default)
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {describe(value)}")
        return value

    def optional_string(self, key: str, default: str | None) -> str | None:
        """A string or null."""
        value, path = self._get(key, default)
        if value is not None and not isinstance(value, str):
            raise ConfigError(path, f"expected a string or null, got {describe(value)}")
        return value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """A list of strings, as a tuple."""
        value, path = self._get(key, default)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list of strings, got {describe(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"{path}[{i}]", f"expected a string, got {describe(item)}")
        return tuple(value)

    def optional_strings(self, key: str, default: tuple[str, ...] | None) -> tuple[str, ...] | None:
        """A list of strings or null."""
        if self.data.get(key, default) is None:
            return None
        return self.strings(key, default or ())

    def integer(self, key: str, default: int) -> int:
        """An integer (booleans and floats are rejected)."""
        value, path = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {describe(value)}")
        return value

    def number(self, key: str, default: float) -> float:
        """An integer or floating-point number."""
        value, path = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {describe(value)}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        """``true`` or ``false``."""
        value, path = self._get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {describe(value)}")
        return value

    def mapping(self, key: str, default: Mapping[str, Any]) -> Mapping[str, Any]:
        """A free-form mapping that must be representable as JSON."""
        value, path = self._get(key, default)
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {describe(value)}")
        _check_plain(path, value)
        return value


# --------------------------------------------------------------------------
# YAML with line numbers


def _index(
    node: yaml.Node, path: str, lines: dict[str, int], active: set[int], fspath: str
) -> None:
    """Record the line of every key below ``node``; reject duplicate keys."""
    if id(node) in active:  # a recursive alias; _check_plain reports it
        return
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                key_node, yaml.ScalarNode
            ):
                continue
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            child = join(path, key)
            if key in seen:
                raise ConfigError(
                    child,
                    f"duplicate key: on line {seen[key]} and again on line {line} of {fspath}",
                )
            seen[key] = line
            lines.setdefault(child, line)
            _index(value_node, child, lines, active, fspath)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = f"{path}[{i}]"
            lines.setdefault(child, item.start_mark.line + 1)
            _index(item, child, lines, active, fspath)
    active.discard(id(node))


def read_yaml_file(fspath: str) -> tuple[Any, dict[str, int]]:
    """Parse a YAML file; return its data and the line of every key path.

    :raises ConfigError: if the file cannot be read or parsed, naming the
        file (and line and column for a syntax error).
    """
    try:
        with open(fspath, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(fspath, f"cannot read the config file: not UTF-8 ({exc.reason})")
    except OSError as exc:
        raise ConfigError(fspath, f"cannot read the config file: {exc.strerror or exc}")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[str, int] = {}
        if node is None:
            return None, lines
        _index(node, "", lines, set(), fspath)
        return loader.construct_document(node), lines
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{fspath}:{mark.line + 1}:{mark.column + 1}" if mark else fspath
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError(where, f"invalid YAML: {problem or exc}")
    except yaml.YAMLError as exc:
        raise ConfigError(fspath, f"invalid YAML: {exc}")
    finally:
        loader.dispose()


def with_line(exc: ConfigError, fspath: str, lines: Mapping[str, int]) -> ConfigError:
    """``exc`` with the file and line of its key path (or nearest parent) appended."""
    path = exc.path
    while path and path not in lines:
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    where = f"{fspath}, line {lines[path]}" if path else fspath
    return ConfigError(exc.path, f"{exc.problem} ({where})")
