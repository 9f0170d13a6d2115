"""Label and field selectors with the API server's syntax and errors.

Part of devcluster, a test double and not a production runtime.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from .apierrors import bad_request

__all__ = ["FieldSelector", "LabelSelector", "field_getter", "parse_bool"]

Obj = dict[str, Any]


def parse_bool(value: str | None) -> bool:
    """The API server's query bool rule: absent, ``0`` or ``false`` (any case) are false."""
    if value is None:
        return False
    return value != "0" and value.lower() != "false"


_KEY = re.compile(
    r"^([a-zA-Z0-9]([-a-zA-Z0-9.]*[a-zA-Z0-9])?/)?[a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?$"
)
_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_TOKEN = re.compile(r"\s*(!=|==|=|\(|\)|,|!|[^\s!=(),]+)")


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos:].strip():
                raise ValueError(f"unexpected character at {pos}")
            break
        out.append(m.group(1))
        pos = m.end()
    return out


class LabelSelector:
    """A parsed ``labelSelector`` (``a=b,c!=d,e in (f,g),!h``)."""

    def __init__(self, text: str | None) -> None:
        self.text = text or ""
        # (operator, key, values): "in"/"notin" compare the value, "exists"/"!" the key.
        self._reqs: list[tuple[str, str, frozenset[str]]] = []
        if self.text.strip():
            try:
                self._parse(_tokens(self.text))
            except ValueError as exc:
                raise bad_request(f"unable to parse requirement: {exc}") from None

    def _key(self, key: str) -> str:
        if not _KEY.match(key) or len(key.split("/")[-1]) > 63:
            raise ValueError(f'invalid label key "{key}"')
        return key

    def _parse(self, toks: list[str]) -> None:
        i = 0

        def take() -> str:
            nonlocal i
            if i >= len(toks):
                raise ValueError("found '', expected: identifier")
            i += 1
            return toks[i - 1]

        while i < len(toks):
            tok = take()
            if tok == "!":
                key = self._key(take())
                self._reqs.append(("!", key, frozenset()))
            else:
                key = self._key(tok)
                op = toks[i] if i < len(toks) else ","
                if op == ",":
                    self._reqs.append(("exists", key, frozenset()))
                elif op in ("=", "==", "!="):
                    i += 1
                    value = toks[i] if i < len(toks) and toks[i] != "," else ""
                    if value:
                        i += 1
                    if not _VALUE.match(value):
                        raise ValueError(f'invalid label value: "{value}"')
                    self._reqs.append(("notin" if op == "!=" else "in", key, frozenset([value])))
                elif op in ("in", "notin"):
                    i += 1
                    if take() != "(":
                        raise ValueError("found '', expected: '('")
                    values: set[str] = set()
                    while True:
                        tok2 = take()
                        if tok2 == ")":
                            break
                        if tok2 == ",":
                            continue
                        values.add(tok2)
                    self._reqs.append((op, key, frozenset(values)))
                else:
                    raise ValueError(f"found '{op}', expected: in, notin, =, ==, !=, gt, lt")
            if i < len(toks):
                if toks[i] != ",":
                    raise ValueError(f"found '{toks[i]}', expected: ',' or 'end of string'")
                i += 1

    def matches(self, obj: Obj) -> bool:
        """Whether the object's labels satisfy every requirement."""
        labels: Mapping[str, str] = obj.get("metadata", {}).get("labels") or {}
        for op, key, values in self._reqs:
            if op == "exists":
                ok = key in labels
            elif op == "!":
                ok = key not in labels
            elif op == "in":
                ok = key in labels and labels[key] in values
            else:  # notin / != also match objects without the label
                ok = labels.get(key) not in values
            if not ok:
                return False
        return True


class FieldSelector:
    """A parsed ``fieldSelector``; ``fields`` maps supported names to getters."""

    def __init__(self, text: str | None, fields: Mapping[str, Callable[[Obj], str]]) -> None:
        self.text = text or ""
        self._reqs: list[tuple[Callable[[Obj], str], str, bool]] = []
        self.exact: dict[str, str] = {}
        for term in filter(None, (t.strip() for t in self.text.split(","))):
            for op in ("!=", "==", "="):
                if op in term:
                    name, value = term.split(op, 1)
                    break
            else:
                raise bad_request(f"invalid selector: '{self.text}'; can't understand '{term}'")
            name = name.strip()
            getter = fields.get(name)
            if getter is None:
                raise bad_request(f"field label not supported: {name}")
            self._reqs.append((getter, value, op == "!="))
            if op != "!=":
                self.exact[name] = value

    def matches(self, obj: Obj) -> bool:
        """Whether the object satisfies every term."""
        return all((getter(obj) == value) != negate for getter, value, negate in self._reqs)


def field_getter(*path: str) -> Callable[[Obj], str]:
    """A getter for a dotted path; missing values read as the empty string."""

    def get(obj: Obj) -> str:
        cur: Any = obj
        for part in path:
            if not isinstance(cur, dict):
                return ""
            cur = cur.get(part)
        if cur is None:
            return ""
        if isinstance(cur, bool):
            return "true" if cur else "false"
        return str(cur)

    return get
