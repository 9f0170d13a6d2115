"""devcluster: a wire-faithful, single-process Kubernetes API server whose Pods are local processes.

It is a test double and a demo backend, NOT a production runtime: "containers"
are ordinary processes of the user running it, with no isolation, no images and
no resource limits. What it does reproduce faithfully is what clients see on
the wire: URLs, JSON shapes, ``metav1.Status`` errors, watch semantics, Pod
status transitions and the exec WebSocket subprotocols (v5 and v1-v4), over
HTTPS with a bearer token, so ``kubectl``, the official ``kubernetes`` client and
kubernetes-asyncio work against it unmodified.

Typical use::

    from kuberun.devcluster import DevCluster

    async with DevCluster() as cluster:
        cluster.write_kubeconfig("kubeconfig")
        cluster.faults.fail(429, verb="create", retry_after=1)
        ...
        print(cluster.requests.tally(verb="create"))

See ``kuberun/devcluster/README.md`` for the CLI, reserved images and faults.
"""

from __future__ import annotations

from .apierrors import ApiError, DevClusterError
from .cluster import DevCluster
from .faults import Fault, Faults, RequestLog, RequestRecord

__all__ = [
    "ApiError",
    "DevCluster",
    "DevClusterError",
    "Fault",
    "Faults",
    "RequestLog",
    "RequestRecord",
]
