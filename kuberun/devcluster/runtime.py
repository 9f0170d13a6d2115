"""Local processes standing in for containers (devcluster is not a production runtime).

Each container and each exec runs as its own process group (a new session), so
signals reach everything it started. Exits are observed through a pidfd on the
running event loop (asyncio or uvloop alike), with a thread as the fallback on
kernels without pidfds. Nothing here isolates anything: a "container" is just
a process of the user running devcluster.
"""

from __future__ import annotations

import asyncio
import atexit
import errno
import fcntl
import os
import signal
import subprocess
import termios
import weakref
from collections.abc import Mapping, Sequence
from typing import IO, Any

__all__ = ["FdReader", "FdWriter", "Proc", "Runtime", "exit_code"]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A bigger pipe means fewer wake-ups per megabyte on the exec hot path.
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def exit_code(returncode: int) -> int:
    """Container-style exit code: 128+N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def make_pipe() -> tuple[int, int]:
    """A close-on-exec pipe, enlarged where the kernel allows it."""
    r, w = os.pipe2(os.O_CLOEXEC) if hasattr(os, "pipe2") else os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
    return r, w


class FdReader:
    """Reads a non-blocking fd from the event loop in large chunks."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._loop = asyncio.get_running_loop()

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; ``b""`` at EOF (EIO from a hung-up pty counts as EOF)."""
        while True:
            try:
                return os.read(self.fd, size)
            except BlockingIOError:
                await self._wait()
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return b""
                raise

    async def readv(self, buffers: list[memoryview]) -> int:
        """Scatter-read into ``buffers``; 0 at EOF."""
        while True:
            try:
                return os.readv(self.fd, buffers)
            except BlockingIOError:
                await self._wait()
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return 0
                raise

    async def _wait(self) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self._loop.add_reader(self.fd, ready)
        try:
            await fut
        finally:
            self._loop.remove_reader(self.fd)


class FdWriter:
    """Writes to a non-blocking fd, waiting for room instead of blocking the loop."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._loop = asyncio.get_running_loop()

    async def write(self, data: bytes | memoryview) -> None:
        """Write everything; raises BrokenPipeError once the reader is gone."""
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                await self._wait()
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:
                    raise BrokenPipeError(errno.EPIPE, "pty closed") from None
                raise
            view = view[n:]

    async def _wait(self) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self._loop.add_writer(self.fd, ready)
        try:
            await fut
        finally:
            self._loop.remove_writer(self.fd)


class Proc:
    """One started process group; ``exited`` resolves to the container-style exit code."""

    def __init__(self, popen: subprocess.Popen[bytes], runtime: Runtime) -> None:
        self.popen = popen
        self.pid = popen.pid
        self._runtime = runtime
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = loop.create_future()
        self.group_alive = True
        self._watch(loop)

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            # No pidfd: a thread waits (rare; kernels before 5.3).
            task = loop.run_in_executor(None, self.popen.wait)
            task.add_done_callback(lambda f: self._done(f.result()))
            return

        def readable() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            rc = self.popen.poll()
            if rc is None:  # cannot happen once the pidfd is readable; be safe
                rc = self.popen.wait()
            self._done(rc)

        loop.add_reader(pidfd, readable)

    def _done(self, returncode: int) -> None:
        self._runtime._procs.discard(self)
        if not self.exited.done():
            self.exited.set_result(exit_code(returncode))

    @property
    def running(self) -> bool:
        """Whether the leader has not been reaped yet."""
        return not self.exited.done()

    def signal_group(self, sig: int) -> None:
        """Signal the whole process group (ignored once it is gone)."""
        if not self.group_alive:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            self.group_alive = False
        except PermissionError:
            pass

    def kill_group(self) -> None:
        """SIGKILL everything left in the group, and forget it afterwards.

        Used once the leader is dead too, so the group id cannot be recycled under us
        while we still hold it.
        """
        self.signal_group(signal.SIGKILL)
        if not self.running:
            self.group_alive = False


def _set_controlling_tty() -> None:  # pragma: no cover - runs in the child
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


_RUNTIMES: weakref.WeakSet[Runtime] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort when the interpreter exits without stopping its clusters
    (an interrupted test run): their processes live in their own sessions and
    would outlive us."""
    for runtime in list(_RUNTIMES):
        for proc in runtime.processes:
            proc.signal_group(signal.SIGKILL)


class Runtime:
    """Starts processes and remembers them until they are reaped."""

    def __init__(self) -> None:
        self._procs: set[Proc] = set()
        self.started = 0
        _RUNTIMES.add(self)

    def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | None,
        *,
        stdin: int | IO[Any] | None,
        stdout: int | IO[Any] | None,
        stderr: int | IO[Any] | None,
        tty: bool = False,
    ) -> Proc:
        """Start ``argv`` in a new session. Raises OSError (e.g. FileNotFoundError).

        With ``tty`` the given stdin must be a pty slave; it becomes the session's
        controlling terminal so job control and SIGWINCH work.
        """
        popen = subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            preexec_fn=_set_controlling_tty if tty else None,
        )
        self.started += 1
        proc = Proc(popen, self)
        self._procs.add(proc)
        return proc

    @property
    def processes(self) -> list[Proc]:
        """Processes started and not yet reaped."""
        return list(self._procs)

    async def stop_all(self, grace: float = 1.0) -> None:
        """SIGTERM every group, SIGKILL what is left after ``grace`` seconds."""
        procs = list(self._procs)
        for proc in procs:
            proc.signal_group(signal.SIGTERM)
        if procs:
            await asyncio.wait([asyncio.ensure_future(p.exited) for p in procs], timeout=grace)
        for proc in procs:
            proc.kill_group()
        left = [p.exited for p in procs if p.running]
        if left:
            await asyncio.wait([asyncio.ensure_future(f) for f in left], timeout=5)


def set_winsize(fd: int, rows: int, cols: int) -> None:
    """Resize a pty (the kernel then sends SIGWINCH to its foreground group)."""
    import struct

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every container process starts from."""
    env = {"PATH": DEFAULT_PATH}
    if extra:
        env.update(extra)
    return env
