"""Seeded chaos runs against a gateway process: random connection lifecycles while
devcluster injects faults, clients are killed mid-start and mid-transfer, and the
gateway is sent SIGTERM mid-traffic.

Each run has epochs. An epoch starts a gateway process (``gatewayproc``, loops and
relay implementations alternate), warms it up, measures its RSS, runs lifecycles
``concurrency`` at a time, each preceded by randomly chosen faults, then checks:

* every session ended with an exit status (kuberun's own statuses 250-254 only
  with a ``kuberun:`` message on stderr); a successful transfer is byte-exact and
  a failed one delivered a correct prefix; no lifecycle hung;
* no Pod is left once ``timeouts.pod_stop`` (plus termination slack) has passed;
* the gateway process is alive, reports no open connections or sessions, and its
  RSS is back near the warm baseline;
* nothing reached the gateway's event-loop exception handler.

Then more lifecycles start and the gateway gets SIGTERM while they run: it must
exit 0, delete every Pod, and each session must end with status 254 and the
shutdown message, or end normally, or (started too late) be refused.

The choices (lifecycle kinds, sizes, kill points, faults) come from the seed;
timing on a loaded machine does not, so a run is reproducible in what it tries,
not instant by instant. ``python -m tests.integration.chaos --help`` for the
long run (``make chaos``); ``tests/integration/test_chaos.py`` runs a short one.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import contextvars
import functools
import hashlib
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import yaml

from kuberun.devcluster import DevCluster

from .chaos_real import RealFaults
from .clusters import RealTestCluster, TestCluster, open_cluster

ROOT = Path(__file__).resolve().parents[2]

SSH_OPTS = [
    "-F",
    "/dev/null",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "Ciphers=aes128-gcm@openssh.com",
]

KUBERUN_STATUSES = range(250, 255)
SHUTDOWN_STATUS = 254
DATA_SIZE = 8 * 1024 * 1024

POD_START = 10
POD_STOP = 10
COMMAND_START = 10
#: Event loop and relay implementation of the gateway, epoch after epoch.
COMBINATIONS = (
    ("uvloop", "cython"),
    ("asyncio", "python"),
    ("asyncio", "cython"),
    ("uvloop", "python"),
)
#: Client-side bound on one lifecycle: beyond this it counts as hung.
LIFECYCLE_TIMEOUT = 120.0
#: Extra time for devcluster to finish terminating deleted Pods.
TERMINATION_SLACK = 10.0
#: The same on a real cluster, whose kubelet may be restarting when the Pods are deleted.
REAL_TERMINATION_SLACK = 120.0


@dataclass
class Options:
    seed: int = 1
    lifecycles: int = 60
    epochs: int = 2
    concurrency: int = 6
    #: Lifecycles started just before the SIGTERM of each epoch.
    shutdown_lifecycles: int = 6
    #: Faults injected per chaos lifecycle, on average.
    faults_per_lifecycle: float = 1.0
    #: Log level of the gateway process (its log goes to gateway.log in the workdir).
    log_level: str = "WARNING"
    #: Lifecycle kinds to run (all when empty), for chasing one problem.
    only: tuple[str, ...] = ()
    #: RSS the gateway may keep above its warm baseline once idle again.
    rss_tolerance: int = 48 * 1024 * 1024
    verbose: bool = False
    #: Against the real cluster (KUBERUN_REAL_KUBECONFIG) with its faults, not devcluster.
    real: bool = False


@dataclass
class Outcome:
    kind: str
    # ok | kuberun-error | killed | refused | violation; on a real cluster also
    # container-killed (the program got SIGKILL), gateway-killed (no status: the
    # gateway was SIGKILLed) and runtime-lost-output (containerd restarted meanwhile,
    # and the API server reported Success without the rest of the output)
    result: str
    detail: str = ""
    phase: str = ""


@dataclass
class EpochReport:
    epoch: int
    loop: str
    relay: str
    rss_baseline: int = 0
    rss_idle: int = 0
    rss_peak: int = 0
    gateway_exit: int | None = None
    pods_left: list[str] = field(default_factory=list)
    #: Pods the gateway's last look at SIGTERM found unowned and deleted: not leaks, but
    #: deletions the gateway had lost track of (each one is worth a look at the log).
    caught_at_stop: list[str] = field(default_factory=list)
    unhandled: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Report:
    options: Options
    outcomes: list[Outcome] = field(default_factory=list)
    epochs: list[EpochReport] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    fired: collections.Counter[str] = field(default_factory=collections.Counter)
    seconds: float = 0.0

    @property
    def lifecycles(self) -> int:
        return len(self.outcomes)

    @property
    def chaos_lifecycles(self) -> int:
        return sum(1 for o in self.outcomes if o.phase == "chaos")

    @property
    def leaked_pods(self) -> int:
        return sum(len(e.pods_left) for e in self.epochs)

    @property
    def caught_at_stop(self) -> int:
        return sum(len(e.caught_at_stop) for e in self.epochs)

    @property
    def silent_ends(self) -> int:
        return sum(1 for o in self.outcomes if o.result == "violation")

    @property
    def unhandled_exceptions(self) -> int:
        return sum(len(e.unhandled) for e in self.epochs)

    def summary(self) -> str:
        tally = collections.Counter(f"{o.kind}:{o.result}" for o in self.outcomes)
        lines = [
            f"chaos seed={self.options.seed}: {self.lifecycles} lifecycles "
            f"({self.chaos_lifecycles} under faults) in {len(self.epochs)} epochs, "
            f"{self.seconds:.0f} s",
            f"  leaked Pods: {self.leaked_pods}; sessions ended silently or wrongly: "
            f"{self.silent_ends}; unhandled exceptions: {self.unhandled_exceptions}; "
            f"Pods only the last look at stop deleted: {self.caught_at_stop}",
            f"  faults injected: {sum(self.faults.values())}, fired: {sum(self.fired.values())} "
            f"({dict(sorted(self.fired.items()))})",
        ]
        for e in self.epochs:
            lines.append(
                f"  epoch {e.epoch} ({e.loop}, {e.relay}): RSS warm {e.rss_baseline >> 20} MiB, "
                f"peak {e.rss_peak >> 20} MiB, idle after chaos {e.rss_idle >> 20} MiB; "
                f"exit after SIGTERM {e.gateway_exit}"
            )
        lines.append("  outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(tally.items())))
        for v in self.violations[:50]:
            lines.append(f"  VIOLATION: {v}")
        return "\n".join(lines)


class Violation(Exception):
    pass


#: When the running lifecycle started (each lifecycle is a task of its own).
_LIFECYCLE_START: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "lifecycle_start", default=None
)


def _send_input(proc: Any, data: bytes | str | None, *, eof: bool = False) -> None:
    """Write a session's stdin (then EOF), unless the session has ended already.

    A session that fails fast (an image that cannot be pulled, a refused exec) closes
    its channel before the client gets to write; asyncssh then raises BrokenPipeError.
    That is no violation in itself: the exit status and the message are judged next.
    """
    with contextlib.suppress(BrokenPipeError):
        if data is not None:
            proc.stdin.write(data)
        if eof:
            proc.stdin.write_eof()


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class GatewayProcess:
    """``gatewayproc`` in a subprocess, its stderr collected."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        loop: str,
        relay: str,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.extra_args = extra_args
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.report = workdir / "unhandled.jsonl"
        self.report.write_text("")
        self.loop = loop
        self.relay = relay
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.stderr = bytearray()
        self._pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        env = dict(os.environ)
        env.pop("KUBERUN_REQUIRE_EXTENSIONS", None)
        if self.relay == "python":
            env["KUBERUN_NO_EXTENSIONS"] = "1"
        else:
            env["KUBERUN_REQUIRE_EXTENSIONS"] = "1"
            env.pop("KUBERUN_NO_EXTENSIONS", None)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.integration.gatewayproc",
            "--config",
            str(self.config_path),
            "--report",
            str(self.report),
            "--loop",
            self.loop,
            *self.extra_args,
            cwd=str(ROOT),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._pump = asyncio.ensure_future(self._collect())
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        match = re.match(rb"PORT (\d+)", line)
        if not match:
            await asyncio.sleep(0.5)
            raise RuntimeError(f"gateway did not start: {self.stderr.decode(errors='replace')}")
        self.port = int(match.group(1))

    async def _collect(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self.stderr += chunk
            if len(self.stderr) > 64 << 20:
                del self.stderr[: 32 << 20]

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        return _rss(self.pid)

    async def metric(self, name: str) -> float | None:
        listen = self.config_metrics()
        if listen is None:
            return None
        async with aiohttp.ClientSession() as http, http.get(f"http://{listen}/metrics") as resp:
            text = await resp.text()
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(match.group(1)) if match else None

    def config_metrics(self) -> str | None:
        data = yaml.safe_load(self.config_path.read_text())
        return data["metrics"]["listen"]  # type: ignore[no-any-return]

    async def stop(self, timeout: float, signo: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signo)
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            code = None
        if self._pump is not None:
            await self._pump
        (self.workdir / "gateway.log").write_bytes(bytes(self.stderr))
        return code

    def unhandled(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.report.read_text().splitlines() if line]

    def caught_at_stop(self) -> list[str]:
        """The Pods the gateway's drain found unowned and deleted (its log says which)."""
        found = []
        for line in bytes(self.stderr).decode(errors="replace").splitlines():
            if _CAUGHT_AT_STOP in line:
                found += line.split(_CAUGHT_AT_STOP, 1)[1].split(", ")
        return found


#: What Gateway.drain() logs before the Pods its last look found.
_CAUGHT_AT_STOP = "that no connection owned any more, deleting them: "


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def inject_fault(cluster: DevCluster, rng: random.Random, budget: float) -> str:
    """Inject one random fault (the mix of every chaos run); returns its label.

    ``budget`` is the client's whole budget for one call (``timeouts.pod_start``):
    "stuck" and "late-answer" faults outlast it.
    """
    faults = cluster.faults
    choice = rng.randrange(12)
    verb = rng.choice(("create", "watch", "delete", "create", "watch", "delete", "get", "list"))
    if choice <= 2:
        status = rng.choice((500, 503, 504, 429))
        retry = 1 if status == 429 and rng.random() < 0.5 else None
        faults.fail(status, verb=verb, count=rng.randrange(1, 4), retry_after=retry)
        return f"fail-{status}-{verb}"
    if choice == 3:
        seconds = rng.choice((0.5, 1.5, 3.0))
        faults.latency(seconds, verb=rng.choice(("create", "watch", "delete")), count=1)
        return "latency"
    if choice == 4:
        # Requests that take longer than the whole budget (timeouts.pod_start or
        # pod_stop): either stuck before anything happens, or carried out with
        # the answer held back (the create's Pod exists; the client cannot know).
        verb = rng.choice(("create", "delete", "watch"))
        if rng.random() < 0.5:
            faults.latency(budget + 2, verb=verb, count=1)
            return f"stuck-{verb}"
        verb = "create" if verb == "watch" else verb
        faults.slow_response(budget + 2, verb=verb, count=1)
        return f"late-answer-{verb}"
    if choice == 5:
        faults.drop_watches(after_events=rng.randrange(0, 3), count=1)
        return "drop-watch"
    if choice in (6, 7):
        faults.drop_exec(after_bytes=rng.choice((0, 100, 70000, 1 << 20)), count=1)
        return "drop-exec"
    if choice == 8:
        faults.fail_image_pull(count=1)
        return "image-pull"
    if choice == 9:
        faults.delay_pod_start(rng.choice((1.0, 3.0)), count=1)
        return "slow-start"
    if choice == 10:
        faults.fail(500, verb="exec", count=1)
        return "fail-exec"
    faults.latency(rng.choice((1.0, 3.0)), verb="exec", count=1)
    return "slow-exec"


class Chaos:
    def __init__(self, options: Options, cluster: TestCluster, workdir: Path) -> None:
        self.options = options
        self.cluster = cluster
        self.workdir = workdir
        self.report = Report(options)
        self.data = random.Random(options.seed).randbytes(DATA_SIZE)
        self.data_path = workdir / "data.bin"
        self.data_path.write_bytes(self.data)
        key = asyncssh.generate_private_key("ssh-ed25519")
        self.key_path = workdir / "id_ed25519"
        self.key_path.write_bytes(key.export_private_key())
        self.key_path.chmod(0o600)
        (workdir / "authorized_keys").write_bytes(key.export_public_key())
        self.kubeconfig = workdir / "kubeconfig"
        cluster.write_kubeconfig(str(self.kubeconfig))
        self.gateway: GatewayProcess | None = None
        self.stopping = False
        self.faults_on = False
        self._injected: list[tuple[str, Any]] = []
        #: The real cluster's faults (chaos_real.py); None on devcluster.
        self.real_faults: RealFaults | None = None
        if isinstance(cluster, RealTestCluster):
            self.real_faults = RealFaults(cluster, cluster.admin_kubeconfig.parent)
        #: Set while a SIGKILLed gateway's sessions end without a status.
        self.gateway_killed = False
        # A real Pod start can wait out a restarting API server or kubelet.
        self.lifecycle_timeout = LIFECYCLE_TIMEOUT * (2 if self.real_faults else 1)

    # -- configuration ------------------------------------------------------------

    def gateway_config(self) -> dict[str, Any]:
        return {
            "ssh": {
                "listen": "127.0.0.1:0",
                "host_keys": [str(self.workdir / "host_key")],
                "authorized_keys": str(self.workdir / "authorized_keys"),
                "accept_env": ["LANG", "KR_*"],
                "max_sessions": 10,
            },
            "kubernetes": {
                **self.cluster.kubernetes_config(self.kubeconfig),
                "ping_interval": 5,
            },
            "pod": {
                "subsystems": {"sftp": ["/usr/lib/openssh/sftp-server"]},
                **self._pod_spec(),
            },
            "timeouts": {
                "pod_start": max(POD_START, self.cluster.pod_start),
                # A real API server restarting takes longer than devcluster's faults.
                "pod_stop": POD_STOP * (3 if self.real_faults else 1),
                "command_start": COMMAND_START,
            },
            "metrics": {"listen": f"127.0.0.1:{_free_port()}"},
            "logging": {"level": self.options.log_level},
        }

    def _pod_spec(self) -> dict[str, Any]:
        spec = self.cluster.pod_spec(self.workdir)
        return {} if spec is None else {"spec": spec}

    # -- clients --------------------------------------------------------------------

    def connect(self, **kwargs: Any) -> Any:
        assert self.gateway is not None
        return asyncssh.connect(
            "127.0.0.1",
            self.gateway.port,
            username="chaos",
            client_keys=[str(self.key_path)],
            known_hosts=None,
            encryption_algs=["aes128-gcm@openssh.com"],
            **kwargs,
        )

    def ssh_args(self, *command: str) -> list[str]:
        assert self.gateway is not None
        return [
            "ssh",
            *SSH_OPTS,
            "-i",
            str(self.key_path),
            "-p",
            str(self.gateway.port),
            "-T",
            "chaos@127.0.0.1",
            *command,
        ]

    # -- outcome checks ---------------------------------------------------------------

    def judge(
        self,
        kind: str,
        status: int | None,
        signal_name: str | None,
        stderr: str,
        expected: Callable[[], bool],
        what: str,
    ) -> Outcome:
        """Classify a finished session; raise Violation for a silent or wrong end."""
        if status is None and signal_name is None and self.gateway_killed:
            return Outcome(kind, "gateway-killed")
        if status is None and signal_name is None:
            raise Violation(f"{what}: no exit status (stderr {stderr[-300:]!r})")
        if status in KUBERUN_STATUSES:
            if "kuberun: " not in stderr:
                raise Violation(f"{what}: status {status} without a kuberun message")
            if status == SHUTDOWN_STATUS and not self.stopping:
                raise Violation(f"{what}: shutdown status while the gateway runs")
            if not self.faults_on and not self.stopping:
                raise Violation(f"{what}: status {status} without any fault: {stderr[-300:]!r}")
            return Outcome(kind, "kuberun-error", f"{status}")
        if not expected():
            killed = status == 137 or signal_name == "KILL"
            real = self.real_faults
            if killed and real is not None and real.container_kills:
                return Outcome(kind, "container-killed")
            started = _LIFECYCLE_START.get(None)
            if (
                status == 0
                and real is not None
                and started is not None
                and real.runtime_restarted_since(started)
            ):
                return Outcome(kind, "runtime-lost-output")
            raise Violation(f"{what}: unexpected result status={status} signal={signal_name}")
        return Outcome(kind, "ok")

    # -- lifecycles --------------------------------------------------------------------

    async def lc_exec(self, rng: random.Random) -> Outcome:
        token = f"tok{rng.randrange(10**9)}"
        code = rng.randrange(0, 100)
        async with self.connect() as conn:
            result = await conn.run(f"echo {token}; echo err >&2; exit {code}")
        return self.judge(
            "exec",
            result.exit_status,
            result.exit_signal and result.exit_signal[0],
            str(result.stderr),
            lambda: result.exit_status == code and result.stdout == token + "\n",
            f"exec {token}",
        )

    async def lc_multi(self, rng: random.Random) -> Outcome:
        count = rng.randrange(2, 5)
        async with self.connect() as conn:
            results = await asyncio.gather(
                *(conn.run(f"echo s{i}; exit {i}") for i in range(count)), return_exceptions=True
            )
        outcomes = []
        for i, result in enumerate(results):
            if isinstance(result, BaseException):
                raise Violation(f"multi session {i}: {result!r}")
            expected = result.exit_status == i and result.stdout == f"s{i}\n"
            outcomes.append(
                self.judge(
                    "multi",
                    result.exit_status,
                    None,
                    str(result.stderr),
                    functools.partial(bool, expected),
                    f"multi session {i}",
                )
            )
        bad = [o for o in outcomes if o.result != "ok"]
        return bad[0] if bad else outcomes[0]

    async def lc_download(self, rng: random.Random) -> Outcome:
        size = rng.choice((1, 1000, 65536, 1 << 20, DATA_SIZE))
        slow = rng.random() < 0.3
        async with self.connect() as conn:
            proc = await conn.create_process(f"head -c {size} {self.data_path}", encoding=None)
            _send_input(proc, None, eof=True)
            got = bytearray()
            while True:
                chunk = await proc.stdout.read(65536)
                if not chunk:
                    break
                got += chunk
                if slow:
                    await asyncio.sleep(0.01)
            result = await proc.wait()
        if bytes(got) != self.data[: len(got)]:
            raise Violation(f"download {size}: corrupted bytes (got {len(got)})")
        return self.judge(
            "download",
            result.exit_status,
            None,
            (result.stderr or b"").decode(errors="replace"),
            lambda: result.exit_status == 0 and len(got) == size,
            f"download {size}",
        )

    async def lc_upload(self, rng: random.Random) -> Outcome:
        size = rng.choice((0, 1, 70000, 1 << 20, 4 << 20))
        data = self.data[:size]
        digest = hashlib.sha256(data).hexdigest()
        async with self.connect() as conn:
            # (conn.run(input=b"") would never send EOF: asyncssh skips empty input.)
            proc = await conn.create_process("sha256sum", encoding=None)
            _send_input(proc, data, eof=True)
            result = await proc.wait()
        out = (result.stdout or b"").decode(errors="replace")
        return self.judge(
            "upload",
            result.exit_status,
            None,
            (result.stderr or b"").decode(errors="replace"),
            lambda: result.exit_status == 0 and out.startswith(digest),
            f"upload {size}",
        )

    async def lc_pty(self, rng: random.Random) -> Outcome:
        token = f"p{rng.randrange(10**6)}"
        async with self.connect() as conn:
            proc = await conn.create_process(
                'read line; echo "got:$line"; exit 4', term_type="xterm", term_size=(80, 24)
            )
            _send_input(proc, token + "\n")
            out = ""
            while True:
                chunk = await proc.stdout.read(1024)
                if not chunk:
                    break
                out += chunk
            result = await proc.wait()
        return self.judge(
            "pty",
            result.exit_status,
            None,
            out + str(result.stderr or ""),
            lambda: result.exit_status == 4 and f"got:{token}" in out,
            f"pty {token}",
        )

    async def lc_signal(self, rng: random.Random) -> Outcome:
        async with self.connect() as conn:
            proc = await conn.create_process("echo started; exec sleep 60")
            first = await proc.stdout.readline()
            if first == "started\n":
                await asyncio.sleep(rng.random() * 0.3)
                proc.send_signal("TERM")
            result = await proc.wait()
        sig = result.exit_signal[0] if result.exit_signal else None
        return self.judge(
            "signal",
            result.exit_status if sig is None else None,
            sig,
            str(result.stderr or ""),
            lambda: sig == "TERM",
            "signal",
        )

    async def lc_abort(self, rng: random.Random) -> Outcome:
        """The client vanishes (TCP abort) during Pod start or mid-transfer."""
        conn = await self.connect()
        try:
            proc = await conn.create_process(f"cat {self.data_path}", encoding=None)
            if rng.random() < 0.5:
                await asyncio.sleep(rng.random() * 1.5)  # probably still starting
            else:
                want = rng.randrange(1, DATA_SIZE // 2)
                got = 0
                while got < want:
                    chunk = await proc.stdout.read(65536)
                    if not chunk:
                        break
                    got += len(chunk)
        finally:
            conn.abort()
        return Outcome("abort", "killed")

    async def lc_ssh(self, rng: random.Random) -> Outcome:
        code = rng.randrange(0, 100)
        proc = await asyncio.create_subprocess_exec(
            *self.ssh_args(f"echo openssh; exit {code}"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        status = proc.returncode
        if status == 255 and self.gateway_killed:
            return Outcome("openssh", "gateway-killed")
        if status == 255:
            raise Violation(f"openssh: exit 255 (connection failed): {err[-300:]!r}")
        return self.judge(
            "openssh",
            status,
            None,
            err.decode(errors="replace"),
            lambda: status == code and out == b"openssh\n",
            "openssh",
        )

    async def lc_ssh_kill(self, rng: random.Random) -> Outcome:
        """OpenSSH SIGKILLed while its Pod starts or while it downloads."""
        during_transfer = rng.random() < 0.5
        proc = await asyncio.create_subprocess_exec(
            *self.ssh_args(f"cat {self.data_path}"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        try:
            if during_transfer:
                want = rng.randrange(1, DATA_SIZE // 2)
                got = 0
                while got < want:
                    chunk = await proc.stdout.read(65536)
                    if not chunk:
                        break
                    got += len(chunk)
            else:
                await asyncio.sleep(rng.random() * 1.5)
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            await proc.wait()
        return Outcome("ssh-kill", "killed")

    LIFECYCLES: dict[str, float] = {
        "lc_exec": 3,
        "lc_multi": 1,
        "lc_download": 2,
        "lc_upload": 1.5,
        "lc_pty": 1,
        "lc_signal": 1,
        "lc_abort": 1.5,
        "lc_ssh": 1,
        "lc_ssh_kill": 1,
    }

    async def lifecycle(self, epoch: int, index: int, phase: str) -> Outcome:
        rng = random.Random(f"{self.options.seed}/{epoch}/{phase}/{index}")
        if phase == "chaos":
            self.inject_some(random.Random(f"{self.options.seed}/{epoch}/faults/{index}"))
        names = [n for n in self.LIFECYCLES if not self.options.only or n[3:] in self.options.only]
        name = rng.choices(names, weights=[self.LIFECYCLES[n] for n in names])[0]
        kind = name[3:]
        runner: Callable[[random.Random], Awaitable[Outcome]] = getattr(self, name)
        _LIFECYCLE_START.set(time.monotonic())
        try:
            return await asyncio.wait_for(runner(rng), self.lifecycle_timeout)
        except Violation as exc:
            return Outcome(kind, "violation", str(exc))
        except asyncio.TimeoutError:
            return Outcome(kind, "violation", f"hung for {self.lifecycle_timeout:.0f} s")
        except (OSError, asyncssh.Error) as exc:
            if self.stopping:
                return Outcome(kind, "refused", repr(exc))
            return Outcome(kind, "violation", f"connection failed: {exc!r}")

    # -- faults ---------------------------------------------------------------------------

    def inject(self, rng: random.Random) -> str:
        return inject_fault(self.cluster.dev, rng, POD_START)

    def inject_some(self, rng: random.Random) -> None:
        """Before a chaos lifecycle starts: a few faults (``faults_per_lifecycle`` on
        average); they hit whichever requests come next, this lifecycle's or others'."""
        count = 0
        while rng.random() < self.options.faults_per_lifecycle / (
            1 + self.options.faults_per_lifecycle
        ):
            count += 1
        for _ in range(count):
            if self.real_faults is not None:
                label = self.real_faults.inject(rng)
                if label is not None:
                    self.report.faults[label] += 1
                continue
            before = {f.id for f in self.cluster.dev.faults.list()}
            label = self.inject(rng)
            self.report.faults[label] += 1
            for fault in self.cluster.dev.faults.list():
                if fault.id not in before:
                    self._injected.append((label, fault))

    # -- epochs ---------------------------------------------------------------------------

    async def run_batch(self, epoch: int, phase: str, count: int, concurrency: int) -> None:
        queue = list(range(count))
        peak = 0

        async def worker() -> None:
            nonlocal peak
            while queue:
                index = queue.pop(0)
                outcome = await self.lifecycle(epoch, index, phase)
                self.record(outcome, f"epoch {epoch} {phase} #{index}", phase)
                if self.gateway is not None and self.gateway.alive:
                    peak = max(peak, self.gateway.rss())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        self.report.epochs[-1].rss_peak = max(self.report.epochs[-1].rss_peak, peak)

    def record(self, outcome: Outcome, where: str, phase: str) -> None:
        outcome.phase = phase
        self.report.outcomes.append(outcome)
        if outcome.result == "violation":
            self.report.violations.append(f"{where} {outcome.kind}: {outcome.detail}")
        if self.options.verbose:
            print(f"{where}: {outcome.kind} {outcome.result} {outcome.detail}", flush=True)

    async def wait_no_pods(self, epoch: EpochReport) -> None:
        slack = TERMINATION_SLACK if self.real_faults is None else REAL_TERMINATION_SLACK
        deadline = time.monotonic() + POD_STOP + slack
        while await self.cluster.pods() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        left = [p["metadata"]["name"] for p in await self.cluster.pods()]
        if left:
            epoch.pods_left.extend(left)
            self.report.violations.append(f"epoch {epoch.epoch}: Pods left behind: {left}")
            # Clean up so the next epoch starts from nothing.
            for name in left:
                await self.cluster.delete_pod_now(name)

    async def epoch(self, index: int, lifecycles: int) -> None:
        loop, relay = COMBINATIONS[index % len(COMBINATIONS)]
        report = EpochReport(index, loop, relay)
        self.report.epochs.append(report)
        workdir = self.workdir / f"epoch{index}"
        workdir.mkdir()
        if self.real_faults is not None:
            await self.real_faults.wait_healthy()
        self.gateway = GatewayProcess(workdir, self.gateway_config(), loop, relay)
        await self.gateway.start()
        # Warm up (every code path once), then the baseline.
        self.faults_on = False
        await self.run_batch(index, "warm", 12, 3)
        await self.wait_no_pods(report)
        report.rss_baseline = self.gateway.rss()

        self.faults_on = True
        try:
            await self.run_batch(index, "chaos", lifecycles, self.options.concurrency)
        finally:
            await self._faults_off()
        # Deletions started by the last lifecycles finish within timeouts.pod_stop.
        await self.wait_no_pods(report)
        self.faults_on = False
        if not self.gateway.alive:
            self.report.violations.append(f"epoch {index}: the gateway died")
        else:
            for metric in ("kuberun_connections", "kuberun_sessions"):
                value = await self.gateway.metric(metric)
                if value != 0:
                    self.report.violations.append(f"epoch {index}: {metric} is {value} when idle")
            report.rss_idle = self.gateway.rss()
            if report.rss_idle - report.rss_baseline > self.options.rss_tolerance:
                self.report.violations.append(
                    f"epoch {index}: RSS {report.rss_idle >> 20} MiB, warm baseline "
                    f"{report.rss_baseline >> 20} MiB"
                )

        # SIGTERM (on a real cluster every other epoch: SIGKILL, then the janitor) mid-traffic.
        sigkill = self.real_faults is not None and index % 2 == 1
        batch = asyncio.ensure_future(
            self.run_batch(
                index,
                "shutdown",
                self.options.shutdown_lifecycles,
                self.options.shutdown_lifecycles,
            )
        )
        rng = random.Random(f"{self.options.seed}/sigterm/{index}")
        await asyncio.sleep(0.5 + rng.random() * 1.5)
        self.stopping = True
        if sigkill:
            self.gateway_killed = True
            report.gateway_exit = await self.gateway.stop(POD_STOP + 20, signal.SIGKILL)
            await batch
            self.gateway_killed = False
            await self.janitor(workdir, loop, relay)
        else:
            report.gateway_exit = await self.gateway.stop(POD_STOP + 20)
            await batch
        self.stopping = False
        if report.gateway_exit != (-signal.SIGKILL if sigkill else 0):
            self.report.violations.append(
                f"epoch {index}: gateway exit status {report.gateway_exit} after SIGTERM"
            )
        await self.wait_no_pods(report)
        report.caught_at_stop = self.gateway.caught_at_stop()
        report.unhandled = self.gateway.unhandled()
        for entry in report.unhandled:
            self.report.violations.append(
                f"epoch {index}: reached the exception handler: {entry['message']} "
                f"{entry['exception']}\n{entry['traceback']}"
            )

    async def _faults_off(self) -> None:
        if self.real_faults is not None:
            await self.real_faults.settle()
            for failure in self.real_faults.failures:
                self.report.violations.append(f"cluster fault failed: {failure}")
            self.real_faults.failures.clear()
            self.report.fired.clear()
            self.report.fired.update(self.real_faults.fired)
            return
        self.cluster.dev.faults.clear()
        for label, fault in self._injected:
            if fault.hits:
                self.report.fired[label] += fault.hits
        self._injected.clear()

    async def janitor(self, workdir: Path, loop: str, relay: str) -> None:
        """After a SIGKILL: a gateway of the same name starts, and its janitor deletes
        the Pods the killed one left (as `kuberun serve` does at start-up)."""
        janitor_dir = workdir / "janitor"
        janitor_dir.mkdir()
        gateway = GatewayProcess(
            janitor_dir, self.gateway_config(), loop, relay, extra_args=("--janitor",)
        )
        await gateway.start()
        code = await gateway.stop(POD_STOP + 20)
        if code != 0:
            self.report.violations.append(f"janitor gateway exit status {code}")

    async def run(self) -> Report:
        started = time.monotonic()
        per_epoch = [self.options.lifecycles // self.options.epochs] * self.options.epochs
        per_epoch[-1] += self.options.lifecycles - sum(per_epoch)
        for index, count in enumerate(per_epoch):
            await self.epoch(index, count)
        self.report.seconds = time.monotonic() - started
        return self.report


async def run_chaos(options: Options, workdir: Path | None = None) -> Report:
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-")))
        async with open_cluster(real=options.real) as cluster:
            return await Chaos(options, cluster, workdir).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.integration.chaos", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lifecycles", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--shutdown-lifecycles", type=int, default=8)
    parser.add_argument("--faults-per-lifecycle", type=float, default=1.0)
    parser.add_argument("--log-level", default="WARNING", help="of the gateway process")
    parser.add_argument("--only", default="", help="comma-separated lifecycle kinds")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="run user mode (pod.mode: user) on this many gateway replicas that are "
        "killed, stopped and restarted (see chaos_replicas.py); 0: the single-gateway run",
    )
    parser.add_argument("--users", type=int, default=4, help="with --replicas: users")
    parser.add_argument("--json", help="write the report here as JSON")
    parser.add_argument("--workdir", help="keep keys, configs and gateway logs here")
    parser.add_argument(
        "--real",
        action="store_true",
        help="against the real cluster of KUBERUN_REAL_KUBECONFIG, with its faults "
        "(chaos_real.py) instead of devcluster's (make chaos-real)",
    )
    args = parser.parse_args(argv)
    if args.replicas:
        return _main_replicas(args)
    options = Options(
        seed=args.seed,
        lifecycles=args.lifecycles,
        epochs=args.epochs,
        concurrency=args.concurrency,
        shutdown_lifecycles=args.shutdown_lifecycles,
        faults_per_lifecycle=args.faults_per_lifecycle,
        log_level=args.log_level,
        only=tuple(k for k in args.only.split(",") if k),
        verbose=args.verbose,
        real=args.real,
    )
    return _run(
        args,
        lambda workdir: run_chaos(options, workdir),
        lambda report: {
            "seed": options.seed,
            "lifecycles": report.lifecycles,
            "chaos_lifecycles": report.chaos_lifecycles,
            "leaked_pods": report.leaked_pods,
            "silent_ends": report.silent_ends,
            "unhandled_exceptions": report.unhandled_exceptions,
            "caught_at_stop": report.caught_at_stop,
            "violations": report.violations,
            "faults": dict(report.faults),
            "seconds": report.seconds,
            "epochs": [e.__dict__ for e in report.epochs],
        },
    )


def _main_replicas(args: argparse.Namespace) -> int:
    from .chaos_replicas import ReplicaOptions, run_replica_chaos

    options = ReplicaOptions(
        seed=args.seed,
        replicas=args.replicas,
        lifecycles=args.lifecycles,
        concurrency=args.concurrency,
        users=args.users,
        faults_per_lifecycle=args.faults_per_lifecycle,
        log_level=args.log_level,
        verbose=args.verbose,
    )
    return _run(
        args,
        lambda workdir: run_replica_chaos(options, workdir),
        lambda report: {k: v for k, v in report.__dict__.items() if k != "options"},
    )


def _run(
    args: argparse.Namespace,
    run: Callable[[Path | None], Coroutine[Any, Any, Any]],
    as_json: Callable[[Any], dict[str, Any]],
) -> int:
    """Run one chaos run on uvloop (``--workdir`` kept), print its summary, write
    ``--json``; exit status 1 if it found violations."""
    import uvloop

    workdir = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=False)
    report = uvloop.run(run(workdir))
    print(report.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(as_json(report), indent=2, default=str))
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
