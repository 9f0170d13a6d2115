"""The node of devcluster: drives Pod status like a scheduler plus kubelet would.

devcluster is a test double, not a production runtime. Each Pod gets a worker
task that schedules it onto the single node, "pulls" its images (reserved image
names simulate slow and failing pulls), starts its containers as local process
groups, restarts them according to ``restartPolicy`` with the kubelet's back-off,
and stops them on deletion (SIGTERM, then SIGKILL after the grace period).
Every change is published as a new Pod status, so watches see the same
ADDED → MODIFIED… sequence a real node produces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .containers import ConfigError, Container, LogBuffer, expand, resolve_env
from .events import EventRecorder
from .faults import Faults
from .pods import NODE_NAME, POD_IP, condition_list, now_rfc3339, pod_phase
from .runtime import FdReader, Runtime, base_env, make_pipe
from .store import Store

__all__ = ["NODE_LABELS", "Kubelet", "PodWorker"]

log = logging.getLogger("kuberun.devcluster")
Obj = dict[str, Any]

PULL_ERROR_IMAGE = "kuberun.devcluster/pull-error"
SLOW_IMAGE_PREFIX = "kuberun.devcluster/slow:"
IDLE_COMMAND = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait; done"]
NODE_LABELS = {
    "kubernetes.io/hostname": NODE_NAME,
    "kubernetes.io/os": "linux",
    "kubernetes.io/arch": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, "amd64"),
}
# The kubelet's crash-loop and image-pull back-off: 10 s doubling to 5 min.
BACKOFF_START = 10.0
BACKOFF_MAX = 300.0


def _backoff(attempt: int) -> float:
    return min(BACKOFF_MAX, BACKOFF_START * (1 << min(16, max(0, attempt - 1))))


class PodWorker:
    """Runs one Pod on the node."""

    def __init__(self, kubelet: Kubelet, pod: Obj) -> None:
        self.kubelet = kubelet
        meta = pod["metadata"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta["uid"]
        spec = pod.get("spec") or {}
        self.restart_policy: str = spec.get("restartPolicy") or "Always"
        self.init_containers = [Container(c, init=True) for c in spec.get("initContainers") or []]
        self.containers = [Container(c) for c in spec.get("containers") or []]
        self.scheduled = False
        self.sandbox = False
        self.init_done = not self.init_containers
        self.start_time: str | None = None
        self.failure: tuple[str, str] | None = None  # pod-level (reason, message)
        self.terminating = False
        self.terminated = asyncio.Event()
        self._stopper: asyncio.Task[Any] | None = None
        self.workdir: Path | None = None
        self._kill_deadline = 0.0
        self._deadline_changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lifetime: asyncio.Task[None] | None = None
        self._sidecars: list[asyncio.Future[None]] = []

    # ---- lookup helpers ----------------------------------------------------------
    def pod(self) -> Obj | None:
        """The stored Pod, if it is still this Pod (same uid)."""
        pod = self.kubelet.store.get("pods", self.namespace, self.name)
        if pod is None or pod["metadata"].get("uid") != self.uid:
            return None
        return pod

    def container(self, name: str) -> Container | None:
        """A container (or init container) by name."""
        for ctr in self.containers + self.init_containers:
            if ctr.name == name:
                return ctr
        return None

    def event(self, type_: str, reason: str, message: str, ctr: Container | None = None) -> None:
        pod = self.pod()
        if pod is None:
            return
        path = None
        if ctr is not None:
            kind = "initContainers" if ctr.init else "containers"
            path = f"spec.{kind}{{{ctr.name}}}"
        self.kubelet.events.record(pod, type_, reason, message, field_path=path)

    # ---- status ------------------------------------------------------------------
    def phase(self) -> str:
        if self.failure is not None:
            return "Failed"
        statuses = [c.status() for c in self.containers]
        return pod_phase(self.restart_policy, self.init_done, statuses)

    def build_status(self, pod: Obj) -> Obj:
        old = pod.get("status") or {}
        now = now_rfc3339()
        phase = self.phase()
        if not self.scheduled:
            return dict(old)
        wanted: list[tuple[str, str, str | None, str | None]] = []
        if self.sandbox:
            done = phase in ("Succeeded", "Failed")
            wanted.append(("PodReadyToStartContainers", "False" if done else "True", None, None))
            if self.init_done:
                wanted.append(("Initialized", "True", None, None))
            else:
                pending = [c.name for c in self.init_containers if "terminated" not in c.state]
                wanted.append(
                    (
                        "Initialized",
                        "False",
                        "ContainersNotInitialized",
                        f"containers with incomplete status: [{' '.join(pending)}]",
                    )
                )
            unready = [c.name for c in self.containers if not c.ready]
            ready: tuple[str, str | None, str | None]
            if done:
                ready = ("False", "PodCompleted" if phase == "Succeeded" else "PodFailed", None)
            elif unready:
                ready = (
                    "False",
                    "ContainersNotReady",
                    f"containers with unready status: [{' '.join(unready)}]",
                )
            else:
                ready = ("True", None, None)
            wanted.append(("Ready", *ready))
            wanted.append(("ContainersReady", *ready))
        wanted.append(("PodScheduled", "True", None, None))
        status: Obj = {
            "phase": phase,
            "conditions": condition_list(old.get("conditions"), wanted, now),
        }
        if self.failure is not None:
            status["reason"], status["message"] = self.failure
        if self.sandbox:
            status["hostIP"] = POD_IP
            status["hostIPs"] = [{"ip": POD_IP}]
            status["podIP"] = POD_IP
            status["podIPs"] = [{"ip": POD_IP}]
            status["startTime"] = self.start_time
            if self.init_containers:
                status["initContainerStatuses"] = [c.status() for c in self.init_containers]
            status["containerStatuses"] = [c.status() for c in self.containers]
        status["qosClass"] = old.get("qosClass", "BestEffort")
        return status

    def publish(self) -> None:
        """Store the current status if it changed."""
        pod = self.pod()
        if pod is None:
            return
        status = self.build_status(pod)
        if status == pod.get("status"):
            return
        updated = dict(pod)
        updated["status"] = status
        if self.scheduled and (pod.get("spec") or {}).get("nodeName") != NODE_NAME:
            updated["spec"] = dict(pod.get("spec") or {}, nodeName=NODE_NAME)
        self.kubelet.store.update("pods", updated)

    # ---- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())
        self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "pod %s/%s worker failed", self.namespace, self.name, exc_info=task.exception()
            )

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless the Pod is being stopped; False when stopped."""
        if seconds <= 0:
            return not self._stop.is_set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return not self._stop.is_set()

    async def _run(self) -> None:
        pod = self.pod()
        if pod is None:
            return
        spec = pod.get("spec") or {}
        node = spec.get("nodeName")
        if node and node != NODE_NAME:
            return  # bound to a node that does not exist: stays Pending, like on a real cluster
        if not self._fits(spec):
            self.scheduled = False
            self._unschedulable(pod)
            return
        await asyncio.sleep(0)
        if self._stop.is_set():
            return  # deleted before it was scheduled
        self.scheduled = True
        self.publish()
        self.kubelet.events.record(
            pod,
            "Normal",
            "Scheduled",
            f"Successfully assigned {self.namespace}/{self.name} to {NODE_NAME}",
            component="default-scheduler",
        )
        delay = self.kubelet.faults.pod_start_delay(self.namespace, self.name)
        self.sandbox = True
        self.start_time = now_rfc3339()
        self.workdir = Path(
            tempfile.mkdtemp(prefix=f"{self.namespace}.{self.name}.", dir=self.kubelet.workdir_root)
        )
        for i, ctr in enumerate(self.init_containers):
            ctr.set_waiting("ContainerCreating" if i == 0 else "PodInitializing")
        for ctr in self.containers:
            ctr.set_waiting("PodInitializing" if self.init_containers else "ContainerCreating")
        self.publish()
        deadline = spec.get("activeDeadlineSeconds")
        if isinstance(deadline, int) and deadline > 0:
            self._lifetime = asyncio.ensure_future(self._enforce_deadline(deadline))
        if not await self._sleep(delay):
            return
        for ctr in self.init_containers:
            if ctr.sidecar:
                self._sidecars.append(asyncio.ensure_future(self._run_container(ctr)))
                continue
            ok = await self._run_init(ctr)
            if not ok:
                return
        self.init_done = True
        self.publish()
        await asyncio.gather(*(self._run_container(c) for c in self.containers))

    def _fits(self, spec: Obj) -> bool:
        selector = spec.get("nodeSelector") or {}
        return all(NODE_LABELS.get(k) == v for k, v in selector.items())

    def _unschedulable(self, pod: Obj) -> None:
        message = (
            "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. "
            "preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling."
        )
        status = dict(pod.get("status") or {})
        status["conditions"] = condition_list(
            None, [("PodScheduled", "False", "Unschedulable", message)], now_rfc3339()
        )
        self.kubelet.store.update("pods", dict(pod, status=status))
        self.kubelet.events.record(
            pod, "Warning", "FailedScheduling", message, component="default-scheduler"
        )

    async def _enforce_deadline(self, seconds: int) -> None:
        if not await self._sleep(seconds):
            return
        self.failure = (
            "DeadlineExceeded",
            "Pod was active on the node longer than the specified deadline",
        )
        self.event(
            "Normal",
            "DeadlineExceeded",
            "Pod was active on the node longer than the specified deadline",
        )
        pod = self.pod()
        grace = int((pod or {}).get("spec", {}).get("terminationGracePeriodSeconds") or 30)
        await self.stop_containers(grace)
        self.publish()

    async def _pull(self, ctr: Container) -> bool:
        """Simulate the image pull; False when the Pod is stopped meanwhile."""
        image = ctr.image
        failing = image == PULL_ERROR_IMAGE or self.kubelet.faults.image_pull_fails(
            self.namespace, self.name, image
        )
        if failing:
            attempt = 0
            while True:
                attempt += 1
                self.event("Normal", "Pulling", f'Pulling image "{image}"', ctr)
                detail = (
                    f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": '
                    f'failed to resolve reference "{image}": {image}: not found'
                )
                self.event("Warning", "Failed", f'Failed to pull image "{image}": {detail}', ctr)
                self.event("Warning", "Failed", "Error: ErrImagePull", ctr)
                ctr.set_waiting("ErrImagePull", detail)
                self.publish()
                if not await self._sleep(2.0):
                    return False
                self.event("Normal", "BackOff", f'Back-off pulling image "{image}"', ctr)
                self.event("Warning", "Failed", "Error: ImagePullBackOff", ctr)
                ctr.set_waiting("ImagePullBackOff", f'Back-off pulling image "{image}"')
                self.publish()
                if not await self._sleep(_backoff(attempt)):
                    return False
        delay = 0.0
        if image.startswith(SLOW_IMAGE_PREFIX):
            try:
                delay = float(image[len(SLOW_IMAGE_PREFIX) :])
            except ValueError:
                ctr.set_waiting(
                    "InvalidImageName",
                    f'Failed to apply default image tag "{image}": couldn\'t parse image name',
                )
                self.event("Warning", "InspectFailed", ctr.state["waiting"]["message"], ctr)
                self.publish()
                await self._stop.wait()
                return False
        policy = ctr.spec.get("imagePullPolicy")
        present = policy == "IfNotPresent" and image in self.kubelet.images
        if policy == "Never" or present or ctr.restart_count > 0:
            self.event(
                "Normal",
                "Pulled",
                f'Container image "{image}" already present on machine and can be accessed '
                "by the pod",
                ctr,
            )
            return True
        self.event("Normal", "Pulling", f'Pulling image "{image}"', ctr)
        began = time.monotonic()
        if not await self._sleep(delay):
            return False
        took = go_duration(time.monotonic() - began)
        self.event(
            "Normal",
            "Pulled",
            f'Successfully pulled image "{image}" in {took} ({took} including waiting). '
            "Image size: 0 bytes.",
            ctr,
        )
        if not delay:  # a slow image stands for a slow pull every time
            self.kubelet.images.add(image)
        return True

    def _prepare(self, ctr: Container) -> list[str] | None:
        """Resolve env, argv and cwd; None (after publishing the error) when impossible."""
        pod = self.pod()
        if pod is None:
            return None
        assert self.workdir is not None
        # A private TMPDIR in the Pod's scratch directory, removed with the Pod:
        # what a program puts there (kuberun's PID files) never piles up in /tmp.
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        base = base_env({"HOSTNAME": self.name, "HOME": str(self.workdir), "TMPDIR": str(tmp)})
        try:
            ctr.env = resolve_env(pod, ctr.spec, base)
        except ConfigError as exc:
            ctr.set_waiting("CreateContainerConfigError", str(exc))
            self.event("Warning", "Failed", f"Error: {exc}", ctr)
            self.publish()
            return None
        command = [expand(a, ctr.env) for a in ctr.spec.get("command") or []]
        args = [expand(a, ctr.env) for a in ctr.spec.get("args") or []]
        ctr.cwd = ctr.spec.get("workingDir") or str(self.workdir)
        argv = command + args if command else args
        return argv or list(IDLE_COMMAND)

    async def _start(self, ctr: Container) -> int:
        """Start one run of the container and wait for it; returns the exit code."""
        argv = self._prepare(ctr)
        if argv is None:
            await self._stop.wait()
            return -1
        ctr.new_container_id()
        self.event("Normal", "Created", f"Created container: {ctr.name}", ctr)
        r, w = make_pipe()
        try:
            proc = self.kubelet.runtime.spawn(
                argv, ctr.env, ctr.cwd, stdin=subprocess.DEVNULL, stdout=w, stderr=w
            )
        except OSError as exc:
            os.close(r)
            os.close(w)
            message = _start_error(argv, ctr.cwd, exc)
            self.event("Warning", "Failed", f"Error: {message}", ctr)
            ctr.state = {"running": {"startedAt": now_rfc3339()}}
            ctr.set_terminated(128, "StartError", message)
            self.publish()
            return 128
        os.close(w)
        ctr.proc = proc
        if ctr.restart_count:
            ctr.previous_log = ctr.log
            ctr.log = LogBuffer()
        pump = asyncio.ensure_future(_pump_log(r, ctr.log.append))
        ctr.set_running()
        self.event("Normal", "Started", f"Started container {ctr.name}", ctr)
        self.publish()
        code = await proc.exited
        # PID 1 of a container exiting takes everything else in it down too.
        proc.kill_group()
        for ex in list(ctr.execs):
            ex.kill_group()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(pump, 5)
        ctr.log.close()
        ctr.set_terminated(code)
        ctr.proc = None
        self.publish()
        return code

    async def _run_init(self, ctr: Container) -> bool:
        attempt = 0
        while True:
            if not await self._pull(ctr):
                return False
            code = await self._start(ctr)
            if self._stop.is_set():
                return False
            if code == 0:
                return True
            if self.restart_policy == "Never":
                self.publish()
                return False
            attempt += 1
            if not await self._backoff_restart(ctr, attempt):
                return False

    async def _run_container(self, ctr: Container) -> None:
        attempt = 0
        while True:
            if not await self._pull(ctr):
                return
            code = await self._start(ctr)
            if self._stop.is_set() or self.failure is not None:
                return
            if not ctr.sidecar and (
                self.restart_policy == "Never" or (self.restart_policy == "OnFailure" and code == 0)
            ):
                return
            attempt += 1
            if not await self._backoff_restart(ctr, attempt):
                return

    async def _backoff_restart(self, ctr: Container, attempt: int) -> bool:
        ctr.last_state = ctr.state
        # The kubelet restarts at once the first time, then backs off.
        if attempt > 1:
            delay = _backoff(attempt - 1)
            message = (
                f"back-off {int(delay)}s restarting failed container={ctr.name} "
                f"pod={self.name}_{self.namespace}({self.uid})"
            )
            ctr.set_waiting("CrashLoopBackOff", message)
            self.event(
                "Warning",
                "BackOff",
                f"Back-off restarting failed container {ctr.name} in pod "
                f"{self.name}_{self.namespace}({self.uid})",
                ctr,
            )
            self.publish()
            if not await self._sleep(delay):
                return False
        ctr.restart_count += 1
        return True

    # ---- stopping ------------------------------------------------------------------
    async def stop_containers(self, grace: float) -> None:
        """SIGTERM the containers, SIGKILL after ``grace`` s; returns when all are gone.

        A second call with a shorter grace period shortens the wait.
        """
        deadline = time.monotonic() + max(0.0, grace)
        if self.terminating:
            if deadline < self._kill_deadline:
                self._kill_deadline = deadline
                self._deadline_changed.set()
            await self._wait_terminated()
            return
        self.terminating = True
        self._stopper = asyncio.current_task()
        self._kill_deadline = deadline
        self._stop.set()
        if self._lifetime is not None and self._lifetime is not asyncio.current_task():
            self._lifetime.cancel()
        procs = []
        for ctr in self.containers + self.init_containers:
            if ctr.proc is not None and ctr.proc.running:
                if grace > 0:
                    self.event("Normal", "Killing", f"Stopping container {ctr.name}", ctr)
                ctr.proc.signal_group(signal.SIGTERM if grace > 0 else signal.SIGKILL)
                procs.append(ctr.proc)
        while procs and any(p.running for p in procs):
            remaining = self._kill_deadline - time.monotonic()
            if remaining <= 0:
                break
            self._deadline_changed.clear()
            waiters: list[asyncio.Future[Any]] = [
                asyncio.ensure_future(p.exited) for p in procs if p.running
            ]
            changed = asyncio.ensure_future(self._deadline_changed.wait())
            waiters.append(changed)
            await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
        everything = [p for p in procs]
        for ctr in self.containers + self.init_containers:
            everything.extend(ctr.execs)
        for proc in everything:
            proc.kill_group()
        left = [asyncio.ensure_future(p.exited) for p in everything if p.running]
        if left:
            await asyncio.wait(left, timeout=10)
        if self._task is not None and not self._task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), 5)
        for ctr in self.containers + self.init_containers:
            if "terminated" not in ctr.state and ctr.container_id and "running" in ctr.state:
                ctr.set_terminated(137)
        self.terminated.set()

    async def _wait_terminated(self) -> None:
        """Wait for the stop under way; finish it here if its task was cancelled
        part-way (a background deletion cancelled as the cluster stops)."""
        while not self.terminated.is_set():
            stopper = self._stopper
            if stopper is None or stopper.done():
                self.terminating = False
                await self.stop_containers(max(0.0, self._kill_deadline - time.monotonic()))
                return
            waiter = asyncio.ensure_future(self.terminated.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    def cleanup(self) -> None:
        """Remove the Pod's scratch directory."""
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def final_status(self) -> Obj | None:
        """Status for the DELETED event (containers terminated)."""
        pod = self.pod()
        if pod is None:
            return None
        return self.build_status(pod)


def go_duration(seconds: float) -> str:
    """Go's ``time.Duration.String`` of a duration truncated to milliseconds."""
    ms = int(seconds * 1000)
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if not minutes:
        return secs
    hours, minutes = divmod(minutes, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m" + secs


def _start_error(argv: list[str], cwd: str | None, exc: OSError) -> str:
    prefix = (
        "failed to create containerd task: failed to create shim task: OCI runtime create failed: "
        "runc create failed: unable to start container process: "
    )
    if cwd and not os.path.isdir(cwd):
        return (
            prefix + f'error during container init: chdir to cwd ("{cwd}") set in config.json '
            "failed: no such file or directory: unknown"
        )
    return prefix + exec_failure(argv[0], exc) + ": unknown"


def exec_failure(program: str, exc: OSError) -> str:
    """runc's wording for a program that cannot be executed."""
    if isinstance(exc, FileNotFoundError):
        if "/" in program:
            return f'exec: "{program}": stat {program}: no such file or directory'
        return f'exec: "{program}": executable file not found in $PATH'
    if isinstance(exc, PermissionError):
        return f'exec: "{program}": permission denied'
    return f'exec: "{program}": {exc.strerror or exc}'


async def _pump_log(fd: int, sink: Callable[[bytes], None]) -> None:
    reader = FdReader(fd)
    try:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            sink(chunk)
    finally:
        os.close(fd)


class Kubelet:
    """All Pod workers of the single node."""

    def __init__(
        self,
        store: Store,
        events: EventRecorder,
        runtime: Runtime,
        faults: Faults,
        workdir_root: str,
    ) -> None:
        self.store = store
        self.events = events
        self.runtime = runtime
        self.faults = faults
        self.workdir_root = workdir_root
        self.workers: dict[str, PodWorker] = {}
        #: Images pulled on this node so far: IfNotPresent finds them without a pull.
        self.images: set[str] = set()

    def admit(self, pod: Obj) -> PodWorker:
        """Start running a newly created Pod."""
        worker = PodWorker(self, pod)
        self.workers[worker.uid] = worker
        worker.start()
        return worker

    def worker_for(self, pod: Obj) -> PodWorker | None:
        """The worker of a stored Pod."""
        return self.workers.get(pod["metadata"].get("uid", ""))

    def forget(self, uid: str) -> None:
        """Drop a worker after its Pod is gone."""
        worker = self.workers.pop(uid, None)
        if worker is not None:
            worker.cleanup()

    async def shutdown(self) -> None:
        """Stop every Pod at once (the cluster is going away)."""
        workers = list(self.workers.values())
        await asyncio.gather(*(w.stop_containers(0) for w in workers), return_exceptions=True)
        for worker in workers:
            self.forget(worker.uid)
