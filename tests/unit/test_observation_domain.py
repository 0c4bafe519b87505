"""Observation domain: per-item validation, derived ids, names, aggregation bounds and statistics."""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from medmesh.runtime.errors import InvalidArgument
from services.observation.domain import (
    AggregationRequest,
    Aggregator,
    DeviceAssignment,
    Observation,
    ObservationDraft,
    Parent,
    Rejection,
    RunningStatistics,
    Waveform,
    aggregation_request,
    observation_id,
    parse_name,
    parse_parent,
    validate,
)

AT = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
DEVICE = "devices/SN-1"
ASSIGNED = DeviceAssignment(DEVICE, "organizations/maker", "organizations/care", "organizations/care/patients/p1")
DRAFT = ObservationDraft("m-1", "heart_rate", AT - timedelta(seconds=5), unit="/min", numeric_value=72.0)


def test_a_valid_item_is_owned_as_the_assignment_says() -> None:
    observation = validate(DRAFT, ASSIGNED, AT)

    assert isinstance(observation, Observation)
    assert observation.organization == "organizations/care"  # the care organization, not the owner
    assert observation.patient == "organizations/care/patients/p1"
    assert observation.device == DEVICE
    assert observation.name == f"{DEVICE}/observations/{observation.id}"
    assert (observation.time, observation.receive_time) == (AT - timedelta(seconds=5), AT)
    assert (observation.numeric_value, observation.unit) == (72.0, "/min")


def test_without_a_care_organization_the_owner_owns_the_data() -> None:
    observation = validate(DRAFT, DeviceAssignment(DEVICE, "organizations/maker"), AT)

    assert isinstance(observation, Observation)
    assert (observation.organization, observation.patient) == ("organizations/maker", "")


def test_ids_are_derived_from_device_and_message_id() -> None:
    first = observation_id(DEVICE, "m-1")

    assert first == observation_id(DEVICE, "m-1")
    assert first != observation_id(DEVICE, "m-2")
    assert first != observation_id("devices/SN-2", "m-1")  # message ids are unique per device only
    assert len(first) == 32
    assert all(c in "0123456789abcdef" for c in first)


def test_times_are_kept_to_the_millisecond() -> None:
    observation = validate(replace(DRAFT, time=AT.replace(microsecond=123987)), ASSIGNED, AT)

    assert isinstance(observation, Observation)
    assert observation.time.microsecond == 123000


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"message_id": ""}, "message_id"),
        ({"message_id": "has space"}, "message_id"),
        ({"message_id": "x" * 129}, "message_id"),
        ({"metric": "Heart_Rate"}, "metric"),
        ({"metric": "9lives"}, "metric"),
        ({"time": None}, "time"),
        ({"time": datetime(1970, 1, 1, tzinfo=UTC)}, "time"),
        ({"time": AT + timedelta(days=1, seconds=1)}, "time"),
        ({"unit": "beats per minute"}, "unit"),
        ({"session": "sessions/with space"}, "session"),
        ({"numeric_value": None}, "value"),
        ({"boolean_value": True}, "value"),  # two values
        ({"numeric_value": math.nan}, "numeric_value"),
        ({"numeric_value": math.inf}, "numeric_value"),
        ({"numeric_value": None, "string_value": "x" * 1025}, "string_value"),
        ({"numeric_value": None, "waveform": Waveform(0.0, (1.0,))}, "waveform.sample_rate_hz"),
        ({"numeric_value": None, "waveform": Waveform(250.0, ())}, "waveform.samples"),
        ({"numeric_value": None, "waveform": Waveform(250.0, (0.0,) * 10_001)}, "waveform.samples"),
        ({"numeric_value": None, "waveform": Waveform(250.0, (1.0, math.nan))}, "waveform.samples"),
    ],
)
def test_invalid_items_are_rejected_naming_the_field(changes: dict[str, object], field: str) -> None:
    result = validate(replace(DRAFT, **changes), ASSIGNED, AT)  # type: ignore[arg-type]

    assert isinstance(result, Rejection)
    assert result.reason == "INVALID_FIELD"
    assert result.description.startswith(f"{field}: ")


@pytest.mark.parametrize(
    "changes",
    [
        {"time": AT + timedelta(hours=23)},  # a device clock somewhat ahead
        {"numeric_value": None, "boolean_value": False},
        {"numeric_value": None, "string_value": ""},
        {"numeric_value": None, "waveform": Waveform(250.0, (0.0,) * 10_000, AT)},
        {"numeric_value": 0.0},
        {"session": "devices/SN-1/sessions/s-1", "unit": "mm[Hg]"},
        {"message_id": "0f8fad5b-d9cb-469f-a165-70867728950e"},
    ],
)
def test_valid_items(changes: dict[str, object]) -> None:
    assert isinstance(validate(replace(DRAFT, **changes), ASSIGNED, AT), Observation)  # type: ignore[arg-type]


def test_parse_parent() -> None:
    assert parse_parent("devices/SN-1") == Parent(device="devices/SN-1")
    assert parse_parent("organizations/a/patients/p1") == Parent(
        patient="organizations/a/patients/p1", organization="organizations/a"
    )
    for bad in ("devices/", "organizations/a", "organizations/a/patients/", "patients/p1", "devices/a/b"):
        with pytest.raises(InvalidArgument):
            parse_parent(bad)


def test_parse_name() -> None:
    assert parse_name("devices/SN-1/observations/abc123") == ("devices/SN-1", "abc123")
    for bad in ("devices/SN-1/observations/", "devices//observations/a", "devices/SN-1/commands/a"):
        with pytest.raises(InvalidArgument):
            parse_name(bad)


# --- aggregation --------------------------------------------------------------------------------


def test_running_statistics_match_the_population_formulas() -> None:
    generator = random.Random(7)
    values = [generator.gauss(80, 15) for _ in range(1000)]
    running = RunningStatistics()
    for value in values:
        running.add(value)

    assert running.count == 1000
    assert (running.minimum, running.maximum) == (min(values), max(values))
    assert running.mean == pytest.approx(statistics.fmean(values))
    assert running.standard_deviation == pytest.approx(statistics.pstdev(values))  # population, not sample
    assert running.standard_deviation != pytest.approx(statistics.stdev(values))


def test_running_statistics_stay_exact_on_large_offsets() -> None:
    # A naive sum-of-squares loses every digit here; Welford's update does not.
    running = RunningStatistics()
    for value in (1e9 + 4, 1e9 + 7, 1e9 + 13, 1e9 + 16):
        running.add(value)

    assert running.standard_deviation == pytest.approx(statistics.pstdev([4, 7, 13, 16]))


def test_a_single_value_has_no_spread() -> None:
    running = RunningStatistics()
    running.add(5.0)
    assert (running.mean, running.standard_deviation) == (5.0, 0.0)


def test_bins_start_at_start_time_and_skip_empty_ones() -> None:
    request = AggregationRequest(("heart_rate", "spo2"), AT, AT + timedelta(minutes=3), timedelta(minutes=1))
    aggregator = Aggregator(request)
    aggregator.add("heart_rate", AT, 60.0)
    aggregator.add("heart_rate", AT + timedelta(seconds=59, milliseconds=999), 80.0)
    aggregator.add("spo2", AT + timedelta(seconds=30), 97.0)
    aggregator.add("heart_rate", AT + timedelta(minutes=2), 90.0)  # the third bin; the second is empty
    aggregator.add("heart_rate", AT + timedelta(minutes=3), 1000.0)  # end is exclusive
    aggregator.add("heart_rate", AT - timedelta(milliseconds=1), 1000.0)
    aggregator.add("temperature", AT, 1000.0)  # not asked for

    bins = aggregator.bins()

    assert [(b.start_time, b.metric, b.count, b.min, b.max, b.mean, b.standard_deviation) for b in bins] == [
        (AT, "heart_rate", 2, 60.0, 80.0, 70.0, 10.0),
        (AT, "spo2", 1, 97.0, 97.0, 97.0, 0.0),
        (AT + timedelta(minutes=2), "heart_rate", 1, 90.0, 90.0, 90.0, 0.0),
    ]


def test_aggregation_request_bounds() -> None:
    day = AT + timedelta(days=1)
    request = aggregation_request(["heart_rate"], AT, day, timedelta(seconds=10))
    assert request.bin_count == 8640

    # A partial last bin counts.
    assert aggregation_request(["a"], AT, AT + timedelta(seconds=61), timedelta(minutes=1)).bin_count == 2

    with pytest.raises(InvalidArgument) as caught:
        aggregation_request(["heart_rate", "spo2"], AT, day, timedelta(seconds=10))  # 17,280 cells
    assert caught.value.reason == "TOO_MANY_BINS"

    for metrics, start, end, size in [
        ([], AT, day, timedelta(hours=1)),
        (["a", "a"], AT, day, timedelta(hours=1)),
        (["Bad"], AT, day, timedelta(hours=1)),
        ([f"m{i}" for i in range(11)], AT, day, timedelta(hours=1)),
        (["a"], None, day, timedelta(hours=1)),
        (["a"], AT, None, timedelta(hours=1)),
        (["a"], day, AT, timedelta(hours=1)),
        (["a"], AT, AT, timedelta(hours=1)),
        (["a"], AT, day, timedelta(milliseconds=999)),
        (["a"], AT, day, timedelta(seconds=1, microseconds=1)),
        (["a"], AT, day, None),
    ]:
        with pytest.raises(InvalidArgument):
            aggregation_request(metrics, start, end, size)
