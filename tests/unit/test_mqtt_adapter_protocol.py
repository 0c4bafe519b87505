"""The adapter's pure protocol parts: client ids, topics, and payload decoding (docs/device-protocol.md)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from medmesh.command.v1 import command_service_pb2 as command_pb
from medmesh.device.v1 import device_service_pb2 as device_pb
from mqtt_adapter.payloads import (
    MAX_PAYLOAD_BYTES,
    PayloadError,
    command_payload,
    decode_command_status,
    decode_observations,
    decode_reported_config,
    decode_status,
)
from mqtt_adapter.topics import Uplink, matches, may_subscribe, parse_client_id, parse_uplink


@pytest.mark.parametrize(
    ("client_id", "expected"),
    [
        ("SN-1", ("SN-1", "")),
        ("SN-1:pub", ("SN-1", "pub")),
        ("a.b_c-9:tool_2", ("a.b_c-9", "tool_2")),
        ("", None),
        (None, None),
        ("-SN", None),
        ("SN-1:", None),
        ("SN-1:x:y", None),
        ("SN/1", None),
        ("SN-1:" + "t" * 24, None),
        ("x" * 65, None),
    ],
)
def test_client_ids_are_device_ids_with_an_optional_tag(
    client_id: str | None, expected: tuple[str, str] | None
) -> None:
    parsed = parse_client_id(client_id)
    assert (None if parsed is None else (parsed.device_id, parsed.tag)) == expected


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("devices/d1/observations", (Uplink.OBSERVATIONS, "")),
        ("devices/d1/status", (Uplink.STATUS, "")),
        ("devices/d1/config/reported", (Uplink.CONFIG_REPORTED, "")),
        ("devices/d1/commands/c-5e1/status", (Uplink.COMMAND_STATUS, "c-5e1")),
        ("devices/d1/files/requests", (Uplink.FILE_REQUESTS, "")),
        ("devices/d2/observations", None),  # another device
        ("devices/d1/acks", None),  # cloud -> device topics are the cloud's
        ("devices/d1/config/desired", None),
        ("devices/d1/commands", None),
        ("devices/d1/commands/C_BAD/status", None),
        ("devices/d1/commands/c1/status/x", None),
        ("devices/d1/observations/x", None),
        ("devices/d1", None),
        ("devices/d10/observations", None),
    ],
)
def test_a_device_publishes_only_its_own_uplink_topics(topic: str, expected: tuple[Uplink, str] | None) -> None:
    parsed = parse_uplink("d1", topic)
    assert (None if parsed is None else (parsed.kind, parsed.command_id)) == expected


@pytest.mark.parametrize(
    ("topic_filter", "allowed"),
    [
        ("devices/d1/#", True),
        ("devices/d1/acks", True),
        ("devices/d1/+", True),
        ("devices/d1/commands/#", True),
        ("devices/d1/+/desired", True),
        ("devices/d1/", False),
        ("devices/d1/a#", False),
        ("devices/d1/#/x", False),
        ("devices/d1/a+", False),
        ("devices/d2/#", False),
        ("devices/+/acks", False),
        ("devices/#", False),
        ("#", False),
        ("$SYS/#", False),
        ("devices/d10/#", False),
    ],
)
def test_a_device_subscribes_only_under_its_own_prefix(topic_filter: str, allowed: bool) -> None:
    assert may_subscribe("d1", topic_filter) is allowed


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("devices/d1/#", "devices/d1/acks", True),
        ("devices/d1/#", "devices/d1/config/desired", True),
        ("devices/d1/+", "devices/d1/acks", True),
        ("devices/d1/+", "devices/d1/config/desired", False),
        ("devices/d1/+/desired", "devices/d1/config/desired", True),
        ("devices/d1/acks", "devices/d1/acks", True),
        ("devices/d1/acks", "devices/d1/errors", False),
        ("devices/d1/config/#", "devices/d1/config", True),  # '#' also matches the parent level
    ],
)
def test_topic_matching(topic_filter: str, topic: str, expected: bool) -> None:
    assert matches(topic_filter, topic) is expected


def encoded(document: Any) -> bytes:
    return json.dumps(document).encode()


def test_observations_are_decoded_and_bad_items_rejected_alone() -> None:
    batch = decode_observations(
        encoded(
            {
                "observations": [
                    {"id": "n", "metric": "heart_rate", "time": "2026-11-24T09:30:00Z", "value": 72, "unit": "/min"},
                    {"id": "b", "metric": "alarm", "time": "2026-11-24T09:30:00+01:00", "value": True},
                    {"id": "s", "metric": "mode", "time": "2026-11-24T09:30:00Z", "value": "night", "session": "s-1"},
                    {
                        "id": "w",
                        "metric": "ecg",
                        "time": "2026-11-24T09:30:00Z",
                        "waveform": {
                            "sample_rate_hz": 250,
                            "samples": [0.1, 0.2],
                            "start_time": "2026-11-24T09:30:00Z",
                        },
                    },
                    {"id": "no-zone", "metric": "x", "time": "2026-11-24T09:30:00", "value": 1},
                    {"id": "both", "metric": "x", "time": "2026-11-24T09:30:00Z", "value": 1, "waveform": {}},
                    {"id": "obj", "metric": "x", "time": "2026-11-24T09:30:00Z", "value": {"a": 1}},
                    {"metric": "x", "time": "2026-11-24T09:30:00Z", "value": 1},
                    "not an object",
                ]
            }
        )
    )

    assert [o.message_id for o in batch.observations] == ["n", "b", "s", "w"]
    numeric, boolean, string, waveform = batch.observations
    assert (numeric.numeric_value, numeric.unit) == (72.0, "/min")
    assert boolean.boolean_value is True
    assert boolean.time.ToJsonString() == "2026-11-24T08:30:00Z"
    assert (string.string_value, string.session) == ("night", "s-1")
    assert list(waveform.waveform.samples) == [0.1, 0.2]
    assert [(r.message_id, r.reason) for r in batch.rejected] == [
        ("no-zone", "INVALID_OBSERVATION"),
        ("both", "INVALID_OBSERVATION"),
        ("obj", "INVALID_OBSERVATION"),
        ("#7", "INVALID_OBSERVATION"),
        ("#8", "INVALID_OBSERVATION"),
    ]


def test_a_bare_observation_is_a_batch_of_one() -> None:
    batch = decode_observations(encoded({"id": "m", "metric": "spo2", "time": "2026-11-24T09:30:00Z", "value": 97}))
    assert [o.message_id for o in batch.observations] == ["m"]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "MALFORMED_PAYLOAD"),
        (b"\xff\xfe", "MALFORMED_PAYLOAD"),
        (b"[1]", "MALFORMED_PAYLOAD"),
        (b"x" * (MAX_PAYLOAD_BYTES + 1), "PAYLOAD_TOO_LARGE"),
        (encoded({"observations": []}), "INVALID_MESSAGE"),
        (encoded({"observations": "many"}), "INVALID_MESSAGE"),
        (encoded({"observations": [{}] * 501}), "INVALID_MESSAGE"),
    ],
)
def test_bad_observation_messages_are_refused_whole(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as refused:
        decode_observations(payload)
    assert refused.value.reason == reason


def test_status_is_partial() -> None:
    report = decode_status(encoded({"battery_percent": 40}))
    assert (report.state, report.battery_percent, report.firmware_version) == (
        device_pb.OperationalStatus.STATE_UNSPECIFIED,
        40,
        None,
    )
    full = decode_status(encoded({"state": "CRITICAL", "message": "occlusion", "time": "2026-11-24T09:30:00Z"}))
    assert (full.state, full.message) == (device_pb.OperationalStatus.STATE_CRITICAL, "occlusion")


@pytest.mark.parametrize(
    "document",
    [
        {"state": "ON FIRE"},
        {"message": "no state"},
        {"battery_percent": 101},
        {"battery_percent": 50.5},
        {"battery_percent": True},
        {"firmware_version": 2},
    ],
)
def test_bad_status_is_refused(document: dict[str, Any]) -> None:
    with pytest.raises(PayloadError) as refused:
        decode_status(encoded(document))
    assert refused.value.reason == "INVALID_MESSAGE"


def test_reported_config_and_command_status() -> None:
    config = decode_reported_config(encoded({"version": 3, "config": {"rate": 5}}))
    assert (config.version, dict(config.config)) == (3, {"rate": 5.0})
    with pytest.raises(PayloadError):
        decode_reported_config(encoded({"version": -1, "config": {}}))
    with pytest.raises(PayloadError):
        decode_reported_config(encoded({"version": True, "config": {}}))

    done = decode_command_status(encoded({"state": "COMPLETED", "result": {"ok": True}}))
    assert done.state == command_pb.Command.STATE_COMPLETED
    assert done.result is not None
    assert dict(done.result) == {"ok": True}
    with pytest.raises(PayloadError):
        decode_command_status(encoded({"state": "DELIVERED"}))


def test_command_payloads() -> None:
    command = command_pb.Command(name="devices/d1/commands/c-1", command_name="measure.now")
    command.parameters.update({"cuff": "adult"})
    command.timeout.FromSeconds(60)
    command.expire_time.FromJsonString("2026-11-24T09:35:00Z")

    run = json.loads(command_payload("run", command))
    stop = json.loads(command_payload("stop", command))

    assert run == {
        "action": "run",
        "id": "c-1",
        "name": "devices/d1/commands/c-1",
        "command": "measure.now",
        "parameters": {"cuff": "adult"},
        "expire_time": "2026-11-24T09:35:00Z",
        "timeout_seconds": 60.0,
    }
    assert stop == {"action": "stop", "id": "c-1", "name": "devices/d1/commands/c-1"}
