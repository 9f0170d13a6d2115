"""One SSH session channel as one Kubernetes exec.

:class:`KuberunSession` is an asyncssh ``SSHServerSession`` (bytes, no line
editor). It records the client's requests (pty, env, shell/exec/subsystem),
waits for the Pod, opens the exec with the program wrapped so env and ``TERM``
are exported and its PID recorded, then relays: exec output goes straight to
``chan.write`` (the relay decoder holds that bound method), SSH input goes to
the stream's encoder. Signals and channel close are delivered with a second
exec running ``kill``, since the exec API has no signal channel.
"""

from __future__ import annotations

import asyncio
import signal as _signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import asyncssh

from .channelhooks import drop_queued
from .errors import (
    EXIT_SHUTDOWN,
    CommandStartError,
    ExecStreamLost,
    KuberunError,
    client_message,
    exit_status_for,
)
from .execstream import ExecResult, ExecStream
from .manifests import (
    SIGNAL_NAMES,
    env_allowed,
    exec_argv,
    kill_argv,
    pid_file_path,
    valid_env_name,
    wrap_command,
)

if TYPE_CHECKING:
    from .audit import Recording
    from .handler import SSHConnectionHandler

__all__ = ["SIGNALS", "KuberunSession"]

#: RFC 4254 §6.10 signal names that can be delivered, with their numbers here.
SIGNALS: dict[str, int] = {
    name: int(getattr(_signal, "SIG" + name)) for name in sorted(SIGNAL_NAMES)
}

#: Wait this long before printing Pod start progress, so fast starts stay quiet.
PROGRESS_DELAY = 1.0

_MAX_TERM_DIM = 65535

#: Environment variables passed to one program, at most (the rest is refused and logged):
#: they travel as exec arguments in the request URL, which API servers bound (1 MiB).
MAX_ENV_BYTES = 64 * 1024

#: Longest text (API server messages included) written to a client's stderr in one line.
MAX_MESSAGE = 2048


class KuberunSession(asyncssh.SSHServerSession[bytes]):
    """An SSH session channel relayed to a Kubernetes exec in the connection's Pod."""

    def __init__(self, conn: SSHConnectionHandler, session_id: str) -> None:
        self._conn = conn
        self._id = session_id
        self._log = conn.logger
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._argv: list[str] | None = None
        self._kind = ""
        self._term: str | None = None
        self._size: tuple[int, int] | None = None
        self._stream: ExecStream | None = None
        self._task: asyncio.Task[None] | None = None
        self._eof = False
        self._closed = False
        self._exited = False
        # An exit status held back until the output queued before it has reached the
        # client (see _exit).
        self._exit_pending: int | None = None
        self._signalled: int | None = None
        self._pid_file: str | None = None
        self._pod: Any = None
        self._progress_lines: list[str] = []
        self._progress_live = False
        self._progress_timer: asyncio.TimerHandle | None = None
        self._eof_warned = False
        self._published = False
        self._pending: list[bytes] = []
        self._input_paused = False  # by the exec stream: its write buffer is full
        self._ssh_full = False  # the channel's send buffer is full (pause_writing)
        self._audit = conn.audit.session(session_id)
        self._recording: Recording | None = None
        # The recording's input side, with audit.record_input only.
        self._record_input: Callable[[bytes], None] | None = None
        # The client can no longer write this session's output (eow@openssh.com); the
        # stdout bytes that had reached the channel by then.
        self._eow = False
        self._stdout_relayed: int | None = None
        # Replaced by the channel's own bound methods in connection_made.
        self.exec_stdout: Callable[[memoryview], object] = _drop
        self.exec_stderr: Callable[[memoryview], object] = _drop

    # -- asyncssh callbacks: set-up ---------------------------------------

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan
        # Output from the exec goes straight into the channel: the relay
        # decoder caches these bound methods.
        self.exec_stdout = cast(Callable[[memoryview], object], chan.write)
        self.exec_stderr = cast(Callable[[memoryview], object], chan.write_stderr)
        self._conn.session_opened(self)

    def pty_requested(
        self, term_type: str, term_size: tuple[int, int, int, int], term_modes: Any
    ) -> bool:
        if self._argv is not None:
            return False
        self._term = term_type or "xterm"
        width, height = term_size[0], term_size[1]
        if 0 < width <= _MAX_TERM_DIM and 0 < height <= _MAX_TERM_DIM:
            self._size = (width, height)
        return True

    def shell_requested(self) -> bool:
        return self._set_program("shell", list(self._conn.config.pod.shell_command))

    def exec_requested(self, command: str) -> bool:
        if "\x00" in command:
            return False
        return self._set_program("exec", exec_argv(command))

    def subsystem_requested(self, subsystem: str) -> bool:
        argv = self._conn.config.pod.subsystems.get(subsystem)
        if argv is None:
            self._log.info("session %s: unknown subsystem %r refused", self._id, subsystem)
            if self._chan is not None:
                self._chan.write_stderr(f"kuberun: unknown subsystem {subsystem!r}\r\n".encode())
            return False
        return self._set_program(f"subsystem {subsystem}", list(argv))

    def _set_program(self, kind: str, argv: list[str]) -> bool:
        if self._argv is not None:
            return False  # a second shell/exec on one channel
        self._argv = argv
        self._kind = kind
        return True

    def session_started(self) -> None:
        env = self._chan.get_environment() if self._chan is not None else {}
        accept = self._conn.config.ssh.accept_env
        self._audit.opened(self._kind, self._argv or [], self._term, self._size, env, accept)
        self._task = asyncio.ensure_future(self._run_guarded())

    async def _run_guarded(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug must end this one session with a message, never go unseen.
            self._log.exception("session %s: internal error", self._id)
            error = ExecStreamLost(f"internal error: {exc!r}")
            self._end_with_error(error.told("internal error (see the gateway log)"))

    # -- start-up ---------------------------------------------------------

    async def _run(self) -> None:
        chan = self._chan
        assert chan is not None and self._argv is not None
        conn = self._conn
        try:
            self._pod = await conn.acquire_pod(self._id, self._progress)
        except asyncio.CancelledError:
            return
        except KuberunError as exc:
            self._end_with_error(exc)
            return
        finally:
            self._stop_progress()
        if self._closed:
            return
        argv = self._wrapped_argv(chan)
        self._start_recording()
        started = time.monotonic()
        try:
            stream = await conn.connector.open(
                self._pod.namespace,
                self._pod.name,
                conn.config.pod.console_container,
                argv,
                self,
                stdin=True,
                tty=self._term is not None,
                timeout=conn.config.timeouts.command_start,
            )
        except asyncio.CancelledError:
            return
        except CommandStartError as exc:
            conn.count_exec_failure("open")
            self._end_with_error(exc)
            return
        if conn.metrics is not None:
            conn.metrics.exec_open_seconds.observe(time.monotonic() - started)
        if self._closed:
            stream.abort()
            self._terminate_program()
            return
        self._stream = stream
        if self._ssh_full or self._recording_blocked():
            # Output flows from the moment the API server switched protocols: the
            # channel can fill (pause_writing) before this session has the stream,
            # and asyncssh says so only once.
            stream.pause_output()
        self._log.info("session %s: %s started in Pod %s", self._id, self._kind, self._pod.name)
        if self._term is not None and self._size is not None:
            stream.resize(*self._size)
        if self._pending:
            held = b"".join(self._pending)
            stream.write_stdin(held)
            self._pending.clear()
            if self._record_input is not None:
                self._record_input(held)
        if self._eof:
            self._deliver_eof(stream)
        if self._eow:
            self._stop_output(stream)
        if not stream.finished and not self._input_paused:
            # (Unless writing the held input already filled the exec's buffer.)
            chan.resume_reading()

    def _start_recording(self) -> None:
        recording = self._audit.record(
            self._kind,
            self._argv or [],
            self._term,
            self._size,
            on_full=self._recording_full,
            on_drained=self._recording_drained,
        )
        if recording is not None:
            # Output goes through the recording, which writes to the channel first.
            recording.write_stdout, recording.write_stderr = self.exec_stdout, self.exec_stderr
            self.exec_stdout, self.exec_stderr = recording.stdout, recording.stderr
            self._recording = recording
            if self._audit.record_input:
                self._record_input = recording.stdin

    def _recording_full(self) -> None:
        # audit.on_overflow: block. Hold both directions until the writer catches up.
        if self._stream is not None:
            self._stream.pause_output()
        if self._chan is not None:
            self._chan.pause_reading()

    def _recording_drained(self) -> None:
        stream = self._stream
        if stream is None or stream.finished or self._closed:
            return
        if not self._ssh_full:
            stream.resume_output()
        if not self._input_paused and self._chan is not None:
            self._chan.resume_reading()

    def _recording_blocked(self) -> bool:
        return self._recording is not None and self._recording.blocked

    def _wrapped_argv(self, chan: asyncssh.SSHServerChannel[bytes]) -> list[str]:
        config = self._conn.config
        env: dict[str, str] = {}
        patterns = config.ssh.accept_env
        budget = MAX_ENV_BYTES
        for name, value in chan.get_environment().items():
            if name == "TERM":
                continue
            shown = name if len(name) <= 64 else name[:64] + "..."
            if not valid_env_name(name) or "\x00" in value:
                self._log.info("session %s: env %r refused (invalid)", self._id, shown)
            elif not env_allowed(name, patterns):
                self._log.info("session %s: env %r refused (not in accept_env)", self._id, shown)
            elif len(name) + len(value) > budget:
                self._log.info(
                    "session %s: env %r refused (over %d bytes of env in all)",
                    self._id,
                    shown,
                    MAX_ENV_BYTES,
                )
            else:
                budget -= len(name) + len(value)
                env[name] = value
        if self._term is not None:
            env["TERM"] = self._term
        if config.pod.signals:
            self._pid_file = pid_file_path(config.pod.pid_dir, self._conn.connection_id, self._id)
        size = self._size if self._term is not None else None
        return wrap_command(self._argv or [], env=env, pid_file=self._pid_file, term_size=size)

    # -- progress while the Pod starts ------------------------------------

    def _progress(self, line: str) -> None:
        if self._progress_live:
            self._write_progress(line)
            return
        self._progress_lines.append(line)
        if self._progress_timer is None:
            loop = asyncio.get_running_loop()
            self._progress_timer = loop.call_later(PROGRESS_DELAY, self._progress_due)

    def _progress_due(self) -> None:
        self._progress_timer = None
        self._progress_live = True
        if self._progress_lines:
            self._write_progress(self._progress_lines[-1])
            self._progress_lines.clear()

    def _stop_progress(self) -> None:
        if self._progress_timer is not None:
            self._progress_timer.cancel()
            self._progress_timer = None
        self._progress_live = False

    def _write_progress(self, line: str) -> None:
        self._write_stderr(f"kuberun: {line}")

    def _write_stderr(self, text: str) -> None:
        chan = self._chan
        if chan is None or self._closed:
            return
        end = "\r\n" if self._term is not None else "\n"
        try:
            chan.write_stderr((terminal_safe(text) + end).encode("utf-8", errors="replace"))
        except OSError:
            pass

    # -- relay: SSH side --------------------------------------------------

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        stream = self._stream
        if stream is not None:
            stream.write_stdin(data)
            if self._record_input is not None:
                self._record_input(data)
        elif not self._closed:
            # Input before the exec is open: keep it and stop reading, so the
            # SSH window bounds what is held here.
            self._pending.append(data)
            if self._chan is not None:
                self._chan.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        if self._stream is not None:
            self._deliver_eof(self._stream)
        return True  # keep the channel half-open: output still flows

    def _deliver_eof(self, stream: ExecStream) -> None:
        if self._term is not None:
            # sshd does not hang up a terminal when the client sends EOF (the pty
            # stays open; the program reads on). On a node, closing a tty exec's stdin
            # hangs the pty up and the program's output is lost (containerd; seen with
            # `ssh -tt host cmd </dev/null`), so the EOF stays here.
            return
        if not stream.close_stdin() and not self._eof_warned:
            self._eof_warned = True
            self._log.warning(
                "session %s: the API server speaks %s, which cannot deliver stdin EOF",
                self._id,
                stream.protocol,
            )
            if self._conn.metrics is not None:
                self._conn.metrics.stdin_eof_undeliverable.inc()

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if self._term is None:
            return
        if not (0 < width <= _MAX_TERM_DIM and 0 < height <= _MAX_TERM_DIM):
            return
        self._size = (width, height)
        self._audit.resized(width, height)
        if self._stream is not None and not self._stream.finished:
            self._stream.resize(width, height)

    def signal_received(self, signal: str) -> None:
        signum = SIGNALS.get(signal)
        if signum is None:
            self._log.info("session %s: unknown signal %r ignored", self._id, signal)
            return
        self._send_signal(signal, signum)

    def break_received(self, msec: int) -> bool:
        if self._term is None:
            return False
        self._send_signal("INT", SIGNALS["INT"])
        return True

    def eow_received(self) -> bool:
        """The client can no longer write this session's output (``eow@openssh.com``:
        the OpenSSH client's stdout broke, e.g. ``| head -1`` ended). As sshd closes the
        program's output pipe: stdout is dropped from now on, what is queued for the
        client included, and the program's group gets SIGPIPE (the exec protocol cannot
        close stdout alone). stderr goes on while the program runs. Returns the
        request's reply."""
        if self._eow or self._closed:
            return True
        self._eow = True
        self._log.info("session %s: the client stopped reading output (eow)", self._id)
        if self._chan is not None:
            if self._exit_pending is None:
                drop_queued(self._chan)
            else:
                # The program has ended, its status waiting for queued output that may
                # now never go out (see _drop_unread_output): end the session.
                self._drop_unread_output(self._chan)
                if self._exit_pending is not None:  # (else resume_writing has sent it)
                    self._send_exit(self._exit_pending)
        if self._stream is not None:
            self._stop_output(self._stream)
        return True

    def _stop_output(self, stream: ExecStream) -> None:
        self._stdout_relayed = stream.stdout_bytes
        stream.drop_stdout()
        if self._pid_file is not None and not stream.finished:
            self._send_signal("PIPE", SIGNALS["PIPE"])

    def pause_writing(self) -> None:
        self._ssh_full = True
        if self._stream is not None:
            self._stream.pause_output()

    def resume_writing(self) -> None:
        if self._exit_pending is not None:
            self._send_exit(self._exit_pending)  # the queued output has all gone out
            return
        self._ssh_full = False
        if self._stream is not None and not self._recording_blocked():
            self._stream.resume_output()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._stop_progress()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        stream = self._stream
        if stream is not None and not stream.finished:
            self._terminate_program()
            stream.abort()
        self._publish_bytes()
        self._audit.ended(stream)
        self._conn.session_closed(self)

    # -- relay: Kubernetes side (ExecListener) ----------------------------

    def exec_pause_input(self) -> None:
        self._input_paused = True
        if self._chan is not None:
            self._chan.pause_reading()

    def exec_resume_input(self) -> None:
        self._input_paused = False
        if self._chan is not None and not self._closed and not self._recording_blocked():
            self._chan.resume_reading()

    def exec_finished(self, result: ExecResult) -> None:
        if self._closed or self._exited:
            return
        if result.error is not None:
            self._conn.count_exec_failure(type(result.error).__name__)
            self._end_with_error(result.error)
            return
        status = result.exit_status if result.exit_status is not None else 0
        self._audit.ending("exit")
        self._exit(status)

    # -- endings ----------------------------------------------------------

    def _end_with_error(self, exc: BaseException) -> None:
        self._audit.ending_with(exc)
        self._log.warning("session %s: %s", self._id, exc)
        self._write_stderr(f"kuberun: {client_message(exc)}")
        self._exit(exit_status_for(exc))

    def shutdown(self, message: str) -> None:
        """Tell the client the gateway is stopping and end the session."""
        if self._closed or self._exited:
            return
        self._write_stderr(f"kuberun: {message}")
        self._audit.ending("shutdown")
        # Exit first: aborting the stream reports a lost stream, which must not
        # replace the shutdown status.
        self._exit(EXIT_SHUTDOWN)
        stream = self._stream
        if stream is not None and not stream.finished:
            self._terminate_program()
            stream.abort()

    def _exit(self, status: int) -> None:
        chan = self._chan
        if chan is None or self._exited:
            return
        self._exited = True
        self._publish_bytes()
        if chan.get_write_buffer_size() > 0 and self._eow:
            self._drop_unread_output(chan)
        elif chan.get_write_buffer_size() > 0:
            # asyncssh sends exit-status at once, ahead of the output still queued for
            # a client that reads slowly. Hold the status until that output is out (a
            # zero low-water mark makes asyncssh call resume_writing exactly then), so
            # a status of success never precedes output the client may not get: if
            # the gateway stops first, abandon() reports the shutdown status instead.
            self._exit_pending = status
            try:
                chan.set_write_buffer_limits(high=0, low=0)
            except OSError:
                pass
            return
        self._send_exit(status)

    def _drop_unread_output(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        # After eow the exit status does not wait for queued output (stderr: stdout is
        # dropped already). The client may never let it out: OpenSSH, when its stdout
        # breaks, throws away the output it held without reopening the window for it
        # (chan_shutdown_write), and writes no more stderr once its stdin is closed
        # too, so a window spent on output it then discarded stays shut. sshd, after
        # eow, closes the channel as soon as the program has exited, whatever stderr
        # is still unsent; so does kuberun.
        dropped = drop_queued(chan, stderr=True)
        if dropped:
            self._log.info(
                "session %s: %d bytes of output the client would not take were dropped",
                self._id,
                dropped,
            )

    def abandon(self) -> None:
        """The connection is about to close (gateway shutdown): a session whose exit
        status waits behind unsent output ends with the shutdown status now."""
        if self._exit_pending is not None:
            self._audit.ending("shutdown", replace=True)
            self._send_exit(EXIT_SHUTDOWN)

    def _send_exit(self, status: int) -> None:
        chan = self._chan
        self._exit_pending = None
        if chan is None or self._closed:
            return
        signalled = self._signalled
        try:
            if signalled is not None and status == 128 + signalled:
                name = next(n for n, num in SIGNALS.items() if num == signalled)
                self._audit.exit(status, name)
                chan.exit_with_signal(name)
            else:
                self._audit.exit(status, None)
                chan.exit(status)
        except OSError:
            pass

    def _publish_bytes(self) -> None:
        stream = self._stream
        metrics = self._conn.metrics
        if stream is None or metrics is None or self._published:
            return
        self._published = True
        stdout = stream.stdout_bytes if self._stdout_relayed is None else self._stdout_relayed
        metrics.relayed_bytes.labels(direction="stdout").inc(stdout)
        metrics.relayed_bytes.labels(direction="stderr").inc(stream.stderr_bytes)
        metrics.relayed_bytes.labels(direction="stdin").inc(stream.stdin_bytes)

    # -- signals through a second exec ------------------------------------

    def _send_signal(self, name: str, signum: int) -> None:
        stream = self._stream
        if stream is None or stream.finished or self._pid_file is None or self._pod is None:
            self._log.info(
                "session %s: signal %s not delivered (no running program)", self._id, name
            )
            self._audit.signal(name, False)
            return
        self._audit.signal(name, True)
        self._signalled = signum
        self._conn.spawn(self._kill(name))

    def _terminate_program(self) -> None:
        # The exec API cannot stop a process: closing the stream leaves it
        # running in the Pod. Terminate it the way a signal request would.
        if self._pid_file is not None and self._pod is not None:
            self._conn.spawn(self._kill("TERM"))

    async def _kill(self, name: str) -> None:
        assert self._pid_file is not None and self._pod is not None
        conn = self._conn
        try:
            stream = await conn.connector.open(
                self._pod.namespace,
                self._pod.name,
                conn.config.pod.console_container,
                kill_argv(name, self._pid_file),
                _Discard(),
                stdin=False,
                tty=False,
                timeout=conn.config.timeouts.command_start,
            )
            result = await stream.wait()
        except KuberunError as exc:
            self._log.warning("session %s: could not deliver %s: %s", self._id, name, exc)
            return
        if result.exit_status != 0:
            self._log.info("session %s: kill -s %s ended with %s", self._id, name, result)


def terminal_safe(text: str) -> str:
    """One line for a user's terminal: at most :data:`MAX_MESSAGE` characters, line
    breaks and tabs as spaces, other control characters (escape sequences that an
    API server or a Pod status could carry) as U+FFFD."""
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 3] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else " " if c in "\t\n\r" else "\ufffd" for c in text)


def _drop(data: memoryview) -> None:
    pass


class _Discard:
    """ExecListener for side execs (kill): output is dropped."""

    exec_stdout = staticmethod(_drop)
    exec_stderr = staticmethod(_drop)

    def exec_pause_input(self) -> None:
        pass

    def exec_resume_input(self) -> None:
        pass

    def exec_finished(self, result: ExecResult) -> None:
        pass
