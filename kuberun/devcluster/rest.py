"""REST handlers of devcluster: Pods, Events, Namespaces, Nodes, logs and watches.

devcluster is a test double, not a production runtime. Response shapes follow
kube-apiserver: single objects carry ``kind``/``apiVersion``, list items do not,
lists carry ``metadata.resourceVersion`` (and ``continue`` when paged), watches
are JSON lines with ADDED/MODIFIED/DELETED/BOOKMARK/ERROR events, and kubectl's
``as=Table`` requests get server-side printed tables.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from aiohttp import web

from .apierrors import ApiError, bad_request, go_json, method_not_allowed, not_found
from .discovery import namespace_object, node_object
from .faults import RequestRecord
from .leases import GROUP_VERSION
from .patch import json_patch, merge_patch, strategic_merge_patch
from .selectors import FieldSelector, LabelSelector, field_getter, parse_bool
from .store import Delivery, Expired
from .tables import partial_metadata, table, wants

__all__ = ["RequestInfo", "Resources", "json_response", "parse_request_info"]

Obj = dict[str, Any]

LIST_KINDS = {
    "pods": "PodList",
    "events": "EventList",
    "namespaces": "NamespaceList",
    "nodes": "NodeList",
    "leases": "LeaseList",
}
KINDS = {
    "pods": "Pod",
    "events": "Event",
    "namespaces": "Namespace",
    "nodes": "Node",
    "leases": "Lease",
}
#: The group/version of each resource outside the core group (``/apis/...``).
API_GROUPS = {"leases": GROUP_VERSION}

POD_FIELDS: dict[str, Callable[[Obj], str]] = {
    "metadata.name": field_getter("metadata", "name"),
    "metadata.namespace": field_getter("metadata", "namespace"),
    "spec.nodeName": field_getter("spec", "nodeName"),
    "spec.restartPolicy": field_getter("spec", "restartPolicy"),
    "spec.schedulerName": field_getter("spec", "schedulerName"),
    "spec.serviceAccountName": field_getter("spec", "serviceAccountName"),
    "spec.hostNetwork": lambda o: "true" if (o.get("spec") or {}).get("hostNetwork") else "false",
    "status.phase": field_getter("status", "phase"),
    "status.podIP": field_getter("status", "podIP"),
    "status.nominatedNodeName": field_getter("status", "nominatedNodeName"),
}
EVENT_FIELDS: dict[str, Callable[[Obj], str]] = {
    "metadata.name": field_getter("metadata", "name"),
    "metadata.namespace": field_getter("metadata", "namespace"),
    "involvedObject.kind": field_getter("involvedObject", "kind"),
    "involvedObject.namespace": field_getter("involvedObject", "namespace"),
    "involvedObject.name": field_getter("involvedObject", "name"),
    "involvedObject.uid": field_getter("involvedObject", "uid"),
    "involvedObject.apiVersion": field_getter("involvedObject", "apiVersion"),
    "involvedObject.resourceVersion": field_getter("involvedObject", "resourceVersion"),
    "involvedObject.fieldPath": field_getter("involvedObject", "fieldPath"),
    "reason": field_getter("reason"),
    "reportingComponent": field_getter("reportingComponent"),
    "source": field_getter("source", "component"),
    "type": field_getter("type"),
}
SIMPLE_FIELDS: dict[str, Callable[[Obj], str]] = {
    "metadata.name": field_getter("metadata", "name"),
    "metadata.namespace": field_getter("metadata", "namespace"),
}
FIELDS = {"pods": POD_FIELDS, "events": EVENT_FIELDS}

# Where the request's log record lives while it is being served.
RECORD_KEY: Any = (
    web.RequestKey("devcluster_record", RequestRecord)
    if hasattr(web, "RequestKey")
    else "devcluster_record"
)

DEFAULT_NAMESPACES = ("default", "kube-node-lease", "kube-public", "kube-system")


@dataclass
class RequestInfo:
    """What the API server's RequestInfoFactory derives from a request."""

    resource_request: bool
    verb: str
    group_version: str = "v1"
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    extra: bool = False  # more path segments than a resource URL has


def parse_request_info(method: str, path: str, query: Any) -> RequestInfo:
    """Classify a request like kube-apiserver does (used for routing, logs and faults)."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 3 and parts[0] == "api" and parts[1] == "v1":
        group_version, rest = "v1", parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        group_version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
    else:
        return RequestInfo(False, method.lower())
    watch_prefix = False
    if rest and rest[0] == "watch":
        watch_prefix = True
        rest = rest[1:]
    namespace = ""
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace = rest[1]
        rest = rest[2:]
    if not rest:
        return RequestInfo(False, method.lower())
    info = RequestInfo(True, "", group_version, resource=rest[0], namespace=namespace)
    if len(rest) > 1:
        info.name = rest[1]
    if len(rest) > 2:
        info.subresource = rest[2]
    info.extra = len(rest) > 3
    if info.resource == "namespaces" and info.name and not namespace:
        info.namespace = info.name
    m = method.upper()
    if watch_prefix:
        # The legacy /watch/ paths serve only GET; a named one watches that object.
        info.verb = "watch" if m == "GET" else "unsupported"
    elif m == "GET" and not info.name and parse_bool(query.get("watch")):
        info.verb = "watch"
    elif m == "GET":
        info.verb = "get" if info.name else "list"
    elif m == "POST":
        info.verb = "create"
    elif m == "PUT":
        info.verb = "update"
    elif m == "PATCH":
        info.verb = "patch"
    elif m == "DELETE":
        info.verb = "delete" if info.name else "deletecollection"
    else:
        info.verb = m.lower()
    if info.subresource in ("exec", "portforward"):
        info.verb = info.subresource
    elif info.subresource == "log":
        info.verb = "log"
    return info


def json_response(
    obj: Any, status: int = 200, *, pretty: bool = False, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response as the API server encodes it (compact, newline-terminated)."""
    body = (json.dumps(obj, indent=2) + "\n").encode() if pretty else go_json(obj) + b"\n"
    resp = web.Response(body=body, status=status, headers=headers)
    resp.content_type = "application/json"
    return resp


def _list_item(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _int_param(query: Any, name: str) -> int | None:
    raw = query.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise bad_request(f'strconv.ParseInt: parsing "{raw}": invalid syntax') from None


async def read_body(request: web.Request) -> Any:
    """Decode a JSON (or YAML) request body; 400/415 like the API server."""
    # No Content-Type means JSON to the API server (aiohttp would say octet-stream).
    ctype = request.content_type if request.headers.get("Content-Type") else "application/json"
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            413, "RequestEntityTooLarge", "Request entity too large: limit is 3145728"
        ) from None
    if ctype in ("application/yaml", "application/apply-patch+yaml"):
        try:
            return yaml.safe_load(raw.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise bad_request(f"error converting YAML to JSON: {exc}") from None
    if ctype not in (
        "application/json",
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
        "application/json-patch+json",
        "*/*",
    ):
        raise ApiError(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: "
            "application/json, application/yaml",
        )
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"couldn't get version/kind; json parse error: {exc}") from None


class Resources:
    """Routes resource requests of one cluster to handlers."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.store = cluster.store

    async def dispatch(self, request: web.Request, info: RequestInfo) -> web.StreamResponse:
        if info.extra or API_GROUPS.get(info.resource, "v1") != info.group_version:
            raise _no_resource()
        handler = {
            "leases": self._leases,
            "pods": self._pods,
            "events": self._events,
            "namespaces": self._namespaces,
            "nodes": self._nodes,
        }.get(info.resource)
        if handler is None:
            raise _no_resource()
        return await handler(request, info)

    # ---- pods ------------------------------------------------------------------------
    async def _pods(self, request: web.Request, info: RequestInfo) -> web.StreamResponse:
        q = request.query
        pretty = parse_bool(q.get("pretty"))
        ns, name, verb = info.namespace, info.name, info.verb
        registry = self.cluster.registry
        if info.subresource:
            if not ns:
                raise _no_resource()
            if info.subresource == "exec":
                upgraded: web.StreamResponse = await self.cluster.exec_handler.handle(
                    request, ns, name
                )
                return upgraded
            if info.subresource == "portforward":
                forwarded: web.StreamResponse = await self.cluster.portforward_handler.handle(
                    request, ns, name
                )
                return forwarded
            if info.subresource == "log" and verb == "log":
                return await self._log(request, ns, name)
            if info.subresource == "status" and verb == "get":
                return json_response(registry.get(ns, name), pretty=pretty)
            raise method_not_allowed() if info.subresource in ("log", "status") else _no_resource()
        if verb in ("list", "watch"):
            return await self._collection(request, info, "pods")
        if not ns:
            raise method_not_allowed()
        dry_run = q.get("dryRun") == "All"
        if "dryRun" in q and q.get("dryRun") not in ("All", ""):
            raise bad_request(
                f'dryRun: Unsupported value: "{q.get("dryRun")}": supported values: "All"'
            )
        if verb == "create":
            body = await read_body(request)
            pod, warnings = registry.create(
                ns, body, dry_run=dry_run, validation=q.get("fieldValidation")
            )
            request[RECORD_KEY].name = pod["metadata"]["name"]
            return json_response(pod, 201, pretty=pretty, headers=_warnings(warnings))
        if verb == "get":
            return self._respond_object(request, "pods", registry.get(ns, name))
        if verb == "delete":
            options = await self._delete_options(request)
            pod = await registry.delete(
                ns, name, options, dry_run=dry_run or options.get("dryRun") == ["All"]
            )
            return json_response(pod, pretty=pretty)
        if verb == "deletecollection":
            options = await self._delete_options(request)
            selected = self._select(request, "pods", ns)
            for pod in selected:
                try:
                    await registry.delete(ns, pod["metadata"]["name"], options, dry_run=dry_run)
                except ApiError:
                    pass
            return json_response(
                self._list_body("pods", selected, {"resourceVersion": str(self.store.rv)})
            )
        if verb == "update":
            body = await read_body(request)
            pod, warnings = registry.update(
                ns, name, body, dry_run=dry_run, validation=q.get("fieldValidation")
            )
            return json_response(pod, pretty=pretty, headers=_warnings(warnings))
        if verb == "patch":
            body = await read_body(request)
            patched = _apply_patch(request, registry.get(ns, name), body)
            explicit_rv = isinstance(body, dict) and bool(
                (body.get("metadata") or {}).get("resourceVersion")
            )
            pod, warnings = registry.update(
                ns,
                name,
                patched,
                dry_run=dry_run,
                validation=q.get("fieldValidation"),
                check_rv=explicit_rv,
            )
            return json_response(pod, pretty=pretty, headers=_warnings(warnings))
        raise method_not_allowed()

    async def _delete_options(self, request: web.Request) -> Obj:
        q = request.query
        options: Obj = {}
        grace = _int_param(q, "gracePeriodSeconds")
        if grace is not None:
            options["gracePeriodSeconds"] = grace
        if q.get("propagationPolicy"):
            options["propagationPolicy"] = q["propagationPolicy"]
        if "orphanDependents" in q:
            options["orphanDependents"] = parse_bool(q.get("orphanDependents"))
        if request.can_read_body:
            body = await read_body(request)
            if body is not None:
                if not isinstance(body, dict):
                    raise bad_request("the body of the request was in an unknown format")
                for key in (
                    "gracePeriodSeconds",
                    "propagationPolicy",
                    "preconditions",
                    "orphanDependents",
                    "dryRun",
                ):
                    if body.get(key) is not None:
                        options[key] = body[key]
                grace_value = options.get("gracePeriodSeconds")
                if grace_value is not None and (
                    isinstance(grace_value, bool) or not isinstance(grace_value, int)
                ):
                    raise bad_request(
                        "json: cannot unmarshal into Go struct field "
                        "DeleteOptions.gracePeriodSeconds of type int64"
                    )
                if not isinstance(options.get("preconditions") or {}, dict):
                    raise bad_request(
                        "json: cannot unmarshal into Go struct field DeleteOptions.preconditions"
                    )
        return options

    async def _log(self, request: web.Request, ns: str, name: str) -> web.StreamResponse:
        pod = self.cluster.registry.get(ns, name)
        from .execws import resolve_container

        container = resolve_container(pod, request.query.get("container"))
        worker = self.cluster.kubelet.worker_for(pod)
        ctr = worker.container(container) if worker else None
        previous = parse_bool(request.query.get("previous"))
        buf = (ctr.previous_log if previous else ctr.log) if ctr else None
        if ctr is None or buf is None or (not ctr.container_id and not previous):
            reason = "ContainerCreating"
            if ctr is not None and "waiting" in ctr.state:
                reason = ctr.state["waiting"].get("reason", reason)
            if previous:
                raise bad_request(
                    f'previous terminated container "{container}" in pod "{name}" not found'
                )
            raise bad_request(
                f'container "{container}" in pod "{name}" is waiting to start: {reason}'
            )
        data = buf.since(0)
        tail = _int_param(request.query, "tailLines")
        if tail is not None and tail >= 0:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-tail:]) if tail else b""
        limit = _int_param(request.query, "limitBytes")
        follow = parse_bool(request.query.get("follow")) and not previous
        resp = web.StreamResponse(status=200)
        resp.content_type = "text/plain"
        await resp.prepare(request)
        sent = 0

        async def emit(chunk: bytes) -> bool:
            nonlocal sent
            if limit is not None and sent + len(chunk) > limit:
                chunk = chunk[: max(0, limit - sent)]
            if chunk:
                await resp.write(chunk)
                sent += len(chunk)
            return limit is None or sent < limit

        if await emit(data) and follow:
            offset = buf.end
            while not buf.closed and request.transport is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(buf.wait(), 1.0)
                chunk = buf.since(offset)
                offset = buf.end
                if chunk and not await emit(chunk):
                    break
            tail_chunk = buf.since(offset)
            if tail_chunk:
                await emit(tail_chunk)
        await resp.write_eof()
        return resp

    # ---- leases (coordination.k8s.io/v1) ------------------------------------------------
    async def _leases(self, request: web.Request, info: RequestInfo) -> web.StreamResponse:
        q = request.query
        pretty = parse_bool(q.get("pretty"))
        ns, name, verb = info.namespace, info.name, info.verb
        leases = self.cluster.leases
        if info.subresource:
            raise _no_resource()
        if verb in ("list", "watch"):
            return await self._collection(request, info, "leases")
        if not ns:
            raise method_not_allowed()
        dry_run = q.get("dryRun") == "All"
        if verb == "create":
            lease, warnings = leases.create(ns, await read_body(request), dry_run=dry_run)
            request[RECORD_KEY].name = lease["metadata"]["name"]
            return json_response(lease, 201, pretty=pretty, headers=_warnings(warnings))
        if verb == "get":
            return self._respond_object(request, "leases", leases.get(ns, name))
        if verb == "update":
            lease, warnings = leases.update(ns, name, await read_body(request), dry_run=dry_run)
            return json_response(lease, pretty=pretty, headers=_warnings(warnings))
        if verb == "patch":
            patched = _apply_patch(request, leases.get(ns, name), await read_body(request))
            lease, warnings = leases.update(ns, name, patched, dry_run=dry_run)
            return json_response(lease, pretty=pretty, headers=_warnings(warnings))
        if verb == "delete":
            options = await self._delete_options(request)
            return json_response(leases.delete(ns, name, options, dry_run=dry_run), pretty=pretty)
        if verb == "deletecollection":
            options = await self._delete_options(request)
            selected = self._select(request, "leases", ns)
            for lease in selected:
                with contextlib.suppress(ApiError):
                    leases.delete(ns, lease["metadata"]["name"], options, dry_run=dry_run)
            return json_response(
                self._list_body("leases", selected, {"resourceVersion": str(self.store.rv)})
            )
        raise method_not_allowed()

    # ---- events, namespaces, nodes ---------------------------------------------------
    async def _events(self, request: web.Request, info: RequestInfo) -> web.StreamResponse:
        if info.subresource:
            raise _no_resource()
        if info.verb in ("list", "watch"):
            return await self._collection(request, info, "events")
        if info.verb == "get" and info.namespace:
            obj = self.store.get("events", info.namespace, info.name)
            if obj is None:
                raise not_found("events", info.name)
            return self._respond_object(request, "events", obj)
        raise method_not_allowed()

    def namespaces(self) -> list[Obj]:
        names = set(DEFAULT_NAMESPACES)
        names.update(p["metadata"]["namespace"] for p in self.store.list("pods"))
        return [namespace_object(n, self.cluster.created) for n in sorted(names)]

    async def _namespaces(self, request: web.Request, info: RequestInfo) -> web.StreamResponse:
        if info.subresource or info.verb not in ("get", "list"):
            raise method_not_allowed()
        if info.verb == "get":
            return self._respond_object(
                request, "namespaces", namespace_object(info.name, self.cluster.created)
            )
        return self._respond_list(
            request, "namespaces", self._filter(request, "namespaces", self.namespaces())
        )

    async def _nodes(self, request: web.Request, info: RequestInfo) -> web.StreamResponse:
        if info.subresource or info.verb not in ("get", "list"):
            raise method_not_allowed()
        node = node_object(self.cluster.created)
        if info.verb == "get":
            if info.name != node["metadata"]["name"]:
                raise not_found("nodes", info.name)
            return self._respond_object(request, "nodes", node)
        return self._respond_list(request, "nodes", self._filter(request, "nodes", [node]))

    # ---- lists and watches -------------------------------------------------------------
    def _predicate(self, request: web.Request, resource: str) -> Callable[[Obj], bool]:
        labels = LabelSelector(request.query.get("labelSelector"))
        fields = FieldSelector(
            request.query.get("fieldSelector"), FIELDS.get(resource, SIMPLE_FIELDS)
        )
        return lambda obj: labels.matches(obj) and fields.matches(obj)

    def _filter(self, request: web.Request, resource: str, objects: list[Obj]) -> list[Obj]:
        pred = self._predicate(request, resource)
        return [o for o in objects if pred(o)]

    def _select(self, request: web.Request, resource: str, namespace: str | None) -> list[Obj]:
        return self._filter(request, resource, self.store.list(resource, namespace or None))

    def _list_body(self, resource: str, items: list[Obj], meta: Obj) -> Obj:
        return {
            "kind": LIST_KINDS[resource],
            "apiVersion": API_GROUPS.get(resource, "v1"),
            "metadata": meta,
            "items": [_list_item(i) for i in items],
        }

    def _respond_object(self, request: web.Request, resource: str, obj: Obj) -> web.Response:
        accept = request.headers.get("Accept", "")
        pretty = parse_bool(request.query.get("pretty"))
        if wants(accept, "Table"):
            meta = {"resourceVersion": obj["metadata"].get("resourceVersion", "")}
            return json_response(
                table(resource, [obj], meta, request.query.get("includeObject")), pretty=pretty
            )
        if wants(accept, "PartialObjectMetadata"):
            return json_response(partial_metadata(obj), pretty=pretty)
        return json_response(obj, pretty=pretty)

    def _respond_list(self, request: web.Request, resource: str, items: list[Obj]) -> web.Response:
        q = request.query
        meta: Obj = {"resourceVersion": str(self.store.rv)}
        limit = _int_param(q, "limit")
        token = q.get("continue")
        if token:
            start = _decode_continue(token)
            items = [i for i in items if _key(i) > start]
        if limit is not None and limit > 0 and len(items) > limit:
            rest = len(items) - limit
            items = items[:limit]
            meta["continue"] = _encode_continue(_key(items[-1]), self.store.rv)
            meta["remainingItemCount"] = rest
        accept = request.headers.get("Accept", "")
        pretty = parse_bool(q.get("pretty"))
        if wants(accept, "Table"):
            return json_response(
                table(resource, items, meta, q.get("includeObject")), pretty=pretty
            )
        if wants(accept, "PartialObjectMetadataList"):
            return json_response(
                {
                    "kind": "PartialObjectMetadataList",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": meta,
                    "items": [partial_metadata(i) for i in items],
                },
                pretty=pretty,
            )
        return json_response(self._list_body(resource, items, meta), pretty=pretty)

    async def _collection(
        self, request: web.Request, info: RequestInfo, resource: str
    ) -> web.StreamResponse:
        if info.verb == "list":
            q = request.query
            rv = q.get("resourceVersion")
            if q.get("resourceVersionMatch") == "Exact" and rv and rv != str(self.store.rv):
                raise ApiError(410, "Expired", f"too old resource version: {rv} ({self.store.rv})")
            return self._respond_list(
                request, resource, self._select(request, resource, info.namespace)
            )
        return await self._watch(request, info, resource)

    async def _watch(
        self, request: web.Request, info: RequestInfo, resource: str
    ) -> web.StreamResponse:
        q = request.query
        selected = self._predicate(request, resource)
        name = info.name

        def pred(obj: Obj) -> bool:
            return selected(obj) and (not name or obj["metadata"].get("name") == name)

        namespace = info.namespace or None
        rv_text = q.get("resourceVersion") or ""
        send_initial = q.get("sendInitialEvents")
        bookmarks = parse_bool(q.get("allowWatchBookmarks"))
        if parse_bool(send_initial) and q.get("resourceVersionMatch") != "NotOlderThan":
            raise _invalid_list_options(
                "resourceVersionMatch",
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            )
        initial = (send_initial is None and rv_text in ("", "0")) or parse_bool(send_initial)
        since: int | None = None
        if not initial:
            if rv_text in ("", "0"):
                since = None
            else:
                try:
                    since = int(rv_text)
                except ValueError:
                    raise bad_request(f'invalid resource version "{rv_text}"') from None
        timeout = _int_param(q, "timeoutSeconds")  # parsed before the 200 goes out
        accept = request.headers.get("Accept", "")
        as_table = wants(accept, "Table")
        include = q.get("includeObject")
        resp = web.StreamResponse(status=200)
        resp.content_type = "application/json"
        resp.enable_chunked_encoding()
        try:
            watcher = self.store.watch(resource, namespace, pred, since)
        except Expired as exc:
            await resp.prepare(request)
            await resp.write(go_json({"type": "ERROR", "object": exc.status()}) + b"\n")
            await resp.write_eof()
            return resp
        try:
            await resp.prepare(request)
            drop_after = self.cluster.faults.watch_drop_after(request.path)
            sent = 0

            async def send(line: bytes) -> None:
                nonlocal sent
                if drop_after is not None and sent >= drop_after:
                    # An injected failure: the stream is cut, not ended.
                    if request.transport is not None:
                        request.transport.abort()
                    raise ConnectionResetError("watch dropped by fault injection")
                await resp.write(line)
                sent += 1

            if initial:
                snapshot = [o for o in self.store.list(resource, namespace) if pred(o)]
                for obj in snapshot:
                    await send(self._encode(Delivery("ADDED", obj, 0), resource, as_table, include))
                if parse_bool(send_initial) and bookmarks:
                    mark = _bookmark(resource, self.store.rv, initial_end=True)
                    await send(go_json({"type": "BOOKMARK", "object": mark}) + b"\n")
            if drop_after is not None and sent >= drop_after:
                await send(b"")
            budget = float(timeout) if timeout and timeout > 0 else random.uniform(1800, 3600)
            deadline = time.monotonic() + budget
            next_bookmark = time.monotonic() + self.cluster.bookmark_interval
            while True:
                now = time.monotonic()
                if now >= deadline or self.cluster.stopping:
                    break
                if request.transport is None or request.transport.is_closing():
                    return resp
                await watcher.wait(min(1.0, deadline - now, max(0.01, next_bookmark - now)))
                if watcher.closed and not watcher.pending:
                    break
                for delivery in watcher.drain():
                    await send(self._encode(delivery, resource, as_table, include))
                if bookmarks and time.monotonic() >= next_bookmark:
                    mark = _bookmark(resource, self.store.rv)
                    await send(go_json({"type": "BOOKMARK", "object": mark}) + b"\n")
                    next_bookmark = time.monotonic() + self.cluster.bookmark_interval
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        finally:
            watcher.close()
        return resp

    def _encode(
        self, delivery: Delivery, resource: str, as_table: bool, include: str | None
    ) -> bytes:
        if not as_table:
            return delivery.line()
        obj = table(
            resource,
            [delivery.obj],
            {"resourceVersion": str(delivery.rv or self.store.rv)},
            include,
        )
        return go_json({"type": delivery.type, "object": obj}) + b"\n"


def _apply_patch(request: web.Request, current: Obj, body: Any) -> Any:
    """``current`` with the request's patch applied, by its Content-Type (415 otherwise)."""
    ctype = request.content_type if request.headers.get("Content-Type") else ""
    if ctype == "application/merge-patch+json":
        return merge_patch(current, body)
    if ctype == "application/strategic-merge-patch+json":
        return strategic_merge_patch(current, body)
    if ctype == "application/json-patch+json":
        return json_patch(current, body)
    raise ApiError(
        415,
        "UnsupportedMediaType",
        "the body of the request was in an unknown format - accepted media types "
        "include: application/json-patch+json, application/merge-patch+json, "
        "application/strategic-merge-patch+json",
    )


def _bookmark(resource: str, rv: int, initial_end: bool = False) -> Obj:
    meta: Obj = {"resourceVersion": str(rv)}
    if initial_end:
        meta["annotations"] = {"k8s.io/initial-events-end": "true"}
    obj: Obj = {
        "kind": KINDS.get(resource, ""),
        "apiVersion": API_GROUPS.get(resource, "v1"),
        "metadata": meta,
    }
    if resource == "pods":
        obj["spec"] = {"containers": None}
        obj["status"] = {}
    return obj


def _key(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _encode_continue(start: str, rv: int) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_continue(token: str) -> str:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        return str(data["start"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise bad_request(
            "continue key is not valid: incorrect encoded start resourceVersion "
            "(version meta.k8s.io/v1)"
        ) from None


def _warnings(texts: list[str]) -> dict[str, str] | None:
    if not texts:
        return None
    return {"Warning": ", ".join('299 - "' + t.replace('"', '\\"') + '"' for t in texts)}


def _no_resource() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def _invalid_list_options(field: str, why: str) -> ApiError:
    return ApiError(
        422,
        "Invalid",
        f'ListOptions.meta.k8s.io "" is invalid: {field}: Forbidden: {why}',
        {
            "kind": "ListOptions",
            "group": "meta.k8s.io",
            "causes": [
                {"reason": "FieldValueForbidden", "message": f"Forbidden: {why}", "field": field}
            ],
        },
    )
