"""The audit event schema against the README: one valid example of every event kind, and
a schema that rejects what it should. (Here rather than in tests/unit: the wheel's tests run
without the README.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from kuberun.audit import EVENT_KINDS, EVENT_SCHEMA

README = Path(__file__).resolve().parents[2] / "README.md"
VALIDATOR = jsonschema.Draft202012Validator(EVENT_SCHEMA)


def readme_examples() -> list[dict[str, Any]]:
    text = README.read_text()
    section = text[text.index("## Audit trail and session recordings") :]
    block = re.search(r"```jsonl\n(.*?)```", section, re.S)
    assert block is not None
    return [json.loads(line) for line in block.group(1).splitlines()]


def test_readme_has_a_valid_example_of_every_event_kind() -> None:
    examples = readme_examples()
    for example in examples:
        VALIDATOR.validate(example)
    assert {e["event"] for e in examples} == set(EVENT_KINDS)


def test_schema_rejects_what_it_should() -> None:
    good = readme_examples()[0]
    for broken in [
        {**good, "time": "2026-12-05 00:08:31"},
        {**good, "event": "connection.open"},
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "client"},
        {**good, "client": {"address": "x", "port": 70000}},
    ]:
        with pytest.raises(jsonschema.ValidationError):
            VALIDATOR.validate(broken)
