"""Fault injection and the request log of devcluster (a test double, not a production runtime).

Failure paths of clients are tested by asking the fake cluster to misbehave in
the ways real clusters do: error statuses (500, 409, 429 with Retry-After, ...),
slow responses, Pods that start late or whose image cannot be pulled, exec
streams that die mid-transfer and watches that end early.

Every rule is a :class:`Fault` with an optional ``count`` (how many times it
fires; None = until cancelled). Create rules through :class:`Faults`, either
from Python (``cluster.faults``) or over HTTP (``/_devcluster/faults``, same
bearer token as the API; see the package README).
"""

from __future__ import annotations

import collections
import itertools
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .apierrors import ApiError, bad_request

__all__ = [
    "HOSTILE_EXEC_MODES",
    "Fault",
    "Faults",
    "RequestLog",
    "RequestRecord",
    "error_for_status",
    "hostile_exec_bytes",
]

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Gone",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def error_for_status(
    code: int,
    message: str | None = None,
    *,
    reason: str | None = None,
    retry_after: int | None = None,
    name: str = "",
    resource: str = "pods",
) -> ApiError:
    """An :class:`ApiError` shaped like the API server's error for ``code``."""
    why = message or "injected fault"
    details: dict[str, Any] | None = None
    if code == 500:
        text = f"Internal error occurred: {why}"
        details = {"causes": [{"message": why}]}
    elif code == 409:
        target = f'{resource} "{name}"' if name else resource
        text = f"Operation cannot be fulfilled on {target}: {why}"
        details = {"name": name, "kind": resource} if name else {"kind": resource}
    elif code == 429:
        text = message or "Too many requests, please try again later."
        details = {}
    elif code == 504:
        text = message or "Timeout: request did not complete within the allotted timeout"
        details = {}
    else:
        text = why
    if retry_after:
        details = dict(details or {}, retryAfterSeconds=retry_after)
    return ApiError(code, reason if reason is not None else _REASONS.get(code, ""), text, details)


@dataclass
class Fault:
    """One injected misbehaviour. ``remaining`` None means unlimited; ``hits`` counts firings."""

    id: int
    kind: str
    params: dict[str, Any]
    remaining: int | None
    hits: int = 0
    _matchers: dict[str, re.Pattern[str]] = field(default_factory=dict, repr=False)
    _owner: Faults | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        """Whether the rule can still fire."""
        return self.remaining is None or self.remaining > 0

    def cancel(self) -> None:
        """Remove the rule."""
        if self._owner is not None:
            self._owner._rules.pop(self.id, None)
        self.remaining = 0

    def _matches(self, **values: str) -> bool:
        for key, pattern in self._matchers.items():
            if pattern.search(values.get(key, "")) is None:
                return False
        return True

    def _fire(self) -> None:
        self.hits += 1
        if self.remaining is not None:
            self.remaining -= 1
            if self.remaining <= 0 and self._owner is not None:
                self._owner._rules.pop(self.id, None)

    def as_dict(self) -> dict[str, Any]:
        """JSON form (what the admin endpoint lists)."""
        return {
            "id": self.id,
            "type": self.kind,
            **self.params,
            "remaining": self.remaining,
            "hits": self.hits,
        }


def _rx(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise bad_request(f"invalid pattern {pattern!r}: {exc}") from None


class Faults:
    """Registry of fault rules; every method returns the created :class:`Fault`.

    Patterns are Python regular expressions matched with ``re.search`` (anchor them
    with ``^...$`` for exact matches).
    """

    def __init__(self, compact: Callable[[], None] | None = None) -> None:
        self._rules: dict[int, Fault] = {}
        self._ids = itertools.count(1)
        self._compact = compact

    def _add(
        self, kind: str, params: dict[str, Any], count: int | None, **patterns: str | None
    ) -> Fault:
        if count is not None and count < 1:
            raise bad_request("count must be at least 1 (or null for unlimited)")
        matchers = {k: rx for k, v in patterns.items() if (rx := _rx(v)) is not None}
        fault = Fault(next(self._ids), kind, params, count, _matchers=matchers, _owner=self)
        self._rules[fault.id] = fault
        return fault

    # ---- API request faults ------------------------------------------------------
    def fail(
        self,
        status: int = 500,
        *,
        method: str | None = None,
        path: str | None = None,
        verb: str | None = None,
        count: int | None = 1,
        retry_after: int | None = None,
        message: str | None = None,
        reason: str | None = None,
        plain_text: bool = False,
    ) -> Fault:
        """Make the next ``count`` matching API requests fail with ``status``.

        ``method`` (``"POST"``), ``path`` (regex on the URL path) and ``verb``
        (``create``, ``get``, ``list``, ``watch``, ``delete``, ``exec``, ...) narrow
        the match. The body is a proper ``metav1.Status``; ``retry_after`` adds
        ``details.retryAfterSeconds`` and the ``Retry-After`` header (use it with
        429). ``plain_text`` answers like API Priority and Fairness does (429
        ``text/plain``, not JSON).
        """
        if not 400 <= status <= 599:
            raise bad_request("status must be an HTTP error code (400-599)")
        params = {
            "status": status,
            "method": method,
            "path": path,
            "verb": verb,
            "retryAfter": retry_after,
            "message": message,
            "reason": reason,
            "plainText": plain_text,
        }
        return self._add(
            "fail",
            params,
            count,
            method=f"^(?i:{re.escape(method)})$" if method else None,
            path=path,
            verb=f"^{re.escape(verb)}$" if verb else None,
        )

    def latency(
        self,
        seconds: float,
        *,
        method: str | None = None,
        path: str | None = None,
        verb: str | None = None,
        count: int | None = None,
    ) -> Fault:
        """Delay matching API requests by ``seconds`` before they are handled."""
        params = {"seconds": seconds, "method": method, "path": path, "verb": verb}
        return self._add(
            "latency",
            params,
            count,
            method=f"^(?i:{re.escape(method)})$" if method else None,
            path=path,
            verb=f"^{re.escape(verb)}$" if verb else None,
        )

    def slow_response(
        self,
        seconds: float,
        *,
        method: str | None = None,
        path: str | None = None,
        verb: str | None = None,
        count: int | None = 1,
    ) -> Fault:
        """Carry out matching requests at once, but hold their answers for ``seconds``.

        Unlike :meth:`latency` the change is made whether or not the client is
        still waiting: a client that gives up on a slow create is left not knowing
        that its Pod exists. Watches and execs (streams) are not delayed.
        """
        params = {"seconds": seconds, "method": method, "path": path, "verb": verb}
        return self._add(
            "slow_response",
            params,
            count,
            method=f"^(?i:{re.escape(method)})$" if method else None,
            path=path,
            verb=f"^{re.escape(verb)}$" if verb else None,
        )

    # ---- node faults --------------------------------------------------------------
    def delay_pod_start(
        self,
        seconds: float,
        *,
        name: str | None = None,
        namespace: str | None = None,
        count: int | None = None,
    ) -> Fault:
        """Keep matching new Pods in ``ContainerCreating`` for ``seconds`` more."""
        params = {"seconds": seconds, "name": name, "namespace": namespace}
        return self._add("delay_pod_start", params, count, name=name, namespace=namespace)

    def fail_image_pull(
        self,
        *,
        image: str | None = None,
        name: str | None = None,
        namespace: str | None = None,
        count: int | None = None,
    ) -> Fault:
        """Make image pulls of matching Pods fail (``ErrImagePull`` → ``ImagePullBackOff``).

        ``count`` counts Pods, not pull attempts: a Pod that failed keeps failing.
        """
        params = {"image": image, "name": name, "namespace": namespace}
        return self._add(
            "fail_image_pull", params, count, image=image, name=name, namespace=namespace
        )

    def drop_exec(
        self,
        after_bytes: int = 0,
        *,
        name: str | None = None,
        namespace: str | None = None,
        count: int | None = 1,
    ) -> Fault:
        """Cut matching exec streams (TCP close, no status) after ``after_bytes`` of output."""
        params = {"afterBytes": after_bytes, "name": name, "namespace": namespace}
        return self._add("drop_exec", params, count, name=name, namespace=namespace)

    def hostile_exec(
        self,
        mode: str,
        *,
        after_bytes: int = 0,
        command: str | None = None,
        name: str | None = None,
        namespace: str | None = None,
        count: int | None = 1,
    ) -> Fault:
        """Make matching exec streams break the WebSocket or exec protocol on purpose.

        After the upgrade and ``after_bytes`` of well-formed stdout, the server
        writes the raw bytes of ``mode`` (one of :data:`HOSTILE_EXEC_MODES`) to
        the connection and closes it; the process is never started.
        ``command`` is a regex on the exec's argv joined with spaces.
        """
        if mode not in HOSTILE_EXEC_MODES:
            raise bad_request(f"unknown hostile exec mode {mode!r}; one of {HOSTILE_EXEC_MODES}")
        if not isinstance(after_bytes, int) or after_bytes < 0:
            raise bad_request("afterBytes must be a non-negative integer")
        params = {
            "mode": mode,
            "afterBytes": after_bytes,
            "command": command,
            "name": name,
            "namespace": namespace,
        }
        return self._add(
            "hostile_exec", params, count, command=command, name=name, namespace=namespace
        )

    def drop_watches(
        self,
        *,
        after_events: int = 0,
        path: str | None = None,
        count: int | None = 1,
    ) -> Fault:
        """Cut matching watch streams abruptly after ``after_events`` events."""
        params = {"afterEvents": after_events, "path": path}
        return self._add("drop_watches", params, count, path=path)

    def expire_watch_history(self) -> None:
        """Forget past changes: watches resuming from an older version get 410 Expired."""
        if self._compact is not None:
            self._compact()

    # ---- management ---------------------------------------------------------------
    def clear(self) -> None:
        """Remove every rule."""
        self._rules.clear()

    def list(self) -> list[Fault]:
        """Active rules in creation order."""
        return list(self._rules.values())

    def from_json(self, spec: Any) -> Fault:
        """Create a rule from its JSON form (``{"type": "fail", "status": 429, ...}``)."""
        if not isinstance(spec, dict):
            raise bad_request("fault must be a JSON object")
        spec = dict(spec)
        kind = spec.pop("type", None)
        renames = {
            "retryAfter": "retry_after",
            "plainText": "plain_text",
            "afterBytes": "after_bytes",
            "afterEvents": "after_events",
        }
        kwargs = {renames.get(k, k): v for k, v in spec.items()}
        makers: dict[str, Callable[..., Fault]] = {
            "fail": self.fail,
            "latency": self.latency,
            "slow_response": self.slow_response,
            "delay_pod_start": self.delay_pod_start,
            "fail_image_pull": self.fail_image_pull,
            "drop_exec": self.drop_exec,
            "hostile_exec": self.hostile_exec,
            "drop_watches": self.drop_watches,
        }
        maker = makers.get(str(kind))
        if maker is None:
            raise bad_request(f"unknown fault type {kind!r}; one of {sorted(makers)}")
        try:
            return maker(**kwargs)
        except TypeError as exc:
            raise bad_request(f"bad fault parameters: {exc}") from None

    # ---- hooks used by the server and the node ------------------------------------
    def _first(self, kind: str, **values: str) -> Fault | None:
        for fault in list(self._rules.values()):
            if fault.kind == kind and fault.active and fault._matches(**values):
                return fault
        return None

    def request_latency(self, method: str, path: str, verb: str) -> float:
        """Seconds to wait before handling this request."""
        fault = self._first("latency", method=method, path=path, verb=verb)
        if fault is None:
            return 0.0
        fault._fire()
        return float(fault.params["seconds"])

    def response_delay(self, method: str, path: str, verb: str) -> float:
        """Seconds to hold the answer to this (already handled) request."""
        if verb in ("watch", "exec"):
            return 0.0
        fault = self._first("slow_response", method=method, path=path, verb=verb)
        if fault is None:
            return 0.0
        fault._fire()
        return float(fault.params["seconds"])

    def request_failure(self, method: str, path: str, verb: str, name: str) -> ApiError | None:
        """The injected error for this request, if a rule fires."""
        fault = self._first("fail", method=method, path=path, verb=verb)
        if fault is None:
            return None
        fault._fire()
        p = fault.params
        err = error_for_status(
            p["status"], p["message"], reason=p["reason"], retry_after=p["retryAfter"], name=name
        )
        if p["plainText"]:
            err.headers["Content-Type"] = "text/plain; charset=utf-8"
            err.headers["X-Content-Type-Options"] = "nosniff"
            err.headers.setdefault("Retry-After", str(p["retryAfter"] or 1))
        return err

    def pod_start_delay(self, namespace: str, name: str) -> float:
        """Extra seconds before this Pod's containers are created."""
        fault = self._first("delay_pod_start", namespace=namespace, name=name)
        if fault is None:
            return 0.0
        fault._fire()
        return float(fault.params["seconds"])

    def image_pull_fails(self, namespace: str, name: str, image: str) -> bool:
        """Whether this Pod's pull of ``image`` must fail."""
        fault = self._first("fail_image_pull", namespace=namespace, name=name, image=image)
        if fault is None:
            return False
        fault._fire()
        return True

    def exec_drop_after(self, namespace: str, name: str) -> int | None:
        """Bytes of output after which this exec stream is cut, or None."""
        fault = self._first("drop_exec", namespace=namespace, name=name)
        if fault is None:
            return None
        fault._fire()
        return int(fault.params["afterBytes"])

    def exec_hostile(self, namespace: str, name: str, command: Sequence[str]) -> bytes | None:
        """The raw bytes this exec stream must send instead of running, or None."""
        fault = self._first(
            "hostile_exec", namespace=namespace, name=name, command=" ".join(command)
        )
        if fault is None:
            return None
        fault._fire()
        return hostile_exec_bytes(fault.params["mode"], int(fault.params["afterBytes"]))

    def watch_drop_after(self, path: str) -> int | None:
        """Events after which this watch is cut, or None."""
        fault = self._first("drop_watches", path=path)
        if fault is None:
            return None
        fault._fire()
        return int(fault.params["afterEvents"])


#: What :meth:`Faults.hostile_exec` can make an exec stream send.
HOSTILE_EXEC_MODES = (
    "masked_frame",  # a server frame with the MASK bit set (RFC 6455 5.1 forbids it)
    "impossible_length",  # a 64-bit length with the most significant bit set
    "oversized_length",  # a well-formed length of 1 TiB
    "bad_opcode",  # reserved opcode 0x3
    "reserved_bits",  # RSV1 set without a negotiated extension
    "fragmented_control",  # a ping without FIN
    "bad_continuation",  # a continuation frame with no message to continue
    "close_mid_frame",  # the header of a 1000-byte frame, 10 bytes of it, then TCP close
    "garbage_status",  # a channel-3 message that is not JSON
    "huge_status",  # a well-framed 1 MiB channel-3 message
    "nested_status",  # channel-3 JSON nested deeper than any decoder recurses
)


def _server_frame(payload: bytes, *, opcode: int = 0x2, fin: bool = True, rsv: int = 0) -> bytes:
    """One unmasked server frame, encoded here (never by aiohttp or kuberun's codec)."""
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 0x10000:
        return bytes((first, 126)) + n.to_bytes(2, "big") + payload
    return bytes((first, 127)) + n.to_bytes(8, "big") + payload


def hostile_exec_bytes(mode: str, after_bytes: int = 0) -> bytes:
    """The raw server-to-client bytes of a hostile exec stream: ``after_bytes`` of
    well-formed stdout (channel 1), then the protocol violation ``mode`` names."""
    out = bytearray()
    left = after_bytes
    while left > 0:
        n = min(left, 32 * 1024)
        out += _server_frame(b"\x01" + b"x" * n)
        left -= n
    if mode == "masked_frame":
        out += bytes((0x82, 0x80 | 6)) + b"\x00\x00\x00\x00" + b"\x01hello"
    elif mode == "impossible_length":
        out += bytes((0x82, 127)) + (1 << 63 | 5).to_bytes(8, "big") + b"\x01xxxx"
    elif mode == "oversized_length":
        out += bytes((0x82, 127)) + (1 << 40).to_bytes(8, "big") + b"\x01xxxx"
    elif mode == "bad_opcode":
        out += _server_frame(b"\x01xx", opcode=0x3)
    elif mode == "reserved_bits":
        out += _server_frame(b"\x01xx", rsv=0x40)
    elif mode == "fragmented_control":
        out += _server_frame(b"ping", opcode=0x9, fin=False)
    elif mode == "bad_continuation":
        out += _server_frame(b"\x01xx", opcode=0x0)
    elif mode == "close_mid_frame":
        out += bytes((0x82, 126)) + (1000).to_bytes(2, "big") + b"\x01" + b"y" * 9
    elif mode == "garbage_status":
        out += _server_frame(b"\x03\xff\xfe{not json at all")
    elif mode == "huge_status":
        message = "x" * (1 << 20)
        out += _server_frame(
            b"\x03" + b'{"status":"Failure","message":"' + message.encode() + b'"}'
        )
    elif mode == "nested_status":
        out += _server_frame(b"\x03" + b"[" * 30_000 + b"]" * 30_000)
    else:
        raise ValueError(f"unknown hostile exec mode {mode!r}")
    if mode in ("garbage_status", "huge_status", "nested_status"):
        out += _server_frame((1000).to_bytes(2, "big"), opcode=0x8)
    return bytes(out)


def plain_status(err: ApiError) -> bytes:
    """Body for an injected error: Status JSON, or APF's text for ``plain_text`` 429s."""
    if err.headers.get("Content-Type", "").startswith("text/plain"):
        return b"Too many requests, please try again later.\n"
    return err.body()


@dataclass
class RequestRecord:
    """One API request as the server saw it.

    ``verb`` follows the API server's request info (``get``, ``list``, ``watch``,
    ``create``, ``update``, ``patch``, ``delete``, ``deletecollection``), except
    that ``pods/exec`` is ``exec`` and ``pods/log`` is ``log``. ``name`` for a
    create is the name of the created object once it is known. ``status`` is the
    HTTP status (101 for an exec upgrade; None while a request is still running).
    """

    method: str
    path: str
    query: dict[str, str]
    params: list[tuple[str, str]]
    verb: str
    resource: str
    subresource: str
    namespace: str
    name: str
    watch: bool
    user_agent: str
    time: float = field(default_factory=time.time)
    status: int | None = None


class RequestLog(list[RequestRecord]):
    """Every API request, oldest first (a list; ``clear()`` empties it).

    Admin requests (``/_devcluster/...``) are not recorded.
    """

    def where(self, **criteria: Any) -> list[RequestRecord]:
        """Records whose attributes equal every given value (``verb="create"``, ...)."""
        return [r for r in self if all(getattr(r, k) == v for k, v in criteria.items())]

    def tally(self, **criteria: Any) -> collections.Counter[str]:
        """Counts per verb among the records matching ``criteria``."""
        return collections.Counter(r.verb for r in self.where(**criteria))
