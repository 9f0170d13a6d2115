"""Pod lifecycle: create from a manifest, wait until Ready by one watch, delete.

Every API call goes through :meth:`PodController._call`, which retries on 429
(honouring ``Retry-After``), 5xx and connection errors with jittered
exponential backoff, bounded by the caller's deadline, and counts requests and
failures for the seed's two counters.

Readiness is decided from one watch (``fieldSelector=metadata.name=...``)
started at the resourceVersion the create returned, so no event is missed and
nothing polls. A Pod that cannot become ready is deleted before the error is
raised: a Pod that failed to start is never left behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import aiohttp
from kubernetes_asyncio import client as k8s

from ._cancel import wait_for
from .errors import (
    KubernetesAPIError,
    KuberunError,
    PodStartError,
    PodStartTimeout,
    client_message,
)

__all__ = [
    "FATAL_WAITING_REASONS",
    "JSONResponse",
    "PodController",
    "PodRef",
    "ProgressCallback",
    "json_body",
    "pod_failure",
    "pod_is_ready",
    "pod_progress",
]

_T = TypeVar("_T")

#: Container waiting reasons that will not resolve on their own.
FATAL_WAITING_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "CrashLoopBackOff",
        "RunContainerError",
    }
)

ProgressCallback = Callable[[str], None]

#: Shortest time one attempt of an API call may take; each gets a third of the
#: call's budget (``timeouts.pod_start``, ``timeouts.pod_stop``) or this, if more.
MIN_ATTEMPT_TIMEOUT = 2.0


@dataclass(frozen=True)
class PodRef:
    """A Pod kuberun created: enough to exec into it and to delete exactly it."""

    namespace: str
    name: str
    uid: str
    #: The Pod's IPs once it is ready (``status.podIPs``); forwards may name them.
    ips: tuple[str, ...] = ()


def pod_ips(pod: Mapping[str, Any]) -> tuple[str, ...]:
    """``status.podIPs`` (or ``status.podIP``) of a Pod object, as strings."""
    status = pod.get("status") or {}
    ips = [entry.get("ip") for entry in status.get("podIPs") or [] if isinstance(entry, dict)]
    if not ips and status.get("podIP"):
        ips = [status.get("podIP")]
    return tuple(str(ip) for ip in ips if ip)


def _status_of(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _retry_after(exc: BaseException) -> float | None:
    headers = getattr(exc, "headers", None)
    if not headers:
        return None
    value = None
    try:
        value = headers.get("Retry-After")
    except AttributeError:
        return None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return None


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, (aiohttp.ClientConnectorCertificateError, ssl.SSLCertVerificationError)):
        return False  # a certificate that fails verification fails again
    status = _status_of(exc)
    if isinstance(exc, k8s.ApiException):
        return status is not None and (status == 429 or status >= 500 or status == 0)
    return isinstance(exc, (aiohttp.ClientError, OSError, asyncio.TimeoutError))


def api_error(exc: BaseException) -> KubernetesAPIError:
    """Turn a kubernetes-asyncio/aiohttp failure into a :class:`KubernetesAPIError`."""
    status = _status_of(exc) or 0
    if isinstance(exc, k8s.ApiException):
        body = exc.body
        reason, message = str(exc.reason or ""), ""
        if body:
            try:
                decoded = json.loads(body)
                if isinstance(decoded, dict):
                    reason = str(decoded.get("reason") or reason)
                    message = str(decoded.get("message") or "")
            except (ValueError, TypeError):
                message = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
        return KubernetesAPIError(status, reason, message.strip() or reason)
    error = KubernetesAPIError(status, type(exc).__name__, str(exc) or type(exc).__name__)
    return error.told(_transport_problem(exc))


def _transport_problem(exc: BaseException) -> str:
    """A failure to talk to the API server, as an SSH client may be told it."""
    if isinstance(exc, (aiohttp.ClientConnectorCertificateError, ssl.SSLCertVerificationError)):
        return "the cluster's TLS certificate could not be verified"
    if isinstance(exc, (ssl.SSLError, aiohttp.ClientSSLError)):
        return "TLS failure talking to the cluster"
    if isinstance(exc, (aiohttp.ClientConnectorError, ConnectionRefusedError)):
        return "cannot connect to the cluster"
    if isinstance(exc, asyncio.TimeoutError):
        return "the cluster did not answer"
    return "lost the connection to the cluster"


def pod_is_ready(pod: Mapping[str, Any]) -> bool:
    """True when the Pod's ``Ready`` condition is ``True``."""
    for cond in (pod.get("status") or {}).get("conditions") or ():
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


def pod_failure(pod: Mapping[str, Any]) -> PodStartError | None:
    """The reason this Pod will never become ready, or ``None`` if it still may."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    name = meta.get("name", "?")
    if meta.get("deletionTimestamp"):
        return PodStartError(f"Pod {name} is being deleted", "Deleted")
    phase = status.get("phase")
    if phase in ("Failed", "Succeeded"):
        detail = status.get("message") or status.get("reason") or ""
        return PodStartError(
            f"Pod {name} ended before it was ready (phase {phase})"
            + (f": {detail}" if detail else ""),
            phase,
        )
    for cond in status.get("conditions") or ():
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return PodStartError(
                f"Pod {name} cannot be scheduled: {cond.get('message') or 'Unschedulable'}",
                "Unschedulable",
            )
    statuses = list(status.get("initContainerStatuses") or ()) + list(
        status.get("containerStatuses") or ()
    )
    for cs in statuses:
        state = cs.get("state") or {}
        waiting = state.get("waiting") or {}
        reason = waiting.get("reason")
        if reason in FATAL_WAITING_REASONS:
            message = waiting.get("message") or ""
            return PodStartError(
                f"container {cs.get('name')!s} cannot start: {reason}"
                + (f": {message}" if message else ""),
                str(reason),
            )
    return None


def pod_progress(pod: Mapping[str, Any]) -> str:
    """A one-line, human-readable summary of where the Pod is in its start-up."""
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    for cond in status.get("conditions") or ():
        if cond.get("type") == "PodScheduled" and cond.get("status") != "True":
            return f"{phase}: waiting to be scheduled"
    for cs in status.get("containerStatuses") or ():
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason"):
            return f"{phase}: {waiting['reason']}"
    return str(phase)


class PodController:
    """Creates, awaits and deletes Pods for one gateway.

    :param api_client: a kubernetes-asyncio ``ApiClient``
    :param requests_counter: incremented once per API call (the seed's
        ``backend_requests`` counter); anything with ``inc()``
    :param failures_counter: incremented once per failed API call
    """

    def __init__(
        self,
        api_client: k8s.ApiClient,
        *,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
        requests_counter: Any = None,
        failures_counter: Any = None,
        backoff_base: float = 0.1,
        backoff_max: float = 5.0,
    ) -> None:
        self._api = k8s.CoreV1Api(api_client)
        self._logger = logger
        self._requests = requests_counter
        self._failures = failures_counter
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max

    @property
    def api(self) -> k8s.CoreV1Api:
        """The ``CoreV1Api`` the controller calls (for callers composing requests of their own)."""
        return self._api

    async def call(
        self,
        what: str,
        deadline: float,
        func: Callable[[], Awaitable[_T]],
    ) -> _T:
        """Run ``func`` (one API request) with this controller's retries, backoff and
        counting until ``deadline`` (``time.monotonic``). Non-retryable failures raise
        :class:`KubernetesAPIError`; running out of time raises :class:`PodStartTimeout`."""
        return await self._call(what, deadline, func)

    async def _call(
        self,
        what: str,
        deadline: float,
        func: Callable[[], Awaitable[_T]],
        *,
        ambiguous: Callable[[], Awaitable[_T | None]] | None = None,
        on_retry: Callable[[KubernetesAPIError], None] | None = None,
        cleanup: bool = False,
    ) -> _T:
        """Run one API call with retries until ``deadline`` (``time.monotonic``).

        ``ambiguous`` is consulted before retrying after a failure that may
        have been applied server-side (5xx or a lost connection): if it finds
        the result, it is returned instead of repeating the call. ``on_retry``
        hears every failure that is retried (progress for a waiting user).

        ``cleanup`` calls (deleting a Pod, finding the Pods to delete) also retry
        403 Forbidden: a kube-apiserver that has just restarted refuses requests
        until its RBAC caches have synced ("role ... not found"), and giving up
        there would leave the Pod behind.

        :raises PodStartTimeout: out of time; its ``last`` is the last failure
        :raises KubernetesAPIError: a failure that is not worth retrying
        """
        attempt = 0
        last: KubernetesAPIError | None = None
        # One stuck request must not use up the whole budget: a retry, on a fresh
        # connection, often gets through where the first attempt hangs.
        per_attempt = max(MIN_ATTEMPT_TIMEOUT, (deadline - time.monotonic()) / 3)
        while True:
            attempt += 1
            if self._requests is not None:
                self._requests.inc()
            try:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                return await wait_for(func(), min(remaining, per_attempt))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._failures is not None:
                    self._failures.inc()
                retryable = _is_retryable(exc) or (cleanup and _status_of(exc) == 403)
                if not retryable or time.monotonic() >= deadline:
                    if retryable:
                        # Out of time, this failure included: say why, the last failure
                        # is the useful part.
                        if not isinstance(exc, asyncio.TimeoutError):
                            last = api_error(exc)
                        why = f" (last error: {last})" if last is not None else ""
                        timeout = PodStartTimeout(f"{what}: timed out{why}", "Timeout")
                        timeout.last = last
                        told = client_message(last) if last is not None else "no answer"
                        raise timeout.told(f"{what}: timed out ({told})") from exc
                    raise api_error(exc) from exc
                if isinstance(exc, asyncio.TimeoutError):
                    last = KubernetesAPIError(0, "Timeout", f"no answer in {per_attempt:.1f}s")
                    last.told("the cluster did not answer")
                else:
                    last = api_error(exc)
                if on_retry is not None:
                    on_retry(last)
                delay = min(self._backoff_max, self._backoff_base * 2 ** (attempt - 1))
                delay = random.uniform(delay / 2, delay)
                hinted = _retry_after(exc)
                if hinted is not None:
                    delay = max(delay, hinted)
                delay = min(delay, max(0.0, deadline - time.monotonic()))
                # The first failure of a call is worth a line; the rest, until it
                # succeeds or runs out of time (which the caller reports), are not.
                self._logger.log(
                    logging.WARNING if attempt == 1 and delay > 0 else logging.DEBUG,
                    "%s failed (%s), retrying in %.2fs",
                    what,
                    last,
                    delay,
                )
                await asyncio.sleep(delay)
                status = _status_of(exc)
                if ambiguous is not None and (status is None or status >= 500):
                    remaining = deadline - time.monotonic()
                    try:
                        found = await wait_for(ambiguous(), max(0.0, min(remaining, per_attempt)))
                    except asyncio.TimeoutError:
                        found = None
                    if found is not None:
                        return found

    async def create(
        self,
        namespace: str,
        manifest: Mapping[str, Any],
        deadline: float,
        label_selector: str,
        *,
        uncertain: Callable[[bool], None] | None = None,
        orphan: Callable[[asyncio.Future[dict[str, Any]]], bool] | None = None,
        on_retry: Callable[[KubernetesAPIError], None] | None = None,
    ) -> dict[str, Any]:
        """Create the Pod; after an ambiguous failure, adopt a Pod the lost call created.

        ``label_selector`` must select exactly the Pods of this request (the
        connection id label), which is what makes adoption safe. ``uncertain``
        is called when an attempt may have created a Pod whose name never
        reached us: with True when the attempt got no answer (timeout, cancel,
        lost connection), as the API server may still create its Pod even a
        while later; with False for a 5xx answer. It is not called for an
        attempt that never reached the API server (connection refused, name
        not resolved) or got a 4xx answer: no Pod can come of those.

        ``orphan`` is offered the attempt under way when the call is cancelled
        (still in flight, or answered in that very turn of the loop); if it
        returns True it takes the attempt over (awaits its answer: a Pod that
        comes of it is then known by name and UID, so no search is needed), else
        an attempt in flight is cancelled, and one that made a Pod is reported to
        ``uncertain`` (False), since nobody will read its answer.
        """

        attempts: list[asyncio.Future[dict[str, Any]]] = []

        async def do_create() -> dict[str, Any]:
            attempt = asyncio.ensure_future(send())
            attempts.append(attempt)
            try:
                return await asyncio.shield(attempt)
            except asyncio.CancelledError:
                if _succeeded(attempt):
                    # Answered in the very turn this attempt timed out or was cancelled:
                    # the Pod exists, so hand it up. (On a cancel, the caller drops it
                    # and create() below takes care of it.)
                    return attempt.result()
                if not attempt.done() and not (orphan is not None and orphan(attempt)):
                    attempt.cancel()
                    await asyncio.gather(attempt, return_exceptions=True)
                raise

        async def send() -> dict[str, Any]:
            try:
                return await _json(
                    self._api.create_namespaced_pod(
                        namespace, cast(Any, manifest), _preload_content=False
                    )
                )
            except k8s.ApiException as exc:
                if uncertain is not None and (exc.status or 0) >= 500:
                    uncertain(False)
                raise
            except aiohttp.ClientConnectorError:
                raise  # never connected: nothing was sent
            except BaseException:
                # No answer (cut off by a timeout or a cancel, the connection
                # dropped, an answer that cannot be read): the API server may have
                # created the Pod, or may still create it, even later.
                if uncertain is not None:
                    uncertain(True)
                raise

        async def find_existing() -> dict[str, Any] | None:
            if self._requests is not None:
                self._requests.inc()
            try:
                listing = await _json(
                    self._api.list_namespaced_pod(
                        namespace, label_selector=label_selector, _preload_content=False
                    )
                )
                items = listing.get("items") or []
            except Exception:
                if self._failures is not None:
                    self._failures.inc()
                return None
            if items:
                pod: dict[str, Any] = items[0]
                self._logger.info(
                    "adopting Pod %s created by a call that lost its answer",
                    pod["metadata"]["name"],
                )
                return pod
            return None

        try:
            return await self._call(
                "create Pod", deadline, do_create, ambiguous=find_existing, on_retry=on_retry
            )
        except asyncio.CancelledError:
            last = attempts[-1] if attempts else None
            if last is not None and _succeeded(last):
                # A Pod was made, and its answer came in the very turn this call was
                # cancelled: the answer is dropped on the way up. Hand it over, or
                # have the Pod looked for.
                taken = orphan is not None and orphan(last)
                if not taken and uncertain is not None:
                    uncertain(False)
            raise

    async def wait_ready(
        self,
        pod: Mapping[str, Any],
        deadline: float,
        progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Watch the Pod until it is Ready; raise :class:`PodStartError` when it cannot be.

        Reconnects the watch from the last seen resourceVersion if it drops,
        and starts over from a fresh ``get`` on ``410 Expired``.
        """
        meta = pod["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        current: dict[str, Any] = dict(pod)
        last_line = ""

        def report(obj: Mapping[str, Any]) -> None:
            nonlocal last_line
            line = pod_progress(obj)
            if progress is not None and line != last_line:
                last_line = line
                progress(line)

        report(current)
        if pod_is_ready(current):
            return current
        failure = pod_failure(current)
        if failure is not None:
            raise failure
        rv = meta.get("resourceVersion") or ""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PodStartTimeout(
                    f"Pod {name} was not ready in time (last state: {pod_progress(current)})",
                    "Timeout",
                )

            async def start_watch(rv: str = rv, remaining: float = remaining) -> Any:
                return await _checked(
                    self._api.list_namespaced_pod(
                        namespace,
                        watch=True,
                        field_selector=f"metadata.name={name}",
                        resource_version=rv,
                        allow_watch_bookmarks=True,
                        timeout_seconds=max(1, int(remaining) + 1),
                        _preload_content=False,
                    )
                )

            try:
                resp = await self._call("watch Pod", deadline, start_watch)
            except PodStartTimeout:
                continue
            expired = False
            try:
                async with resp:
                    async for event in _watch_events(resp, deadline):
                        etype = event.get("type")
                        obj = event.get("object") or {}
                        if etype == "ERROR":
                            if obj.get("code") == 410:
                                expired = True
                                break
                            raise api_error_from_status(obj)
                        new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                        if new_rv:
                            rv = new_rv
                        if etype == "BOOKMARK":
                            continue
                        if etype == "DELETED":
                            raise PodStartError(f"Pod {name} was deleted while starting", "Deleted")
                        current = obj
                        report(current)
                        if pod_is_ready(current):
                            return current
                        failure = pod_failure(current)
                        if failure is not None:
                            raise failure
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                # A dropped watch: resume from the last resourceVersion we saw.
                self._logger.info("watch on Pod %s dropped (%s), resuming", name, exc)
            if expired:
                current = await self.get(namespace, name, deadline)
                rv = current["metadata"].get("resourceVersion") or ""
                report(current)
                if pod_is_ready(current):
                    return current
                failure = pod_failure(current)
                if failure is not None:
                    raise failure

    async def list_pods(
        self, namespace: str, label_selector: str, deadline: float
    ) -> list[dict[str, Any]]:
        """List the Pods matching ``label_selector`` as plain dicts."""

        async def do_list() -> dict[str, Any]:
            return await _json(
                self._api.list_namespaced_pod(
                    namespace, label_selector=label_selector, _preload_content=False
                )
            )

        data = await self._call("list Pods", deadline, do_list, cleanup=True)
        return list(data.get("items") or [])

    async def get(self, namespace: str, name: str, deadline: float) -> dict[str, Any]:
        """Read one Pod as a plain dict."""

        async def do_get() -> dict[str, Any]:
            return await _json(
                self._api.read_namespaced_pod(name, namespace, _preload_content=False)
            )

        return await self._call("get Pod", deadline, do_get)

    async def delete(self, ref: PodRef, timeout: float) -> bool:
        """Delete exactly this Pod (UID precondition). ``NotFound`` counts as done.

        Returns True when the API server accepted the deletion or the Pod was
        already gone; False (logged) if it could not be deleted within ``timeout``.
        """
        error = await self.try_delete(ref, timeout)
        if error is not None:
            self._logger.error("could not delete Pod %s: %s", ref.name, error)
        return error is None

    async def try_delete(self, ref: PodRef, timeout: float) -> KuberunError | None:
        """Delete exactly this Pod (UID precondition) within ``timeout``, retries included.

        Returns None when it is done: the API server accepted the deletion, the
        Pod is already gone, or the name now belongs to another Pod (which is
        not kuberun's to delete). Otherwise returns the error, without logging it.
        """
        if not ref.uid:
            # Without a UID precondition the name could meanwhile belong to a Pod
            # kuberun did not create: never delete by name alone.
            return KubernetesAPIError(
                0, "NoUID", f"not deleting Pod {ref.name}: its UID is unknown"
            )
        deadline = time.monotonic() + timeout
        body = k8s.V1DeleteOptions(
            preconditions=k8s.V1Preconditions(uid=ref.uid),
            propagation_policy="Background",
        )

        async def do_delete() -> None:
            await _json(
                self._api.delete_namespaced_pod(
                    ref.name, ref.namespace, body=body, _preload_content=False
                )
            )

        try:
            await self._call(f"delete Pod {ref.name}", deadline, do_delete, cleanup=True)
        except KubernetesAPIError as exc:
            if exc.status == 404:
                return None
            if exc.status == 409:
                # UID precondition failed: a different Pod now has that name. Not ours.
                self._logger.warning("Pod %s was replaced; not deleting it", ref.name)
                return None
            return exc
        except PodStartTimeout as exc:
            return exc
        return None


def _succeeded(attempt: asyncio.Future[Any]) -> bool:
    """Whether ``attempt`` has ended with a result."""
    return attempt.done() and not attempt.cancelled() and attempt.exception() is None


async def _checked(call: Awaitable[Any]) -> aiohttp.ClientResponse:
    """Await a ``_preload_content=False`` call; raise ``ApiException`` on a non-2xx answer."""
    resp: aiohttp.ClientResponse = await call
    if 200 <= resp.status < 300:
        return resp
    async with resp:
        body = await resp.read()
    exc = k8s.ApiException(status=resp.status, reason=resp.reason)
    exc.body = body
    exc.headers = resp.headers
    raise exc


#: The type of :func:`json_body`'s argument: a ``_preload_content=False`` call.
JSONResponse = Awaitable[Any]


async def json_body(call: JSONResponse) -> dict[str, Any]:
    """Await a ``_preload_content=False`` call and decode its JSON body
    (``ApiException`` on a non-2xx answer)."""
    return await _json(call)


async def _json(call: Awaitable[Any]) -> dict[str, Any]:
    """Await a ``_preload_content=False`` call and decode its JSON body."""
    resp = await _checked(call)
    async with resp:
        body = await resp.read()
    data = json.loads(body) if body else {}
    if not isinstance(data, dict):
        raise KubernetesAPIError(resp.status, "BadResponse", "response is not a JSON object")
    return data


def api_error_from_status(obj: Mapping[str, Any]) -> KubernetesAPIError:
    """A :class:`KubernetesAPIError` from a ``metav1.Status`` dict."""
    code = obj.get("code")
    return KubernetesAPIError(
        code if isinstance(code, int) else 0,
        str(obj.get("reason") or ""),
        str(obj.get("message") or ""),
    )


async def _watch_events(
    resp: aiohttp.ClientResponse, deadline: float
) -> Any:  # AsyncIterator[dict[str, Any]]
    """Yield JSON watch events from a streaming response (one JSON object per line)."""
    pending = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        chunk = await wait_for(resp.content.readany(), remaining)
        if not chunk:
            return
        pending += chunk
        if len(pending) > 16 * 1024 * 1024:
            raise KubernetesAPIError(0, "WatchEventTooLarge", "watch event over 16 MiB")
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError as exc:
                raise KubernetesAPIError(0, "BadWatchEvent", f"undecodable watch event: {exc}")
            if isinstance(event, dict):
                yield event
