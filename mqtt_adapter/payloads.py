"""Device payloads (docs/device-protocol.md, sections 3 and 4): JSON in, protobuf out, and back.

The adapter checks shape only: a JSON object with fields of the right JSON types. What the
values mean (metric names, units, ranges, versions) is checked by the service that owns them,
which answers per item; the adapter passes those answers on to the device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from medmesh.command.v1 import command_service_pb2 as command_pb
from medmesh.device.v1 import device_service_pb2 as device_pb
from medmesh.observation.v1 import observation_service_pb2 as observation_pb

MAX_PAYLOAD_BYTES = 256 * 1024
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_OBSERVATIONS = 500


class PayloadError(Exception):
    """A message the device must be told about on its errors topic."""

    def __init__(self, reason: str, description: str) -> None:
        super().__init__(description)
        self.reason = reason
        self.description = description


@dataclass(frozen=True)
class Rejected:
    message_id: str
    reason: str
    description: str

    def as_json(self) -> dict[str, str]:
        return {"id": self.message_id, "reason": self.reason, "description": self.description}


@dataclass
class ObservationBatch:
    """What one observations message held: items to store, and items refused by shape."""

    observations: list[observation_pb.Observation] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


def _object(payload: bytes | bytearray) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError("PAYLOAD_TOO_LARGE", f"{len(payload)} bytes; at most {MAX_PAYLOAD_BYTES}")
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as error:
        raise PayloadError("MALFORMED_PAYLOAD", f"not JSON: {error}") from None
    if not isinstance(document, dict):
        raise PayloadError("MALFORMED_PAYLOAD", "not a JSON object")
    return document


def _set_time(target: timestamp_pb2.Timestamp, value: Any, name: str) -> None:
    """Parses an RFC 3339 time into `target` (set in place: the hot path of every observation)."""
    if not isinstance(value, str):
        raise PayloadError("INVALID_MESSAGE", f"{name}: an RFC 3339 time string is required")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise PayloadError("INVALID_MESSAGE", f"{name}: not an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise PayloadError("INVALID_MESSAGE", f"{name}: the time needs a zone (Z or an offset)")
    # What Timestamp.FromDatetime computes, without its detour through a time tuple.
    since = moment - _EPOCH
    target.seconds = since.days * 86_400 + since.seconds
    target.nanos = since.microseconds * 1000


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _observation(item: Any) -> observation_pb.Observation:
    if not isinstance(item, dict):
        raise PayloadError("INVALID_OBSERVATION", "an observation must be a JSON object")
    message_id, metric = item.get("id"), item.get("metric")
    if not isinstance(message_id, str) or not message_id:
        raise PayloadError("INVALID_OBSERVATION", "id: a non-empty string is required")
    if not isinstance(metric, str):
        raise PayloadError("INVALID_OBSERVATION", "metric: a string is required")
    observation = observation_pb.Observation(message_id=message_id, metric=metric)
    try:
        _set_time(observation.time, item.get("time"), "time")
    except PayloadError as error:
        raise PayloadError("INVALID_OBSERVATION", error.description) from None
    for name in ("unit", "session"):
        if name in item:
            if not isinstance(item[name], str):
                raise PayloadError("INVALID_OBSERVATION", f"{name}: must be a string")
            setattr(observation, name, item[name])
    value, waveform = item.get("value"), item.get("waveform")
    if (value is None) == (waveform is None):
        raise PayloadError("INVALID_OBSERVATION", "exactly one of value and waveform is required")
    if isinstance(value, bool):
        observation.boolean_value = value
    elif _number(value):
        observation.numeric_value = float(value)  # type: ignore[arg-type]
    elif isinstance(value, str):
        observation.string_value = value
    elif value is not None:
        raise PayloadError("INVALID_OBSERVATION", "value: a number, a boolean or a string is required")
    else:
        observation.waveform.CopyFrom(_waveform(waveform))
    return observation


def _waveform(value: Any) -> observation_pb.Waveform:
    if not isinstance(value, dict):
        raise PayloadError("INVALID_OBSERVATION", "waveform: must be an object")
    rate, samples = value.get("sample_rate_hz"), value.get("samples")
    if not _number(rate) or not isinstance(samples, list) or not all(_number(s) for s in samples):
        raise PayloadError("INVALID_OBSERVATION", "waveform: sample_rate_hz and a list of numbers in samples")
    waveform = observation_pb.Waveform(sample_rate_hz=float(rate), samples=samples)  # type: ignore[arg-type]
    if "start_time" in value:
        try:
            _set_time(waveform.start_time, value["start_time"], "waveform.start_time")
        except PayloadError as error:
            raise PayloadError("INVALID_OBSERVATION", error.description) from None
    return waveform


def decode_observations(payload: bytes | bytearray) -> ObservationBatch:
    """One observation or `{"observations": [...]}`; items of the wrong shape are rejected alone."""
    document = _object(payload)
    items = document.get("observations", [document])  # a bare observation is a one-item batch
    if not isinstance(items, list) or not items:
        raise PayloadError("INVALID_MESSAGE", "observations: a non-empty list is required")
    if len(items) > MAX_OBSERVATIONS:
        raise PayloadError("INVALID_MESSAGE", f"observations: at most {MAX_OBSERVATIONS} per message")
    batch = ObservationBatch()
    for index, item in enumerate(items):
        try:
            batch.observations.append(_observation(item))
        except PayloadError as error:
            message_id = item.get("id") if isinstance(item, dict) else None
            name = message_id if isinstance(message_id, str) else f"#{index}"
            batch.rejected.append(Rejected(name, error.reason, error.description))
    return batch


_STATES = {
    "OK": device_pb.OperationalStatus.STATE_OK,
    "MINOR": device_pb.OperationalStatus.STATE_MINOR,
    "MAJOR": device_pb.OperationalStatus.STATE_MAJOR,
    "CRITICAL": device_pb.OperationalStatus.STATE_CRITICAL,
}


@dataclass(frozen=True)
class StatusReport:
    state: int  # device_pb.OperationalStatus.State
    message: str
    battery_percent: int | None
    firmware_version: str | None
    time: timestamp_pb2.Timestamp | None


def decode_status(payload: bytes | bytearray) -> StatusReport:
    document = _object(payload)
    state_name = document.get("state")
    if state_name is not None and state_name not in _STATES:
        raise PayloadError("INVALID_MESSAGE", f"state: one of {', '.join(_STATES)}")
    message = document.get("message", "")
    battery = document.get("battery_percent")
    firmware = document.get("firmware_version")
    if not isinstance(message, str) or (message and state_name is None):
        raise PayloadError("INVALID_MESSAGE", "message: a string, and only with a state")
    if battery is not None and (not isinstance(battery, int) or isinstance(battery, bool) or not 0 <= battery <= 100):
        raise PayloadError("INVALID_MESSAGE", "battery_percent: an integer from 0 to 100")
    if firmware is not None and not isinstance(firmware, str):
        raise PayloadError("INVALID_MESSAGE", "firmware_version: a string")
    time = None
    if "time" in document:
        time = timestamp_pb2.Timestamp()
        _set_time(time, document["time"], "time")
    state = _STATES[state_name] if state_name else device_pb.OperationalStatus.STATE_UNSPECIFIED
    return StatusReport(state, message, battery, firmware, time)


@dataclass(frozen=True)
class ConfigReport:
    version: int
    config: struct_pb2.Struct


def decode_reported_config(payload: bytes | bytearray) -> ConfigReport:
    document = _object(payload)
    version, config = document.get("version"), document.get("config")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise PayloadError("INVALID_MESSAGE", "version: a non-negative integer is required")
    if not isinstance(config, dict):
        raise PayloadError("INVALID_MESSAGE", "config: an object is required")
    reported = struct_pb2.Struct()
    reported.update(config)
    return ConfigReport(version, reported)


_COMMAND_STATES = {
    "IN_PROGRESS": command_pb.Command.STATE_IN_PROGRESS,
    "COMPLETED": command_pb.Command.STATE_COMPLETED,
    "FAILED": command_pb.Command.STATE_FAILED,
}


@dataclass(frozen=True)
class CommandReport:
    state: int  # command_pb.Command.State
    result: struct_pb2.Struct | None
    error_message: str


def decode_command_status(payload: bytes | bytearray) -> CommandReport:
    document = _object(payload)
    state = document.get("state")
    if state not in _COMMAND_STATES:
        raise PayloadError("INVALID_MESSAGE", f"state: one of {', '.join(_COMMAND_STATES)}")
    result, error_message = document.get("result"), document.get("error_message", "")
    if result is not None and not isinstance(result, dict):
        raise PayloadError("INVALID_MESSAGE", "result: an object")
    if not isinstance(error_message, str):
        raise PayloadError("INVALID_MESSAGE", "error_message: a string")
    struct = None
    if result is not None:
        struct = struct_pb2.Struct()
        struct.update(result)
    return CommandReport(_COMMAND_STATES[state], struct, error_message)


@dataclass(frozen=True)
class FileRequest:
    request_id: str
    action: str  # "create" or "complete"
    fields: dict[str, Any]


def decode_file_request(payload: bytes | bytearray) -> FileRequest:
    document = _object(payload)
    request_id, action = document.get("request_id"), document.get("action")
    if not isinstance(request_id, str) or not request_id:
        raise PayloadError("INVALID_MESSAGE", "request_id: a non-empty string is required")
    if action not in ("create", "complete"):
        raise PayloadError("INVALID_MESSAGE", "action: create or complete")
    return FileRequest(request_id, action, document)


# Cloud -> device.


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def error_payload(
    topic: str, reason: str, description: str, *, rejected: list[Rejected] | None = None, **extra: Any
) -> bytes:
    document: dict[str, Any] = {"topic": topic, "reason": reason, "description": description}
    if rejected:
        document["rejected"] = [item.as_json() for item in rejected]
    document.update(extra)
    return encode(document)


def _rfc3339(stamp: timestamp_pb2.Timestamp) -> str:
    return stamp.ToJsonString()


def desired_config_payload(version: int, config: struct_pb2.Struct) -> bytes:
    return encode({"version": version, "config": json_format.MessageToDict(config)})


def command_payload(action: str, command: command_pb.Command) -> bytes:
    command_id = command.name.rsplit("/", 1)[-1]
    document: dict[str, Any] = {"action": action, "id": command_id, "name": command.name}
    if action == "run":
        document["command"] = command.command_name
        document["parameters"] = json_format.MessageToDict(command.parameters)
        if command.HasField("expire_time"):
            document["expire_time"] = _rfc3339(command.expire_time)
        if command.HasField("timeout"):
            document["timeout_seconds"] = command.timeout.seconds + command.timeout.nanos / 1e9
    return encode(document)
