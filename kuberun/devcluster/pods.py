"""Pod semantics of devcluster: validation, defaulting, status and conditions.

devcluster is a test double, not a production runtime. The rules here follow
kube-apiserver's Pod strategy closely enough that clients meet the same 422s,
defaults and status shapes as on a real cluster; see the exec protocol spec §4.
"""

from __future__ import annotations

import copy
import datetime
import re
import secrets
import uuid
from typing import Any

from .apierrors import ApiError, bad_request, invalid

__all__ = [
    "NODE_NAME",
    "condition_list",
    "default_pod",
    "generate_name",
    "now_rfc3339",
    "pod_phase",
    "validate_pod",
]

Obj = dict[str, Any]

NODE_NAME = "devcluster"
POD_IP = "127.0.0.1"

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")

_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
    "'-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', "
    "regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', "
    "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
_LABEL_VALUE_MSG = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' "
    "or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
    "'my_value',  or '12345', regex used for validation is "
    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)

# kube-apiserver's generateName alphabet (no vowels, no look-alikes) and length.
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_MAX_GENERATE_PREFIX = 58


def now_rfc3339(ts: datetime.datetime | None = None) -> str:
    """A ``metav1.Time`` string (second precision, UTC, ``Z``)."""
    ts = ts or datetime.datetime.now(datetime.timezone.utc)
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> datetime.datetime | None:
    """Parse a ``metav1.Time``; None when it is not one."""
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=datetime.timezone.utc
        )
    except (TypeError, ValueError):
        return None


def generate_name(prefix: str) -> str:
    """``prefix`` (truncated to 58 characters) plus 5 random characters."""
    suffix = "".join(secrets.choice(_NAME_ALPHABET) for _ in range(5))
    return prefix[:_MAX_GENERATE_PREFIX] + suffix


def _cause(reason: str, field: str, message: str) -> dict[str, str]:
    return {"reason": reason, "message": message, "field": field}


def _required(field: str) -> dict[str, str]:
    return _cause("FieldValueRequired", field, "Required value")


def _invalid(field: str, value: Any, why: str) -> dict[str, str]:
    shown = f'"{value}"' if isinstance(value, str) else str(value)
    return _cause("FieldValueInvalid", field, f"Invalid value: {shown}: {why}")


def _validate_metadata_maps(meta: Obj, causes: list[dict[str, str]]) -> None:
    for key, value in (meta.get("labels") or {}).items():
        _validate_qualified_key("metadata.labels", key, causes)
        if len(value) > 63:
            causes.append(
                _cause(
                    "FieldValueInvalid",
                    "metadata.labels",
                    f'Invalid value: "{value}": must be no more than 63 characters',
                )
            )
        elif not _LABEL_VALUE.match(value):
            causes.append(_invalid("metadata.labels", value, _LABEL_VALUE_MSG))
    for key in meta.get("annotations") or {}:
        _validate_qualified_key("metadata.annotations", key.lower(), causes)
    total = sum(len(k) + len(v) for k, v in (meta.get("annotations") or {}).items())
    if total > 256 * 1024:
        causes.append(
            _cause(
                "FieldValueTooLong",
                "metadata.annotations",
                "Too long: may not be more than 262144 bytes",
            )
        )


def _validate_qualified_key(field: str, key: str, causes: list[dict[str, str]]) -> None:
    prefix, _, name = key.rpartition("/")
    ok = bool(name) and len(name) <= 63 and bool(_QUALIFIED_NAME.match(name))
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        ok = False
    if not ok:
        causes.append(
            _invalid(
                field,
                key,
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must "
                "start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  "
                "or '123-abc', regex used for validation is "
                "'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')",
            )
        )


def _validate_containers(
    containers: list[Obj], field: str, names: set[str], causes: list[dict[str, str]]
) -> None:
    for i, ctr in enumerate(containers):
        path = f"{field}[{i}]"
        name = ctr.get("name") or ""
        if not name:
            causes.append(_required(f"{path}.name"))
        elif len(name) > 63 or not _DNS1123_LABEL.match(name):
            causes.append(_invalid(f"{path}.name", name, _LABEL_MSG))
        elif name in names:
            causes.append(
                _cause("FieldValueDuplicate", f"{path}.name", f'Duplicate value: "{name}"')
            )
        names.add(name)
        if not ctr.get("image"):
            causes.append(_required(f"{path}.image"))
        policy = ctr.get("imagePullPolicy")
        if policy and policy not in ("Always", "IfNotPresent", "Never"):
            causes.append(
                _cause(
                    "FieldValueNotSupported",
                    f"{path}.imagePullPolicy",
                    f'Unsupported value: "{policy}": supported values: "Always", '
                    '"IfNotPresent", "Never"',
                )
            )
        for j, env in enumerate(ctr.get("env") or []):
            env_name = env.get("name") or ""
            if not env_name:
                causes.append(_required(f"{path}.env[{j}].name"))
            elif not _ENV_NAME.match(env_name):
                causes.append(
                    _invalid(
                        f"{path}.env[{j}].name",
                        env_name,
                        "a valid environment variable name must consist of alphabetic "
                        "characters, digits, '_', '-', or '.', and must not start with a digit "
                        "(e.g. 'my.env-name',  or 'MY_ENV.NAME',  or 'MyEnvName1', regex used "
                        "for validation is '[-._a-zA-Z][-._a-zA-Z0-9]*')",
                    )
                )


def validate_pod(pod: Obj) -> None:
    """Raise 422 Invalid (all causes at once) when the Pod would be rejected."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    name = meta.get("name") or ""
    causes: list[dict[str, str]] = []
    if not name:
        causes.append(
            _cause(
                "FieldValueRequired",
                "metadata.name",
                "Required value: name or generateName is required",
            )
        )
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        causes.append(_invalid("metadata.name", name, _SUBDOMAIN_MSG))
    _validate_metadata_maps(meta, causes)
    for i, ref in enumerate(meta.get("ownerReferences") or []):
        for key in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(key):
                causes.append(_required(f"metadata.ownerReferences[{i}].{key}"))
    containers = spec.get("containers") or []
    if not containers:
        causes.append(_required("spec.containers"))
    names: set[str] = set()
    _validate_containers(spec.get("initContainers") or [], "spec.initContainers", names, causes)
    _validate_containers(containers, "spec.containers", names, causes)
    policy = spec.get("restartPolicy")
    if policy not in (None, "", "Always", "OnFailure", "Never"):
        causes.append(
            _cause(
                "FieldValueNotSupported",
                "spec.restartPolicy",
                f'Unsupported value: "{policy}": supported values: "Always", "OnFailure", "Never"',
            )
        )
    grace = spec.get("terminationGracePeriodSeconds")
    if isinstance(grace, int) and grace < 0:
        causes.append(
            _invalid(
                "spec.terminationGracePeriodSeconds", grace, "must be greater than or equal to 0"
            )
        )
    deadline = spec.get("activeDeadlineSeconds")
    if isinstance(deadline, int) and deadline <= 0:
        causes.append(
            _invalid(
                "spec.activeDeadlineSeconds",
                deadline,
                "must be between 1 and 2147483647, inclusive",
            )
        )
    if causes:
        raise invalid("Pod", name, causes)


def _default_container(ctr: Obj) -> None:
    image = ctr.get("image") or ""
    tag = image.rsplit("/", 1)[-1]
    if "imagePullPolicy" not in ctr or not ctr["imagePullPolicy"]:
        latest = "@" not in tag and (":" not in tag or tag.endswith(":latest"))
        ctr["imagePullPolicy"] = "Always" if latest else "IfNotPresent"
    ctr.setdefault("resources", {})
    ctr.setdefault("terminationMessagePath", "/dev/termination-log")
    ctr.setdefault("terminationMessagePolicy", "File")


def _qos_class(spec: Obj) -> str:
    requests_seen = False
    guaranteed = True
    for ctr in spec.get("containers") or []:
        res = ctr.get("resources") or {}
        limits = res.get("limits") or {}
        requests = res.get("requests") or {}
        if limits or requests:
            requests_seen = True
        for key in ("cpu", "memory"):
            if key not in limits or requests.get(key, limits[key]) != limits[key]:
                guaranteed = False
    if not requests_seen:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


def default_pod(pod: Obj, namespace: str) -> Obj:
    """Fill in what the API server defaults and admission add on create."""
    pod = copy.deepcopy(pod)
    pod["kind"] = "Pod"
    pod["apiVersion"] = "v1"
    meta = pod.setdefault("metadata", {})
    for key in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"):
        meta.pop(key, None)
    meta["namespace"] = namespace
    meta["uid"] = str(uuid.uuid4())
    meta["generation"] = 1
    meta["creationTimestamp"] = now_rfc3339()
    for key in ("labels", "annotations", "ownerReferences", "finalizers", "managedFields"):
        if meta.get(key) in (None, {}, []):
            meta.pop(key, None)
    spec = pod.setdefault("spec", {})
    for ctr in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        _default_container(ctr)
    if not spec.get("restartPolicy"):
        spec["restartPolicy"] = "Always"
    if spec.get("terminationGracePeriodSeconds") is None:
        spec["terminationGracePeriodSeconds"] = 30
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    if not spec.get("serviceAccountName"):
        spec["serviceAccountName"] = spec.get("serviceAccount") or "default"
    spec["serviceAccount"] = spec["serviceAccountName"]
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    spec.setdefault("priority", 0)
    if spec.get("tolerations") is None:
        # What the DefaultTolerationSeconds admission plugin adds to every Pod.
        spec["tolerations"] = [
            {
                "key": f"node.kubernetes.io/{taint}",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            }
            for taint in ("not-ready", "unreachable")
        ]
    pod["status"] = {"phase": "Pending", "qosClass": _qos_class(spec)}
    return pod


def check_create_body(pod: Any, namespace: str) -> None:
    """Reject bodies the API server refuses before validation (400s)."""
    if not isinstance(pod, dict):
        raise bad_request("the body of the request was in an unknown format")
    kind = pod.get("kind")
    api_version = pod.get("apiVersion")
    if kind not in (None, "", "Pod") or api_version not in (None, "", "v1"):
        raise bad_request(
            f"the API version in the data ({api_version}) does not match the expected API "
            "version (v1)"
            if api_version not in (None, "", "v1")
            else f'Pod in version "v1" cannot be handled as a Pod: no kind "{kind}" is registered'
            ' for version "v1" in scheme'
        )
    meta_ns = (pod.get("metadata") or {}).get("namespace")
    if meta_ns and meta_ns != namespace:
        raise bad_request(
            "the namespace of the provided object does not match the namespace sent on the request"
        )


def condition_list(
    previous: list[Obj] | None, wanted: list[tuple[str, str, str | None, str | None]], now: str
) -> list[Obj]:
    """Build conditions, keeping ``lastTransitionTime`` when a status did not change."""
    prev = {c.get("type"): c for c in previous or []}
    out: list[Obj] = []
    for typ, status, reason, message in wanted:
        old = prev.get(typ)
        since = old.get("lastTransitionTime") if old and old.get("status") == status else now
        cond: Obj = {
            "type": typ,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": since,
        }
        if reason:
            cond["reason"] = reason
        if message:
            cond["message"] = message
        out.append(cond)
    return out


def pod_phase(restart_policy: str, init_done: bool, statuses: list[Obj]) -> str:
    """The phase the kubelet derives from container states (``getPhase``)."""
    if not init_done:
        return "Pending"
    running = waiting = stopped = succeeded = 0
    for st in statuses:
        state = st.get("state") or {}
        if "running" in state:
            running += 1
        elif "terminated" in state:
            stopped += 1
            if state["terminated"].get("exitCode") == 0:
                succeeded += 1
        elif (st.get("lastState") or {}).get("terminated"):
            stopped += 1
        else:
            waiting += 1
    if waiting:
        return "Pending"
    if running:
        return "Running"
    if stopped:
        if restart_policy == "Always":
            return "Running"
        if stopped == succeeded:
            return "Succeeded"
        if restart_policy == "OnFailure":
            return "Running"
        return "Failed"
    return "Pending"


def check_spec_update(old: Obj, new: Obj) -> None:
    """422 Forbidden when an update changes Pod spec fields that are immutable."""

    def strip(spec: Obj) -> Obj:
        spec = copy.deepcopy(spec)
        for key in ("activeDeadlineSeconds", "tolerations"):
            spec.pop(key, None)
        return spec

    if strip(old.get("spec") or {}) != strip(new.get("spec") or {}):
        name = (old.get("metadata") or {}).get("name", "")
        raise invalid(
            "Pod",
            name,
            [
                _cause(
                    "FieldValueForbidden",
                    "spec",
                    "Forbidden: pod updates may not change fields other than "
                    "`spec.containers[*].image`,`spec.initContainers[*].image`,"
                    "`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to "
                    "existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to "
                    "be set to 1 if it was previously negative)",
                )
            ],
        )


def precondition_error(name: str, what: str, wanted: str, actual: str) -> ApiError:
    """409 for a delete precondition that does not hold (note the kind ``Pod``)."""
    if what == "uid":
        why = (
            f"the UID in the precondition ({wanted}) does not match the UID in record "
            f"({actual}). The object might have been deleted and then recreated"
        )
    else:
        why = (
            f"the ResourceVersion in the precondition ({wanted}) does not match the "
            f"ResourceVersion in record ({actual}). The object might have been modified"
        )
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on Pod "{name}": {why}',
        {"name": name, "kind": "Pod"},
    )
