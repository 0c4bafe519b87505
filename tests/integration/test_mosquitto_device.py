"""A device driven only by Mosquitto's command-line clients, following docs/device-protocol.md:
`mosquitto_sub` holds the device's connection and receives what the cloud sends; each
`mosquitto_pub` is an auxiliary connection (`{device}:pub`) of the same device."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration import mosquitto
from tests.integration.devices import DeviceIdentity, register_device
from tests.integration.people import eventually, ok
from tests.integration.platform import Platform

pytestmark = pytest.mark.integration


def tls_arguments(platform: Platform, identity: DeviceIdentity) -> list[str]:
    return [
        "-h", "localhost", "-p", str(platform.config.port("mqtt")), "--tls-version", "tlsv1.3",
        "--cafile", str(platform.ca), "--cert", str(identity.cert), "--key", str(identity.key),
    ]  # fmt: skip


class Subscriber:
    """`mosquitto_sub -v` in the background; each line it prints is `topic payload`."""

    def __init__(self, platform: Platform, identity: DeviceIdentity) -> None:
        self.device_id = identity.device_id
        self.lines: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.unread: list[tuple[str, Any]] = []
        arguments = [*tls_arguments(platform, identity), "-i", identity.device_id, "-q", "1", "-v"]
        self.process = subprocess.Popen(
            [str(mosquitto.binary("mosquitto_sub")), *arguments, "-t", f"devices/{identity.device_id}/#"],
            env=mosquitto.environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            topic, _, payload = line.rstrip("\n").partition(" ")
            try:
                self.lines.put((topic, json.loads(payload)))
            except ValueError:
                self.lines.put((topic, payload))

    def expect(self, suffix: str, within: float = 10.0) -> Any:
        """The first message on `devices/{id}/{suffix}`; others are kept for later expects (the
        cloud sends configuration and commands in no particular order)."""
        topic = f"devices/{self.device_id}/{suffix}"
        deadline = time.monotonic() + within
        while True:
            for index, (got, payload) in enumerate(self.unread):
                if got == topic:
                    del self.unread[index]
                    return payload
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"mosquitto_sub printed nothing on {topic} within {within}s")
            try:
                self.unread.append(self.lines.get(timeout=remaining))
            except queue.Empty:
                continue

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module", autouse=True)
def installed() -> None:
    mosquitto.install()


@pytest.fixture
def identity(rest: httpx.Client, tmp_path: Path) -> DeviceIdentity:
    return register_device(rest, tmp_path)


def publish(platform: Platform, identity: DeviceIdentity, suffix: str, payload: Any) -> None:
    message = payload if isinstance(payload, str) else json.dumps(payload)
    arguments = [*tls_arguments(platform, identity), "-i", f"{identity.device_id}:pub", "-q", "1"]
    subprocess.run(
        [
            str(mosquitto.binary("mosquitto_pub")),
            *arguments,
            "-t",
            f"devices/{identity.device_id}/{suffix}",
            "-m",
            message,
        ],
        env=mosquitto.environment(),
        check=True,
        timeout=20,
        capture_output=True,
    )


def test_a_device_driven_by_mosquitto_pub_and_sub(
    platform: Platform, rest: httpx.Client, identity: DeviceIdentity
) -> None:
    # Waiting for the device before it connects: a command and a configuration.
    queued = ok(rest.post(f"/v1/{identity.name}/commands", json={"command_name": "selftest.run"}))
    version = int(ok(rest.patch(f"/v1/{identity.name}/config", json={"desired": {"interval_s": 5}}))["desired_version"])

    device = Subscriber(platform, identity)
    try:
        # Delivered as soon as mosquitto_sub subscribes.
        assert device.expect("config/desired") == {"version": version, "config": {"interval_s": 5}}
        assert device.expect("commands")["name"] == queued["name"]
        assert eventually(lambda: ok(rest.get(f"/v1/{identity.name}/status"))["connection"].get("connected"))

        observations = {
            "observations": [
                {"id": "mq-1", "metric": "heart_rate", "time": "2026-11-24T09:30:00Z", "value": 71, "unit": "/min"},
                {"id": "mq-2", "metric": "spo2", "time": "2026-11-24T09:30:00Z", "value": 98, "unit": "%"},
            ]
        }
        publish(platform, identity, "observations", observations)
        assert device.expect("acks") == {"stored": ["mq-1", "mq-2"]}
        publish(platform, identity, "observations", observations)  # resent: stored once
        assert device.expect("acks") == {"stored": [], "duplicates": ["mq-1", "mq-2"]}
        listed = ok(rest.get(f"/v1/{identity.name}/observations"))["observations"]
        assert sorted(o["message_id"] for o in listed) == ["mq-1", "mq-2"]

        publish(platform, identity, "config/reported", {"version": version, "config": {"interval_s": 5}})
        command_id = str(queued["name"]).rsplit("/", 1)[-1]
        publish(platform, identity, f"commands/{command_id}/status", {"state": "COMPLETED", "result": {"ok": True}})
        publish(platform, identity, "status", {"state": "OK", "battery_percent": 88})
        assert eventually(lambda: ok(rest.get(f"/v1/{identity.name}/config"))["in_sync"])
        assert eventually(lambda: ok(rest.get(f"/v1/{queued['name']}"))["state"] == "STATE_COMPLETED")
        assert eventually(lambda: ok(rest.get(f"/v1/{identity.name}/status")).get("battery_percent") == 88)

        # Live, while connected.
        live = ok(rest.post(f"/v1/{identity.name}/commands", json={"command_name": "measure.now"}))
        assert device.expect("commands")["name"] == live["name"]

        publish(platform, identity, "observations", "this is not JSON")
        error = device.expect("errors")
        assert (error["topic"], error["reason"]) == (f"devices/{identity.device_id}/observations", "MALFORMED_PAYLOAD")
    finally:
        device.close()
