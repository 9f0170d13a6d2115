"""The reference point: a direct asyncssh server that runs each command as a local subprocess.

``python -m benchmarks.e2e.direct_proc --workdir D``

Same host key (file and type), same authorized_keys auth, same asyncssh server
options (:func:`kuberun.server.server_options`: no line editor, bytes, AES-GCM
first) and the same event loop (uvloop) as the gateway; only what is behind the
session differs. The session uses asyncssh's low-level callback API and moves
bytes with ``os.read``/``os.write`` from ``add_reader``/``add_writer`` callbacks
(256 KiB reads from 1 MiB pipes, as devcluster's exec does), flow control coupled
both ways, so this is about as cheap as an asyncssh server can be.
Prints one JSON line (``{"port": ..., "pid": ...}``) once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import fcntl
import json
import os
import pty
import signal
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import asyncssh

from kuberun.cli import run_async, setup_logging
from kuberun.config import config_from_dict
from kuberun.devcluster.runtime import make_pipe
from kuberun.gateway import load_host_keys
from kuberun.server import server_options

from .gateway_proc import gateway_config_dict

__all__ = ["DirectServer", "DirectSession", "main"]

READ_SIZE = 256 * 1024
STDIN_HIGH_WATER = 256 * 1024


class DirectServer(asyncssh.SSHServer):
    """authorized_keys auth, read per connection exactly as kuberun's AuthorizedKeysServer does."""

    def __init__(self, authorized_keys: str) -> None:
        self._authorized_keys = authorized_keys
        self.conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn

    def begin_auth(self, username: str) -> bool:
        assert self.conn is not None
        text = Path(self._authorized_keys).read_text()
        self.conn.set_authorized_keys(asyncssh.import_authorized_keys(text))
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def session_requested(self) -> Any:
        assert self.conn is not None
        return self.conn.create_server_channel(encoding=None), DirectSession()

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        # ssh -L to a local port: asyncssh's own forwarder connects and relays (the
        # reference for kuberun's port forwarding in benchmarks/e2e/forward.py).
        return dest_host in ("localhost", "127.0.0.1")


def _set_ctty() -> None:  # pragma: no cover - runs in the child
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class DirectSession(asyncssh.SSHServerSession[bytes]):
    def __init__(self) -> None:
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._argv: list[str] | None = None
        self._term: str | None = None
        self._size: tuple[int, int] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdin = -1
        self._outputs: dict[int, bool] = {}  # fd -> is stderr
        self._reading = True
        self._pending = bytearray()
        self._eof = False
        self._exit: int | None = None
        self._pidfd = -1
        self._loop = asyncio.get_running_loop()

    # -- requests --------------------------------------------------------------

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan

    def pty_requested(self, term_type: str, term_size: Any, term_modes: Any) -> bool:
        self._term = term_type or "xterm"
        self._size = (term_size[0], term_size[1])
        return True

    def shell_requested(self) -> bool:
        self._argv = ["/bin/sh"]
        return True

    def exec_requested(self, command: str) -> bool:
        self._argv = ["/bin/sh", "-c", command]
        return True

    def session_started(self) -> None:
        assert self._argv is not None and self._chan is not None
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
        child: list[int] = []
        try:
            if self._term is not None:
                env["TERM"] = self._term
                master, slave = pty.openpty()
                if self._size and self._size[0] > 0 and self._size[1] > 0:
                    import struct

                    fcntl.ioctl(
                        master,
                        termios.TIOCSWINSZ,
                        struct.pack("HHHH", self._size[1], self._size[0], 0, 0),
                    )
                child.append(slave)
                os.set_blocking(master, False)
                self._stdin = os.dup(master)
                os.set_blocking(self._stdin, False)
                self._outputs[master] = False
                stdio: dict[str, Any] = {"stdin": slave, "stdout": slave, "stderr": slave}
                preexec = _set_ctty
            else:
                r0, w0 = make_pipe()
                r1, w1 = make_pipe()
                r2, w2 = make_pipe()
                child += [r0, w1, w2]
                for fd in (w0, r1, r2):
                    os.set_blocking(fd, False)
                self._stdin = w0
                self._outputs[r1] = False
                self._outputs[r2] = True
                stdio = {"stdin": r0, "stdout": w1, "stderr": w2}
                preexec = None
            self._proc = subprocess.Popen(
                self._argv,
                env=env,
                start_new_session=True,
                close_fds=True,
                preexec_fn=preexec,
                **stdio,
            )
        except OSError as exc:
            self._chan.write_stderr(f"cannot start: {exc}\n".encode())
            self._chan.exit(127)
            return
        finally:
            for fd in child:
                os.close(fd)
        for fd in self._outputs:
            self._loop.add_reader(fd, self._readable, fd)
        self._pidfd = os.pidfd_open(self._proc.pid)
        self._loop.add_reader(self._pidfd, self._exited)

    # -- process output -> SSH ---------------------------------------------------

    def _readable(self, fd: int) -> None:
        chan = self._chan
        assert chan is not None
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            data = b""
        if not data:
            self._close_output(fd)
            return
        if self._outputs[fd]:
            chan.write_stderr(data)
        else:
            chan.write(data)

    def _close_output(self, fd: int) -> None:
        self._loop.remove_reader(fd)
        del self._outputs[fd]
        os.close(fd)
        self._maybe_done()

    def pause_writing(self) -> None:
        if self._reading:
            self._reading = False
            for fd in self._outputs:
                self._loop.remove_reader(fd)

    def resume_writing(self) -> None:
        if not self._reading:
            self._reading = True
            for fd in self._outputs:
                self._loop.add_reader(fd, self._readable, fd)

    def _exited(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        assert self._proc is not None
        rc = self._proc.wait()
        self._exit = 128 - rc if rc < 0 else rc
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._exit is not None and not self._outputs and self._chan is not None:
            self._close_stdin()
            self._chan.exit(self._exit)

    # -- SSH -> process input -----------------------------------------------------

    def data_received(self, data: bytes, datatype: Any) -> None:
        if self._stdin < 0:
            return
        if self._pending:
            self._pending += data
        else:
            try:
                n = os.write(self._stdin, data)
            except BlockingIOError:
                n = 0
            except OSError:
                return
            if n == len(data):
                return
            self._pending += data[n:]
            self._loop.add_writer(self._stdin, self._writable)
        if len(self._pending) > STDIN_HIGH_WATER and self._chan is not None:
            self._chan.pause_reading()

    def _writable(self) -> None:
        try:
            n = os.write(self._stdin, self._pending)
        except BlockingIOError:
            return
        except OSError:
            n = len(self._pending)
        del self._pending[:n]
        if not self._pending:
            self._loop.remove_writer(self._stdin)
            if self._eof:
                self._close_stdin()
            if self._chan is not None:
                self._chan.resume_reading()

    def eof_received(self) -> bool:
        self._eof = True
        if not self._pending:
            self._close_stdin()
        return True

    def _close_stdin(self) -> None:
        if self._stdin >= 0:
            if self._pending:
                self._loop.remove_writer(self._stdin)
                self._pending.clear()
            os.close(self._stdin)
            self._stdin = -1

    def terminal_size_changed(self, width: int, height: int, pw: int, ph: int) -> None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        for fd in list(self._outputs):
            self._loop.remove_reader(fd)
            os.close(fd)
        self._outputs.clear()
        self._close_stdin()
        if self._proc is not None and self._exit is None:
            try:
                os.killpg(self._proc.pid, signal.SIGHUP)
            except OSError:
                pass


async def serve(args: argparse.Namespace) -> int:
    config = config_from_dict(gateway_config_dict("unused", args.workdir, 30.0))
    keys = load_host_keys(config.ssh.host_keys)
    assert config.ssh.authorized_keys is not None
    authorized = config.ssh.authorized_keys
    acceptor = await asyncssh.create_server(
        lambda: DirectServer(authorized),
        "127.0.0.1",
        0,
        server_host_keys=keys,
        reuse_address=True,
        **server_options(config),
    )
    port = acceptor.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    kind = type(loop).__module__.split(".")[0]
    print(json.dumps({"port": port, "pid": os.getpid(), "loop": kind}), flush=True)
    await stop.wait()
    acceptor.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="holds host_key and authorized_keys")
    args = parser.parse_args(argv)
    setup_logging("text", "WARNING")
    return run_async(serve(args))


if __name__ == "__main__":
    sys.exit(main())
