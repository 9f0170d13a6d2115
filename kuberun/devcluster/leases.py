"""``coordination.k8s.io/v1`` Leases in devcluster: storage semantics and validation.

devcluster is a test double, not a production runtime. What clients can observe
of kube-apiserver's Lease registry is reproduced: ``MicroTime`` fields must carry
exactly six fractional digits (anything else is a 400 decoding error), an update
or patch that carries a stale ``resourceVersion`` (or a different ``uid``) is a
409 Conflict while one without a version is applied unconditionally, a create on
a name in use is a 409 AlreadyExists, and a delete checks its ``uid`` and
``resourceVersion`` preconditions (409) before the object goes, at once (Leases
have no graceful deletion), answered by a ``Status`` of ``Success``.
"""

from __future__ import annotations

import copy
import datetime
import re
import uuid
from typing import Any

from .apierrors import ApiError, bad_request, invalid
from .pods import _DNS1123_SUBDOMAIN, _validate_metadata_maps, generate_name, now_rfc3339
from .store import Store

__all__ = ["GROUP", "GROUP_VERSION", "LEASE_RESOURCES", "LeaseRegistry", "lease_group"]

Obj = dict[str, Any]

GROUP = "coordination.k8s.io"
VERSION = "v1"
GROUP_VERSION = f"{GROUP}/{VERSION}"

#: ``/apis/coordination.k8s.io/v1``.
LEASE_RESOURCES: Obj = {
    "kind": "APIResourceList",
    "apiVersion": "v1",
    "groupVersion": GROUP_VERSION,
    "resources": [
        {
            "name": "leases",
            "singularName": "lease",
            "namespaced": True,
            "kind": "Lease",
            "verbs": [
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ],
        }
    ],
}

# Go's "2006-01-02T15:04:05.000000Z07:00": six fractional digits, then a zone.
_MICRO_TIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})\.(\d{6})(Z|[+-]\d{2}:\d{2})"
)
_SPEC_FIELDS = {
    "holderIdentity": str,
    "leaseDurationSeconds": int,
    "acquireTime": "micro",
    "renewTime": "micro",
    "leaseTransitions": int,
    "strategy": str,
    "preferredHolder": str,
}
_META_FIELDS = (
    "name",
    "generateName",
    "namespace",
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
    "generation",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)
_INT32_MAX = 2**31 - 1


def lease_group() -> Obj:
    """The group's entry in ``/apis`` (an ``APIGroup``)."""
    version = {"groupVersion": GROUP_VERSION, "version": VERSION}
    return {"name": GROUP, "versions": [version], "preferredVersion": version}


def _undecodable(why: str) -> ApiError:
    return bad_request(f'Lease in version "v1" cannot be handled as a Lease: {why}')


def _micro_time(field: str, value: Any) -> str:
    """Check a ``MicroTime`` and return it as the server writes it (UTC, ``Z``)."""
    if not isinstance(value, str):
        raise _undecodable(f"json: cannot unmarshal {type(value).__name__} into Go value")
    match = _MICRO_TIME.fullmatch(value)
    if match is None:
        raise _undecodable(
            f'parsing time "{value}" as "2006-01-02T15:04:05.000000Z07:00": cannot parse '
            f"{field} (six fractional digits and a zone are required)"
        )
    if match.group(8) != "Z":
        parsed = datetime.datetime.fromisoformat(value)
        return parsed.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return value


def decode_lease(body: Any) -> tuple[Obj, list[str]]:
    """Decode a Lease body: types checked, times normalised; returns it and warnings."""
    if not isinstance(body, dict):
        raise _undecodable("the body is not a JSON object")
    warnings: list[str] = []
    kind, version = body.get("kind"), body.get("apiVersion")
    if kind not in (None, "", "Lease") or version not in (None, "", GROUP_VERSION):
        raise bad_request(
            f"the API version in the data ({version}) does not match the expected API version "
            f"({GROUP_VERSION})"
        )
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    if not isinstance(meta, dict) or not isinstance(spec, dict):
        raise _undecodable("metadata and spec must be objects")
    out_spec: Obj = {}
    for key, value in spec.items():
        want = _SPEC_FIELDS.get(key)
        if want is None:
            warnings.append(f'unknown field "spec.{key}"')
        elif value is None:
            continue
        elif want == "micro":
            out_spec[key] = _micro_time(f"spec.{key}", value)
        elif isinstance(value, bool) or not isinstance(value, want):  # type: ignore[arg-type]
            raise _undecodable(f"json: cannot unmarshal into Go struct field LeaseSpec.spec.{key}")
        else:
            out_spec[key] = value
    out_meta: Obj = {}
    for key, value in meta.items():
        if key not in _META_FIELDS:
            warnings.append(f'unknown field "metadata.{key}"')
        elif value is not None:
            out_meta[key] = copy.deepcopy(value)
    for key in ("labels", "annotations"):
        if key in out_meta and (
            not isinstance(out_meta[key], dict)
            or not all(isinstance(v, str) for v in out_meta[key].values())
        ):
            raise _undecodable(f"json: cannot unmarshal into Go struct field ObjectMeta.{key}")
    return {"metadata": out_meta, "spec": out_spec}, warnings


def _validate(lease: Obj) -> None:
    meta, spec = lease["metadata"], lease["spec"]
    causes: list[dict[str, str]] = []
    name = meta.get("name", "")
    if not name:
        causes.append(
            {
                "reason": "FieldValueRequired",
                "message": "Required value: name or generateName is required",
                "field": "metadata.name",
            }
        )
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        causes.append(
            {
                "reason": "FieldValueInvalid",
                "message": f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must '
                "consist of lower case alphanumeric characters, '-' or '.', and must start "
                "and end with an alphanumeric character",
                "field": "metadata.name",
            }
        )
    _validate_metadata_maps(meta, causes)
    for key in ("leaseDurationSeconds", "leaseTransitions"):
        value = spec.get(key)
        if value is None:
            continue
        low = 1 if key == "leaseDurationSeconds" else 0
        if value < low or value > _INT32_MAX:
            why = "must be greater than 0" if low else "must be greater than or equal to 0"
            causes.append(
                {
                    "reason": "FieldValueInvalid",
                    "message": f"Invalid value: {value}: {why}",
                    "field": f"spec.{key}",
                }
            )
    if causes:
        err = invalid(f"Lease.{GROUP}", name, causes)
        raise ApiError(
            422,
            "Invalid",
            err.message,
            {"name": name, "group": GROUP, "kind": "Lease", "causes": causes},
        )


def _not_found(name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'leases.{GROUP} "{name}" not found',
        {"name": name, "group": GROUP, "kind": "leases"},
    )


def _conflict(name: str, why: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on leases.{GROUP} "{name}": {why}',
        {"name": name, "group": GROUP, "kind": "leases"},
    )


class LeaseRegistry:
    """Leases as the API server stores them (in devcluster's one :class:`Store`)."""

    resource = "leases"

    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, namespace: str, name: str) -> Obj:
        """The Lease or 404."""
        lease = self.store.get(self.resource, namespace, name)
        if lease is None:
            raise _not_found(name)
        return lease

    def create(self, namespace: str, body: Any, *, dry_run: bool = False) -> tuple[Obj, list[str]]:
        """Create a Lease; 409 AlreadyExists when the name is taken."""
        lease, warnings = decode_lease(body)
        meta = lease["metadata"]
        if meta.get("namespace") not in (None, "", namespace):
            raise bad_request(
                "the namespace of the provided object does not match the namespace sent on the "
                "request"
            )
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = generate_name(meta["generateName"])
        for key in ("uid", "resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(key, None)
        meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        _validate(lease)
        name = meta["name"]
        if self.store.get(self.resource, namespace, name) is not None:
            raise ApiError(
                409,
                "AlreadyExists",
                f'leases.{GROUP} "{name}" already exists',
                {"name": name, "group": GROUP, "kind": "leases"},
            )
        lease = {"kind": "Lease", "apiVersion": GROUP_VERSION, **lease}
        if dry_run:
            return lease, warnings
        return self.store.create(self.resource, lease), warnings

    def update(
        self, namespace: str, name: str, body: Any, *, dry_run: bool = False
    ) -> tuple[Obj, list[str]]:
        """Replace a Lease. A ``resourceVersion`` or ``uid`` in the body is a precondition
        (409 when stale); without a version the update is unconditional."""
        current = self.get(namespace, name)
        lease, warnings = decode_lease(body)
        meta = lease["metadata"]
        if meta.get("name") and meta["name"] != name:
            raise bad_request(
                f"the name of the object ({meta['name']}) does not match the name on the URL "
                f"({name})"
            )
        cur_meta = current["metadata"]
        if meta.get("uid") and meta["uid"] != cur_meta["uid"]:
            raise _conflict(
                name,
                f"Precondition failed: UID in precondition: {meta['uid']}, UID in object meta: "
                f"{cur_meta['uid']}",
            )
        rv = meta.get("resourceVersion")
        if rv and rv != cur_meta["resourceVersion"]:
            raise _conflict(
                name,
                "the object has been modified; please apply your changes to the latest version "
                "and try again",
            )
        new_meta = copy.deepcopy(cur_meta)
        for key in ("labels", "annotations", "ownerReferences", "finalizers"):
            if meta.get(key):
                new_meta[key] = meta[key]
            else:
                new_meta.pop(key, None)
        updated = {"kind": "Lease", "apiVersion": GROUP_VERSION, "metadata": new_meta}
        updated["spec"] = lease["spec"]
        _validate(updated)
        if dry_run or updated == current:
            return updated, warnings
        return self.store.update(self.resource, updated), warnings

    def delete(self, namespace: str, name: str, options: Obj, *, dry_run: bool = False) -> Obj:
        """Delete at once after checking preconditions; returns a success ``Status``."""
        current = self.get(namespace, name)
        meta = current["metadata"]
        pre = options.get("preconditions") or {}
        for key, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            if pre.get(key) and pre[key] != meta.get(key):
                raise _conflict(
                    name,
                    f"Precondition failed: {label} in precondition: {pre[key]}, {label} in "
                    f"object meta: {meta.get(key)}",
                )
        if not dry_run:
            self.store.delete(self.resource, current)
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {"name": name, "group": GROUP, "kind": "leases", "uid": meta["uid"]},
        }
