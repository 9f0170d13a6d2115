"""Pure pieces of the security model: what reaches annotations, terminals and deletes."""

from __future__ import annotations

import logging
import ssl
import time
from typing import Any

import aiohttp
import pytest

from kuberun.errors import PodStartTimeout
from kuberun.manifests import MAX_ANNOTATION, annotation_value
from kuberun.pods import PodController, PodRef, _is_retryable
from kuberun.session import MAX_MESSAGE, terminal_safe
from kuberun.upgrade import parse_response_head


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("alice", "alice"),
        ("Alice Smith <a@b>", "Alice Smith <a@b>"),
        ("evil\x1b[2J", "evil\\x1b[2J"),
        ("nul\x00x", "nul\\x00x"),
        ("line\nbreak\r", "line\\x0abreak\\x0d"),
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("bidi\u202eevil", "bidi\\u202eevil"),
        ("ünïcødé ✓", "ünïcødé ✓"),
    ],
)
def test_annotation_value_escapes_control_characters(raw: str, expected: str) -> None:
    assert annotation_value(raw) == expected


def test_annotation_value_is_bounded() -> None:
    value = annotation_value("\x01" * 10_000)
    assert len(value) == MAX_ANNOTATION and value.endswith("...")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("plain message", "plain message"),
        ("red \x1b[31malert\x1b[0m", "red \ufffd[31malert\ufffd[0m"),
        ("two\nlines\tand\rcr", "two lines and cr"),
        ("title \x1b]0;pwned\x07", "title \ufffd]0;pwned\ufffd"),
        ("c1 \x9b31m", "c1 \ufffd31m"),
    ],
)
def test_terminal_safe(raw: str, expected: str) -> None:
    assert terminal_safe(raw) == expected


def test_terminal_safe_is_bounded() -> None:
    assert len(terminal_safe("m" * 100_000)) == MAX_MESSAGE


def test_certificate_failures_are_not_retried() -> None:
    assert not _is_retryable(ssl.SSLCertVerificationError(1, "certificate verify failed"))
    assert _is_retryable(aiohttp.ServerDisconnectedError())
    assert _is_retryable(ConnectionResetError())


class _Counter:
    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1


class _NoApi:
    """An ApiClient stand-in; the tests below must not reach it."""

    configuration: Any = None

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"unexpected API use: {name}")


async def test_no_delete_without_uid(caplog: pytest.LogCaptureFixture) -> None:
    requests = _Counter()
    controller = PodController(
        _NoApi(),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        requests_counter=requests,
    )
    assert await controller.delete(PodRef("default", "someone-elses", ""), 5) is False
    assert requests.value == 0
    assert "UID is unknown" in caplog.text


async def test_timeout_names_the_last_failure() -> None:
    controller = PodController(
        _NoApi(),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        backoff_base=0.01,
    )

    async def refused() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(PodStartTimeout, match=r"timed out \(last error: .*Connection refused"):
        await controller._call("create Pod", time.monotonic() + 0.2, refused)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"12", 12), (b"", None), (b"\xb2", None), (b"1" * 19, None), (b"-1", None), (b"0", 0)],
)
def test_content_length(value: bytes, expected: int | None) -> None:
    head = b"HTTP/1.1 500 X\r\nContent-Length: " + value if value else b"HTTP/1.1 500 X"
    assert parse_response_head(head).content_length() == expected


async def test_timeout_after_a_retryable_failure_at_the_deadline() -> None:
    """A retryable failure that comes when no time is left ends as a timeout naming it,
    not as a bare API error (the race behind a flaky run of the test above)."""
    controller = PodController(
        _NoApi(),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
    )
    deadline = time.monotonic() + 0.05

    async def refused_late() -> None:
        # Blocks past the deadline without yielding, so no timeout can cut it short.
        time.sleep(max(0.0, deadline - time.monotonic()) + 0.01)
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(PodStartTimeout, match=r"timed out \(last error: .*Connection refused"):
        await controller._call("create Pod", deadline, refused_late)


async def test_cleanup_calls_outlast_a_restarting_api_servers_403() -> None:
    """Right after a restart kube-apiserver answers 403 until its RBAC caches have
    synced (seen under chaos on the real cluster): a delete retries through it, a
    create does not (it reports the refusal)."""
    from kubernetes_asyncio.client.rest import ApiException

    from kuberun.errors import KubernetesAPIError

    controller = PodController(
        _NoApi(),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        backoff_base=0.01,
    )
    answers: list[int] = []

    async def forbidden_twice() -> str:
        answers.append(403)
        if len(answers) <= 2:
            raise ApiException(status=403, reason="Forbidden")
        return "deleted"

    deadline = time.monotonic() + 10
    assert await controller._call("delete Pod", deadline, forbidden_twice, cleanup=True) == (
        "deleted"
    )
    assert len(answers) == 3
    answers.clear()
    with pytest.raises(KubernetesAPIError) as info:
        await controller._call("create Pod", deadline, forbidden_twice)
    assert info.value.status == 403 and len(answers) == 1
