"""The one error hierarchy of kuberun.

Every exception kuberun raises on purpose derives from :class:`KuberunError`.
Each class documents what the SSH client sees when it ends a session or a
connection, so the mapping to the wire lives next to the error itself.
"""

from __future__ import annotations

from typing import TypeVar

__all__ = [
    "EXIT_EXEC_ERROR",
    "EXIT_EXEC_FAILED",
    "EXIT_POD_FAILED",
    "EXIT_SHUTDOWN",
    "EXIT_STREAM_LOST",
    "CommandStartError",
    "ConfigError",
    "ExecError",
    "ExecProtocolError",
    "ExecStreamLost",
    "ForwardRefused",
    "KubernetesAPIError",
    "KuberunError",
    "PodStartError",
    "PodStartTimeout",
    "client_message",
    "exit_status_for",
]


_E = TypeVar("_E", bound="KuberunError")


class KuberunError(Exception):
    """Root of every error kuberun raises on purpose.

    The message (``str(exc)``) is for the log and may name internal addresses
    or the failure's exception type. ``client_message``, when set (with
    :meth:`told`), is what an SSH client is told instead; see
    :func:`client_message`.
    """

    client_message: str | None = None

    def told(self: _E, text: str) -> _E:
        """Set what the SSH client is told about this error; returns the error."""
        self.client_message = text
        return self


class ConfigError(KuberunError, ValueError):
    """The configuration is invalid.

    ``path`` names the offending key (``"pod.spec"``, ``"timeouts.pod_start"``);
    the message says what is wrong with it.
    """

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)


class KubernetesAPIError(KuberunError):
    """The Kubernetes API answered with an error ``Status``.

    ``status`` is the HTTP code, ``reason`` the Status ``reason``
    (``NotFound``, ``AlreadyExists``, ``Forbidden``, ...).
    """

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{status} {reason}: {message}" if reason else f"{status}: {message}")


class PodStartError(KuberunError):
    """The Pod could not be started (image pull failure, unschedulable, exited, ...).

    The SSH client sees the message on stderr and a non-zero exit status.
    """

    def __init__(self, message: str, reason: str = "") -> None:
        self.reason = reason
        super().__init__(message)


class PodStartTimeout(PodStartError, TimeoutError):
    """The Pod did not become ready within ``timeouts.pod_start`` (or an API call ran
    out of time: ``last`` is then its last failure)."""

    last: KubernetesAPIError | None = None


class CommandStartError(KuberunError):
    """The exec stream could not be opened (refused upgrade, timeout, TLS failure).

    ``status`` is the HTTP status of a refused upgrade (None otherwise);
    ``transient`` says whether trying again may work (429, 5xx, a dropped
    connection), and ``retry_after`` is the server's hint in seconds, if any.
    """

    def __init__(
        self,
        message: str,
        status: int | None = None,
        *,
        transient: bool = False,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.transient = transient or status == 429 or (status is not None and status >= 500)
        self.retry_after = retry_after
        super().__init__(message)


class ExecProtocolError(KuberunError):
    """The API server sent bytes that break the WebSocket or Kubernetes exec protocol.

    Ends that one session with a message; never the gateway.
    """


class ExecError(KuberunError):
    """The exec ended with a failure status that is not a plain exit code.

    ``reason`` is the Kubernetes Status reason (``InternalError``, ...),
    or ``"MalformedStatus"`` when the status could not be decoded.
    """

    def __init__(self, message: str, reason: str = "") -> None:
        self.reason = reason
        self.message = message
        super().__init__(message)


class ExecStreamLost(KuberunError):
    """The exec stream ended without a status (connection reset, API server gone)."""


class ForwardRefused(KuberunError):
    """A forwarding channel (``ssh -L``, ``-D``, ``-W``) could not be opened.

    The SSH client sees a channel open failure with ``code`` (an RFC 4254
    ``SSH_OPEN_*`` value: administratively prohibited, connect failed) and the
    message as its reason; ``reason`` labels ``kuberun_forward_failures_total``.
    """

    def __init__(self, message: str, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(message)


# Exit statuses the SSH client sees when kuberun, not the program, ended a session.
# They sit at the top of the range, away from shell conventions (126, 127, 128+N),
# and are documented in the README.

#: The Pod could not be created or did not become ready.
EXIT_POD_FAILED = 250
#: The exec could not be opened (API server refused or unreachable).
EXIT_EXEC_FAILED = 251
#: The exec stream was lost mid-session (connection dropped, protocol violation).
EXIT_STREAM_LOST = 252
#: The exec ended with a failure status that carries no exit code.
EXIT_EXEC_ERROR = 253
#: The gateway is shutting down.
EXIT_SHUTDOWN = 254


def client_message(exc: BaseException) -> str:
    """What an SSH client is told about ``exc``: never an internal address or an
    exception name (those go to the log)."""
    if isinstance(exc, KuberunError):
        return exc.client_message or str(exc)
    return "internal error (see the gateway log)"


def exit_status_for(exc: BaseException) -> int:
    """The exit status the SSH client sees for an error that ended its session."""
    if isinstance(exc, PodStartError):
        return EXIT_POD_FAILED
    if isinstance(exc, CommandStartError):
        return EXIT_EXEC_FAILED
    if isinstance(exc, ExecError):
        return EXIT_EXEC_ERROR
    if isinstance(exc, KubernetesAPIError):
        return EXIT_POD_FAILED
    return EXIT_STREAM_LOST
