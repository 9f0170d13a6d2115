"""decode_status: exec Status messages (channel 3) to exit codes or errors."""

from __future__ import annotations

import json
from types import ModuleType

import pytest

from kuberun.errors import ExecError
from tests.unit.test_relay_decoder import EXIT3_V1_TEXT, EXIT3_V4_JSON, EXIT3_V5_JSON, INTERNAL_JSON

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V1 = "channel.k8s.io"


def _failure(reason: str, causes: object, message: str = "boom") -> bytes:
    return json.dumps(
        {
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "details": {"causes": causes},
        }
    ).encode()


def test_success(relay_impl: ModuleType) -> None:
    for proto in (V5, V4):
        assert relay_impl.decode_status(b'{"metadata":{},"status":"Success"}', proto) == 0
    assert relay_impl.decode_status(b'{"status":"Success"}') == 0
    # Success is success, whatever else the object carries.
    assert relay_impl.decode_status(b'{"status":"Success","message":["x"],"code":"?"}') == 0


def test_exit_codes_from_the_spec(relay_impl: ModuleType) -> None:
    assert relay_impl.decode_status(EXIT3_V5_JSON, V5) == 3
    assert relay_impl.decode_status(EXIT3_V4_JSON, V4) == 3
    assert relay_impl.decode_status(bytearray(EXIT3_V5_JSON)) == 3
    assert relay_impl.decode_status(memoryview(EXIT3_V5_JSON)) == 3


@pytest.mark.parametrize("code", [1, 2, 126, 127, 130, 137, 255])
def test_exit_code_range(relay_impl: ModuleType, code: int) -> None:
    causes = [{"message": "no reason"}, {"reason": "ExitCode", "message": str(code)}]
    assert relay_impl.decode_status(_failure("NonZeroExitCode", causes)) == code


def test_internal_error_carries_message_and_reason(relay_impl: ModuleType) -> None:
    with pytest.raises(ExecError) as exc:
        relay_impl.decode_status(INTERNAL_JSON, V5)
    assert exc.value.reason == "InternalError"
    assert exc.value.message.startswith("Internal error occurred: unable to upgrade connection")


def test_v1_plain_text(relay_impl: ModuleType) -> None:
    assert relay_impl.decode_status(b"", V1) == 0
    with pytest.raises(ExecError) as exc:
        relay_impl.decode_status(EXIT3_V1_TEXT, V1)
    assert exc.value.message == EXIT3_V1_TEXT.decode()
    with pytest.raises(ExecError):
        relay_impl.decode_status(b"\xff\xfe not utf-8", V1)


MALFORMED = [
    b"",
    b"not json",
    b"\xff\xfe",
    b"[]",
    b"null",
    b'"Success"',
    b"{}",
    b'{"status":"Weird"}',
    b'{"status":"Failure","message":["x"]}',
    b'{"status":"Failure","reason":7}',
    _failure("NonZeroExitCode", []),
    _failure("NonZeroExitCode", None),
    _failure("NonZeroExitCode", "causes"),
    _failure("NonZeroExitCode", [{"reason": "ExitCode", "message": "256"}]),
    _failure("NonZeroExitCode", [{"reason": "ExitCode", "message": "-1"}]),
    _failure("NonZeroExitCode", [{"reason": "ExitCode", "message": "3.0"}]),
    _failure(
        "NonZeroExitCode", [{"reason": "ExitCode", "message": "\N{ARABIC-INDIC DIGIT THREE}"}]
    ),
    _failure("NonZeroExitCode", [{"reason": "ExitCode", "message": 3}]),
    _failure("NonZeroExitCode", [{"reason": "ExitCode"}]),
    _failure("NonZeroExitCode", [7, "x", {"reason": "ExitCode", "message": ""}]),
    json.dumps({"status": "Failure", "reason": "NonZeroExitCode", "details": []}).encode(),
    b"[" * 60000 + b"]" * 4000,
    b'{"status":"Success","pad":"' + b"x" * 70000 + b'"}',
]


@pytest.mark.parametrize("raw", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_status(relay_impl: ModuleType, raw: bytes) -> None:
    with pytest.raises(ExecError) as exc:
        relay_impl.decode_status(raw, V5)
    assert exc.value.reason == "MalformedStatus"


def test_other_failures_keep_the_server_reason(relay_impl: ModuleType) -> None:
    with pytest.raises(ExecError) as exc:
        relay_impl.decode_status(_failure("Forbidden", None, "not allowed"), V4)
    assert (exc.value.message, exc.value.reason) == ("not allowed", "Forbidden")
    with pytest.raises(ExecError) as exc:
        relay_impl.decode_status(b'{"status":"Failure"}', V4)
    assert exc.value.reason == ""


def test_unknown_protocol(relay_impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        relay_impl.decode_status(b"", "base64.channel.k8s.io")
