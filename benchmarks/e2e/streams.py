"""Exec stream alone: kuberun's relay against the bare cost of the same bytes over TLS.

The throughput phase's overhead (gateway CPU minus the direct server's) holds
everything the gateway does beyond asyncssh, TLS to the API server included,
which no relay can avoid. This phase takes SSH out and puts a floor under the
exec stream: each variant is its own process (:mod:`benchmarks.e2e.stream_proc`,
uvloop) that execs into one devcluster Pod and moves N bytes down
(``head -c N /dev/zero``) and N bytes up (``cat >/dev/null``):

* ``floor``: the same TLS connection and WebSocket upgrade, then only counting
  received bytes and writing pre-masked frames: zero per-byte work in Python;
* ``cython``, ``python``: kuberun's ExecStream with either relay;
* ``aiohttp``: the kubernetes-asyncio/aiohttp baseline.

The consumer's and devcluster's CPU come from ``/proc/PID/stat`` before and after
each transfer. Relay cost = variant CPU minus the floor's in the same round (then
the median): what the stream code itself costs per GiB on top of TLS.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

from kuberun.pods import PodController, PodRef

from .services import PY, Service
from .stream_proc import CONTAINER, NAMESPACE, VARIANTS, exec_connector

__all__ = ["run"]

POD = "bench-streams"
VERIFY_SIZE = 8 << 20

_log = logging.getLogger("benchmarks.e2e.streams")

#: Per variant: what its process's environment adds (the relay choice is made at import).
_ENV = {
    "floor": {},
    "cython": {"KUBERUN_REQUIRE_EXTENSIONS": "1"},
    "python": {"KUBERUN_NO_EXTENSIONS": "1"},
    "aiohttp": {},
}


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _create_pod(kubeconfig: str) -> PodRef:
    """Create the Pod every variant execs into and wait until it is ready."""
    api, _connector = await exec_connector(kubeconfig)
    try:
        pods = PodController(api, logger=_log)
        manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": POD, "labels": {"app": POD}},
            "spec": {
                # Its idle command only: every transfer is an exec.
                "containers": [{"name": CONTAINER, "image": "bench"}],
                "terminationGracePeriodSeconds": 0,
            },
        }
        deadline = time.monotonic() + 120
        pod = await pods.create(NAMESPACE, manifest, deadline, f"app={POD}")
        pod = await pods.wait_ready(pod, deadline)
        meta = pod["metadata"]
        return PodRef(NAMESPACE, meta["name"], meta["uid"])
    finally:
        await api.close()


async def _delete_pod(kubeconfig: str, ref: PodRef) -> None:
    api, _connector = await exec_connector(kubeconfig)
    try:
        await PodController(api, logger=_log).delete(ref, 60)
    finally:
        await api.close()


def _delete_and_wait(bench: Any, ref: PodRef, timeout: float = 60) -> None:
    """Delete the Pod and wait until it is gone: later phases pick any running Pod."""
    _run_loop(_delete_pod(str(bench.cluster.kubeconfig), ref))
    deadline = time.monotonic() + timeout
    while ref.name in bench.cluster.pod_names() and time.monotonic() < deadline:
        time.sleep(0.1)


def _start(bench: Any, variant: str, pod: str) -> Service:
    child = Service.start(
        f"stream-{variant}",
        [
            PY,
            "-m",
            "benchmarks.e2e.stream_proc",
            "--kubeconfig",
            str(bench.cluster.kubeconfig),
            "--pod",
            pod,
            "--variant",
            variant,
        ],
        bench.workdir / f"stream-{variant}.log",
        env=_ENV[variant],
        stdin=True,
    )
    want = {"cython": "cython", "python": "python"}.get(variant)
    if want is not None and child.info.get("implementation") != want:
        child.stop()
        raise RuntimeError(f"stream-{variant} runs the {child.info.get('implementation')} relay")
    return child


def _ask(child: Service, request: dict[str, Any]) -> dict[str, Any]:
    answer = child.ask(request)
    if not answer.get("ok"):
        raise RuntimeError(f"{child.name} {request}: {answer.get('error')}")
    return answer


def _transfer(child: Service, cluster: Any, op: str, size: int) -> dict[str, Any]:
    """One timed transfer; CPU of the consumer and of devcluster around it."""
    c0, k0 = child.cpu(), cluster.cpu()
    answer = _ask(child, {"op": op, "size": size})
    c1, k1 = child.cpu(), cluster.cpu()
    return {
        "seconds": answer["seconds"],
        "cpu": c1 - c0,
        "cluster_cpu": k1 - k0,
        "self_cpu": answer["self_cpu"],
        "wire_bytes": answer.get("wire_bytes"),
    }


def run(bench: Any, args: Any) -> dict[str, Any]:
    """Every variant in its own process, ``args.rounds`` rounds in rotating order."""
    kubeconfig = str(bench.cluster.kubeconfig)
    ref: PodRef = _run_loop(_create_pod(kubeconfig))
    variants = ["floor", *(v for v in VARIANTS if v in args.variants)]
    children: dict[str, Service] = {}
    samples: list[dict[str, Any]] = []
    try:
        for variant in variants:
            children[variant] = _start(bench, variant, ref.name)
        for child in children.values():
            _ask(child, {"op": "verify", "size": VERIFY_SIZE})  # also warms every path up
        _note(f"streams: {len(children)} variants verified; {args.rounds} rounds of {args.size}")
        for rnd in range(args.rounds):
            order = variants[rnd % len(variants) :] + variants[: rnd % len(variants)]
            for direction in ("down", "up"):
                for variant in order:
                    sample = _transfer(children[variant], bench.cluster, direction, args.size)
                    sample |= {
                        "variant": variant,
                        "direction": direction,
                        "round": rnd,
                        "size": args.size,
                    }
                    samples.append(sample)
                    per_gib = (1 << 30) / args.size
                    _note(
                        f"  round {rnd} {direction:4} {variant:8} "
                        f"{args.size / sample['seconds'] / 1e6:7.1f} MB/s  "
                        f"consumer {sample['cpu'] * per_gib:.2f} s/GiB  "
                        f"devcluster {sample['cluster_cpu'] * per_gib:.2f} s/GiB  "
                        f"(consumer by itself {sample['self_cpu'] * per_gib:.3f})"
                    )
    finally:
        for child in children.values():
            child.stop()
        _delete_and_wait(bench, ref)
    return {"size": args.size, "rounds": args.rounds, "samples": samples}


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
