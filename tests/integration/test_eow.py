"""Readers that stop early, with the OpenSSH client: eow@openssh.com and early closes.

When its stdout breaks, ssh stops taking the channel's output and sends eow@openssh.com
(only to servers whose version starts with OpenSSH). sshd then closes the program's
output pipe: the program dies of SIGPIPE on its next write, sshd sends exit-signal PIPE,
and ssh exits 255 (it reports only exit-status). Run against OpenSSH 9.2p1's sshd on
Debian 12: `ssh host 'exec yes' | head -c10` exits 255, the remote `yes` ends with 141.
kuberun must end each case the same way, promptly, with no process left in the Pod.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import signal
import socket
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from kuberun.channelhooks import EOW_REQUEST

from .conftest import SSH_OPTS, Gateway, wait_for
from .podprocs import pod_group_gone, program_gone, recorded_group

pytestmark = pytest.mark.openssh

#: ssh's exit status when the session ended with exit-signal (here PIPE), as with sshd.
SSH_EXIT_SIGNALLED = 255

#: A program that would write for minutes: 4 GB of zeros.
ENDLESS = "head -c 4000000000 /dev/zero"


@pytest.fixture
def gateway_overrides(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "pids").mkdir()
    return {"pod__pid_dir": str(tmp_path / "pids")}


class Reader:
    """ssh with its stdout on a pipe whose read end the test holds, as `| head` would."""

    def __init__(self, proc: asyncio.subprocess.Process, fd: int) -> None:
        self.proc = proc
        self.fd = fd
        self.data = b""

    async def read_until(self, done: Any, timeout: float = 30) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done(self.data):
            read = loop.run_in_executor(None, os.read, self.fd, 65536)
            try:
                chunk = await asyncio.wait_for(read, max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                self.proc.kill()  # its end of the pipe closes: the blocked read returns
                pytest.fail(f"no output for {timeout}s after {self.data[:200]!r}")
            assert chunk, f"EOF after {self.data[:200]!r}"
            self.data += chunk
        return self.data

    def close(self) -> float:
        """Close the read end, as a reader that exits does; returns the time."""
        os.close(self.fd)
        self.fd = -1
        return time.monotonic()


async def start_ssh(
    gateway: Gateway, command: str, *, tty: bool = False, extra_opts: Sequence[str] = ()
) -> Reader:
    r, w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *gateway.ssh_args(command, tty=tty, extra_opts=extra_opts),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=w,
            stderr=asyncio.subprocess.PIPE,
        )
    finally:
        os.close(w)
    return Reader(proc, r)


async def finish(reader: Reader, closed_at: float) -> tuple[int, bytes, float]:
    """ssh's exit status, its stderr, and the seconds it took to end after the close."""
    _, err = await asyncio.wait_for(reader.proc.communicate(), 20)
    elapsed = time.monotonic() - closed_at
    assert reader.proc.returncode is not None
    return reader.proc.returncode, err, elapsed


#: (command, what the reader does): `| head -c 10`, `| sleep 2` (the window closes and
#: stays closed until the reader exits), `| head -1`.
READER_CASES = [(ENDLESS, "head -c 10"), (ENDLESS, "sleep 2"), ("seq 1 100000000", "head -1")]
READER_IDS = ["head-c-10", "sleep-2", "head-1-of-seq"]


async def stop_reading(reader: Reader, how: str) -> float:
    """Read as ``how`` would, then close the pipe; returns the time of the close."""
    if how == "sleep 2":
        await asyncio.sleep(2)
    elif how == "head -1":
        data = await reader.read_until(lambda d: b"\n" in d)
        assert data.split(b"\n")[0].rstrip(b"\r") == b"1"
    else:
        await reader.read_until(lambda d: len(d) >= 10)
    return reader.close()


async def start_watched(gateway: Gateway, command: str, **kwargs: Any) -> tuple[Reader, int]:
    """:func:`start_ssh`, and the process group its program runs in."""
    pid_dir = gateway.workdir / "pids"
    before = os.listdir(pid_dir)
    reader = await start_ssh(gateway, command, **kwargs)
    return reader, await recorded_group(pid_dir, before)


async def ended_as_with_sshd(
    gateway: Gateway, rc: int, err: bytes, elapsed: float, pgid: int
) -> None:
    """ssh reported the exit-signal, promptly, and nothing of the program is left."""
    assert rc == SSH_EXIT_SIGNALLED, err
    assert elapsed < 10
    await wait_for(program_gone(gateway, pgid), 10, "the program is still running")


@pytest.mark.parametrize("tty", [False, True], ids=["no-pty", "pty"])
@pytest.mark.parametrize(("command", "how"), READER_CASES, ids=READER_IDS)
async def test_reader_that_stops(gateway: Gateway, command: str, how: str, tty: bool) -> None:
    reader, pgid = await start_watched(gateway, command, tty=tty)
    await ended_as_with_sshd(gateway, *await finish(reader, await stop_reading(reader, how)), pgid)


def stderr_job(n: int) -> str:
    """A background job writing ``n`` lines to stderr, 0.2 s apart, that survives
    SIGPIPE (an ignored signal stays ignored in `sleep` too)."""
    return (
        f"(trap '' PIPE; i=0; while [ $i -lt {n} ]; do echo err-$i >&2; i=$((i+1)); "
        "sleep 0.2; done) &"
    )


async def test_stderr_flows_after_stdout_broke(gateway: Gateway) -> None:
    # A writer of stderr keeps writing after the reader of stdout left: kuberun relays
    # all of it, then ends the session with the status of the program, which SIGPIPE
    # killed. (ssh itself, like with sshd, no longer prints a channel's stderr once its
    # stdout broke; its debug log shows what arrived.) stdout comes slowly here, so the
    # client's window has room when its stdout breaks: what ssh holds for a reader that
    # is gone it throws away without reopening the window for it, and a window spent
    # that way (the next test) lets no stderr through.
    command = f"{stderr_job(10)} exec sh -c 'while :; do echo out; sleep 0.1; done'"
    reader, pgid = await start_watched(gateway, command, extra_opts=["-vv"])
    rc, err, elapsed = await finish(reader, await stop_reading(reader, "head -c 10"))
    await ended_as_with_sshd(gateway, rc, err, elapsed, pgid)
    log = err.decode().splitlines()
    assert "debug2: channel 0: send eow" in log
    after_eow = log[log.index("debug2: channel 0: send eow") :]
    shown = [line for line in log if line.startswith("err-")]
    relayed_later = sum(
        int(line.rsplit(" ", 1)[1]) for line in after_eow if "rcvd ext data" in line
    )
    relayed = len("".join(f"{line}\n" for line in shown)) + relayed_later
    assert relayed == len("".join(f"err-{i}\n" for i in range(10))), log
    assert relayed_later > 0


async def test_stderr_queued_when_the_window_is_spent(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing reads for 2 s: ssh's window fills with output it then throws away when
    # its stdout breaks, and it never reopens that window; the stderr still flowing
    # queues up behind it. As sshd (which closes the channel once the program is gone
    # after eow), kuberun ends the session when the program ends, dropping that stderr,
    # instead of holding the exit status for output that cannot go out.
    caplog.set_level(logging.INFO, logger="kuberun")
    reader, pgid = await start_watched(gateway, f"{stderr_job(15)} exec yes")
    rc, err, elapsed = await finish(reader, await stop_reading(reader, "sleep 2"))
    await ended_as_with_sshd(gateway, rc, err, elapsed, pgid)
    assert "of output the client would not take were dropped" in caplog.text


async def test_exit_held_for_queued_output_goes_out_on_eow(gateway: Gateway) -> None:
    # The program has ended and its status waits for the output queued behind a shut
    # window; then the client says it cannot write that output (eow) and keeps its
    # window shut, as ssh does. The status goes out at once, the queued output dropped.
    pid_dir = gateway.workdir / "pids"
    async with gateway.asyncssh_connect() as conn:
        before = os.listdir(pid_dir)
        chan, _ = await conn.create_session(
            asyncssh.SSHClientSession,
            "head -c 40000 /dev/zero; echo err >&2",
            encoding=None,
            window=1000,
        )
        chan.pause_reading()  # the window stays shut: 1000 bytes, never adjusted
        pgid = await recorded_group(pid_dir, before)
        await wait_for(pod_group_gone(conn, pgid), 20, "the program is still running")
        await asyncio.sleep(1)  # time for the exec's status to reach the gateway
        assert chan.get_exit_status() is None  # held for the queued output
        chan._send_request(EOW_REQUEST.encode())  # as OpenSSH sends it: no reply wanted
        await wait_for(lambda: chan.get_exit_status() is not None, 10, "no exit status")
        assert chan.get_exit_status() == 0
        chan.resume_reading()
        await asyncio.wait_for(chan.wait_closed(), 10)


async def test_client_killed_while_its_window_is_closed(gateway: Gateway) -> None:
    reader, pgid = await start_watched(gateway, "yes")
    await asyncio.sleep(1.5)  # nothing read: the window closes, output queues up
    reader.proc.send_signal(signal.SIGKILL)
    await asyncio.wait_for(reader.proc.wait(), 10)
    reader.close()
    await wait_for(program_gone(gateway, pgid), 10, "the program is still running")
    await gateway.wait_no_pods()


async def test_channel_closed_while_output_is_queued(gateway: Gateway) -> None:
    pid_dir = gateway.workdir / "pids"
    async with gateway.asyncssh_connect() as conn:
        before = os.listdir(pid_dir)
        proc = await conn.create_process("yes", encoding=None)
        pgid = await recorded_group(pid_dir, before)
        await asyncio.sleep(1.5)  # nothing read: the window closes, output queues up
        started = time.monotonic()
        proc.close()
        await asyncio.wait_for(proc.wait_closed(), 10)
        await wait_for(pod_group_gone(conn, pgid), 10, "the program is still running")
        assert time.monotonic() - started < 10
        result = await conn.run("echo still-here")
        assert result.stdout == "still-here\n"


async def test_banner_makes_openssh_send_eow(gateway: Gateway) -> None:
    code, _, err = await gateway.ssh("true", extra_opts=["-v"])
    assert code == 0, err
    assert b"remote software version OpenSSH_9.9 kuberun" in err
    # OpenSSH applies its compat table to it: only SSH_NEW_OPENSSH, no bug workarounds.
    assert b"pat OpenSSH* compat 0x04000000" in err


@pytest.mark.parametrize("gateway_overrides", [{"ssh__server_version": None}])
async def test_without_an_openssh_banner_no_eow_arrives(gateway: Gateway) -> None:
    # asyncssh's own version: ssh discards the output it cannot write and the program
    # runs to its end (a short one here), whose real status it then reports.
    _, _, err = await gateway.ssh("true", extra_opts=["-v"])
    assert b"remote software version AsyncSSH_" in err
    reader = await start_ssh(gateway, "head -c 20000000 /dev/zero; exit 3", extra_opts=["-vv"])
    await reader.read_until(lambda d: len(d) >= 10)
    rc, err, _ = await finish(reader, reader.close())
    assert rc == 3, err
    assert b"send eow" in err  # ssh logs it, then sends nothing to a non-OpenSSH server


async def test_no_more_sessions_after_the_client_said_so(gateway: Gateway) -> None:
    # Sent by OpenSSH clients to servers that claim to be OpenSSH; sshd then refuses
    # any further session on the connection, and so does kuberun.
    async with gateway.asyncssh_connect() as conn:
        result = await conn.run("echo first")
        assert result.stdout == "first\n"
        conn._send_global_request(b"no-more-sessions@openssh.com")
        with pytest.raises(asyncssh.ChannelOpenError, match="no more sessions"):
            await conn.run("echo second")


# -- the same cases against OpenSSH's sshd, run on a free port -------------------------

SSHD = "/usr/sbin/sshd"


@pytest.fixture
async def sshd(tmp_path: Path) -> AsyncIterator[list[str]]:
    """sshd on a free port of 127.0.0.1; yields the ssh arguments that reach it."""
    if os.geteuid() != 0:
        pytest.skip("sshd needs root to run sessions")
    assert os.path.exists(SSHD), "openssh-server is missing (scripts/system-deps.sh)"
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    host_key = tmp_path / "sshd_host_key"
    host_key.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    host_key.chmod(0o600)
    client_key = tmp_path / "sshd_client_key"
    key = asyncssh.generate_private_key("ssh-ed25519")
    client_key.write_bytes(key.export_private_key())
    client_key.chmod(0o600)
    (tmp_path / "sshd_authorized_keys").write_bytes(key.export_public_key())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {host_key}\n"
        f"AuthorizedKeysFile {tmp_path}/sshd_authorized_keys\nPidFile {tmp_path}/sshd.pid\n"
        "StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
    )
    proc = await asyncio.create_subprocess_exec(
        SSHD, "-D", "-e", "-f", str(tmp_path / "sshd_config"), stderr=asyncio.subprocess.PIPE
    )
    try:

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        await wait_for(listening, 10, "sshd does not listen")
        yield [
            "ssh", *SSH_OPTS, "-i", str(client_key), "-p", str(port), "-T",
            f"{pwd.getpwuid(os.geteuid()).pw_name}@127.0.0.1",
        ]  # fmt: skip
    finally:
        proc.terminate()
        await proc.wait()


async def _run_case(argv: list[str], how: str) -> tuple[int, float]:
    r, w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=w, stderr=asyncio.subprocess.PIPE
        )
    finally:
        os.close(w)
    reader = Reader(proc, r)
    rc, _, elapsed = await finish(reader, await stop_reading(reader, how))
    return rc, elapsed


@pytest.mark.parametrize(("command", "how"), READER_CASES, ids=READER_IDS)
async def test_exit_status_matches_sshd(
    gateway: Gateway, sshd: list[str], command: str, how: str
) -> None:
    sshd_rc, sshd_elapsed = await _run_case([*sshd, command], how)
    rc, elapsed = await _run_case(gateway.ssh_args(command), how)
    assert (rc, sshd_rc) == (SSH_EXIT_SIGNALLED, SSH_EXIT_SIGNALLED)
    assert elapsed < 10 and sshd_elapsed < 10
