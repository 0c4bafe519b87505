"""The status of a device (`devices/{device}/status`): its connection, as the MQTT adapters
report it, and what the device itself reports (operational state, battery, firmware). No I/O.

Connections: each connection a device opens is a session of its own, recorded once when it
opens and marked when it closes. The device is connected when its newest session (by connect
time) is open. So a disconnect that an adapter reports late, for a connection the device has
already replaced (on the same or another adapter instance), closes only that old session and
never marks the device offline. Adapters give each connection a session id; without one, the
adapter instance stands for the session, which cannot tell a late disconnect of an earlier
connection to the same instance from the current one.

Device reports are kept in independent parts (operational state, battery, firmware, last
seen), each written whole: two reports arriving together cannot undo each other's fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Protocol

from medmesh.runtime.errors import InvalidArgument

COLLECTION = "status"
MAX_MESSAGE_LENGTH = 1000
# Times from an adapter's clock later than this server's are taken as now: a wrong clock must
# not pin "last seen" in the future.
CLOCK_TOLERANCE = timedelta(seconds=5)
# Connect time of a session known only from its disconnect (reported before its connect, or
# after the session was forgotten): older than any real one, so it is never the newest, and it
# keeps a connect report that arrives after it from reopening that session.
NEVER_CONNECTED = datetime(1970, 1, 1, tzinfo=UTC)


class OperationalState(StrEnum):
    OK = "OK"
    MINOR = "MINOR"
    MAJOR = "MAJOR"
    CRITICAL = "CRITICAL"


@dataclass(frozen=True)
class Session:
    """One connection of a device to an adapter instance."""

    device_key: str  # `Device.state_key`
    session_id: str  # from the adapter; the adapter instance when it sent none
    adapter_instance: str
    remote_address: str
    connect_time: datetime
    disconnect_time: datetime | None = None
    # Where the adapter instance's internal gRPC API listens (`host:port`): how services push to
    # the device while this session is open. Empty when the adapter did not say.
    adapter_address: str = ""

    @property
    def open(self) -> bool:
        return self.disconnect_time is None


@dataclass(frozen=True)
class Operational:
    state: OperationalState
    message: str
    update_time: datetime


@dataclass(frozen=True)
class Battery:
    percent: int
    update_time: datetime


@dataclass(frozen=True)
class Firmware:
    version: str
    update_time: datetime


@dataclass(frozen=True)
class StatusParts:
    """What the device reported, each part as last written."""

    operational: Operational | None = None
    battery: Battery | None = None
    firmware: Firmware | None = None
    last_seen_time: datetime | None = None


@dataclass(frozen=True)
class StatusReport:
    """A partial status from the device: None for what it did not send."""

    state: OperationalState | None = None
    message: str = ""
    battery_percent: int | None = None
    firmware_version: str | None = None

    def validated(self) -> StatusReport:
        if self.state is None and self.message:
            raise InvalidArgument.for_field("message", "goes with a state; send the state too")
        if len(self.message) > MAX_MESSAGE_LENGTH:
            raise InvalidArgument.for_field("message", f"at most {MAX_MESSAGE_LENGTH} characters")
        if self.battery_percent is not None and not 0 <= self.battery_percent <= 100:
            raise InvalidArgument.for_field("battery_percent", "must be 0 to 100")
        if self.firmware_version is not None and len(self.firmware_version) > 64:
            raise InvalidArgument.for_field("firmware_version", "at most 64 characters")
        return self

    @property
    def is_empty(self) -> bool:
        return self.state is None and self.battery_percent is None and self.firmware_version is None


@dataclass(frozen=True)
class DeviceStatus:
    """The status as callers see it."""

    device: str  # `devices/{serial}`
    session: Session | None  # the newest session; None if the device never connected
    parts: StatusParts

    @property
    def name(self) -> str:
        return f"{self.device}/{COLLECTION}"

    @property
    def connected(self) -> bool:
        return self.session is not None and self.session.open


@dataclass(frozen=True)
class DeviceConnection:
    """A device's newest connection as the mesh sees it (`GetDeviceConnection`)."""

    device: str  # `devices/{serial}`
    session: Session | None  # None if the device never connected

    @property
    def connected(self) -> bool:
        return self.session is not None and self.session.open


class StatusStore(Protocol):
    """Where sessions and reported status are kept; the repository and the unit tests' fake provide it."""

    async def newest_session(self, device_key: str) -> Session | None:
        """The session with the latest connect time (ties: the greatest session id); sessions
        known only from their disconnect (`NEVER_CONNECTED`) do not count."""

    async def open_session(self, session: Session) -> None:
        """Records a session unless one with its id exists, and forgets the device's sessions that
        connected before it. An existing session stays as it is, except that a placeholder
        (`NEVER_CONNECTED`, closed) gets the connect details (adapter instance and address, remote
        address, connect time) and stays closed."""

    async def close_session(self, device_key: str, session_id: str, at: datetime) -> bool:
        """Marks that one session closed; False if there is no such session."""

    async def parts(self, device_key: str) -> StatusParts: ...

    async def put_operational(self, device_key: str, operational: Operational) -> None: ...

    async def put_battery(self, device_key: str, battery: Battery) -> None: ...

    async def put_firmware(self, device_key: str, firmware: Firmware) -> None: ...

    async def touch(self, device_key: str, at: datetime) -> None:
        """Last seen = the later of the stored time and `at`."""

    async def delete_all(self, device_key: str) -> None: ...


def event_time(given: datetime | None, server_now: datetime) -> datetime:
    """When a reported event happened: as the adapter says, never later than now (plus tolerance)."""
    if given is None or given > server_now + CLOCK_TOLERANCE:
        return server_now
    # Milliseconds, what BSON dates keep: a stored time equals the one reported.
    return given.replace(microsecond=given.microsecond // 1000 * 1000)


def session_key(session_id: str, adapter_instance: str) -> str:
    if not session_id and not adapter_instance:
        raise InvalidArgument.for_field("adapter_instance", "is required (and a session_id is recommended)")
    return session_id or adapter_instance
