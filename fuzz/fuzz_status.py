#!/usr/bin/env python3
"""Fuzzing of the exec status decoder (``kuberun.relay.decode_status``) with atheris.

The channel-3 message is the API server's verdict on an exec; a hostile or
broken server controls every byte of it. For any input, ``decode_status`` must
return an exit code in 0..255 or raise ``ExecError``, nothing else, and must
agree with a small reference model of the rules written here from the protocol
description (Success -> 0; Failure/NonZeroExitCode -> the ExitCode cause, plain
ASCII decimal 0..255; other Failures -> ExecError with the server's reason;
anything malformed -> ExecError "MalformedStatus"; v1 statuses are plain text).

Half of the inputs are structured: the fuzzer's bytes choose a Status object
(field types, reasons, causes, digits, nesting), which reaches the interesting
branches far sooner than raw JSON.

    python fuzz/fuzz_status.py -max_total_time=15
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import atheris

import kuberun  # noqa: F401  (imported uninstrumented: only the decoder is instrumented)
from kuberun.errors import ExecError

# Re-import the decoder's module under instrumentation (import_module, not "from
# kuberun import ...", which would hand back the package's uninstrumented attribute).
sys.modules.pop("kuberun._relay_common", None)
with atheris.instrument_imports(include=["kuberun._relay_common"]):
    _relay_common = importlib.import_module("kuberun._relay_common")

decode_status = _relay_common.decode_status
PROTOCOLS = _relay_common.PROTOCOLS
V1 = _relay_common.PROTOCOL_V1
LIMIT = _relay_common.DEFAULT_MAX_STATUS
MALFORMED = "MalformedStatus"

_TEXTS = ("", "Success", "Failure", "NonZeroExitCode", "ExitCode", "InternalError", "x")
# Superscript two and Arabic-Indic one pass str.isdigit() but are not ASCII digits.
_DIGITS = ["0", "1", "42", "255", "256", "007", "-1", "+1", " 1", "1 ", "1e2", "9" * 40]
_DIGITS += ["\u00b2", "\u0661"]


def reference(data: bytes, protocol: str) -> tuple[str, Any]:
    """What the decoder must do: ("code", n) or ("error", reason)."""
    if len(data) > LIMIT:
        return ("error", MALFORMED)
    if protocol == V1:
        return ("code", 0) if not data else ("error", "")
    try:
        status = json.loads(data)
    except (ValueError, RecursionError):
        return ("error", MALFORMED)
    if not isinstance(status, dict):
        return ("error", MALFORMED)
    if status.get("status") == "Success":
        return ("code", 0)
    message, reason = status.get("message", ""), status.get("reason", "")
    if not isinstance(message, str) or not isinstance(reason, str):
        return ("error", MALFORMED)
    if status.get("status") != "Failure":
        return ("error", MALFORMED)
    if reason != "NonZeroExitCode":
        return ("error", reason)
    details = status.get("details")
    causes = details.get("causes") if isinstance(details, dict) else None
    if isinstance(causes, list):
        for cause in causes:
            if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
                text = cause.get("message")
                if not isinstance(text, str) or not 1 <= len(text) <= 3 or not text.isascii():
                    break
                if text.isdigit() and int(text) <= 255:
                    return ("code", int(text))
                break
    return ("error", MALFORMED)


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind == 0:
        return fdp.PickValueInList(list(_TEXTS))
    if kind == 1:
        return fdp.PickValueInList(_DIGITS)
    if kind == 2:
        return fdp.ConsumeIntInRange(-300, 300)
    if kind == 3:
        return None
    if kind == 4:
        return fdp.ConsumeBool()
    if kind == 5:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 20))
    if kind == 6 and depth < 4:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 7 and depth < 4:
        return _cause(fdp, depth + 1)
    return fdp.ConsumeFloat()


def _cause(fdp: atheris.FuzzedDataProvider, depth: int) -> Any:
    cause: dict[str, Any] = {}
    if fdp.ConsumeBool():
        cause["reason"] = "ExitCode" if fdp.ConsumeBool() else _value(fdp, depth + 1)
    if fdp.ConsumeBool():
        cause["message"] = (
            fdp.PickValueInList(_DIGITS) if fdp.ConsumeBool() else _value(fdp, depth + 1)
        )
    return cause


def structured(fdp: atheris.FuzzedDataProvider) -> bytes:
    status: dict[str, Any] = {}
    for key in ("status", "message", "reason"):
        if fdp.ConsumeBool():
            status[key] = fdp.PickValueInList(list(_TEXTS)) if fdp.ConsumeBool() else _value(fdp)
    if fdp.ConsumeBool():
        causes = [_cause(fdp, 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
        status["details"] = {"causes": causes} if fdp.ConsumeBool() else _value(fdp)
    for _ in range(fdp.ConsumeIntInRange(0, 2)):
        status[fdp.ConsumeUnicodeNoSurrogates(4)] = _value(fdp)
    text = json.dumps(status, ensure_ascii=fdp.ConsumeBool())
    raw = text.encode("utf-8", "surrogatepass")
    if fdp.ConsumeIntInRange(0, 15) == 0:  # occasionally broken after the fact
        cut = fdp.ConsumeIntInRange(0, len(raw))
        raw = raw[:cut] + bytes(fdp.ConsumeBytes(3))
    return raw


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    protocol = PROTOCOLS[fdp.ConsumeIntInRange(0, len(PROTOCOLS) - 1)]
    use_structure = fdp.ConsumeBool()
    raw = structured(fdp) if use_structure else bytes(fdp.ConsumeBytes(fdp.remaining_bytes()))
    if fdp.remaining_bytes() == 0 and len(raw) < 8 and fdp.ConsumeBool():
        raw = raw * (LIMIT // max(1, len(raw)) + 1)  # the size limit, from both sides
    expected = reference(raw, protocol)
    try:
        code = decode_status(raw, protocol)
    except ExecError as exc:
        got: tuple[str, Any] = ("error", exc.reason)
        assert isinstance(exc.message, str)
    else:
        assert type(code) is int and 0 <= code <= 255, code
        got = ("code", code)
    if got != expected:
        raise AssertionError(f"{protocol} {raw[:200]!r}: decoder {got}, reference {expected}")
    # bytearray and memoryview inputs decode the same way.
    for view in (bytearray(raw), memoryview(raw)):
        try:
            again: tuple[str, Any] = ("code", decode_status(view, protocol))
        except ExecError as exc:
            again = ("error", exc.reason)
        assert again == got


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
