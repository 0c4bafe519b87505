"""A small, strict subset of AIP-160 filters, translated to MongoDB queries.

Grammar:

    filter     = term ("AND" term)*
    term       = field operator value
    operator   = "=" | "!=" | "<" | "<=" | ">" | ">="
    value      = double-quoted string | bare word (enum names, resource names)

`=` and `!=` apply to every field; `<`, `<=`, `>`, `>=` only to fields whose converter yields
an ordered value (a time or a number), for example `event_time >= "2026-01-01T00:00:00Z"`
with `rfc3339_timestamp`. Fields must be on the list a service allows; anything else is
INVALID_ARGUMENT on `filter`, never ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from medmesh.runtime.errors import InvalidArgument

_TOKEN = re.compile(
    r"""\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<op>!=|<=|>=|=|<|>)|(?P<word>[A-Za-z_][A-Za-z0-9_.\-/]*))"""
)

# Maps a filter value (as written) to the stored value; raises ValueError if not allowed.
Converter = Callable[[str], Any]


class Comparison(StrEnum):
    """An ordering operator; equality is `Condition.equal`."""

    LESS = "<"
    LESS_OR_EQUAL = "<="
    GREATER = ">"
    GREATER_OR_EQUAL = ">="

    @property
    def mongo_operator(self) -> str:
        return _MONGO_OPERATORS[self]

    def holds(self, actual: Any, value: Any) -> bool:
        if self is Comparison.LESS:
            return bool(actual < value)
        if self is Comparison.LESS_OR_EQUAL:
            return bool(actual <= value)
        if self is Comparison.GREATER:
            return bool(actual > value)
        return bool(actual >= value)


_MONGO_OPERATORS = {
    Comparison.LESS: "$lt",
    Comparison.LESS_OR_EQUAL: "$lte",
    Comparison.GREATER: "$gt",
    Comparison.GREATER_OR_EQUAL: "$gte",
}


@dataclass(frozen=True)
class Condition:
    key: str  # the attribute / document key, not the name written in the filter; dots reach into parts
    equal: bool  # `=` when true, `!=` when false; true for comparisons
    value: Any
    comparison: Comparison | None = None  # `<`, `<=`, `>`, `>=`; None for `=` and `!=`

    def matches(self, item: Any) -> bool:
        """Like MongoDB: on a list or tuple attribute, `=` means "contains" and a comparison
        holds if it holds for any element; a missing (None) value is never ordered."""
        actual = item
        for part in self.key.split("."):
            actual = getattr(actual, part)
        if self.comparison is not None:
            candidates = actual if isinstance(actual, list | tuple) else [actual]
            return any(self._ordered(candidate) for candidate in candidates)
        if isinstance(actual, list | tuple) and not isinstance(self.value, list | tuple):
            return (self.value in actual) == self.equal
        return bool(actual == self.value) == self.equal

    def _ordered(self, actual: Any) -> bool:
        assert self.comparison is not None
        if actual is None:
            return False
        try:
            return self.comparison.holds(actual, self.value)
        except TypeError:  # MongoDB does not order values of different types either
            return False


def _clause(condition: Condition) -> dict[str, Any]:
    if condition.comparison is not None:
        return {condition.key: {condition.comparison.mongo_operator: condition.value}}
    return {condition.key: condition.value} if condition.equal else {condition.key: {"$ne": condition.value}}


def mongo_query(conditions: Sequence[Condition]) -> dict[str, Any]:
    clauses = [_clause(c) for c in conditions]
    if not clauses:
        return {}
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


def rfc3339_timestamp(written: str) -> datetime:
    """Converter of an RFC 3339 time (`2026-01-02T03:04:05.678Z`, `...+02:00`) to an aware UTC datetime.

    The offset is required: a time without one would mean a different moment on every server.
    Digits past microseconds are dropped; MongoDB itself keeps milliseconds.
    """
    if not _RFC3339.match(written):
        raise ValueError(f"{written!r} is not an RFC 3339 time such as 2026-01-02T03:04:05Z")
    try:
        moment = datetime.fromisoformat(written.upper().replace("Z", "+00:00"))
    except ValueError as error:  # well-formed but impossible, like month 13
        raise ValueError(f"{written!r} is not a valid time: {error}") from None
    return moment.astimezone(UTC)


def _orderable(value: Any) -> bool:
    return isinstance(value, datetime | int | float) and not isinstance(value, bool)


def _bad(description: str) -> InvalidArgument:
    return InvalidArgument.for_field("filter", description, reason="INVALID_FILTER")


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    text = text.strip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            raise _bad(f"cannot parse near {text[position : position + 20]!r}")
        kind = match.lastgroup or ""
        value = match.group(kind)
        if kind == "string":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        tokens.append((kind, value))
        position = match.end()
    return tokens


def parse_filter(text: str, fields: Mapping[str, tuple[str, Converter]]) -> list[Condition]:
    """`fields` maps a filterable field to (attribute key, converter of the written value)."""
    tokens = _tokens(text)
    clauses: list[Condition] = []
    index = 0
    while index < len(tokens):
        if clauses:
            if tokens[index] != ("word", "AND"):
                raise _bad("terms must be joined with AND")
            index += 1
        if index + 3 > len(tokens):
            raise _bad("expected `field = value`")
        (field_kind, field), (op_kind, op), (value_kind, raw) = tokens[index : index + 3]
        if field_kind != "word" or op_kind != "op" or value_kind not in {"string", "word"}:
            raise _bad("expected `field = value`")
        if field not in fields:
            raise _bad(f"cannot filter on {field!r}; allowed: {', '.join(sorted(fields))}")
        key, convert = fields[field]
        try:
            value = convert(raw)
        except ValueError as error:
            raise _bad(f"bad value for {field}: {error}") from error
        if op in {"=", "!="}:
            clauses.append(Condition(key, op == "=", value))
        elif _orderable(value):
            clauses.append(Condition(key, True, value, Comparison(op)))
        else:
            raise _bad(f"`{op}` compares times and numbers; {field} takes = or !=")
        index += 3
    return clauses
