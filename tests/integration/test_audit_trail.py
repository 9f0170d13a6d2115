"""The audit trail of a scripted OpenSSH run against a gateway process.

One gateway (``kuberun serve`` as a process, so it can be stopped with
SIGTERM) with ``audit.directory`` set. OpenSSH clients, multiplexed over one
ControlMaster connection where sshd users would do so: a refused key, an exec,
a shell with a pty, sftp, a forward (``-W``) to a server in the Pod, a BREAK
(``~B``, delivered as SIGINT), a client killed mid-session, and a session still
running when the gateway gets SIGTERM. Every event line must validate against
:data:`kuberun.audit.EVENT_SCHEMA` and each kind the run can produce must be there,
with the fields that say what happened.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import jsonschema
import pytest

from kuberun.audit import EVENT_SCHEMA

from .chaos import Chaos, GatewayProcess, Options, _free_port
from .clusters import open_cluster
from .conftest import SSH_OPTS, wait_for

pytestmark = pytest.mark.asyncio(loop_factories=["uvloop"])


def read_events(directory: Path) -> list[dict[str, Any]]:
    """Every event in ``directory``'s events files, each checked against the schema."""
    events = []
    validator = jsonschema.Draft202012Validator(EVENT_SCHEMA)
    for path in sorted(directory.glob("events-*.jsonl")):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            validator.validate(event)
            events.append(event)
    return events


class Run:
    def __init__(self, harness: Chaos, gateway: GatewayProcess, audit_dir: Path) -> None:
        self.harness = harness
        self.gateway = gateway
        self.audit_dir = audit_dir
        self.control = harness.workdir / "cm"

    def ssh(self, *args: str, tty: bool = False, master: bool = True) -> list[str]:
        mux = ["-o", f"ControlPath={self.control}", "-o", "ControlMaster=auto"]
        return [
            "ssh",
            *SSH_OPTS,
            *([*mux, "-o", "ControlPersist=60"] if master else []),
            "-i",
            str(self.harness.key_path),
            "-p",
            str(self.gateway.port),
            "-tt" if tty else "-T",
            "auditor@127.0.0.1",
            *args,
        ]

    async def run(self, argv: list[str], stdin: bytes = b"", timeout: float = 60) -> Any:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        return proc.returncode, out, err

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.audit_dir)

    async def wait_event(self, what: str, **fields: Any) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for event in self.events():
                if event["event"] == what and all(event.get(k) == v for k, v in fields.items()):
                    return event
            return None

        found: dict[str, Any] = await wait_for(find, 30, f"{what} {fields}")
        return found


@pytest.fixture
async def run(tmp_path: Path) -> AsyncIterator[Run]:
    async with open_cluster() as cluster:
        harness = Chaos(Options(), cluster, tmp_path)
        workdir = tmp_path / "gateway"
        workdir.mkdir()
        audit_dir = tmp_path / "audit"
        config = harness.gateway_config()
        config["audit"] = {"directory": str(audit_dir), "recordings": "pty"}
        gateway = GatewayProcess(workdir, config, "uvloop", "cython")
        harness.gateway = gateway
        await gateway.start()
        r = Run(harness, gateway, audit_dir)
        try:
            yield r
        finally:
            subprocess.run(
                ["ssh", "-o", f"ControlPath={r.control}", "-O", "exit", "x"],
                capture_output=True,
                check=False,
            )
            await gateway.stop(60)
            assert not gateway.unhandled()


async def test_every_event_kind_of_an_openssh_run(run: Run, tmp_path: Path) -> None:
    # A key the gateway does not know: a failed publickey attempt.
    stranger = tmp_path / "stranger"
    stranger.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    stranger.chmod(0o600)
    argv = run.ssh("true", master=False)
    argv[argv.index(str(run.harness.key_path))] = str(stranger)
    code, _, _ = await run.run(argv)
    assert code == 255

    # exec, on the master connection (which creates the Pod).
    code, out, _ = await run.run(run.ssh("echo hello; echo oops >&2"))
    assert (code, out) == (0, b"hello\n")

    # A shell with a pty, in the same Pod.
    code, out, _ = await run.run(
        run.ssh(tty=True, master=True), stdin=b"printf 'in the shell\\n'; exit 3\n"
    )
    assert code == 3 and b"in the shell" in out

    # sftp
    (tmp_path / "up.txt").write_bytes(b"sftp payload\n")
    batch = tmp_path / "batch"
    batch.write_text(
        f"put {tmp_path / 'up.txt'} /tmp/up.txt\nget /tmp/up.txt {tmp_path / 'down.txt'}\n"
    )
    sftp = [
        "sftp",
        *SSH_OPTS,
        "-o",
        f"ControlPath={run.control}",
        "-i",
        str(run.harness.key_path),
        "-P",
        str(run.gateway.port),
        "-b",
        str(batch),
        "auditor@127.0.0.1",
    ]
    code, _, err = await run.run(sftp)
    assert code == 0, err
    assert (tmp_path / "down.txt").read_bytes() == b"sftp payload\n"

    # A forward (ssh -W) to an HTTP server in the Pod.
    port = _free_port()
    server = await asyncio.create_subprocess_exec(
        *run.ssh(f"exec python3 -m http.server {port} --bind 127.0.0.1"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    forward = [
        "ssh",
        *SSH_OPTS,
        "-o",
        f"ControlPath={run.control}",
        "-p",
        str(run.gateway.port),
        "-W",
        f"127.0.0.1:{port}",
        "auditor@127.0.0.1",
    ]
    for _ in range(100):  # until the server listens
        code, out, _ = await run.run(forward, stdin=b"GET / HTTP/1.0\r\n\r\n")
        if out.startswith(b"HTTP/1.0 200"):
            break
        await asyncio.sleep(0.2)
    assert out.startswith(b"HTTP/1.0 200"), out[:200]
    server.kill()
    await server.wait()

    # A BREAK (~B, the escape at the start of a line), delivered as SIGINT.
    proc = await asyncio.create_subprocess_exec(
        *run.ssh("exec sleep 30", tty=True),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    opened = await run.wait_event("session.opened", command="exec sleep 30")
    await asyncio.sleep(1.0)  # until the program runs
    proc.stdin.write(b"\n~B")
    await proc.stdin.drain()
    await asyncio.wait_for(proc.wait(), 20)
    signalled = await run.wait_event("session.signal", session=opened["session"])
    assert signalled["signal"] == "INT" and signalled["delivered"] is True

    # A client killed mid-session (its own connection).
    proc = await asyncio.create_subprocess_exec(
        *run.ssh("sleep 60", master=False),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    killed = await run.wait_event("session.opened", command="sleep 60")
    await asyncio.sleep(0.5)
    proc.kill()
    await proc.wait()
    ended = await run.wait_event("session.ended", connection=killed["connection"])
    assert ended["how"] == "client_closed"
    await run.wait_event("connection.closed", connection=killed["connection"])

    # A session running when the gateway gets SIGTERM.
    proc = await asyncio.create_subprocess_exec(
        *run.ssh("sleep 61", master=False),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    last = await run.wait_event("session.opened", command="sleep 61", session="s1")
    await wait_for(
        lambda: any(
            e["event"] == "pod.created" and e["connection"] == last["connection"]
            for e in run.events()
        ),
        30,
        "the last connection's Pod",
    )
    await asyncio.sleep(0.5)
    assert await run.gateway.stop(60) == 0
    await asyncio.wait_for(proc.wait(), 20)

    events = run.events()  # each validated against the schema
    kinds = {e["event"] for e in events}
    expected = {
        "connection.opened",
        "auth",
        "pod.created",
        "pod.reused",
        "pod.deleted",
        "session.opened",
        "session.signal",
        "session.ended",
        "forward.opened",
        "forward.closed",
        "connection.closed",
    }
    assert expected <= kinds, expected - kinds
    assert {e["gateway"] for e in events} == {events[0]["gateway"]}

    def of(kind: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            e for e in events if e["event"] == kind and all(e[k] == v for k, v in fields.items())
        ]

    failures = of("auth", result="failure")
    assert failures and failures[0]["method"] == "publickey"
    assert failures[0]["key"]["fingerprint"].startswith("SHA256:")
    ours = asyncssh.read_private_key(str(run.harness.key_path)).get_fingerprint("sha256")
    successes = of("auth", result="success")
    assert successes and all(e["key"]["fingerprint"] == ours for e in successes)
    assert all(e["key"]["type"] == "ssh-ed25519" for e in successes)

    master = of("session.opened", command="echo hello; echo oops >&2")[0]["connection"]
    sessions = {e["session"]: e for e in of("session.opened", connection=master)}
    ends = {e["session"]: e for e in of("session.ended", connection=master)}
    kinds_opened = sorted((e["kind"], e["subsystem"]) for e in sessions.values())
    assert ("shell", None) in kinds_opened and ("subsystem", "sftp") in kinds_opened
    exec_end = next(
        ends[s] for s, e in sessions.items() if e["command"] == "echo hello; echo oops >&2"
    )
    assert exec_end["how"] == "exit" and exec_end["exit_status"] == 0
    assert exec_end["bytes"] == {"stdin": 0, "stdout": 6, "stderr": 5}
    assert exec_end["recording"] is None  # recordings: pty
    shell = next(e for e in sessions.values() if e["kind"] == "shell")
    assert shell["pty"] is not None and shell["pty"]["term"]
    shell_end = ends[shell["session"]]
    assert shell_end["exit_status"] == 3
    assert shell_end["recording"]["format"] == "asciicast-v2"
    cast = run.audit_dir / shell_end["recording"]["files"][0]
    assert b"in the shell" in cast.read_bytes()
    interrupted = ends[signalled["session"]]
    assert interrupted["exit_signal"] == "INT" and interrupted["exit_status"] is None
    # Sessions after the first found the connection's Pod running.
    assert len(of("pod.reused", connection=master)) >= 3
    assert len(of("pod.created", connection=master)) == 1

    served = [e for e in of("forward.closed", port=port) if e["bytes"]["from_pod"] > 0]
    assert served and served[-1]["host"] == "127.0.0.1" and served[-1]["bytes"]["to_pod"] == 18
    opened_forwards = {e["forward"] for e in of("forward.opened", port=port)}
    assert served[-1]["forward"] in opened_forwards

    stopped = of("session.ended", connection=last["connection"])
    assert stopped and stopped[0]["how"] == "shutdown" and stopped[0]["exit_status"] == 254
    closed = of("connection.closed", connection=last["connection"])
    assert closed and closed[0]["reason"] == "gateway shutdown"
    # Every Pod created was deleted, and every connection that was opened was closed.
    created = {e["pod"]["uid"] for e in of("pod.created")}
    assert created == {e["pod"]["uid"] for e in of("pod.deleted")}
    assert {e["connection"] for e in of("connection.opened")} == {
        e["connection"] for e in of("connection.closed")
    }
    # The env names the client sent: OpenSSH sends LANG/LC_* only when configured; none here.
    assert all(isinstance(e["env"], list) for e in of("session.opened"))
