"""OpenSSH session behaviour: pty, resize, env, signals, sftp/scp/rsync, session mode."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import asyncssh
import pytest

from .conftest import STTY_LOOP, Gateway, sizes_until, wait_for

pytestmark = pytest.mark.openssh


async def _read_until(stream: asyncssh.SSHReader[str], marker: str, timeout: float = 20) -> str:
    buf = ""

    async def read() -> None:
        nonlocal buf
        while marker not in buf:
            chunk = await stream.read(1024)
            if not chunk:
                break
            buf += chunk

    await asyncio.wait_for(read(), timeout)
    return buf


async def test_pty_size_and_resize(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as conn:
        result = await conn.run("stty size", term_type="xterm", term_size=(100, 40))
        assert result.stdout.strip() == "40 100"

        proc = await conn.create_process(STTY_LOOP, term_type="xterm", term_size=(100, 40))
        await _read_until(proc.stdout, "ready")
        proc.change_terminal_size(120, 50)
        # On devcluster, as with sshd, the very next line sees the new size.
        sizes = await sizes_until(proc, "50 120", real=gateway.cluster.real)
        assert sizes[-1] == "50 120", sizes
        proc.stdin.write("q\n")
        await proc.wait()


async def test_pty_output_survives_client_eof(gateway: Gateway) -> None:
    """`ssh -tt host cmd </dev/null`: the client's EOF comes first; as with sshd, a pty
    session's output still arrives in full (a real kubelet closes the pty with stdin)."""
    proc = await asyncio.create_subprocess_exec(
        *gateway.ssh_args("tty; sleep 1; echo after; exit 3", tty=True),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 3, err
    assert out.startswith(b"/dev/pts/") and out.endswith(b"after\r\n"), out


async def test_term_under_ssh_tt(gateway: Gateway) -> None:
    env = dict(os.environ, TERM="xterm-256color")
    proc = await asyncio.create_subprocess_exec(
        *gateway.ssh_args("echo $TERM", tty=True),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert out.strip() == b"xterm-256color"


async def test_env_filtered_by_accept_env(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as conn:
        result = await conn.run(
            'printf "%s|%s|%s" "$LANG" "$KR_X" "$OTHER"',
            env={"LANG": "C.UTF-8", "KR_X": "1", "OTHER": "2"},
        )
        assert result.stdout == "C.UTF-8|1|"


@pytest.mark.parametrize(
    "value",
    [
        'it\'s "quoted"',
        "$(touch /tmp/kuberun-pwned)",
        "`touch /tmp/kuberun-pwned`",
        "line1\nline2\n",
        "; rm -rf / #",
        "ünïcødé $HOME ${X:-y} \\ *",
    ],
)
async def test_env_values_arrive_byte_exact(gateway: Gateway, value: str) -> None:
    async with gateway.asyncssh_connect() as conn:
        result = await conn.run('printf "%s" "$KR_V"', env={"KR_V": value})
        assert result.stdout == value
        # Where the command would have run (the Pod: on devcluster, this machine).
        assert (await conn.run("test ! -e /tmp/kuberun-pwned")).exit_status == 0
    assert not Path("/tmp/kuberun-pwned").exists()


async def test_signal_term_ends_program(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as conn:
        proc = await conn.create_process("echo started; exec sleep 30")
        await _read_until(proc.stdout, "started")
        proc.send_signal("TERM")
        result = await asyncio.wait_for(proc.wait(), 20)
        assert (result.exit_signal is not None and result.exit_signal[0] == "TERM") or (
            result.exit_status == 143
        ), (result.exit_status, result.exit_signal)


async def test_usr1_signal_reaches_program(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as conn:
        proc = await conn.create_process(
            "trap 'echo got-usr1; exit 0' USR1; echo started; while :; do sleep 0.1; done"
        )
        await _read_until(proc.stdout, "started")
        proc.send_signal("USR1")
        out = await _read_until(proc.stdout, "got-usr1")
        assert "got-usr1" in out
        result = await asyncio.wait_for(proc.wait(), 20)
        assert result.exit_status == 0


async def test_closing_channel_kills_program(gateway: Gateway, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    async with gateway.asyncssh_connect() as conn:
        proc = await conn.create_process(f"echo $$ > {pidfile}; echo started; exec sleep 60")
        await _read_until(proc.stdout, "started")
        pid = int(pidfile.read_text())
        proc.close()

        # Asked inside the Pod (its PID namespace): gone, or a zombie (it has exited).
        probe = (
            f"s=$(sed 's/.*) //' /proc/{pid}/stat 2>/dev/null | cut -c1); "
            '[ -z "$s" ] || [ "$s" = Z ]'
        )

        async def gone() -> bool:
            return bool((await conn.run(probe)).exit_status == 0)

        await wait_for(gone, 20, "program still running after channel close")


async def test_resize_and_signal_after_exit_are_harmless(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as conn:
        proc = await conn.create_process("true", term_type="xterm", term_size=(80, 24))
        result = await proc.wait()
        assert result.exit_status == 0
        calls: tuple[Callable[[], None], ...] = (
            lambda: proc.change_terminal_size(100, 30),
            lambda: proc.send_signal("TERM"),
        )
        for call in calls:
            try:
                call()
            except (OSError, asyncssh.Error):
                pass  # the channel is already closed: fine, as long as nothing breaks
        result = await conn.run("echo still-fine")
        assert result.stdout == "still-fine\n"


async def test_break_sends_sigint_with_pty(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as conn:
        proc = await conn.create_process(
            "trap 'echo got-int; exit 0' INT; echo started; while :; do sleep 0.1; done",
            term_type="xterm",
        )
        await _read_until(proc.stdout, "started")
        proc.send_break(100)
        out = await _read_until(proc.stdout, "got-int")
        assert "got-int" in out
        await asyncio.wait_for(proc.wait(), 20)


async def test_unknown_subsystem_refused(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as conn:
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_process(subsystem="nope")
        result = await conn.run("echo ok")
        assert result.stdout == "ok\n"


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _make_tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "top.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    (root / "a" / "mid.txt").write_text("hello\n" * 1000)
    (root / "a" / "b" / "empty").write_bytes(b"")
    (root / "a" / "b" / "deep.bin").write_bytes(os.urandom(70000))


async def _run(*args: str) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out


def _client_opts(gateway: Gateway) -> list[str]:
    from .conftest import SSH_OPTS

    return [*SSH_OPTS, "-i", str(gateway.key_path)]


async def test_sftp_put_get(gateway: Gateway, tmp_path: Path) -> None:
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(5 * 1024 * 1024 + 3))
    remote = tmp_path / "remote.bin"
    back = tmp_path / "back.bin"
    batch = tmp_path / "batch"
    batch.write_text(f"put {src} {remote}\nget {remote} {back}\n")
    code, out = await _run(
        "sftp",
        *_client_opts(gateway),
        "-P",
        str(gateway.port),
        "-b",
        str(batch),
        f"{gateway.user}@127.0.0.1",
    )
    assert code == 0, out
    assert remote.read_bytes() == src.read_bytes() == back.read_bytes()


@pytest.mark.parametrize("legacy", [False, True], ids=["scp-sftp", "scp-O"])
async def test_scp_both_modes(gateway: Gateway, tmp_path: Path, legacy: bool) -> None:
    src = tmp_path / "src"
    _make_tree(src)
    dst = tmp_path / "dst"
    back = tmp_path / "back"
    mode = ["-O"] if legacy else []
    code, out = await _run(
        "scp",
        *mode,
        "-r",
        *_client_opts(gateway),
        "-P",
        str(gateway.port),
        str(src),
        f"{gateway.user}@127.0.0.1:{dst}",
    )
    assert code == 0, out
    code, out = await _run(
        "scp",
        *mode,
        "-r",
        *_client_opts(gateway),
        "-P",
        str(gateway.port),
        f"{gateway.user}@127.0.0.1:{dst}",
        str(back),
    )
    assert code == 0, out
    assert _tree(src) == _tree(dst) == _tree(back)


async def test_rsync_tree(gateway: Gateway, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _make_tree(src)
    dst = tmp_path / "dst"
    ssh_cmd = " ".join(["ssh", *_client_opts(gateway), "-p", str(gateway.port)])
    code, out = await _run(
        "rsync", "-a", "-e", ssh_cmd, f"{src}/", f"{gateway.user}@127.0.0.1:{dst}/"
    )
    assert code == 0, out
    assert _tree(src) == _tree(dst)


@pytest.mark.parametrize("gateway_overrides", [{"pod__mode": "session"}])
async def test_session_mode_pod_per_session(gateway: Gateway) -> None:
    async with gateway.asyncssh_connect() as conn:
        first = await conn.create_process("echo $HOSTNAME; read x")
        second = await conn.create_process("echo $HOSTNAME; read x")
        host1 = (await _read_until(first.stdout, "\n")).strip()
        host2 = (await _read_until(second.stdout, "\n")).strip()
        assert host1 and host2 and host1 != host2
        assert {p["metadata"]["name"] for p in await gateway.cluster.pods()} == {host1, host2}
        first.stdin.write("\n")
        second.stdin.write("\n")
        await first.wait()
        await second.wait()
        await gateway.wait_no_pods()
