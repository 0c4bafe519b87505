"""Two MQTT adapter instances: the one holding a device's connection pushes to it, and killing an
instance with SIGKILL while devices stream loses nothing and stores nothing twice."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import MongoClient

from medmesh.runtime.mongo import Document
from tests.integration.devices import DeviceIdentity, MqttDevice, register_device, tls_context
from tests.integration.people import eventually, ok
from tests.integration.platform import Platform, free_ports
from tests.integration.stores import ServiceProcess

pytestmark = pytest.mark.integration

SECOND = "mqtt-adapter-test-1"


@dataclass
class Adapter:
    process: ServiceProcess
    mqtt_port: int


def start_adapter(platform: Platform, directory: Path) -> Adapter:
    grpc_port, mqtt_port = free_ports(2)
    env = {
        **platform.service_environment(),
        "MEDMESH_GRPC_PORT": str(grpc_port),
        "MEDMESH_MQTT_PORT": str(mqtt_port),
        "MEDMESH_MQTT_TLS_CERT_FILE": str(platform.config.tls_dir / "server.crt"),
        "MEDMESH_MQTT_TLS_KEY_FILE": str(platform.config.tls_dir / "server.key"),
        "MEDMESH_ADAPTER_INSTANCE": SECOND,
    }
    process = ServiceProcess("mqtt_adapter", env, grpc_port, "", directory / "second-adapter.log")
    process.wait_serving()
    return Adapter(process, mqtt_port)


@pytest.fixture
def second_adapter(platform: Platform, tmp_path: Path) -> Iterator[Adapter]:
    adapter = start_adapter(platform, tmp_path)
    try:
        yield adapter
    finally:
        adapter.process.close()


def device_on(platform: Platform, identity: DeviceIdentity, port: int) -> MqttDevice:
    device = MqttDevice(port, identity.device_id, tls_context(platform.ca, identity.cert, identity.key))
    assert device.connect() == "Success"
    device.subscribe_own()
    return device


def test_the_instance_holding_the_connection_delivers(
    platform: Platform, rest: httpx.Client, second_adapter: Adapter, tmp_path: Path
) -> None:
    identity = register_device(rest, tmp_path)
    device = device_on(platform, identity, second_adapter.mqtt_port)
    try:
        status = eventually(
            lambda: (c := ok(rest.get(f"/v1/{identity.name}/status"))["connection"]).get("connected") and c
        )
        assert status["adapter_instance"] == SECOND

        started = time.monotonic()
        command = ok(rest.post(f"/v1/{identity.name}/commands", json={"command_name": "measure.now"}))
        assert device.expect("commands", within=5)["name"] == command["name"]
        command_seconds = time.monotonic() - started
        started = time.monotonic()
        reply = ok(rest.patch(f"/v1/{identity.name}/config", json={"desired": {"mode": "night"}}))
        assert device.expect("config/desired", within=5)["version"] == int(reply["desired_version"])
        config_seconds = time.monotonic() - started
        assert command_seconds < 1.0, command_seconds
        assert config_seconds < 1.0, config_seconds
    finally:
        device.close()


@dataclass
class StreamingDevice:
    """Sends three observations per message and keeps each until the cloud acknowledges it."""

    platform: Platform
    identity: DeviceIdentity
    port: int
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)  # message id -> observation
    acked: set[str] = field(default_factory=set)
    connection: MqttDevice | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def connect(self, port: int) -> None:
        self.port = port
        self.connection = device_on(self.platform, self.identity, port)

    def send(self, index: int) -> None:
        base = f"{self.identity.device_id}-{index}"
        at = f"2026-11-24T10:{index // 60 % 60:02d}:{index % 60:02d}Z"
        items: list[dict[str, Any]] = [
            {"id": f"{base}-hr", "metric": "heart_rate", "time": at, "value": 60 + index % 40, "unit": "/min"},
            {"id": f"{base}-spo2", "metric": "spo2", "time": at, "value": 95 + index % 5, "unit": "%"},
            {"id": f"{base}-rr", "metric": "resp_rate", "time": at, "value": 12 + index % 8, "unit": "/min"},
        ]
        with self.lock:
            for item in items:
                self.sent[item["id"]] = item
        assert self.connection is not None
        # QoS 1 without waiting for the PUBACK: the application ack is what counts.
        self.connection.client.publish(
            f"devices/{self.identity.device_id}/observations",
            _json({"observations": items}),
            qos=1,
        )

    def collect_acks(self) -> None:
        if self.connection is None:
            return
        for topic, payload in self.connection.drain():
            if topic.endswith("/acks"):
                with self.lock:
                    self.acked.update(payload.get("stored", []), payload.get("duplicates", []))

    def unacked(self) -> list[dict[str, Any]]:
        with self.lock:
            return [item for message_id, item in self.sent.items() if message_id not in self.acked]

    def resend_unacked(self) -> None:
        pending = self.unacked()
        assert self.connection is not None
        for start in range(0, len(pending), 100):
            self.connection.client.publish(
                f"devices/{self.identity.device_id}/observations",
                _json({"observations": pending[start : start + 100]}),
                qos=1,
            )


def _json(document: Any) -> bytes:
    return json.dumps(document).encode()


def test_sigkill_of_an_adapter_while_devices_stream_loses_nothing_and_stores_nothing_twice(
    platform: Platform, rest: httpx.Client, tmp_path: Path
) -> None:
    victim = start_adapter(platform, tmp_path)
    survivor_port = platform.config.port("mqtt")
    devices = [StreamingDevice(platform, register_device(rest, tmp_path), victim.mqtt_port) for _ in range(4)]
    try:
        for device in devices:
            device.connect(victim.mqtt_port)
        index = 0
        killed_at = None
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            for device in devices:
                device.send(index)
            index += 1
            if killed_at is None and index == 60:
                victim.process.kill()  # SIGKILL: no shutdown, nothing flushed, acks in flight are lost
                killed_at = index
                # What was just sent cannot have been acknowledged yet: the kill catches messages in flight.
                in_flight = sum(len(device.unacked()) for device in devices)
                assert in_flight >= len(devices) * 3
            if killed_at is not None:
                for device in devices:
                    assert device.connection is not None
                    if not device.connection.connected.is_set():
                        device.collect_acks()
                        device.connection.close()
                        device.connect(survivor_port)  # another instance
                        device.resend_unacked()
            for device in devices:
                device.collect_acks()
            time.sleep(0.02)

        def all_acked() -> bool:
            for device in devices:
                device.collect_acks()
            return all(not device.unacked() for device in devices)

        if not eventually(all_acked, within=20):
            for device in devices:  # what was lost in flight is resent after the ack timeout
                device.resend_unacked()
        assert eventually(all_acked, within=20), [len(d.unacked()) for d in devices]
        assert killed_at is not None
        assert all(device.port == survivor_port for device in devices)

        database = MongoClient[Document](platform.config.mongodb_uri)["medmesh_observation"]
        for device in devices:
            stored = list(database.observations.find({"device": device.identity.name}, {"message_id": 1}))
            message_ids = [document["message_id"] for document in stored]
            assert len(message_ids) == len(set(message_ids)), "stored twice"
            assert set(message_ids) == set(device.sent), "lost or unexpected"
            assert len(device.sent) == 3 * index
    finally:
        for device in devices:
            if device.connection is not None:
                device.connection.close()
        victim.process.close()
