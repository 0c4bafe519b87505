"""The adapter's broker without a task, queue or timer per idle connection (README: memory per
device): the MQTT behaviour devices rely on, over real TLS 1.3 with client certificates, against
`DeviceBroker` with the mesh in memory (mqtt_adapter/memory_probe.py)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from medmesh.launcher.tls import issue_client_certificate
from mqtt_adapter import broker as broker_module
from mqtt_adapter.broker import KeepAlive
from mqtt_adapter.memory_probe import Adapter, InMemoryRegistry, running_adapter
from mqtt_adapter.mesh import Admission
from mqtt_adapter.payloads import StatusReport
from mqtt_adapter.topics import Downlink
from tools.mqtt_bench.idle import mqtt_packet, mqtt_string

CONNACK, PUBLISH, PUBACK, SUBACK, UNSUBACK, PINGRESP = 2, 3, 4, 9, 11, 13
PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


def connect_packet(client_id: str, *, keepalive: int = 60, level: int = 4) -> bytes:
    return mqtt_packet(
        0x10, mqtt_string("MQTT") + bytes([level, 0x02]) + keepalive.to_bytes(2, "big") + mqtt_string(client_id)
    )


def subscribe_packet(packet_id: int, topic: str, qos: int = 1) -> bytes:
    return mqtt_packet(0x82, packet_id.to_bytes(2, "big") + mqtt_string(topic) + bytes([qos]))


def unsubscribe_packet(packet_id: int, topic: str) -> bytes:
    return mqtt_packet(0xA2, packet_id.to_bytes(2, "big") + mqtt_string(topic))


def publish_packet(packet_id: int, topic: str, payload: bytes) -> bytes:
    return mqtt_packet(0x32, mqtt_string(topic) + packet_id.to_bytes(2, "big") + payload)  # QoS 1


class Registry(InMemoryRegistry):
    """The in-memory registry, recording reports; it can be made unreachable."""

    def __init__(self) -> None:
        super().__init__()
        self.reachable = True
        self.answer = asyncio.Event()  # cleared: certificates wait for it
        self.answer.set()
        self.reports: list[tuple[str, bool, str]] = []
        self.statuses: list[tuple[str, str]] = []

    async def check_certificate(self, der: bytes) -> Admission:
        if not self.reachable:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())
        await self.answer.wait()
        return await super().check_certificate(der)

    async def report_connection(self, device: str, *, connected: bool, **fields: Any) -> None:
        self.reports.append((device, connected, fields["session_id"]))
        await super().report_connection(device, connected=connected)

    async def report_status(self, device: str, report: StatusReport) -> None:
        self.statuses.append((device, report.message))


class Device:
    """A device's MQTT connection, a packet at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, adapter: Adapter, device_id: str, *, certificate: bool = True) -> Device:
        context = ssl.create_default_context(cafile=str(adapter.pki.ca_cert))
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        if certificate:
            cert, key = issue_client_certificate(adapter.pki, device_id, adapter.workdir / "certs")
            context.load_cert_chain(cert, key)
        reader, writer = await asyncio.open_connection("localhost", adapter.port, ssl=context)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def packet(self, within: float = 5.0) -> tuple[int, int, bytes]:
        """(type, flags, body) of the next packet the adapter sends."""
        first = (await asyncio.wait_for(self.reader.readexactly(1), within))[0]
        length, multiplier = 0, 1
        while True:
            byte = (await self.reader.readexactly(1))[0]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            if not byte & 0x80:
                break
        return first >> 4, first & 0x0F, await self.reader.readexactly(length)

    async def connack(self) -> int:
        kind, _, body = await self.packet()
        assert kind == CONNACK
        return body[1]

    async def closed(self, within: float = 5.0) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(), within) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


@pytest.fixture
async def adapter(tmp_path: Path) -> AsyncIterator[Adapter]:
    async with running_adapter(tmp_path, Registry()) as running:
        yield running


def registry_of(adapter: Adapter) -> Registry:
    assert isinstance(adapter.registry, Registry)
    return adapter.registry


async def connected(adapter: Adapter, device_id: str, **connect: Any) -> Device:
    device = await Device.open(adapter, device_id)
    device.send(connect_packet(device_id, **connect) + subscribe_packet(1, f"devices/{device_id}/#"))
    assert await device.connack() == 0
    kind, _, body = await device.packet()
    assert (kind, body) == (SUBACK, b"\x00\x01\x01")
    return device


async def settled() -> None:
    for _ in range(5):
        await asyncio.sleep(0.01)


async def test_an_idle_device_costs_no_task(adapter: Adapter) -> None:
    before = len(asyncio.all_tasks())
    devices = [await connected(adapter, f"idle-{k}") for k in range(20)]
    await settled()
    assert len(asyncio.all_tasks()) == before
    assert len(adapter.connections) == 20
    assert [report[:2] for report in registry_of(adapter).reports] == [(f"devices/idle-{k}", True) for k in range(20)]
    for device in devices:
        device.send(PINGREQ)
        assert (await device.packet())[0] == PINGRESP
        await device.close()


async def test_what_a_device_sends_with_its_connect_waits_until_it_is_admitted(adapter: Adapter) -> None:
    device = await Device.open(adapter, "eager")
    device.send(connect_packet("eager") + subscribe_packet(7, "devices/eager/acks") + PINGREQ)
    assert await device.connack() == 0
    assert registry_of(adapter).reports[0][:2] == ("devices/eager", True)
    answers = {await device.packet(), await device.packet()}  # in no set order, as with amqtt
    assert answers == {(SUBACK, 0, b"\x00\x07\x01"), (PINGRESP, 0, b"")}
    device.send(unsubscribe_packet(8, "devices/eager/acks"))
    assert await device.packet() == (UNSUBACK, 0, b"\x00\x08")
    assert adapter.connections.of("devices/eager")[0].subscriptions == {}
    await device.close()


async def test_a_device_subscribes_only_to_its_own_topics(adapter: Adapter) -> None:
    device = await Device.open(adapter, "own")
    device.send(connect_packet("own") + subscribe_packet(2, "devices/other/#"))
    assert await device.connack() == 0
    assert await device.packet() == (SUBACK, 0, b"\x00\x02\x80")
    await device.close()


async def test_the_cloud_publishes_to_a_device_and_it_acknowledges(adapter: Adapter) -> None:
    device = await connected(adapter, "pushed")
    (sent,) = adapter.connections.publish("devices/pushed", Downlink.COMMANDS, b'{"action": "run"}')
    kind, flags, body = await device.packet()
    assert (kind, flags >> 1) == (PUBLISH, 1)
    topic_length = int.from_bytes(body[:2], "big")
    assert body[2 : 2 + topic_length] == b"devices/pushed/commands"
    assert body[4 + topic_length :] == b'{"action": "run"}'
    device.send(mqtt_packet(0x40, body[2 + topic_length : 4 + topic_length]))
    await asyncio.wait_for(sent, 5)
    await device.close()


async def test_what_a_device_publishes_is_routed_in_order_and_acknowledged(adapter: Adapter) -> None:
    device = await connected(adapter, "talker")
    statuses = [b'{"state": "OK", "message": "m%d"}' % k for k in (1, 2, 3)]
    device.send(b"".join(publish_packet(k, "devices/talker/status", status) for k, status in enumerate(statuses, 1)))
    for k in (1, 2, 3):
        assert await device.packet() == (PUBACK, 0, k.to_bytes(2, "big"))
    await settled()
    assert registry_of(adapter).statuses == [("devices/talker", f"m{k}") for k in (1, 2, 3)]
    device.send(publish_packet(4, "devices/someone-else/status", b"{}"))
    assert await device.packet() == (PUBACK, 0, b"\x00\x04")
    kind, _, body = await device.packet()  # the router's answer on the device's errors topic
    assert kind == PUBLISH
    assert b"devices/talker/errors" in body
    assert b"TOPIC_NOT_ALLOWED" in body
    await device.close()


async def test_clients_are_refused_with_amqtts_codes(adapter: Adapter) -> None:
    anonymous = await Device.open(adapter, "anonymous", certificate=False)
    anonymous.send(connect_packet("anonymous"))
    assert await anonymous.connack() == 5
    assert await anonymous.closed()

    impostor = await Device.open(adapter, "honest")
    impostor.send(connect_packet("victim"))
    assert await impostor.connack() == 5

    old = await Device.open(adapter, "old")
    old.send(connect_packet("old", level=3))
    assert await old.connack() == 1

    registry_of(adapter).reachable = False
    waiting = await Device.open(adapter, "waiting")
    waiting.send(connect_packet("waiting"))
    assert await waiting.connack() == 3  # server unavailable: retry later
    assert len(adapter.connections) == 0
    assert registry_of(adapter).reports == []


async def test_a_packet_over_the_limit_closes_the_connection_before_it_is_read(adapter: Adapter) -> None:
    device = await connected(adapter, "flooder")
    # Only the header of a 2 MiB publish: the adapter must not wait for (or buffer) the rest.
    header = bytearray([0x32])
    length = 2 * 1024 * 1024
    while True:
        byte, length = length % 128, length // 128
        header.append(byte | (0x80 if length else 0))
        if not length:
            break
    device.send(bytes(header) + b"x" * 100)
    assert await device.closed()
    bystander = await connected(adapter, "bystander")
    await bystander.close()


async def test_a_will_never_reaches_another_device(adapter: Adapter) -> None:
    # amqtt kept a retained will and sent it to whoever subscribed to a matching filter later:
    # any device could plant a command on another device's topics by dropping its connection.
    mallory = await Device.open(adapter, "mallory")
    flags = 0x02 | 0x04 | 0x08 | 0x20  # clean session, will, will QoS 1, will retain
    header = mqtt_string("MQTT") + bytes([4, flags]) + (60).to_bytes(2, "big")
    will = mqtt_string("devices/victim/commands") + mqtt_string('{"action": "run"}')
    mallory.send(mqtt_packet(0x10, header + mqtt_string("mallory") + will))
    assert await mallory.connack() == 0
    mallory.writer.transport.abort()
    await settled()
    victim = await connected(adapter, "victim")
    with pytest.raises(TimeoutError):
        await victim.packet(within=1)
    await victim.close()


async def test_the_same_client_id_again_closes_the_earlier_connection(adapter: Adapter) -> None:
    first = await connected(adapter, "twice")
    second = await connected(adapter, "twice")
    assert await first.closed()
    await settled()
    (connection,) = adapter.connections.of("devices/twice")
    reports = registry_of(adapter).reports
    assert [report[:2] for report in reports] == [("devices/twice", True)] * 2 + [("devices/twice", False)]
    assert reports[2][2] == reports[0][2] != connection.session_id  # the earlier session ended
    await second.close()


async def test_a_connection_gone_while_being_admitted_takes_nothing_over(adapter: Adapter) -> None:
    first = await connected(adapter, "steady")
    registry = registry_of(adapter)
    registry.answer.clear()
    second = await Device.open(adapter, "steady")
    second.send(connect_packet("steady"))
    await settled()
    second.writer.transport.abort()
    await settled()
    registry.answer.set()
    await settled()
    assert [report[:2] for report in registry.reports] == [("devices/steady", True)]
    first.send(PINGREQ)
    assert (await first.packet())[0] == PINGRESP
    await first.close()


async def test_a_device_not_heard_within_one_and_a_half_keepalives_is_closed(adapter: Adapter) -> None:
    device = await connected(adapter, "sleepy", keepalive=1)
    lively = await connected(adapter, "lively", keepalive=1)
    for _ in range(4):
        await asyncio.sleep(0.5)
        lively.send(PINGREQ)
        assert (await lively.packet())[0] == PINGRESP
    assert await device.closed(within=1)
    await settled()
    assert adapter.connections.of("devices/sleepy") == []
    assert registry_of(adapter).reports[-1][:2] == ("devices/sleepy", False)
    assert len(adapter.connections.of("devices/lively")) == 1
    await lively.close()


async def test_a_client_that_never_sends_connect_is_closed(adapter: Adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_module, "CONNECT_TIMEOUT", 1.0)
    silent = await Device.open(adapter, "silent")
    assert await silent.closed(within=3)


async def test_a_device_leaving_is_reported_and_forgotten(adapter: Adapter) -> None:
    device = await connected(adapter, "leaving")
    device.send(DISCONNECT)
    assert await device.closed()
    await settled()
    assert len(adapter.connections) == 0
    assert [report[:2] for report in registry_of(adapter).reports] == [
        ("devices/leaving", True),
        ("devices/leaving", False),
    ]


async def test_closing_the_broker_closes_and_reports_every_connection(adapter: Adapter) -> None:
    devices = [await connected(adapter, f"held-{k}") for k in range(3)]
    await adapter.broker.shutdown()
    await adapter.broker.close()
    for device in devices:
        assert await device.closed()
    assert sorted(report[:2] for report in registry_of(adapter).reports if not report[1]) == [
        (f"devices/held-{k}", False) for k in range(3)
    ]


class Watched:
    """What the keep-alive wheel asks of a connection."""

    def __init__(self, heard: float) -> None:
        self.heard = heard
        self.keepalive_timeout: float | None = None
        self.keepalive_slot: int | None = None
        self.timed_out = False

    def handle_read_timeout(self) -> None:
        self.timed_out = True


async def test_the_keepalive_wheel_closes_the_silent_and_wakes_for_the_next_deadline() -> None:
    now = asyncio.get_running_loop().time()
    wheel = KeepAlive()
    heard_since, next_due, silent = Watched(now - 6), Watched(now), Watched(now - 10)
    for watched, timeout in ((heard_since, 5.0), (next_due, 2.0), (silent, 5.0)):
        wheel.watch(watched, timeout)  # type: ignore[arg-type]
    heard_since.heard = now  # a packet since: its deadline moves past next_due's
    wheel._tick()
    assert (silent.timed_out, heard_since.timed_out, next_due.timed_out) == (True, False, False)
    assert heard_since.keepalive_slot == math.ceil(now + 5)
    assert wheel._due == next_due.keepalive_slot == math.ceil(now + 2)
    wheel.forget(next_due)  # type: ignore[arg-type]
    wheel.forget(heard_since)  # type: ignore[arg-type]
    wheel.close()
