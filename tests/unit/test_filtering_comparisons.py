"""Filter comparisons (`<`, `<=`, `>`, `>=`), RFC 3339 times, dotted keys, and their MongoDB translation."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import pytest

from medmesh.runtime.errors import InvalidArgument
from medmesh.runtime.filtering import Comparison, Condition, Converter, mongo_query, parse_filter, rfc3339_timestamp

FIELDS: dict[str, tuple[str, Converter]] = {
    "event_time": ("event_time", rfc3339_timestamp),
    "count": ("count", int),
    "resource": ("resource", str),
    "actor": ("actor.subject", str),
}

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Actor:
    subject: str


@dataclass(frozen=True)
class Item:
    event_time: datetime | None
    count: int = 0
    resource: str = ""
    actor: Actor = Actor("")
    tags: tuple[int, ...] = ()


def violation(text: str) -> str:
    with pytest.raises(InvalidArgument) as caught:
        parse_filter(text, FIELDS)
    assert caught.value.reason == "INVALID_FILTER"
    assert [v.field for v in caught.value.field_violations] == ["filter"]
    return caught.value.field_violations[0].description


# --- parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operator", "comparison"),
    [
        ("<", Comparison.LESS),
        ("<=", Comparison.LESS_OR_EQUAL),
        (">", Comparison.GREATER),
        (">=", Comparison.GREATER_OR_EQUAL),
    ],
)
def test_each_comparison_operator_parses(operator: str, comparison: Comparison) -> None:
    assert parse_filter(f'event_time {operator} "2026-01-01T00:00:00Z"', FIELDS) == [
        Condition("event_time", True, T0, comparison)
    ]


def test_comparisons_need_no_spaces_and_two_character_operators_are_one_token() -> None:
    assert parse_filter('count>="3" AND count<"9"', FIELDS) == [
        Condition("count", True, 3, Comparison.GREATER_OR_EQUAL),
        Condition("count", True, 9, Comparison.LESS),
    ]


def test_a_time_range_with_equality_terms() -> None:
    text = (
        'resource = "organizations/o/patients/p" AND event_time >= "2026-01-01T00:00:00Z"'
        ' AND event_time < "2026-02-01T00:00:00+01:00"'
    )
    assert parse_filter(text, FIELDS) == [
        Condition("resource", True, "organizations/o/patients/p"),
        Condition("event_time", True, T0, Comparison.GREATER_OR_EQUAL),
        Condition("event_time", True, datetime(2026, 1, 31, 23, tzinfo=UTC), Comparison.LESS),
    ]


def test_positional_conditions_are_equality_as_before() -> None:
    assert Condition("resource", True, "x").comparison is None
    assert parse_filter('resource != "x"', FIELDS) == [Condition("resource", False, "x")]


def test_ordering_a_string_field_is_refused() -> None:
    description = violation('resource > "organizations/a"')
    assert "`>`" in description
    assert "resource" in description


@pytest.mark.parametrize(
    "text",
    [
        "event_time >= 2026-01-01T00:00:00Z",  # times are quoted
        'event_time >= "2026-01-01"',  # a date is not a time
        'event_time >= "2026-01-01T00:00:00"',  # no offset: a different moment on every server
        'event_time >= "2026-13-01T00:00:00Z"',  # no month 13
        'event_time >= "yesterday"',
        'event_time => "2026-01-01T00:00:00Z"',
        'event_time < < "2026-01-01T00:00:00Z"',
        'event_time <> "2026-01-01T00:00:00Z"',
        'event_time >= "2026-01-01T00:00:00Z" AND',
        "count >",
        "count > 3",  # values are words or quoted strings
    ],
)
def test_malformed_comparisons_are_rejected(text: str) -> None:
    violation(text)


# --- RFC 3339 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("2026-01-02T03:04:05Z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02t03:04:05z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02T03:04:05.678Z", datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)),
        ("2026-01-02T03:04:05.123456789Z", datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)),
        ("2026-01-02T05:04:05+02:00", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-01T23:30:00-05:30", datetime(2026, 1, 2, 5, 0, tzinfo=UTC)),
    ],
)
def test_rfc3339_times_become_aware_utc(written: str, expected: datetime) -> None:
    converted = rfc3339_timestamp(written)
    assert converted == expected
    assert converted.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "written",
    ["", "2026-01-02", "2026-01-02T03:04:05", "20260102T030405Z", "2026-01-02T03:04Z", "2026-02-30T00:00:00Z"],
)
def test_rfc3339_rejects_other_forms(written: str) -> None:
    with pytest.raises(ValueError, match=r"RFC 3339|valid time"):
        rfc3339_timestamp(written)


# --- matching (the in-memory fakes) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("comparison", "before", "at", "after"),
    [
        (Comparison.LESS, True, False, False),
        (Comparison.LESS_OR_EQUAL, True, True, False),
        (Comparison.GREATER, False, False, True),
        (Comparison.GREATER_OR_EQUAL, False, True, True),
    ],
)
def test_comparison_matches_on_both_sides_of_the_bound(
    comparison: Comparison, before: bool, at: bool, after: bool
) -> None:
    condition = Condition("event_time", True, T0, comparison)
    second = timedelta(seconds=1)
    assert condition.matches(Item(T0 - second)) is before
    assert condition.matches(Item(T0)) is at
    assert condition.matches(Item(T0 + second)) is after


def test_comparison_across_time_zones_compares_moments() -> None:
    condition = parse_filter('event_time >= "2026-01-01T01:00:00+01:00"', FIELDS)[0]
    assert condition.matches(Item(T0))
    assert not condition.matches(Item(T0.astimezone(timezone(timedelta(hours=-3))) - timedelta(milliseconds=1)))


def test_a_missing_value_is_never_ordered() -> None:
    for comparison in Comparison:
        assert not Condition("event_time", True, T0, comparison).matches(Item(None))


def test_comparison_on_a_list_holds_for_any_element() -> None:
    assert Condition("tags", True, 5, Comparison.GREATER).matches(Item(T0, tags=(1, 9)))
    assert not Condition("tags", True, 9, Comparison.GREATER).matches(Item(T0, tags=(1, 9)))


def test_dotted_keys_reach_into_parts() -> None:
    condition = parse_filter('actor = "organizations/o/users/u"', FIELDS)[0]
    assert condition.key == "actor.subject"
    assert condition.matches(Item(T0, actor=Actor("organizations/o/users/u")))
    assert not condition.matches(Item(T0, actor=Actor("organizations/o/users/v")))


# --- MongoDB translation --------------------------------------------------------------------------


def test_mongo_query_of_comparisons() -> None:
    text = (
        'event_time >= "2026-01-01T00:00:00Z" AND event_time < "2026-01-02T00:00:00Z" AND count <= "3" AND count > "1"'
    )
    assert mongo_query(parse_filter(text, FIELDS)) == {
        "$and": [
            {"event_time": {"$gte": T0}},
            {"event_time": {"$lt": T0 + timedelta(days=1)}},
            {"count": {"$lte": 3}},
            {"count": {"$gt": 1}},
        ]
    }


def test_mongo_query_mixes_equality_and_dotted_keys() -> None:
    text = 'actor = "organizations/o/users/u" AND resource != "x" AND event_time > "2026-01-01T00:00:00Z"'
    assert mongo_query(parse_filter(text, FIELDS)) == {
        "$and": [
            {"actor.subject": "organizations/o/users/u"},
            {"resource": {"$ne": "x"}},
            {"event_time": {"$gt": T0}},
        ]
    }
