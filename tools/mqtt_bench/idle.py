"""Thousands of idle device connections: TLS, CONNECT, SUBSCRIBE devices/{d}/#, then PINGREQ.

A paho client per idle device would cost a thread or an event-loop integration each; an idle
device only needs a few fixed packets, so this is a minimal MQTT 3.1.1 codec over asyncio
protocols. It answers QoS 1 messages the broker pushes (PUBACK) and keeps the connection alive
like a real device (a PINGREQ every keep-alive period), so the broker pays what a fleet costs.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from tools.mqtt_bench.devices import DeviceCredentials, Endpoint, tls_context
from tools.mqtt_bench.procs import serve

PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
_CONNACK, _PUBLISH, _SUBACK, _PINGRESP = 2, 3, 9, 13


def mqtt_string(text: str) -> bytes:
    """An MQTT UTF-8 string: its length in two bytes, then the bytes."""
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def mqtt_packet(first: int, body: bytes) -> bytes:
    """An MQTT packet: the first byte (type and flags), the remaining length, the body."""
    encoded = bytearray([first])
    length = len(body)
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(encoded) + body


def connect_packet(client_id: str, keepalive: int) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session, no credentials (the certificate is the identity)."""
    return mqtt_packet(
        0x10, mqtt_string("MQTT") + bytes([4, 0x02]) + keepalive.to_bytes(2, "big") + mqtt_string(client_id)
    )


def subscribe_packet(packet_id: int, topic: str, qos: int) -> bytes:
    return mqtt_packet(0x82, packet_id.to_bytes(2, "big") + mqtt_string(topic) + bytes([qos]))


def puback_packet(packet_id: int) -> bytes:
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


class IdleDevice(asyncio.Protocol):
    """One device connection: ready once its subscription is granted."""

    def __init__(self, device: str, keepalive: int) -> None:
        self.device = device
        self.keepalive = keepalive
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.received = 0
        self.open = False
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._pinger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.open = True
        transport.write(connect_packet(self.device, self.keepalive))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (packet := self._next_packet()) is not None:
            self._handle(*packet)

    def _next_packet(self) -> tuple[int, int, bytes] | None:
        buffer = self._buffer
        length, multiplier, index = 0, 1, 1
        while True:
            if index >= len(buffer):
                return None
            byte = buffer[index]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            index += 1
            if not byte & 0x80:
                break
        if len(buffer) < index + length:
            return None
        header, body = buffer[0], bytes(buffer[index : index + length])
        del buffer[: index + length]
        return header >> 4, header & 0x0F, body

    def _handle(self, kind: int, flags: int, body: bytes) -> None:
        assert self._transport is not None
        if kind == _CONNACK:
            if body[1] != 0:
                self._fail(f"CONNACK {body[1]}")
                return
            self._transport.write(subscribe_packet(1, f"devices/{self.device}/#", 1))
        elif kind == _SUBACK:
            if body[2] == 0x80:
                self._fail("SUBACK refused")
                return
            if not self.ready.done():
                self.ready.set_result(None)
            self._schedule_ping()
        elif kind == _PUBLISH:
            self.received += 1
            qos = (flags >> 1) & 0x03
            if qos:
                topic_length = int.from_bytes(body[:2], "big")
                packet_id = int.from_bytes(body[2 + topic_length : 4 + topic_length], "big")
                self._transport.write(puback_packet(packet_id))

    def _schedule_ping(self) -> None:
        # Jittered so 5,000 devices do not ping in lockstep; inside the keep-alive period.
        delay = self.keepalive * random.uniform(0.7, 0.95)
        self._pinger = asyncio.get_running_loop().call_later(delay, self._ping)

    def _ping(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(PINGREQ)
            self._schedule_ping()

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self._pinger is not None:
            self._pinger.cancel()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before ready: {exc}"))

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(DISCONNECT)
            self._transport.close()


@dataclass
class IdleReport:
    """How many connections a worker holds, and what went wrong with the others."""

    wanted: int
    connected: int
    open: int
    failures: dict[str, int] = field(default_factory=dict)  # failed attempts, by reason
    given_up: int = 0
    seconds: float = 0.0
    pushed_messages: int = 0


class IdleStatus:
    """Request: how many of the connections are still open."""


@dataclass(frozen=True)
class FleetPlan:
    """How a worker connects its idle devices."""

    keepalive: int  # seconds, sent in CONNECT; a PINGREQ goes out within each period
    concurrency: int  # connection attempts in progress at once
    budget: float  # seconds after which a device still refused is given up


async def connect_fleet(
    endpoint: Endpoint, devices: list[DeviceCredentials], plan: FleetPlan
) -> tuple[list[IdleDevice], Counter[str], int, float]:
    """Connects every device as the protocol says a device does (section 6): a refused or failed
    attempt is retried after 1 s, doubling up to 60 s, +-30 % jitter; CONNACK 5 is not retried.
    Returns the connections, failed attempts by reason, devices given up, and the seconds taken."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(plan.concurrency)
    failures: Counter[str] = Counter()
    connected: list[IdleDevice] = []
    given_up = 0
    started = time.monotonic()

    async def attempt(device: DeviceCredentials) -> IdleDevice:
        async with gate:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: IdleDevice(device.device_id, plan.keepalive),
                    endpoint.host,
                    endpoint.port,
                    ssl=tls_context(endpoint, device),
                    server_hostname=endpoint.host,
                ),
                timeout=60,
            )
            await asyncio.wait_for(protocol.ready, timeout=60)
            return protocol

    async def one(device: DeviceCredentials) -> None:
        nonlocal given_up
        backoff = 1.0
        while True:
            try:
                connected.append(await attempt(device))
                return
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as error:
                reason = str(error) if isinstance(error, ConnectionError) else type(error).__name__
                failures[reason] += 1
                if reason == "CONNACK 5" or time.monotonic() + backoff > started + plan.budget:
                    given_up += 1
                    return
            await asyncio.sleep(backoff * random.uniform(0.7, 1.3))
            backoff = min(60.0, backoff * 2)

    await asyncio.gather(*(one(d) for d in devices))
    return connected, failures, given_up, time.monotonic() - started


def idle_worker(conn: Connection, endpoint: Endpoint, devices: list[DeviceCredentials], plan: FleetPlan) -> None:
    """Process entry: connects `devices`, reports, holds them until told to stop."""

    async def setup() -> tuple[IdleReport, Any, Any]:
        fleet, failures, given_up, seconds = await connect_fleet(endpoint, devices, plan)

        def report() -> IdleReport:
            return IdleReport(
                wanted=len(devices),
                connected=len(fleet),
                open=sum(d.open for d in fleet),
                failures=dict(failures),
                given_up=given_up,
                seconds=round(seconds, 1),
                pushed_messages=sum(d.received for d in fleet),
            )

        async def handle(request: Any) -> IdleReport:
            assert isinstance(request, IdleStatus)
            return report()

        async def teardown() -> None:
            for device in fleet:
                device.close()
            await asyncio.sleep(0.5)

        return report(), handle, teardown

    serve(conn, "idle", setup)
