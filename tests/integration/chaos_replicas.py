"""Seeded chaos against several user-mode gateway replicas sharing one cluster.

``python -m tests.integration.chaos --replicas 3`` (``make chaos
CHAOS_ARGS='--replicas 3 ...'``) runs it; ``tests/integration/test_chaos.py``
runs a short one. Replica processes (``gatewayproc``, ``pod.mode: user``) serve
a small pool of users, so every user's connections keep landing on different
replicas, while:

* devcluster injects the faults of the single-gateway run (API errors, latency,
  lost answers, dropped watches and exec streams, image pull failures, slow
  starts) plus failing patches (claims) and Lease renewals;
* replicas are SIGKILLed or SIGTERMed mid-traffic and restarted;
* lifecycles hold sessions for up to longer than ``pod.idle_timeout``, and some
  open two connections of one user on two replicas at once.

Each session reports the Pod it runs in (its scratch ``$HOME`` is unique per
Pod), and a probe in the API server's storage timestamps every Pod change as it
is committed. The run fails on:

* a Pod deleted while a connection was using it (deletion inside a session's
  confirmed lifetime, that session's replica alive and not stopping);
* two Pods of one user at once, or two live connections of one user in two Pods;
* a Pod left once every user has gone, ``lease_duration`` + ``idle_timeout``
  (plus one look) later, while one replica still runs;
* a session that ended without an exit status, or with kuberun's status and no
  message, while its replica was alive; a hung lifecycle; anything that reached
  a replica's event-loop exception handler.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from kuberun.devcluster import DevCluster

from .chaos import KUBERUN_STATUSES, GatewayProcess, _free_port, inject_fault

IDLE_TIMEOUT = 3.0
LEASE_DURATION = 2.0
POD_START = 15
#: The longest a lifecycle holds its session (longer than the idle timeout on purpose).
HOLD_MAX = 4.5
LIFECYCLE_TIMEOUT = 90.0
COMBINATIONS = (("uvloop", "cython"), ("asyncio", "python"))


@dataclass
class ReplicaOptions:
    seed: int = 1
    replicas: int = 3
    lifecycles: int = 60
    concurrency: int = 6
    users: int = 4
    #: Replica kills/stops (then restarts) during the run, on average one per this many s.
    disruption_every: float = 6.0
    faults_per_lifecycle: float = 0.7
    log_level: str = "WARNING"
    verbose: bool = False


@dataclass
class Use:
    """One session's confirmed stay in one Pod."""

    user: str
    uid: str
    start: float
    end: float = float("inf")
    replica: int = -1


@dataclass
class ReplicaReport:
    options: ReplicaOptions
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: list[str] = field(default_factory=list)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    disruptions: collections.Counter[str] = field(default_factory=collections.Counter)
    pods_created: int = 0
    pods_deleted: int = 0
    deleted_under_connection: int = 0
    duplicates: int = 0
    leaked_pods: int = 0
    unhandled_exceptions: int = 0
    shared_checks: int = 0
    seconds: float = 0.0

    @property
    def lifecycles(self) -> int:
        return sum(self.outcomes.values())

    def summary(self) -> str:
        o = self.options
        lines = [
            f"replica chaos seed={o.seed}: {self.lifecycles} lifecycles of {o.users} users on "
            f"{o.replicas} replicas, {self.seconds:.0f} s",
            f"  Pods created {self.pods_created}, deleted {self.pods_deleted}; deleted under a "
            f"live connection: {self.deleted_under_connection}; duplicates: {self.duplicates}; "
            f"leaked after the idle timeout: {self.leaked_pods}",
            f"  two-replica sharing checks: {self.shared_checks}; unhandled exceptions: "
            f"{self.unhandled_exceptions}",
            f"  replica disruptions: {dict(sorted(self.disruptions.items()))}",
            f"  faults injected: {sum(self.faults.values())} ({dict(sorted(self.faults.items()))})",
            "  outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items())),
        ]
        lines += [f"  VIOLATION: {v}" for v in self.violations[:50]]
        return "\n".join(lines)


class Replica:
    def __init__(self, index: int, proc: GatewayProcess) -> None:
        self.index = index
        self.proc = proc
        self.down = False  # killed or being stopped: its sessions may end any way


class ReplicaChaos:
    def __init__(self, options: ReplicaOptions, cluster: DevCluster, workdir: Path) -> None:
        self.options = options
        self.cluster = cluster
        self.workdir = workdir
        self.report = ReplicaReport(options)
        key = asyncssh.generate_private_key("ssh-ed25519")
        self.key_path = workdir / "id_ed25519"
        self.key_path.write_bytes(key.export_private_key())
        self.key_path.chmod(0o600)
        (workdir / "authorized_keys").write_bytes(key.export_public_key())
        self.kubeconfig = workdir / "kubeconfig"
        cluster.write_kubeconfig(str(self.kubeconfig))
        self.replicas: list[Replica] = []
        self.retired: list[Replica] = []
        self.uses: list[Use] = []
        self.deleted_at: dict[str, float] = {}
        self.user_of: dict[str, str] = {}
        self.live: dict[str, set[str]] = collections.defaultdict(set)
        self.faults_on = False
        self._started = 0
        self._rng = random.Random(f"{options.seed}/replicas")

    # -- the storage probe -------------------------------------------------------------

    def _probe(self, pod: dict[str, Any]) -> bool:
        """Called by the store for every Pod change as it is committed: timestamps
        deletions and checks that no user ever has two Pods at once."""
        meta = pod.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        user = (meta.get("labels") or {}).get("kuberun.io/username")
        if not uid or not user:
            return False
        if uid not in self.user_of:
            self.user_of[uid] = user
            self.report.pods_created += 1
            others = self.live[user] - {uid}
            if others:
                self.report.duplicates += 1
                self.report.violations.append(f"user {user}: Pod {uid} created beside {others}")
            self.live[user].add(uid)
        if meta.get("deletionTimestamp") and uid not in self.deleted_at:
            self.deleted_at[uid] = time.monotonic()
            self.report.pods_deleted += 1
            self.live[user].discard(uid)
        return False  # the probe never delivers events

    # -- replicas ------------------------------------------------------------------------

    def _config(self, workdir: Path) -> dict[str, Any]:
        return {
            "ssh": {
                "listen": "127.0.0.1:0",
                "host_keys": [str(workdir / "host_key")],
                "authorized_keys": str(self.workdir / "authorized_keys"),
            },
            "kubernetes": {"kubeconfig": str(self.kubeconfig), "context": "devcluster"},
            "pod": {
                "mode": "user",
                "idle_timeout": IDLE_TIMEOUT,
                "lease_duration": LEASE_DURATION,
                "metadata": {"generateName": "ws-"},
            },
            "timeouts": {"pod_start": POD_START, "pod_stop": 10, "command_start": 10},
            "metrics": {"listen": f"127.0.0.1:{_free_port()}"},
            "logging": {"level": self.options.log_level},
        }

    async def start_replica(self, slot: int) -> None:
        self._started += 1
        workdir = self.workdir / f"replica{self._started}"
        workdir.mkdir()
        loop, relay = COMBINATIONS[self._started % len(COMBINATIONS)]
        proc = GatewayProcess(workdir, self._config(workdir), loop, relay)
        await proc.start()
        replica = Replica(slot, proc)
        if slot < len(self.replicas):
            self.replicas[slot] = replica
        else:
            self.replicas.append(replica)

    def alive(self) -> list[Replica]:
        return [r for r in self.replicas if not r.down and r.proc.alive]

    async def disrupt(self, stop: asyncio.Event) -> None:
        """Kill or stop a replica now and then, and restart it; one always stays up."""
        rng = self._rng
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    stop.wait(), rng.uniform(0.5, 1.5) * self.options.disruption_every
                )
            if stop.is_set():
                return
            up = self.alive()
            if len(up) < 2:
                continue
            victim = rng.choice(up)
            victim.down = True
            assert victim.proc.proc is not None
            if rng.random() < 0.6:
                self.report.disruptions["sigkill"] += 1
                victim.proc.proc.send_signal(signal.SIGKILL)
                await victim.proc.stop(5)
            else:
                self.report.disruptions["sigterm"] += 1
                code = await victim.proc.stop(40)
                if code != 0:
                    self.report.violations.append(f"replica exit status {code} after SIGTERM")
            self.retired.append(victim)
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            await self.start_replica(victim.index)
            self.report.disruptions["restart"] += 1

    # -- lifecycles ------------------------------------------------------------------------

    def _connect(self, replica: Replica, user: str) -> Any:
        return asyncssh.connect(
            "127.0.0.1",
            replica.proc.port,
            username=user,
            client_keys=[str(self.key_path)],
            known_hosts=None,
            encryption_algs=["aes128-gcm@openssh.com"],
        )

    def _uid_of_home(self, home: str) -> str | None:
        for pod in self.cluster.pods():
            worker = self.cluster.kubelet.worker_for(pod)
            if worker is not None and str(worker.workdir) == home:
                return str(pod["metadata"]["uid"])
        return None

    async def session(self, replica: Replica, user: str, hold: float, tag: str) -> Use | None:
        """One connection, one session held ``hold`` s; returns its Use (None if it never
        ran). Raises AssertionError for a violation."""
        use: Use | None = None
        try:
            async with self._connect(replica, user) as conn:
                proc = await conn.create_process(
                    f'printf "%s\\n" "$HOME"; sleep {hold:.2f}; echo {tag}'
                )
                first = await proc.stdout.readline()
                if first.startswith("/"):
                    uid = self._uid_of_home(first.strip())
                    if uid is not None:
                        use = Use(user, uid, time.monotonic(), replica=replica.index)
                        self.uses.append(use)
                result = await proc.wait()
                rest, stderr = str(result.stdout or ""), str(result.stderr or "")
                if use is not None:
                    use.end = time.monotonic()
                status = result.exit_status
                if replica.down:
                    return use
                if status == 0 and rest.strip() == tag and use is not None:
                    return use
                if status in KUBERUN_STATUSES and "kuberun: " in stderr and self.faults_on:
                    return use
                raise AssertionError(
                    f"{tag} on replica {replica.index}: status {status}, output "
                    f"{(first + rest)[-200:]!r}, stderr {stderr[-300:]!r}"
                )
        except (OSError, asyncssh.Error) as exc:
            if use is not None and use.end == float("inf"):
                use.end = time.monotonic()
            if replica.down or (self.faults_on and "kuberun" in str(exc)):
                return use
            raise AssertionError(f"{tag} on replica {replica.index}: {exc!r}") from exc

    async def lifecycle(self, index: int) -> str:
        rng = random.Random(f"{self.options.seed}/lc/{index}")
        if self.faults_on:
            self.inject_some(random.Random(f"{self.options.seed}/faults/{index}"))
        user = f"user{rng.randrange(self.options.users)}"
        up = self.alive()
        if not up:
            return "no-replica"
        hold = rng.uniform(0, HOLD_MAX)
        if rng.random() < 0.3 and len(up) >= 2:
            first, second = rng.sample(up, 2)
            a, b = await asyncio.gather(
                self.session(first, user, hold, f"a{index}"),
                self.session(second, user, hold, f"b{index}"),
            )
            if a is not None and b is not None and a.uid != b.uid:
                overlap = min(a.end, b.end) > max(a.start, b.start)
                if overlap:
                    raise AssertionError(f"user {user}: two live connections in two Pods")
            self.report.shared_checks += 1
            return "shared"
        await self.session(rng.choice(up), user, hold, f"s{index}")
        return "single"

    def inject_some(self, rng: random.Random) -> None:
        p = self.options.faults_per_lifecycle
        while rng.random() < p / (1 + p):
            if rng.random() < 0.25:
                # What only user mode sends: claim patches and Lease renewals.
                verb = rng.choice(("patch", "patch", "get", "list"))
                self.cluster.faults.fail(rng.choice((500, 503, 429)), verb=verb, count=2)
                label = f"fail-{verb}"
            else:
                label = inject_fault(self.cluster, rng, POD_START)
            self.report.faults[label] += 1

    async def run_lifecycles(self) -> None:
        queue = list(range(self.options.lifecycles))

        async def worker() -> None:
            while queue:
                index = queue.pop(0)
                try:
                    kind = await asyncio.wait_for(self.lifecycle(index), LIFECYCLE_TIMEOUT)
                    self.report.outcomes[kind] += 1
                except AssertionError as exc:
                    self.report.outcomes["violation"] += 1
                    self.report.violations.append(str(exc))
                except asyncio.TimeoutError:
                    self.report.outcomes["hung"] += 1
                    self.report.violations.append(f"lifecycle {index} hung")

        await asyncio.gather(*(worker() for _ in range(self.options.concurrency)))

    # -- judging ---------------------------------------------------------------------------

    def judge_deletions(self) -> None:
        for use in self.uses:
            when = self.deleted_at.get(use.uid)
            if when is None or not use.start < when < use.end:
                continue
            self.report.deleted_under_connection += 1
            self.report.violations.append(
                f"Pod {use.uid} of {use.user} deleted {when - use.start:.2f} s into a session "
                f"that lasted {use.end - use.start:.2f} s"
            )

    async def run(self) -> ReplicaReport:
        started = time.monotonic()
        watcher = self.cluster.store.watch("pods", None, self._probe, None)
        try:
            for slot in range(self.options.replicas):
                await self.start_replica(slot)
            self.faults_on = True
            stop = asyncio.Event()
            disruptor = asyncio.ensure_future(self.disrupt(stop))
            try:
                await self.run_lifecycles()
            finally:
                stop.set()
                await disruptor
                self.cluster.faults.clear()
                self.faults_on = False
            # Everyone has left: with one replica (at least) running, every user Pod goes
            # within lease expiry + idle timeout + a look or two.
            bound = LEASE_DURATION + IDLE_TIMEOUT + 15
            deadline = time.monotonic() + bound
            while self.cluster.pods() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            left = {
                p["metadata"]["name"]: {
                    "phase": p["status"].get("phase"),
                    "deleting": bool(p["metadata"].get("deletionTimestamp")),
                    "claims": sorted(
                        k for k in p["metadata"].get("annotations") or {} if "claims." in k
                    ),
                }
                for p in self.cluster.pods()
            }
            if left:
                self.report.leaked_pods = len(left)
                leases = [x["metadata"]["name"] for x in self.cluster.lease_list()]
                self.report.violations.append(
                    f"Pods left {bound:.0f} s after the end: {left}; Leases: {leases}"
                )
        finally:
            for replica in self.replicas:
                if replica.proc.alive:
                    code = await replica.proc.stop(40)
                    if code != 0:
                        self.report.violations.append(f"final SIGTERM: exit status {code}")
            watcher.close()
        self.judge_deletions()
        leases = self.cluster.lease_list()
        alive_names = [x["metadata"]["name"] for x in leases]
        # Stopped replicas delete their Leases; killed ones' are collected by peers (the
        # last survivors may not have had the time, so only stopped ones are checked).
        for replica in self.replicas + self.retired:
            for entry in replica.proc.unhandled():
                self.report.unhandled_exceptions += 1
                self.report.violations.append(
                    f"reached a replica's exception handler: {entry['message']} "
                    f"{entry['exception']}\n{entry['traceback']}"
                )
        if self.options.verbose:
            print(f"Leases left: {alive_names}")
        self.report.seconds = time.monotonic() - started
        return self.report


async def run_replica_chaos(options: ReplicaOptions, workdir: Path | None = None) -> ReplicaReport:
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-")))
        async with DevCluster() as cluster:
            return await ReplicaChaos(options, cluster, workdir).run()
