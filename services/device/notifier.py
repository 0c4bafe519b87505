"""Telling a connected device of a new desired configuration right away, through the MQTT adapter
instance that holds its connection (`medmesh.runtime.adapters`). The device service knows the
connections itself: it reads them from its own stores rather than calling itself."""

from __future__ import annotations

from medmesh.runtime.adapters import PENDING_CONFIG, AdapterConnection, AdapterNotifier
from medmesh.runtime.resources import ResourceStore
from services.device.domain import Device, parse_name
from services.device.status import StatusStore


class RepositoryConnections:
    """`ConnectionLookup` from the device service's own stores: the registration (for its state
    key), then its connection state."""

    def __init__(self, store: ResourceStore[Device], statuses: StatusStore) -> None:
        self._store = store
        self._statuses = statuses

    async def open_connection(self, device: str) -> AdapterConnection | None:
        registered = await self._store.get(parse_name(device, "device"))
        if registered is None:
            return None
        session = (await self._statuses.connections(registered.state_key)).newest
        if session is None or not session.open:
            return None
        return AdapterConnection(session.adapter_instance, session.adapter_address)


class AdapterConfigNotifier:
    """`DesiredConfigNotifier` over an `AdapterNotifier`: in the background, so an update of the
    configuration is not held up by the adapter."""

    def __init__(self, notifier: AdapterNotifier) -> None:
        self._notifier = notifier

    async def desired_config_changed(self, device: str) -> None:
        self._notifier.notify_soon(device, PENDING_CONFIG)
