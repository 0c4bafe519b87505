"""The cloud side emulated for Mosquitto: MQTT clients doing what medmesh's adapter does.

Ack workers subscribe to their share of the devices' `observations` and answer every message on
`devices/{d}/acks` with its ids (an application-level ack, without storage), telling apart ids
seen before (`duplicates`), as the platform does. Devices are split between the workers by
device, so each worker sees all of a device's messages and its duplicate check is exact.
Commands: `send_commands` publishes on `devices/{d}/commands` and waits for the COMPLETED status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import aiomqtt

from tools.mqtt_bench.devices import NO_DELAY, DeviceCredentials, Endpoint, tls_context
from tools.mqtt_bench.procs import serve


@dataclass(frozen=True)
class CloudCounts:
    """Request and answer: observations received (every delivery) and distinct ids among them."""

    messages: int = 0
    observations: int = 0
    distinct: int = 0


def _client(endpoint: Endpoint, credentials: DeviceCredentials) -> aiomqtt.Client:
    client = aiomqtt.Client(
        endpoint.host,
        endpoint.port,
        identifier=credentials.device_id,
        protocol=aiomqtt.ProtocolVersion.V311,
        clean_session=True,
        tls_context=tls_context(endpoint, credentials),
        max_inflight_messages=1000,
        socket_options=NO_DELAY,
        timeout=30,
    )
    client._client.disable_logger()  # paho would format a debug line per packet
    return client


def ack_worker(conn: Connection, endpoint: Endpoint, identity: DeviceCredentials, devices: list[str]) -> None:
    """Process entry: acks the observations of `devices` until told to stop."""

    async def setup() -> tuple[int, Any, Any]:
        stack = AsyncExitStack()
        client = await stack.enter_async_context(_client(endpoint, identity))
        for device in devices:
            await client.subscribe(f"devices/{device}/observations", qos=1)
        seen: set[tuple[str, str]] = set()
        counts = {"messages": 0, "observations": 0}

        async def acknowledge() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                device = message.topic.value.split("/")[1]
                body = json.loads(message.payload)
                observations = body.get("observations", [body])
                ids = [str(o["id"]) for o in observations]
                counts["messages"] += 1
                counts["observations"] += len(ids)
                # Ids are unique per device only.
                stored = [i for i in ids if (device, i) not in seen]
                seen.update((device, i) for i in stored)
                duplicates = [i for i in ids if i not in stored]
                ack = json.dumps({"stored": stored, "duplicates": duplicates}).encode()
                # Straight to paho: waiting for each PUBACK would serialize the acks.
                client._client.publish(f"devices/{device}/acks", ack, qos=1)

        task = asyncio.create_task(acknowledge())
        stack.callback(task.cancel)

        async def handle(request: Any) -> CloudCounts:
            assert isinstance(request, CloudCounts)
            return CloudCounts(counts["messages"], counts["observations"], len(seen))

        return len(devices), handle, stack.aclose

    serve(conn, f"cloud-{identity.device_id}", setup)


async def send_commands(
    endpoint: Endpoint,
    identity: DeviceCredentials,
    devices: list[str],
    rate: float,
    duration: float,
    answer_timeout: float,
) -> tuple[list[tuple[str, float, float]], list[str]]:
    """Publishes `rate` commands/s round-robin over `devices`; returns (id, when due, when its
    COMPLETED status arrived) per command, and the ids with no status within `answer_timeout`."""
    completed: list[tuple[str, float, float]] = []
    waiting: dict[str, float] = {}
    sending_done, answered = asyncio.Event(), asyncio.Event()
    async with _client(endpoint, identity) as client:
        await client.subscribe("devices/+/commands/+/status", qos=1)

        async def statuses() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                command = message.topic.value.split("/")[3]
                if json.loads(message.payload).get("state") == "COMPLETED" and command in waiting:
                    completed.append((command, waiting.pop(command), time.monotonic()))
                    if not waiting and sending_done.is_set():
                        answered.set()

        reader = asyncio.create_task(statuses())
        start = time.monotonic() + 0.2
        total = int(rate * duration)
        for index in range(total):
            due = start + index / rate
            if (delay := due - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            device = devices[index % len(devices)]
            command = uuid.uuid4().hex[:16]
            waiting[command] = due
            body: dict[str, Any] = {"action": "run", "id": command, "name": f"devices/{device}/commands/{command}"}
            body |= {"command": "bench.ping", "parameters": {}, "timeout_seconds": 60}
            client._client.publish(f"devices/{device}/commands", json.dumps(body).encode(), qos=1)
        sending_done.set()
        if waiting:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(answered.wait(), answer_timeout)
        reader.cancel()
    return completed, list(waiting)
