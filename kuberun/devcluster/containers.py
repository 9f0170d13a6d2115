"""Per-container state and the container environment (devcluster is not a production runtime).

A :class:`Container` holds what the kubelet tracks for one container: its state
in the Pod status, the process group standing in for it, the exec sessions
running inside it and a bounded log buffer for ``pods/log``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
from typing import Any

from .pods import NODE_NAME, POD_IP, now_rfc3339
from .runtime import Proc

__all__ = ["ConfigError", "Container", "LogBuffer", "expand", "resolve_env"]

Obj = dict[str, Any]

LOG_LIMIT = 1 << 20
_VAR_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


class ConfigError(Exception):
    """The container cannot be created (``CreateContainerConfigError``)."""


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known names are replaced, ``$$`` escapes ``$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, text)


def _field_ref(pod: Obj, path: str) -> str:
    meta = pod.get("metadata") or {}
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    values = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": NODE_NAME,
        "spec.serviceAccountName": (pod.get("spec") or {}).get("serviceAccountName", ""),
        "status.hostIP": POD_IP,
        "status.hostIPs": POD_IP,
        "status.podIP": POD_IP,
        "status.podIPs": POD_IP,
    }
    if path not in values:
        raise ConfigError(f'unsupported fieldRef path "{path}"')
    return str(values[path])


def _resource_ref(ctr: Obj, ref: Obj) -> str:
    resource = str(ref.get("resource", ""))
    limits = (ctr.get("resources") or {}).get("limits") or {}
    requests = (ctr.get("resources") or {}).get("requests") or {}
    kind, _, what = resource.partition(".")
    source = limits if kind == "limits" else requests
    if what in source:
        return str(source[what])
    if what == "cpu":
        return str(os.cpu_count() or 1) if kind == "limits" else "0"
    if what == "memory":
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = 0
        return str(total) if kind == "limits" else "0"
    return "0"


def resolve_env(pod: Obj, ctr: Obj, base: dict[str, str]) -> dict[str, str]:
    """The container's environment; raises :class:`ConfigError` like the kubelet would.

    Secrets and ConfigMaps do not exist in devcluster, so non-optional references
    to them fail with the kubelet's ``... not found`` message.
    """
    env = dict(base)
    for source in ctr.get("envFrom") or []:
        if not isinstance(source, dict):
            continue
        for key, kind in (("secretRef", "secret"), ("configMapRef", "configmap")):
            ref = source.get(key)
            if isinstance(ref, dict) and not ref.get("optional"):
                raise ConfigError(f'{kind} "{ref.get("name", "")}" not found')
    for var in ctr.get("env") or []:
        name = var.get("name") or ""
        if "valueFrom" not in var or var.get("valueFrom") is None:
            env[name] = expand(str(var.get("value") or ""), env)
            continue
        source = var["valueFrom"]
        if not isinstance(source, dict):
            raise ConfigError(f"invalid valueFrom for {name}")
        if "fieldRef" in source:
            env[name] = _field_ref(pod, str((source["fieldRef"] or {}).get("fieldPath", "")))
        elif "resourceFieldRef" in source:
            env[name] = _resource_ref(ctr, source["resourceFieldRef"] or {})
        else:
            for key, kind in (("secretKeyRef", "secret"), ("configMapKeyRef", "configmap")):
                ref = source.get(key)
                if isinstance(ref, dict):
                    if ref.get("optional"):
                        break
                    raise ConfigError(f'{kind} "{ref.get("name", "")}" not found')
    return env


class LogBuffer:
    """The last :data:`LOG_LIMIT` bytes a container wrote, with waiters for ``follow``."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.dropped = 0
        self.closed = False
        self._changed = asyncio.Event()

    def append(self, chunk: bytes) -> None:
        """Add output, forgetting the oldest bytes beyond the limit."""
        self.data += chunk
        excess = len(self.data) - LOG_LIMIT
        if excess > 0:
            del self.data[:excess]
            self.dropped += excess
        self._changed.set()
        self._changed = asyncio.Event()

    def close(self) -> None:
        """The writer is gone; followers finish."""
        self.closed = True
        self._changed.set()

    @property
    def end(self) -> int:
        """Absolute offset of the end of the buffer."""
        return self.dropped + len(self.data)

    def since(self, offset: int) -> bytes:
        """Bytes from absolute ``offset`` on (clamped to what is kept)."""
        return bytes(self.data[max(0, offset - self.dropped) :])

    async def wait(self) -> None:
        """Wait for more output or the end."""
        if not self.closed:
            await self._changed.wait()


class Container:
    """What the kubelet tracks for one (init) container."""

    def __init__(self, spec: Obj, init: bool = False) -> None:
        self.spec = spec
        self.name: str = spec.get("name", "")
        self.image: str = spec.get("image", "")
        self.init = init
        self.sidecar = init and spec.get("restartPolicy") == "Always"
        self.state: Obj = {
            "waiting": {"reason": "PodInitializing" if not init else "ContainerCreating"}
        }
        self.last_state: Obj = {}
        self.restart_count = 0
        self.ready = False
        self.container_id = ""
        self.proc: Proc | None = None
        self.execs: set[Proc] = set()
        self.log = LogBuffer()
        self.previous_log: LogBuffer | None = None
        self.env: dict[str, str] = {}
        self.cwd: str | None = None

    @property
    def running(self) -> bool:
        """Whether the container's process is up."""
        return "running" in self.state and self.proc is not None and self.proc.running

    def image_id(self) -> str:
        """A stable fake image digest."""
        if not self.container_id:
            return ""
        digest = hashlib.sha256(self.image.encode()).hexdigest()
        return f"{self.image.split('@')[0]}@sha256:{digest}"

    def new_container_id(self) -> None:
        """Give the next run of this container a new runtime id."""
        self.container_id = "devcluster://" + secrets.token_hex(32)

    def set_waiting(self, reason: str, message: str | None = None) -> None:
        """Move to a waiting state."""
        waiting: Obj = {"reason": reason}
        if message:
            waiting["message"] = message
        self.state = {"waiting": waiting}
        self.ready = False

    def set_running(self) -> None:
        """Move to running (ready at once: devcluster runs no readiness probes)."""
        self.state = {"running": {"startedAt": now_rfc3339()}}
        self.ready = True

    def set_terminated(
        self, code: int, reason: str | None = None, message: str | None = None
    ) -> None:
        """Move to terminated with an exit code."""
        started = (self.state.get("running") or {}).get("startedAt")
        term: Obj = {
            "exitCode": code,
            "reason": reason or ("Completed" if code == 0 else "Error"),
        }
        if message:
            term["message"] = message
        term["startedAt"] = started
        term["finishedAt"] = now_rfc3339()
        if self.container_id:
            term["containerID"] = self.container_id
        self.state = {"terminated": term}
        self.ready = False

    def status(self) -> Obj:
        """The ``containerStatuses[]`` entry (Go field order)."""
        out: Obj = {
            "name": self.name,
            "state": self.state,
            "lastState": self.last_state,
            "ready": self.ready,
            "restartCount": self.restart_count,
            "image": self.image,
            "imageID": self.image_id(),
        }
        if self.container_id:
            out["containerID"] = self.container_id
        out["started"] = "running" in self.state
        return out
