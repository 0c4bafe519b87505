"""The device protocol's topics and payloads (docs/device-protocol.md), as pure functions.

Nothing here does I/O: encoding checks what the platform would refuse anyway (ids, metrics,
sizes) so that a mistake surfaces at the call, not as an `errors` message later; decoding turns
cloud -> device JSON into typed values and raises `MalformedCloudMessage` for anything unreadable.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from medmesh_device.errors import CloudError, InvalidMessage, MalformedCloudMessage, Rejection

MAX_PAYLOAD_BYTES = 256 * 1024
MAX_BATCH = 500
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TAG = re.compile(r"^[A-Za-z0-9_-]{1,23}$")
OBSERVATION_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
METRIC = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
STATES = ("OK", "MINOR", "MAJOR", "CRITICAL")
COMMAND_OVER_REASONS = frozenset(
    {"COMMAND_TIMED_OUT", "COMMAND_CANCELED", "COMMAND_EXPIRED", "COMMAND_ALREADY_FINISHED", "COMMAND_NOT_FOUND"}
)

_BATCH_HEAD = b'{"observations":['
_BATCH_TAIL = b"]}"

JSONValue = Any  # what json.loads returns


def rfc3339(moment: datetime) -> str:
    """`2026-11-24T09:30:00.250Z`. Naive datetimes are refused: a device clock must say its zone."""
    if moment.tzinfo is None:
        raise InvalidMessage(f"time {moment.isoformat()} has no time zone")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))


@dataclass(frozen=True)
class Topics:
    """The topics of one device, all under `devices/{device}/`."""

    device_id: str

    @property
    def prefix(self) -> str:
        return f"devices/{self.device_id}/"

    @property
    def observations(self) -> str:
        return self.prefix + "observations"

    @property
    def status(self) -> str:
        return self.prefix + "status"

    @property
    def config_reported(self) -> str:
        return self.prefix + "config/reported"

    def command_status(self, command_id: str) -> str:
        return f"{self.prefix}commands/{command_id}/status"

    @property
    def file_requests(self) -> str:
        return self.prefix + "files/requests"

    @property
    def acks(self) -> str:
        return self.prefix + "acks"

    @property
    def errors(self) -> str:
        return self.prefix + "errors"

    @property
    def config_desired(self) -> str:
        return self.prefix + "config/desired"

    @property
    def commands(self) -> str:
        return self.prefix + "commands"

    @property
    def file_responses(self) -> str:
        return self.prefix + "files/responses"

    def cloud_to_device(self) -> list[str]:
        """Subscribed one by one rather than `#`, so a broker never echoes the device's own publishes."""
        return [self.acks, self.errors, self.config_desired, self.commands, self.file_responses]

    def command_of_status_topic(self, topic: str) -> str | None:
        """`devices/d/commands/c-1/status` -> `c-1`; None for any other topic."""
        head = self.prefix + "commands/"
        if topic.startswith(head) and topic.endswith("/status"):
            command_id = topic[len(head) : -len("/status")]
            return command_id if command_id and "/" not in command_id else None
        return None


def client_id(device_id: str, tag: str | None = None) -> str:
    """The MQTT client id: the device id, or `{device}:{tag}` for an auxiliary connection."""
    if not DEVICE_ID.match(device_id):
        raise InvalidMessage(f"device id {device_id!r} must match {DEVICE_ID.pattern}")
    if tag is None:
        return device_id
    if not TAG.match(tag):
        raise InvalidMessage(f"connection tag {tag!r} must match {TAG.pattern}")
    return f"{device_id}:{tag}"


# --- device -> cloud ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Waveform:
    """Samples taken at a fixed rate from `start_time` (the observation's time when None)."""

    sample_rate_hz: float
    samples: Sequence[float]
    start_time: datetime | None = None


ObservationValue = float | int | bool | str


@dataclass(frozen=True)
class Observation:
    """One measurement: a `value` (number, boolean or string) or a `waveform`.

    `time` defaults to when it is queued, `id` to one the client generates; give an id of your
    own when you keep observations across restarts, so a resend after a reboot is stored once.
    """

    metric: str
    value: ObservationValue | None = None
    waveform: Waveform | None = None
    time: datetime | None = None
    unit: str | None = None
    session: str | None = None
    id: str | None = None


def _finite(number: float, what: str) -> float:
    if isinstance(number, bool) or not isinstance(number, int | float):
        raise InvalidMessage(f"{what} must be a number, not {type(number).__name__}")
    if not math.isfinite(number):
        raise InvalidMessage(f"{what} must be finite, not {number}")
    return number


def encode_observation(observation: Observation, observation_id: str, now: datetime) -> bytes:
    """One observation's JSON (compact UTF-8), after checking what the platform would refuse."""
    if not OBSERVATION_ID.match(observation_id):
        raise InvalidMessage(f"observation id {observation_id!r}: 1-128 printable ASCII characters, no spaces")
    if not METRIC.match(observation.metric):
        raise InvalidMessage(f"metric {observation.metric!r} must match {METRIC.pattern}")
    moment = observation.time or now
    item: dict[str, JSONValue] = {"id": observation_id, "metric": observation.metric, "time": rfc3339(moment)}
    if (observation.value is None) == (observation.waveform is None):
        raise InvalidMessage(f"observation {observation_id}: give exactly one of value and waveform")
    if observation.value is not None:
        value = observation.value
        if not isinstance(value, bool | str):
            value = _finite(value, f"observation {observation_id} value")
        item["value"] = value
    else:
        assert observation.waveform is not None
        wave = observation.waveform
        if _finite(wave.sample_rate_hz, "sample_rate_hz") <= 0:
            raise InvalidMessage(f"observation {observation_id}: sample_rate_hz must be positive")
        item["waveform"] = {
            "sample_rate_hz": wave.sample_rate_hz,
            "start_time": rfc3339(wave.start_time or moment),
            "samples": [_finite(s, f"observation {observation_id} sample") for s in wave.samples],
        }
    if observation.unit is not None:
        item["unit"] = observation.unit
    if observation.session is not None:
        item["session"] = observation.session
    encoded = json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()
    if len(encoded) + len(_BATCH_HEAD) + len(_BATCH_TAIL) > MAX_PAYLOAD_BYTES:
        raise InvalidMessage(f"observation {observation_id} is {len(encoded)} bytes; a message holds at most 256 KiB")
    return encoded


def batch_payload(items: Sequence[bytes]) -> bytes:
    """`{"observations": [...]}` from already encoded observations."""
    return _BATCH_HEAD + b",".join(items) + _BATCH_TAIL


def batch_fits(count: int, size: int, item: bytes) -> bool:
    """Whether `item` may join a batch of `count` items totalling `size` encoded bytes."""
    framing = len(_BATCH_HEAD) + len(_BATCH_TAIL) + count  # one comma per item already in
    return count < MAX_BATCH and framing + size + len(item) <= MAX_PAYLOAD_BYTES


def encode_status(
    time: datetime,
    state: str | None = None,
    message: str | None = None,
    battery_percent: int | None = None,
    firmware_version: str | None = None,
) -> dict[str, JSONValue]:
    """A partial status: only the fields given."""
    status: dict[str, JSONValue] = {"time": rfc3339(time)}
    if state is not None:
        if state not in STATES:
            raise InvalidMessage(f"state {state!r} must be one of {', '.join(STATES)}")
        status["state"] = state
    if message is not None:
        if state is None:
            raise InvalidMessage("a status message goes with a state")
        status["message"] = message
    if battery_percent is not None:
        if isinstance(battery_percent, bool) or not isinstance(battery_percent, int) or not 0 <= battery_percent <= 100:
            raise InvalidMessage(f"battery_percent {battery_percent!r} must be an integer within 0-100")
        status["battery_percent"] = battery_percent
    if firmware_version is not None:
        status["firmware_version"] = firmware_version
    return status


def merge_status(older: Mapping[str, JSONValue], newer: Mapping[str, JSONValue]) -> dict[str, JSONValue]:
    """Two partial statuses as one: newer fields win; a new state without a message clears the old message."""
    merged = {**older, **newer}
    if "state" in newer and "message" not in newer:
        merged.pop("message", None)
    return merged


def encode_reported_config(version: int, config: Mapping[str, JSONValue]) -> dict[str, JSONValue]:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise InvalidMessage(f"configuration version {version!r} must be an integer >= 0")
    return {"version": version, "config": dict(config)}


CommandState = Literal["IN_PROGRESS", "COMPLETED", "FAILED"]


def encode_command_status(
    state: CommandState, result: Mapping[str, JSONValue] | None = None, error_message: str | None = None
) -> dict[str, JSONValue]:
    report: dict[str, JSONValue] = {"state": state}
    if result is not None:
        report["result"] = dict(result)
    if error_message is not None:
        report["error_message"] = error_message
    return report


def encode_file_create(
    request_id: str,
    content_type: str,
    size_bytes: int,
    sha256: str,
    display_name: str | None = None,
    session: str | None = None,
) -> dict[str, JSONValue]:
    if not REQUEST_ID.match(request_id):
        raise InvalidMessage(f"request id {request_id!r} must match {REQUEST_ID.pattern}")
    request: dict[str, JSONValue] = {
        "request_id": request_id,
        "action": "create",
        "content_type": content_type,
        "size_bytes": size_bytes,
        "sha256": sha256,
    }
    if display_name is not None:
        request["display_name"] = display_name
    if session is not None:
        request["session"] = session
    return request


def encode_file_complete(request_id: str, file: str, parts: Sequence[tuple[int, str]] = ()) -> dict[str, JSONValue]:
    if not REQUEST_ID.match(request_id):
        raise InvalidMessage(f"request id {request_id!r} must match {REQUEST_ID.pattern}")
    request: dict[str, JSONValue] = {"request_id": request_id, "action": "complete", "file": file}
    if parts:
        request["parts"] = [{"part_number": number, "etag": etag} for number, etag in parts]
    return request


def dumps(payload: Mapping[str, JSONValue]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


# --- cloud -> device ---------------------------------------------------------------------------


def _object(topic: str, payload: bytes) -> dict[str, JSONValue]:
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MalformedCloudMessage(topic, f"not JSON: {error}") from error
    if not isinstance(data, dict):
        raise MalformedCloudMessage(topic, "not a JSON object")
    return data


def _strings(topic: str, data: Mapping[str, JSONValue], key: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MalformedCloudMessage(topic, f"{key} must be a list of strings")
    return tuple(value)


def _text(topic: str, data: Mapping[str, JSONValue], key: str, required: bool = False) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise MalformedCloudMessage(topic, f"{key} must be a {'non-empty ' if required else ''}string")
    return value


def _number(topic: str, data: Mapping[str, JSONValue], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedCloudMessage(topic, f"{key} must be a number")
    return float(value)


@dataclass(frozen=True)
class Acks:
    """Observation ids durably stored (`stored`) or stored by an earlier send (`duplicates`)."""

    stored: tuple[str, ...]
    duplicates: tuple[str, ...]


def parse_acks(topic: str, payload: bytes) -> Acks:
    data = _object(topic, payload)
    return Acks(_strings(topic, data, "stored"), _strings(topic, data, "duplicates"))


def parse_error(topic: str, payload: bytes) -> CloudError:
    data = _object(topic, payload)
    rejected = data.get("rejected", [])
    if not isinstance(rejected, list):
        raise MalformedCloudMessage(topic, "rejected must be a list")
    rejections = []
    for item in rejected:
        if not isinstance(item, dict):
            raise MalformedCloudMessage(topic, "each rejected entry must be an object")
        rejection_id = _text(topic, item, "id", required=True)
        rejections.append(Rejection(rejection_id, _text(topic, item, "reason"), _text(topic, item, "description")))
    return CloudError(
        topic=_text(topic, data, "topic"),
        reason=_text(topic, data, "reason", required=True),
        description=_text(topic, data, "description"),
        rejected=tuple(rejections),
        retry_after_seconds=_number(topic, data, "retry_after_seconds"),
        message_ids=_strings(topic, data, "message_ids") if "message_ids" in data else None,
    )


@dataclass(frozen=True)
class DesiredConfig:
    version: int
    config: dict[str, JSONValue]


def parse_desired_config(topic: str, payload: bytes) -> DesiredConfig:
    data = _object(topic, payload)
    version, config = data.get("version"), data.get("config", {})
    if isinstance(version, bool) or not isinstance(version, int):
        raise MalformedCloudMessage(topic, "version must be an integer")
    if not isinstance(config, dict):
        raise MalformedCloudMessage(topic, "config must be an object")
    return DesiredConfig(version, config)


CommandAction = Literal["run", "stop", "cancel"]


@dataclass(frozen=True)
class Command:
    """A command to run (`action` run), or to stop or drop (`stop`, `cancel`).

    `id` is the command id, `name` its resource name (`devices/d-1/commands/c-5e1`), `command`
    what to do (`measure.blood_pressure`), `parameters` its arguments; report within
    `timeout_seconds` or the platform marks it TIMED_OUT.
    """

    action: CommandAction
    id: str
    name: str = ""
    command: str = ""
    parameters: dict[str, JSONValue] = field(default_factory=dict)
    expire_time: datetime | None = None
    timeout_seconds: float | None = None


def parse_command(topic: str, payload: bytes) -> Command:
    data = _object(topic, payload)
    action = data.get("action")
    if action not in ("run", "stop", "cancel"):
        raise MalformedCloudMessage(topic, f"unknown command action {action!r}")
    command_id = _text(topic, data, "id", required=True)
    if "/" in command_id or "+" in command_id or "#" in command_id:
        raise MalformedCloudMessage(topic, f"command id {command_id!r} cannot be used in a topic")
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise MalformedCloudMessage(topic, "parameters must be an object")
    expire_text = _text(topic, data, "expire_time")
    try:
        expire_time = parse_time(expire_text) if expire_text else None
    except ValueError as error:
        raise MalformedCloudMessage(topic, f"expire_time: {error}") from error
    return Command(
        action=action,
        id=command_id,
        name=_text(topic, data, "name"),
        command=_text(topic, data, "command"),
        parameters=parameters,
        expire_time=expire_time,
        timeout_seconds=_number(topic, data, "timeout_seconds"),
    )


@dataclass(frozen=True)
class UploadPart:
    part_number: int
    url: str


@dataclass(frozen=True)
class FileResponse:
    """An answer on `files/responses`: upload URLs, a state, or an error."""

    request_id: str
    file: str = ""
    single_url: str = ""
    parts: tuple[UploadPart, ...] = ()
    part_size: int = 0
    state: str = ""
    error_reason: str = ""
    error_description: str = ""


def parse_file_response(topic: str, payload: bytes) -> FileResponse:
    data = _object(topic, payload)
    request_id = _text(topic, data, "request_id", required=True)
    error = data.get("error")
    if error is not None:
        if not isinstance(error, dict):
            raise MalformedCloudMessage(topic, "error must be an object")
        return FileResponse(
            request_id,
            file=_text(topic, data, "file"),
            error_reason=_text(topic, error, "reason") or "UNKNOWN",
            error_description=_text(topic, error, "description"),
        )
    upload = data.get("upload") or {}
    if not isinstance(upload, dict):
        raise MalformedCloudMessage(topic, "upload must be an object")
    parts = []
    for part in upload.get("parts") or []:
        if not isinstance(part, dict) or not isinstance(part.get("part_number"), int):
            raise MalformedCloudMessage(topic, "each upload part needs a part_number and url")
        parts.append(UploadPart(part["part_number"], _text(topic, part, "url", required=True)))
    part_size = upload.get("part_size") or 0
    if isinstance(part_size, str) and part_size.isdigit():
        part_size = int(part_size)  # proto3 JSON writes 64-bit integers as strings
    if isinstance(part_size, bool) or not isinstance(part_size, int | float):
        raise MalformedCloudMessage(topic, "part_size must be a number")
    return FileResponse(
        request_id,
        file=_text(topic, data, "file"),
        single_url=_text(topic, upload, "single_url"),
        parts=tuple(sorted(parts, key=lambda p: p.part_number)),
        part_size=int(part_size),
        state=_text(topic, data, "state"),
    )
