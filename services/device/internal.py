"""Use cases the mesh calls (the MQTT adapters, other services), never users: who owns a device's
data now, connection and status reports, and the configuration handshake with the device.

Only internal callers (the mesh credential) get here. Reports from devices are not audited:
they are the device's own telemetry, not an action of a person, and one event per heartbeat or
battery reading would flood the audit trail. What people change (registry, assignment,
desired configuration) is audited by `DeviceService`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from medmesh.runtime.auth import current_principal
from medmesh.runtime.errors import NotFound, PermissionDenied
from medmesh.runtime.resources import ResourceStore, now
from services.device.domain import NAME_PREFIX, Device, parse_name
from services.device.status import (
    Battery,
    DeviceConnection,
    Firmware,
    Operational,
    Session,
    StatusReport,
    StatusStore,
    event_time,
    session_key,
)
from services.device.twin import (
    ConfigStore,
    DesiredConfig,
    DeviceConfig,
    ReportedConfig,
    require_config,
    require_reported_version,
)


def _require_internal() -> None:
    principal = current_principal()
    if not principal.is_internal:
        raise PermissionDenied(f"{principal.subject} may not call internal methods", reason="INTERNAL_ONLY")


class DeviceInternal:
    def __init__(self, store: ResourceStore[Device], configs: ConfigStore, statuses: StatusStore) -> None:
        self._store = store
        self._configs = configs
        self._statuses = statuses

    async def _device(self, name: str, field: str = "device") -> Device:
        _require_internal()
        serial = parse_name(name, field)
        device = await self._store.get(serial)
        if device is None:
            raise NotFound(
                f"device {serial!r} does not exist",
                reason="DEVICE_NOT_FOUND",
                metadata={"device": NAME_PREFIX + serial},
            )
        return device

    async def assignment(self, name: str) -> Device:
        """The device with its owner, care organization and patient (see `Device.data_organization`)."""
        return await self._device(name)

    async def report_connection(
        self,
        name: str,
        *,
        connected: bool,
        adapter_instance: str,
        session_id: str,
        remote_address: str,
        at: datetime | None,
        adapter_address: str = "",
    ) -> None:
        """A connection opened or closed. A close ends only the session it names, so one reported
        late by an adapter that no longer holds the device's connection leaves the device online.
        `adapter_address` (on connect) is where services reach that adapter instance to push to
        the device."""
        device = await self._device(name)
        key = session_key(session_id, adapter_instance)
        when = event_time(at, now())
        if not connected:
            await self._statuses.change_connections(device.state_key, lambda state: state.after_disconnect(key, when))
            return
        session = Session(
            device.state_key,
            key,
            adapter_instance,
            remote_address,
            connect_time=when,
            adapter_address=adapter_address,
        )
        # Independent records: written together.
        await asyncio.gather(
            self._statuses.change_connections(device.state_key, lambda state: state.after_connect(session)),
            self._statuses.touch(device.state_key, when),
        )

    async def connection(self, name: str) -> DeviceConnection:
        """The device's newest connection and the adapter (instance and address) that holds it."""
        device = await self._device(name)
        return DeviceConnection(device.name, (await self._statuses.connections(device.state_key)).newest)

    async def report_status(self, name: str, report: StatusReport, at: datetime | None) -> None:
        """Keeps what the device sent; what it left out stays as it was."""
        device = await self._device(name)
        report.validated()
        when = event_time(at, now())
        if report.state is not None:
            await self._statuses.put_operational(device.state_key, Operational(report.state, report.message, when))
        if report.battery_percent is not None:
            await self._statuses.put_battery(device.state_key, Battery(report.battery_percent, when))
        if report.firmware_version is not None:
            await self._statuses.put_firmware(device.state_key, Firmware(report.firmware_version, when))
        await self._statuses.touch(device.state_key, when)

    async def report_config(
        self, name: str, reported: Mapping[str, Any], version: int, at: datetime | None
    ) -> DesiredConfig | None:
        """Keeps the configuration the device runs and the desired version it applied; returns the
        desired configuration if the device is still behind it. A version the platform never
        issued is INVALID_ARGUMENT and nothing is kept."""
        device = await self._device(name)
        desired = await self._configs.current_desired(device.state_key)
        require_reported_version(version, desired.version if desired else 0)
        when = event_time(at, now())
        config = ReportedConfig(device.state_key, version, require_config(reported, "reported"), when)
        await self._configs.put_reported(config)
        await self._statuses.touch(device.state_key, when)
        return DeviceConfig(device.name, desired, config).pending

    async def pending_config(self, name: str) -> DesiredConfig | None:
        """The desired configuration if the device has not reported applying it, else None."""
        device = await self._device(name)
        desired, reported = await asyncio.gather(
            self._configs.current_desired(device.state_key), self._configs.reported(device.state_key)
        )
        return DeviceConfig(device.name, desired, reported).pending

    async def touch(self, name: str, at: datetime | None) -> None:
        """The device was heard from (any message). Adapters should send this at most every few
        tens of seconds per device: it is a database write."""
        device = await self._device(name)
        await self._statuses.touch(device.state_key, event_time(at, now()))
