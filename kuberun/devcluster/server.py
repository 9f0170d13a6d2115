"""The HTTP front of devcluster: authentication, request log, faults, routing, discovery.

devcluster is a test double, not a production runtime. Requests are classified
like kube-apiserver's RequestInfo, recorded in the request log, authenticated
with the bearer token (401 Status without it), subjected to injected faults,
then routed. Errors always leave as ``metav1.Status`` JSON; nothing a client
sends can take the server down.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from typing import Any

from aiohttp import web

from .apierrors import ApiError, bad_request, internal_error, unauthorized
from .discovery import API_RESOURCES, OPENAPI_LEASES, OPENAPI_V1, openapi_root, version_info
from .execws import bearer_from_protocols
from .faults import RequestRecord, plain_status
from .leases import GROUP, GROUP_VERSION, LEASE_RESOURCES, lease_group
from .rest import RECORD_KEY, json_response, parse_request_info, read_body

__all__ = ["build_app"]

log = logging.getLogger("kuberun.devcluster")

ADMIN_PREFIX = "/_devcluster/"
# Readable without credentials, as the system:public-info-viewer role allows.
PUBLIC_PATHS = ("/version", "/healthz", "/livez", "/readyz")
MAX_BODY = 3 * 1024 * 1024


def _status_response(err: ApiError) -> web.Response:
    if err.headers.get("Content-Type", "").startswith("text/plain"):
        headers = {k: v for k, v in err.headers.items() if k != "Content-Type"}
        resp = web.Response(status=err.code, body=plain_status(err), headers=headers)
        resp.content_type = "text/plain"
        resp.charset = "utf-8"
        return resp
    resp = web.Response(status=err.code, body=err.body(), headers=err.headers)
    resp.content_type = "application/json"
    return resp


def _text_404() -> web.Response:
    resp = web.Response(status=404, text="404 page not found\n")
    resp.content_type = "text/plain"
    resp.charset = "utf-8"
    return resp


class Frontend:
    """Request pipeline of one cluster."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def _token(self, request: web.Request) -> str | None:
        auth = request.headers.get("Authorization")
        if auth is not None:
            scheme, _, value = auth.partition(" ")
            return value.strip() if scheme.lower() == "bearer" else ""
        return bearer_from_protocols(request.headers.get("Sec-WebSocket-Protocol"))

    def _authenticated(self, request: web.Request) -> bool | None:
        """True: good token; False: bad token; None: no credentials."""
        token = self._token(request)
        if token is None:
            return None
        return hmac.compare_digest(token.encode(), self.cluster.token.encode())

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith(ADMIN_PREFIX):
            if not self._authenticated(request):
                return _status_response(unauthorized())
            try:
                return await self._admin(request)
            except ApiError as err:
                return _status_response(err)
        info = parse_request_info(request.method, path, request.query)
        record = RequestRecord(
            method=request.method,
            path=path,
            query={k: request.query[k] for k in request.query},
            params=list(request.query.items()),
            verb=info.verb,
            resource=info.resource,
            subresource=info.subresource,
            namespace=info.namespace,
            name=info.name,
            watch=info.verb == "watch",
            user_agent=request.headers.get("User-Agent", ""),
        )
        request[RECORD_KEY] = record
        self.cluster.requests.append(record)
        try:
            resp = await self._handle(request, info)
        except ApiError as err:
            resp = _status_response(err)
        except web.HTTPException as exc:
            resp = _status_response(
                ApiError(exc.status, exc.reason.replace(" ", ""), exc.text or exc.reason)
            )
        except ConnectionError:
            # The client went away mid-request (a cancelled call, a killed process):
            # routine for an API server, not an error to print a traceback for.
            # The 500 goes nowhere; re-raising would make aiohttp log a traceback.
            log.debug("devcluster: %s %s: client went away", request.method, path)
            return web.Response(status=500)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a handler bug must not take the server down
            log.exception("devcluster: %s %s failed", request.method, path)
            resp = _status_response(internal_error(f"{type(exc).__name__}: {exc}"))
        record.status = resp.status
        return resp

    async def _handle(self, request: web.Request, info: Any) -> web.StreamResponse:
        auth = self._authenticated(request)
        if auth is False or (auth is None and request.path not in PUBLIC_PATHS):
            raise unauthorized()
        faults = self.cluster.faults
        delay = faults.request_latency(request.method, request.path, info.verb)
        if delay > 0:
            await asyncio.sleep(delay)
        failure = faults.request_failure(request.method, request.path, info.verb, info.name)
        if failure is not None:
            return _status_response(failure)
        if info.resource_request:
            resp: web.StreamResponse = await self.cluster.resources.dispatch(request, info)
            delay = faults.response_delay(request.method, request.path, info.verb)
            if delay > 0:
                await asyncio.sleep(delay)  # done already; only the answer is late
            return resp
        return self._non_resource(request)

    def _non_resource(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        if request.method not in ("GET", "HEAD"):
            if path.startswith(("/api", "/apis")):
                raise ApiError(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                    {},
                )
            return _text_404()
        if path == "/version":
            return json_response(version_info())
        if path in ("/healthz", "/livez", "/readyz"):
            resp = web.Response(text="ok")
            resp.content_type = "text/plain"
            return resp
        if path == "/api":
            host = self.cluster.address
            return json_response(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": host}
                    ],
                }
            )
        if path == "/api/v1":
            return json_response(API_RESOURCES)
        if path == "/apis":
            return json_response(
                {"kind": "APIGroupList", "apiVersion": "v1", "groups": [lease_group()]}
            )
        if path == f"/apis/{GROUP}":
            return json_response({"kind": "APIGroup", "apiVersion": "v1", **lease_group()})
        if path == f"/apis/{GROUP_VERSION}":
            return json_response(LEASE_RESOURCES)
        if path == "/openapi/v3":
            return json_response(openapi_root())
        if path == "/openapi/v3/api/v1":
            return json_response(OPENAPI_V1)
        if path == f"/openapi/v3/apis/{GROUP_VERSION}":
            return json_response(OPENAPI_LEASES)
        if path.startswith(("/api/", "/apis/")):
            raise ApiError(404, "NotFound", "the server could not find the requested resource", {})
        return _text_404()

    # ---- admin endpoint (never served by a real API server) ------------------------------
    async def _admin(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path[len(ADMIN_PREFIX) :].split("/") if p]
        faults = self.cluster.faults
        method = request.method
        if parts[:1] == ["faults"]:
            if len(parts) == 1:
                if method == "GET":
                    return json_response({"faults": [f.as_dict() for f in faults.list()]})
                if method == "POST":
                    fault = faults.from_json(await read_body(request))
                    return json_response(fault.as_dict(), 201)
                if method == "DELETE":
                    faults.clear()
                    return json_response({"faults": []})
            elif len(parts) == 2 and parts[1] == "expire-watch-history" and method == "POST":
                faults.expire_watch_history()
                return json_response({"resourceVersion": str(self.cluster.store.rv)})
            elif len(parts) == 2 and method == "DELETE":
                for fault in faults.list():
                    if str(fault.id) == parts[1]:
                        fault.cancel()
                        return json_response(fault.as_dict())
                raise ApiError(404, "NotFound", f"fault {parts[1]} not found")
        if parts == ["requests"]:
            if method == "GET":
                return json_response(
                    {
                        "requests": [
                            {
                                "method": r.method,
                                "path": r.path,
                                "query": r.query,
                                "verb": r.verb,
                                "namespace": r.namespace,
                                "name": r.name,
                                "watch": r.watch,
                                "status": r.status,
                                "time": r.time,
                            }
                            for r in self.cluster.requests
                        ]
                    }
                )
            if method == "DELETE":
                self.cluster.requests.clear()
                return json_response({"requests": []})
        raise bad_request(f"unknown admin request {method} {request.path}")


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    # Record the status as soon as it is sent: an exec's 101 or a watch's 200 comes
    # long before its handler returns.
    record = request.get(RECORD_KEY)
    if record is not None:
        record.status = response.status
    response.headers.pop("Server", None)
    if response.status != 101:
        response.headers.setdefault("Audit-Id", str(uuid.uuid4()))
        response.headers.setdefault("Cache-Control", "no-cache, private")


def build_app(cluster: Any) -> web.Application:
    """The aiohttp application serving ``cluster``."""
    app = web.Application(
        client_max_size=MAX_BODY, handler_args={"max_field_size": 1 << 20, "max_line_size": 1 << 20}
    )
    frontend = Frontend(cluster)
    app.router.add_route("*", "/{tail:.*}", frontend.handle)
    app.on_response_prepare.append(_on_prepare)
    return app
