"""Devices for tests: registered over REST with a certificate, and an MQTT client (paho) that
speaks the device protocol (docs/device-protocol.md) at the packet level, so tests can do
what a well-behaved device does and what a broken or hostile one does."""

from __future__ import annotations

import json
import queue
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.integration.people import create_device, ok

MANUFACTURER = "organizations/manufacturer"


@dataclass(frozen=True)
class DeviceIdentity:
    name: str  # devices/{id}
    cert: Path
    key: Path

    @property
    def device_id(self) -> str:
        return self.name.removeprefix("devices/")


def register_device(rest: httpx.Client, directory: Path, organization: str = MANUFACTURER) -> DeviceIdentity:
    """A new device with a certificate from the development route (key made by the platform)."""
    name = create_device(rest, organization)
    issued = ok(rest.post(f"/v1/{name}:generateCertificate", json={}))
    device_id = name.removeprefix("devices/")
    cert, key = directory / f"{device_id}.crt", directory / f"{device_id}.key"
    cert.write_text(issued["certificate"]["pem"])
    key.write_text(issued["private_key_pem"])
    key.chmod(0o600)
    return DeviceIdentity(name, cert, key)


def tls_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


class MqttDevice:
    """One MQTT connection; received messages are queued as (topic, parsed JSON)."""

    def __init__(
        self,
        port: int,
        client_id: str,
        context: ssl.SSLContext,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.port = port
        self.client_id = client_id
        self.messages: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.unread: list[tuple[str, Any]] = []  # received, not yet taken by expect
        self.connack: str | None = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self._suback: dict[int, list[int]] = {}
        self._subscribed = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=True
        )
        self.client.tls_set_context(context)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connack = str(reason)
        if not reason.is_failure:
            self.connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        self.disconnected.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        with self._subscribed:
            self._suback[mid] = [reason.value for reason in reasons]
            self._subscribed.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            payload = json.loads(message.payload)
        except ValueError:
            payload = message.payload
        self.messages.put((message.topic, payload))

    def connect(self, within: float = 10.0, *, reconnect: bool = False) -> str | None:
        """Connects; the CONNACK verdict ("Success", "Not authorized", ...), None when there was none."""
        self.disconnected.clear()
        try:
            self.client.connect("localhost", self.port, keepalive=60)
        except (OSError, ssl.SSLError) as error:
            return f"error: {error!r}"
        if not reconnect:
            self.client.loop_start()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and self.connack is None and not self.disconnected.is_set():
            time.sleep(0.02)
        return self.connack

    def subscribe(self, topic_filter: str, qos: int = 1, within: float = 10.0) -> int:
        """The SUBACK return code: the granted QoS, or 0x80 when refused."""
        _, mid = self.client.subscribe(topic_filter, qos)
        assert mid is not None
        with self._subscribed:
            assert self._subscribed.wait_for(lambda: mid in self._suback, timeout=within), "no SUBACK"
            return self._suback.pop(mid)[0]

    def subscribe_own(self) -> None:
        assert self.subscribe(f"devices/{self.device_id}/#") == 1

    @property
    def device_id(self) -> str:
        return self.client_id.split(":", 1)[0]

    def publish(self, suffix_or_topic: str, payload: Any, qos: int = 1, within: float = 10.0) -> None:
        """Publishes (JSON unless bytes) and waits for the PUBACK."""
        topic = (
            suffix_or_topic if suffix_or_topic.startswith("devices/") else f"devices/{self.device_id}/{suffix_or_topic}"
        )
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self.client.publish(topic, data, qos=qos)
        info.wait_for_publish(timeout=within)
        assert info.is_published(), f"no PUBACK for {topic}"

    def expect(self, suffix: str, within: float = 10.0, where: Any = None) -> Any:
        """The first message on `devices/{id}/{suffix}` (matching `where`); others are kept for
        later expects and `drain` (the cloud's messages on different topics come in no set order)."""
        topic = f"devices/{self.device_id}/{suffix}"
        deadline = time.monotonic() + within
        while True:
            for index, (got_topic, payload) in enumerate(self.unread):
                if got_topic == topic and (where is None or where(payload)):
                    del self.unread[index]
                    return payload
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"nothing on {topic} within {within}s"
            try:
                self.unread.append(self.messages.get(timeout=remaining))
            except queue.Empty:
                continue

    def drain(self) -> list[tuple[str, Any]]:
        items, self.unread = self.unread, []
        while True:
            try:
                items.append(self.messages.get_nowait())
            except queue.Empty:
                return items

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def observation(
    message_id: str, metric: str = "heart_rate", value: Any = 72, at: str = "2026-11-24T09:30:00Z"
) -> dict[str, Any]:
    return {"id": message_id, "metric": metric, "time": at, "value": value, "unit": "/min"}
