"""The configuration twin of a device (`devices/{device}/config`): what the platform wants the
device to run (`desired`, versioned) and what the device says it runs (`reported`). No I/O.

Versions: every change of `desired` makes a new version, one more than the current one. Each
version is stored as its own record whose key includes the version, so of two concurrent
changes exactly one can create version n+1 (an insert of an existing key fails atomically,
where a conditional update would not: FerretDB does not apply those atomically). The current
desired configuration is the highest version.

A device reports the version it applied. A report of a version the platform never issued
(greater than the desired version) is refused: accepting it could later claim "in sync" for a
different configuration that happens to get that version number.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from medmesh.runtime.errors import FieldViolation, InvalidArgument
from medmesh.runtime.resources import etag_of

COLLECTION = "config"
# Compact JSON, the form a device receives it in over MQTT.
MAX_CONFIG_BYTES = 64 * 1024
# Desired versions kept per device besides the current one (history for operators; the
# current one is all the platform needs).
KEPT_VERSIONS = 10

JsonObject = dict[str, Any]


@dataclass(frozen=True)
class DesiredConfig:
    """One version of a device's desired configuration."""

    device_key: str  # `Device.state_key`
    version: int  # 1, 2, ...
    values: JsonObject
    update_time: datetime


@dataclass(frozen=True)
class ReportedConfig:
    """What the device last said it runs, and which desired version that is."""

    device_key: str
    version: int  # 0: a configuration the platform did not set
    values: JsonObject
    update_time: datetime


@dataclass(frozen=True)
class DeviceConfig:
    """The twin as callers see it."""

    device: str  # `devices/{serial}`
    desired: DesiredConfig | None  # None: nothing desired yet (version 0)
    reported: ReportedConfig | None  # None: the device has not reported

    @property
    def name(self) -> str:
        return f"{self.device}/{COLLECTION}"

    @property
    def desired_version(self) -> int:
        return self.desired.version if self.desired else 0

    @property
    def reported_version(self) -> int:
        return self.reported.version if self.reported else 0

    @property
    def in_sync(self) -> bool:
        return self.reported_version == self.desired_version

    @property
    def etag(self) -> str:
        # Covers `desired` only: a report from the device does not make a caller's etag stale.
        return config_etag(self.device, self.desired_version)

    @property
    def pending(self) -> DesiredConfig | None:
        """The desired configuration when the device is behind it, else None."""
        if self.desired is not None and self.reported_version < self.desired.version:
            return self.desired
        return None


class ConfigStore(Protocol):
    """Where twins are kept; the repository and the unit tests' fake provide it."""

    async def current_desired(self, device_key: str) -> DesiredConfig | None:
        """The highest desired version, or None if there is none."""

    async def insert_desired(self, config: DesiredConfig) -> None:
        """Adds a version; AlreadyExists (atomically) if that version of the device exists."""

    async def reported(self, device_key: str) -> ReportedConfig | None: ...

    async def put_reported(self, config: ReportedConfig) -> None:
        """Replaces what the device reported (last report wins)."""

    async def delete_all(self, device_key: str) -> None: ...


class DesiredConfigNotifier(Protocol):
    """Tells a connected device at once that its desired configuration changed (through the MQTT
    adapter that holds its connection). Best effort and quick: the caller does not wait for the
    device, and a device that was not told gets the configuration when it next connects."""

    async def desired_config_changed(self, device: str) -> None: ...


def config_etag(device: str, desired_version: int) -> str:
    return etag_of(f"{device}/{COLLECTION}", desired_version)


def encoded_size(values: Mapping[str, Any], field: str) -> int:
    """Bytes of `values` as compact JSON; INVALID_ARGUMENT for numbers JSON cannot carry."""
    try:
        text = json.dumps(values, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as error:
        raise InvalidArgument.for_field(field, "numbers must be finite (no NaN or Infinity)") from error
    return len(text.encode())


def require_config(values: Mapping[str, Any], field: str) -> JsonObject:
    size = encoded_size(values, field)
    if size > MAX_CONFIG_BYTES:
        raise InvalidArgument.for_field(
            field,
            f"is {size} bytes as JSON; at most {MAX_CONFIG_BYTES}",
            reason="CONFIG_TOO_LARGE",
        )
    normalized: JsonObject = _normalized(dict(values))
    return normalized


def _normalized(value: Any) -> Any:
    """google.protobuf.Struct numbers are doubles: 5.0 and 5 are one value, kept as 5."""
    if isinstance(value, dict):
        return {key: _normalized(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_normalized(item) for item in value]
    if isinstance(value, float) and value.is_integer() and math.isfinite(value) and abs(value) < 2**53:
        return int(value)
    return value


def resolve_desired_mask(paths: Sequence[str]) -> set[str] | None:
    """None: replace all of `desired`; otherwise the top-level keys named as `desired.<key>`."""
    if not paths or list(paths) == ["*"] or list(paths) == ["desired"]:
        return None
    keys: set[str] = set()
    for path in paths:
        key = path.removeprefix("desired.")
        if not path.startswith("desired.") or not key:
            raise InvalidArgument.for_field(
                "update_mask",
                f"cannot update {path}; updatable: desired, desired.<key>",
                reason="FIELD_NOT_UPDATABLE",
            )
        keys.add(key)
    return keys


def merged_desired(current: Mapping[str, Any], given: Mapping[str, Any], keys: set[str] | None) -> JsonObject:
    """The new desired configuration: `given` whole, or `current` with the masked top-level keys
    taken from `given` (a masked key absent from `given` is removed)."""
    if keys is None:
        return dict(given)
    merged = dict(current)
    for key in keys:
        if key in given:
            merged[key] = given[key]
        else:
            merged.pop(key, None)
    return merged


def require_reported_version(version: int, desired_version: int) -> int:
    if version < 0:
        raise InvalidArgument.for_field("reported_version", "must not be negative")
    if version > desired_version:
        raise InvalidArgument(
            f"reported_version {version} is ahead of the desired version {desired_version}: "
            "the platform never issued it",
            reason="REPORTED_VERSION_AHEAD",
            metadata={"reported_version": str(version), "desired_version": str(desired_version)},
            field_violations=[FieldViolation("reported_version", f"at most {desired_version}")],
        )
    return version
