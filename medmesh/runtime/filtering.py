"""A small, strict subset of AIP-160 filters, translated to MongoDB queries.

Grammar: `term (AND term)*`, term = `field = value` or `field != value`, value a
double-quoted string or a bare word (enum names). Fields must be on the list a
service allows; anything else is INVALID_ARGUMENT on `filter`, never ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medmesh.runtime.errors import InvalidArgument

_TOKEN = re.compile(r"""\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<op>!=|=)|(?P<word>[A-Za-z_][A-Za-z0-9_.\-/]*))""")

# Maps a filter value (as written) to the stored value; raises ValueError if not allowed.
Converter = Callable[[str], Any]


@dataclass(frozen=True)
class Condition:
    key: str  # the attribute / document key, not the name written in the filter
    equal: bool  # `=` when true, `!=` when false
    value: Any

    def matches(self, item: Any) -> bool:
        """Like MongoDB: on a list or tuple attribute, `=` means "contains"."""
        actual = getattr(item, self.key)
        if isinstance(actual, list | tuple) and not isinstance(self.value, list | tuple):
            return (self.value in actual) == self.equal
        return bool(actual == self.value) == self.equal


def mongo_query(conditions: Sequence[Condition]) -> dict[str, Any]:
    clauses = [{c.key: c.value} if c.equal else {c.key: {"$ne": c.value}} for c in conditions]
    if not clauses:
        return {}
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


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
        clauses.append(Condition(key, op == "=", value))
        index += 3
    return clauses
