"""The device connections this adapter instance holds, and publishing to them.

Cloud -> device messages are written straight to the connections of the one device they are
for, filtered by that connection's own few subscriptions: never matched against every
subscription of the broker (amqtt's generic broadcast is linear in all subscriptions).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mqtt_adapter.topics import ClientId, Downlink, downlink_topic, matches

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 30.0  # a device that does not PUBACK by then gets it again on reconnect


@dataclass(eq=False, slots=True)  # slots: one per device connection, thousands per instance
class Connection:
    """One MQTT connection of a device on this instance."""

    client: ClientId
    handler: Any  # amqtt BrokerProtocolHandler
    remote_address: str
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    subscriptions: dict[str, int] = field(default_factory=dict)  # topic filter -> granted QoS
    last_touch: float = 0.0

    @property
    def device(self) -> str:
        return self.client.device

    def subscribed(self, topic: str) -> int | None:
        """The QoS to send `topic` with, or None when no subscription of this connection covers it."""
        granted = [qos for topic_filter, qos in self.subscriptions.items() if matches(topic_filter, topic)]
        return max(granted) if granted else None


class Connections:
    def __init__(self) -> None:
        # A tuple per device: nearly always one connection (a set would be 0.2 KiB each).
        self._by_device: dict[str, tuple[Connection, ...]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, connection: Connection) -> None:
        connections = self._by_device.get(connection.device, ())
        if connection not in connections:
            self._by_device[connection.device] = (*connections, connection)

    def remove(self, connection: Connection) -> None:
        connections = self._by_device.get(connection.device)
        if connections is not None:
            remaining = tuple(c for c in connections if c is not connection)
            if remaining:
                self._by_device[connection.device] = remaining
            else:
                del self._by_device[connection.device]

    def of(self, device: str) -> list[Connection]:
        return list(self._by_device.get(device, ()))

    def __iter__(self) -> Iterator[Connection]:
        for connections in list(self._by_device.values()):
            yield from connections

    def __len__(self) -> int:
        return sum(len(connections) for connections in self._by_device.values())

    def holds(self, device: str) -> bool:
        return device in self._by_device

    def publish(self, device: str, kind: Downlink, payload: bytes) -> list[asyncio.Task[None]]:
        """Sends to every connection of the device that subscribed to the topic; the tasks end at PUBACK."""
        topic = downlink_topic(device.removeprefix("devices/"), kind)
        tasks = []
        for connection in self.of(device):
            qos = connection.subscribed(topic)
            if qos is not None:
                tasks.append(self._spawn(self._send(connection, topic, payload, min(qos, 1))))
        return tasks

    async def _send(self, connection: Connection, topic: str, payload: bytes, qos: int) -> None:
        try:
            await connection.handler.mqtt_publish(topic, payload, qos, retain=False, ack_timeout=PUBLISH_TIMEOUT)
        except (TimeoutError, ConnectionError, OSError) as error:
            log.info("publish to %s on %s not acknowledged: %r", connection.client.device_id, topic, error)
            raise

    def _spawn(self, coroutine: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Logged in _send for the expected failures; anything else is a bug worth seeing.
            error = task.exception()
            if not isinstance(error, TimeoutError | ConnectionError | OSError):
                log.warning("publish failed: %r", error)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
