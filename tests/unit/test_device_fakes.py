"""In-memory fakes of the device service's twin, status and patient ports, and tests that they keep
the contracts the repositories keep (a fake that is kinder than the database would hide bugs)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta

import pytest

from medmesh.runtime.errors import AlreadyExists, Unavailable
from services.device.status import (
    Battery,
    ConnectionState,
    Firmware,
    Operational,
    OperationalState,
    Session,
    StatusParts,
)
from services.device.twin import KEPT_VERSIONS, DesiredConfig, ReportedConfig


class InMemoryConfigStore:
    """Like ConfigRepository: one record per (device, version), inserting a taken version fails.

    `before_insert` runs between a writer's read and its insert, where another writer may come
    in; `yield_between` makes every call an await point, so concurrent tasks interleave.
    """

    def __init__(self) -> None:
        self.desired: dict[tuple[str, int], DesiredConfig] = {}
        self.reported_configs: dict[str, ReportedConfig] = {}
        self.before_insert: Callable[[DesiredConfig], Awaitable[None]] | None = None
        self.yield_between = False

    async def _pause(self) -> None:
        if self.yield_between:
            await asyncio.sleep(0)

    async def current_desired(self, device_key: str) -> DesiredConfig | None:
        await self._pause()
        versions = [config for (key, _), config in self.desired.items() if key == device_key]
        return max(versions, key=lambda config: config.version, default=None)

    async def insert_desired(self, config: DesiredConfig) -> None:
        if self.before_insert is not None:
            await self.before_insert(config)
        await self._pause()
        if (config.device_key, config.version) in self.desired:
            raise AlreadyExists("version exists", reason="CONFIG_VERSION_EXISTS")
        self.desired[(config.device_key, config.version)] = config
        for key, version in list(self.desired):
            if key == config.device_key and version < config.version - KEPT_VERSIONS:
                del self.desired[(key, version)]

    async def reported(self, device_key: str) -> ReportedConfig | None:
        return self.reported_configs.get(device_key)

    async def put_reported(self, config: ReportedConfig) -> None:
        self.reported_configs[config.device_key] = config

    async def delete_all(self, device_key: str) -> None:
        self.desired = {k: v for k, v in self.desired.items() if k[0] != device_key}
        self.reported_configs.pop(device_key, None)

    def versions(self, device_key: str) -> list[int]:
        return sorted(version for key, version in self.desired if key == device_key)


class InMemoryStatusStore:
    """Like StatusRepository: one connection state per device, changed atomically; parts whole.

    `before_write` runs between a change's read and its write, where another change may come
    in; the change is then applied again to what that one left, as the repository's claims make
    it happen.
    """

    def __init__(self) -> None:
        self.states: dict[str, ConnectionState] = {}
        self.operational: dict[str, Operational] = {}
        self.battery: dict[str, Battery] = {}
        self.firmware: dict[str, Firmware] = {}
        self.last_seen: dict[str, datetime] = {}
        self.before_write: Callable[[str], Awaitable[None]] | None = None

    async def connections(self, device_key: str) -> ConnectionState:
        return self.states.get(device_key, ConnectionState())

    async def change_connections(
        self, device_key: str, change: Callable[[ConnectionState], ConnectionState | None]
    ) -> ConnectionState:
        while True:
            read = self.states.get(device_key)
            changed = change(read or ConnectionState())
            if changed is None:
                return read or ConnectionState()
            if self.before_write is not None:
                await self.before_write(device_key)
            if self.states.get(device_key) is read:
                self.states[device_key] = changed
                return changed

    async def parts(self, device_key: str) -> StatusParts:
        return StatusParts(
            operational=self.operational.get(device_key),
            battery=self.battery.get(device_key),
            firmware=self.firmware.get(device_key),
            last_seen_time=self.last_seen.get(device_key),
        )

    async def put_operational(self, device_key: str, operational: Operational) -> None:
        self.operational[device_key] = operational

    async def put_battery(self, device_key: str, battery: Battery) -> None:
        self.battery[device_key] = battery

    async def put_firmware(self, device_key: str, firmware: Firmware) -> None:
        self.firmware[device_key] = firmware

    async def touch(self, device_key: str, at: datetime) -> None:
        self.last_seen[device_key] = max(at, self.last_seen.get(device_key, at))

    async def delete_all(self, device_key: str) -> None:
        self.states.pop(device_key, None)
        self.operational.pop(device_key, None)
        self.battery.pop(device_key, None)
        self.firmware.pop(device_key, None)
        self.last_seen.pop(device_key, None)


class FakePatientDirectory:
    """The patient service as the device service sees it: the names the caller may see."""

    def __init__(self, existing: Iterable[str] = (), *, unavailable: bool = False) -> None:
        self.existing = set(existing)
        self.unavailable = unavailable
        self.asked: list[str] = []

    async def exists(self, patient: str) -> bool:
        self.asked.append(patient)
        if self.unavailable:
            raise Unavailable(f"cannot check patient {patient!r}: UNAVAILABLE", reason="PATIENT_SERVICE_UNAVAILABLE")
        return patient in self.existing


# --- the fakes keep the contracts -----------------------------------------------------------------

T0 = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)


def desired(version: int, key: str = "k") -> DesiredConfig:
    return DesiredConfig(key, version, {"v": version}, T0)


async def test_config_fake_refuses_a_taken_version_and_keeps_the_highest_current() -> None:
    store = InMemoryConfigStore()
    await store.insert_desired(desired(1))
    await store.insert_desired(desired(2))

    with pytest.raises(AlreadyExists):
        await store.insert_desired(desired(2))

    current = await store.current_desired("k")
    assert current is not None
    assert current.version == 2
    assert await store.current_desired("other") is None


async def test_config_fake_prunes_only_old_versions() -> None:
    store = InMemoryConfigStore()
    for version in range(1, KEPT_VERSIONS + 5):
        await store.insert_desired(desired(version))

    assert store.versions("k") == list(range(4, KEPT_VERSIONS + 5))


def session(session_id: str, minutes: int, adapter: str = "adapter-1") -> Session:
    return Session("k", session_id, adapter, "198.51.100.7", T0 + timedelta(minutes=minutes))


async def test_status_fake_applies_changes_and_skips_none() -> None:
    store = InMemoryStatusStore()

    stored = await store.change_connections("k", lambda state: state.after_connect(session("s1", 0)))
    unchanged = await store.change_connections("k", lambda state: None)

    assert stored == unchanged == await store.connections("k") == ConnectionState(session("s1", 0))
    assert await store.connections("other") == ConnectionState()


async def test_status_fake_applies_a_change_again_after_one_that_came_in_between() -> None:
    store = InMemoryStatusStore()
    seen: list[ConnectionState] = []

    async def another_change_comes_in(key: str) -> None:
        store.before_write = None
        await store.change_connections(key, lambda state: state.after_connect(session("s2", 5)))

    def late_disconnect(state: ConnectionState) -> ConnectionState | None:
        seen.append(state)
        return state.after_disconnect("s1", T0 + timedelta(minutes=6))

    await store.change_connections("k", lambda state: state.after_connect(session("s1", 0)))
    store.before_write = another_change_comes_in
    await store.change_connections("k", late_disconnect)

    assert [state.newest.session_id if state.newest else None for state in seen] == ["s1", "s2"]
    newest = (await store.connections("k")).newest
    assert newest is not None
    assert (newest.session_id, newest.open) == ("s2", True)


async def test_status_fake_keeps_the_later_touch() -> None:
    store = InMemoryStatusStore()
    await store.touch("k", T0 + timedelta(seconds=10))
    await store.touch("k", T0)

    assert (await store.parts("k")).last_seen_time == T0 + timedelta(seconds=10)


async def test_status_fake_parts_are_independent() -> None:
    store = InMemoryStatusStore()
    await store.put_operational("k", Operational(OperationalState.MAJOR, "occlusion", T0))
    await store.put_battery("k", Battery(40, T0))

    parts = await store.parts("k")
    assert parts.operational == Operational(OperationalState.MAJOR, "occlusion", T0)
    assert parts.battery == Battery(40, T0)
    assert parts.firmware is None
