"""The status of a device (`devices/{device}/status`): its connection, as the MQTT adapters
report it, and what the device itself reports (operational state, battery, firmware). No I/O.

Connections: each connection a device opens is a session of its own. The device is connected
when its newest session (by connect time) is open. So a disconnect that an adapter reports
late, for a connection the device has already replaced (on the same or another adapter
instance), never marks the device offline. Adapters give each connection a session id; without
one, the adapter instance stands for the session, which cannot tell a late disconnect of an
earlier connection to the same instance from the current one.

What the reports add up to is one `ConnectionState` per device: the newest session, and the
sessions whose close was reported while they were not the newest (superseded, or their connect
report has not arrived yet: a connect reported after its own disconnect stays closed). Stores
keep it as one record read and written by the device's key, each change applied to the state
it was computed from (`StatusStore.change_connections`), so concurrent reports cannot undo
each other.

Device reports are kept in independent parts (operational state, battery, firmware, last
seen), each written whole: two reports arriving together cannot undo each other's fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Protocol

from medmesh.runtime.errors import InvalidArgument

COLLECTION = "status"
MAX_MESSAGE_LENGTH = 1000
# Times from an adapter's clock later than this server's are taken as now: a wrong clock must
# not pin "last seen" in the future.
CLOCK_TOLERANCE = timedelta(seconds=5)
# Connect time of a session known only from its disconnect, in records of the layout before
# `ConnectionState`: never the newest.
NEVER_CONNECTED = datetime(1970, 1, 1, tzinfo=UTC)
# Closes of sessions that were not the newest are kept until the next connect report, as the
# per-session records of the layout before were; the latest ones if more come in between.
MAX_EARLY_CLOSES = 8


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

    @property
    def order(self) -> tuple[datetime, str]:
        """Newer sessions sort later: by connect time, ties by session id."""
        return (self.connect_time, self.session_id)


@dataclass(frozen=True)
class EarlyClose:
    """A reported close of a session that was not the device's newest when it came."""

    session_id: str
    disconnect_time: datetime


@dataclass(frozen=True)
class ConnectionState:
    """What a device's connection reports add up to (see the module docstring)."""

    newest: Session | None = None  # None if the device never connected
    early_closes: tuple[EarlyClose, ...] = ()  # oldest first, at most MAX_EARLY_CLOSES

    def after_connect(self, session: Session) -> ConnectionState | None:
        """The state after a connect report; None when it changes nothing.

        A session reported before stays as it is. One whose close came first is closed at that
        time. One older than the newest is not the device's connection any more. Every connect
        report forgets the other early closes.
        """
        if session.connect_time <= NEVER_CONNECTED:
            return None
        if self.newest is not None and self.newest.session_id == session.session_id:
            return ConnectionState(self.newest) if self.early_closes else None
        closed = next((c for c in self.early_closes if c.session_id == session.session_id), None)
        if closed is not None:
            session = replace(session, disconnect_time=closed.disconnect_time)
        if self.newest is not None and session.order <= self.newest.order:
            return ConnectionState(self.newest) if self.early_closes else None
        return ConnectionState(session)

    def after_disconnect(self, session_id: str, at: datetime) -> ConnectionState | None:
        """The state after a disconnect report; None when it changes nothing. It closes the
        newest session only if that is the one it names; a repeated close keeps the first time."""
        if self.newest is not None and self.newest.session_id == session_id:
            if not self.newest.open:
                return None
            return replace(self, newest=replace(self.newest, disconnect_time=at))
        if any(c.session_id == session_id for c in self.early_closes):
            return None
        kept = (*self.early_closes, EarlyClose(session_id, at))[-MAX_EARLY_CLOSES:]
        return replace(self, early_closes=kept)


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
    """Where connection states and reported status are kept; the repository and the unit tests' fake provide it."""

    async def connections(self, device_key: str) -> ConnectionState:
        """The device's connection state (empty if it never reported a connection)."""

    async def change_connections(
        self, device_key: str, change: Callable[[ConnectionState], ConnectionState | None]
    ) -> ConnectionState:
        """Applies `change` (None: nothing to change) to the stored state, atomically: when
        another change came in between, `change` is applied again to the state that change
        left. `change` must be pure. Returns the state now stored."""

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
