"""``metav1.Status`` errors and Go-compatible JSON encoding for devcluster.

devcluster is a test double, not a production runtime. This module produces the
exact error bodies kube-apiserver sends so clients see the shapes they will meet
on a real cluster: REST errors carry ``kind``/``apiVersion`` and end with a
newline, exec channel-3 statuses carry neither (see the exec protocol spec §1.7,
§2.6.2, §4.6).
"""

from __future__ import annotations

import json
from typing import Any

from kuberun.errors import KuberunError

__all__ = [
    "ApiError",
    "DevClusterError",
    "already_exists",
    "bad_request",
    "conflict",
    "go_json",
    "internal_error",
    "invalid",
    "method_not_allowed",
    "not_found",
    "status_body",
    "too_many_requests",
    "unauthorized",
]

# Go's encoding/json escapes these even inside strings; byte-exact statuses need the same.
_GO_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def go_json(obj: Any) -> bytes:
    """Encode ``obj`` like Go's ``json.Marshal``: compact, UTF-8, ``<>&`` escaped."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return text.translate(_GO_ESCAPES).encode("utf-8")


class DevClusterError(KuberunError):
    """Root of the errors devcluster raises on purpose."""


class ApiError(DevClusterError):
    """An error the API answers with a ``metav1.Status`` body.

    ``code`` is the HTTP status, ``reason`` the Status reason (may be empty, as
    for some real 500s), ``details`` the Status details object (field order kept).
    ``headers`` are extra response headers (``Retry-After``).
    """

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = dict(headers or {})
        retry = (details or {}).get("retryAfterSeconds")
        if retry and "Retry-After" not in self.headers:
            self.headers["Retry-After"] = str(retry)

    def status(self) -> dict[str, Any]:
        """The Status object (with kind/apiVersion, as REST responses carry it)."""
        return status_body(self.code, self.reason, self.message, self.details)

    def body(self) -> bytes:
        """The REST response body: compact JSON terminated by a newline."""
        return go_json(self.status()) + b"\n"


def status_body(
    code: int, reason: str, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A failure ``metav1.Status`` in Go's field order."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
    }
    if reason:
        body["reason"] = reason
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


def _details(name: str | None, kind: str) -> dict[str, Any]:
    return {"name": name, "kind": kind} if name else {"kind": kind}


def not_found(resource: str, name: str) -> ApiError:
    """404 ``pods "x" not found``."""
    return ApiError(404, "NotFound", f'{resource} "{name}" not found', _details(name, resource))


def already_exists(resource: str, name: str, message: str | None = None) -> ApiError:
    """409 AlreadyExists."""
    return ApiError(
        409,
        "AlreadyExists",
        message or f'{resource} "{name}" already exists',
        _details(name, resource),
    )


def conflict(resource: str, name: str, why: str, kind: str | None = None) -> ApiError:
    """409 Conflict ``Operation cannot be fulfilled on <resource> "name": why``."""
    label = kind or resource
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {label} "{name}": {why}',
        _details(name, label),
    )


def bad_request(message: str) -> ApiError:
    """400 BadRequest (no details, as the API server sends it)."""
    return ApiError(400, "BadRequest", message)


def internal_error(message: str) -> ApiError:
    """500 InternalError with one cause."""
    return ApiError(
        500,
        "InternalError",
        f"Internal error occurred: {message}",
        {"causes": [{"message": message}]},
    )


def invalid(kind: str, name: str, causes: list[dict[str, str]]) -> ApiError:
    """422 Invalid; ``causes`` are ``{"reason", "message", "field"}`` dicts.

    The message lists ``field: message`` like ``field.ErrorList.ToAggregate``.
    """
    parts = [f"{c['field']}: {c['message']}" if c.get("field") else c["message"] for c in causes]
    text = parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
    return ApiError(
        422,
        "Invalid",
        f'{kind} "{name}" is invalid: {text}',
        {"name": name, "kind": kind, "causes": causes},
    )


def method_not_allowed() -> ApiError:
    """405 as the API server answers a verb a resource does not support."""
    return ApiError(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
        {},
    )


def unauthorized() -> ApiError:
    """401 Unauthorized."""
    return ApiError(401, "Unauthorized", "Unauthorized")


def too_many_requests(message: str, retry_after: int) -> ApiError:
    """429 TooManyRequests in Status form with ``Retry-After``."""
    return ApiError(
        429,
        "TooManyRequests",
        message,
        {"retryAfterSeconds": retry_after} if retry_after > 0 else {},
        headers={"Retry-After": str(retry_after)} if retry_after > 0 else None,
    )
