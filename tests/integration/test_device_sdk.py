"""The device SDK (clients/python/medmesh_device) against the real platform and MQTT adapter:
a device registered over REST with a certificate streams observations that are acked and then
found over REST, completes commands created over REST, applies configuration changes, reports
status and uploads files that become AVAILABLE (docs/device-protocol.md)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from medmesh_device import (
    Command,
    DeviceClient,
    DeviceError,
    NotAuthorized,
    Observation,
    Outcome,
    UploadError,
    Waveform,
)
from tests.integration.devices import DeviceIdentity, register_device
from tests.integration.people import create_organization, ok, unique
from tests.integration.platform import Platform

pytestmark = pytest.mark.integration


async def until(check: Callable[[], Awaitable[Any]], within: float = 15.0) -> Any:
    """Polls `check` until it returns something truthy."""
    async with asyncio.timeout(within):
        while not (result := await check()):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        return result


@pytest.fixture
async def api(platform: Platform, admin_token: str) -> AsyncIterator[httpx.AsyncClient]:
    """REST as the platform admin, asynchronous: the device shares the event loop with the test."""
    context = ssl.create_default_context(cafile=str(platform.ca))
    headers = {"authorization": f"Bearer {admin_token}"}
    async with httpx.AsyncClient(base_url=platform.gateway, verify=context, timeout=20.0, headers=headers) as client:
        yield client


async def get(api: httpx.AsyncClient, path: str, **params: Any) -> dict[str, Any]:
    return ok(await api.get(path, params=params))


async def post(api: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    return ok(await api.post(path, json=body))


async def set_desired(api: httpx.AsyncClient, device: str, desired: dict[str, Any]) -> int:
    reply = ok(await api.patch(f"/v1/{device}/config", params={"update_mask": "desired"}, json={"desired": desired}))
    return int(reply["desired_version"])


class Device:
    """What the device's callbacks saw."""

    def __init__(self) -> None:
        self.configs: list[tuple[int, dict[str, Any]]] = []
        self.commands: list[Command] = []
        self.errors: list[DeviceError] = []

    async def on_config(self, version: int, config: dict[str, Any]) -> None:
        self.configs.append((version, config))

    async def on_command(self, command: Command) -> dict[str, Any]:
        self.commands.append(command)
        if command.command == "self_test.fail":
            raise RuntimeError("cuff not attached")
        if command.command == "wait":
            await asyncio.sleep(3600)
        return {"systolic": 121, "cuff": command.parameters.get("cuff")}

    async def on_error(self, error: DeviceError) -> None:
        self.errors.append(error)


@pytest.fixture(scope="module")
def organization(rest: httpx.Client) -> str:
    return create_organization(rest, unique("SDK clinic"))


@pytest.fixture
def identity(rest: httpx.Client, organization: str, tmp_path: Path) -> DeviceIdentity:
    return register_device(rest, tmp_path, organization)


def connect(platform: Platform, identity: DeviceIdentity, seen: Device, **options: Any) -> DeviceClient:
    return DeviceClient.with_certificate(
        identity.device_id,
        "localhost",
        platform.config.port("mqtt"),
        ca_file=platform.ca,
        cert_file=identity.cert,
        key_file=identity.key,
        on_config=seen.on_config,
        on_command=seen.on_command,
        on_error=seen.on_error,
        **options,
    )


@pytest.fixture
async def online(platform: Platform, identity: DeviceIdentity) -> AsyncIterator[tuple[DeviceClient, Device]]:
    seen = Device()
    async with connect(platform, identity, seen) as device:
        await device.wait_connected(timeout=15)
        yield device, seen


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def test_observations_are_acked_once_stored_and_found_over_rest(
    api: httpx.AsyncClient, identity: DeviceIdentity, online: tuple[DeviceClient, Device]
) -> None:
    device, seen = online
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    batch = [
        Observation("heart_rate", 72, unit="/min", time=start, id=unique("hr")),
        Observation("spo2", 97.5, unit="%", time=start),
        Observation("lead_off", True, time=start),
        Observation("rhythm", "sinus", time=start),
        Observation("ecg.lead_ii", waveform=Waveform(250, [0.12, 0.15, 0.11]), unit="mV", time=start),
    ]
    results = await asyncio.wait_for(device.send_observations(batch), 15)
    assert [r.outcome for r in results.values()] == [Outcome.STORED] * 5

    again = await asyncio.wait_for(device.send_observations([batch[0]]), 15)
    assert again[str(batch[0].id)].outcome is Outcome.DUPLICATE

    window = f'time >= "{_rfc3339(start)}" AND time <= "{_rfc3339(start + timedelta(seconds=1))}"'
    page = await get(api, f"/v1/{identity.name}/observations", filter=window, page_size=50)
    found = {o["message_id"]: o for o in page["observations"]}
    assert set(found) == set(results)
    assert found[str(batch[0].id)]["numeric_value"] == 72
    by_metric = {o["metric"]: o for o in found.values()}
    assert by_metric["lead_off"]["boolean_value"] is True
    assert by_metric["rhythm"]["string_value"] == "sinus"
    assert by_metric["ecg.lead_ii"]["waveform"]["samples"] == [0.12, 0.15, 0.11]
    assert (device.counters.stored, device.counters.duplicates, device.counters.rejected) == (5, 1, 0)
    assert seen.errors == []


async def test_commands_created_over_rest_are_completed_or_failed_by_the_device(
    api: httpx.AsyncClient, identity: DeviceIdentity, online: tuple[DeviceClient, Device]
) -> None:
    device, seen = online

    async def create(name: str) -> dict[str, Any]:
        body = {"command_name": name, "parameters": {"cuff": "adult"}, "timeout": "30s"}
        return await post(api, f"/v1/{identity.name}/commands", body)

    def in_state(command: dict[str, Any], state: str) -> Callable[[], Awaitable[Any]]:
        async def check() -> Any:
            found = await get(api, f"/v1/{command['name']}")
            return found["state"] == state and found

        return check

    measure = await create("measure.blood_pressure")
    done = await until(in_state(measure, "STATE_COMPLETED"))
    assert done["result"] == {"systolic": 121, "cuff": "adult"}
    (received,) = seen.commands
    assert (received.name, received.command, received.timeout_seconds) == (
        measure["name"],
        "measure.blood_pressure",
        30,
    )

    failing = await create("self_test.fail")
    failed = await until(in_state(failing, "STATE_FAILED"))
    assert failed["error_message"] == "cuff not attached"

    running = await create("wait")
    await until(in_state(running, "STATE_IN_PROGRESS"))
    await post(api, f"/v1/{running['name']}:stop", {})
    stopped = await until(in_state(running, "STATE_FAILED"))
    assert stopped["error_message"] == "stopped"
    assert (device.counters.commands_completed, device.counters.commands_failed) == (1, 2)
    assert [c.command for c in seen.commands] == ["measure.blood_pressure", "self_test.fail", "wait"]


async def test_a_configuration_change_is_applied_and_reported_in_sync(
    api: httpx.AsyncClient, identity: DeviceIdentity, online: tuple[DeviceClient, Device]
) -> None:
    device, seen = online
    version = await set_desired(api, identity.name, {"sample_interval_s": 5, "alarm_volume": 3})

    async def in_sync() -> Any:
        config = await get(api, f"/v1/{identity.name}/config")
        return config.get("in_sync") and config

    config = await until(in_sync)
    assert int(config["reported_version"]) == version
    assert config["reported"] == {"sample_interval_s": 5, "alarm_volume": 3}
    assert seen.configs == [(version, {"sample_interval_s": 5, "alarm_volume": 3})]
    assert device.counters.configs_applied == 1


async def test_what_waited_while_the_device_was_offline_arrives_when_it_connects(
    platform: Platform, api: httpx.AsyncClient, identity: DeviceIdentity
) -> None:
    version = await set_desired(api, identity.name, {"mode": "night"})
    command = await post(api, f"/v1/{identity.name}/commands", {"command_name": "sync.clock", "ttl": "300s"})

    async def completed() -> bool:
        return bool((await get(api, f"/v1/{command['name']}"))["state"] == "STATE_COMPLETED")

    async def in_sync() -> bool:
        return bool((await get(api, f"/v1/{identity.name}/config")).get("in_sync"))

    seen = Device()
    async with connect(platform, identity, seen) as device:
        await device.wait_connected(timeout=15)
        await asyncio.wait_for(device.report_status("OK", battery_percent=88, firmware_version="3.1.0"), 15)
        assert await until(completed)
        assert await until(in_sync)
        status = await get(api, f"/v1/{identity.name}/status")
    assert seen.configs == [(version, {"mode": "night"})]
    assert [c.command for c in seen.commands] == ["sync.clock"]
    assert status["battery_percent"] == 88
    assert status["firmware_version"] == "3.1.0"
    assert status["connection"]["connected"] is True


async def test_temporary_credentials_and_a_revoked_certificate(
    platform: Platform, api: httpx.AsyncClient, identity: DeviceIdentity
) -> None:
    issued = await post(api, f"/v1/{identity.name}:createTemporaryCredentials", {})
    relay = DeviceClient.with_credentials(
        identity.device_id,
        "localhost",
        platform.config.port("mqtt"),
        ca_file=platform.ca,
        username=issued["username"],
        password=issued["password"],
        tag="phone",
    )
    async with relay:
        await relay.wait_connected(timeout=15)
        results = await asyncio.wait_for(relay.send_observations([Observation("heart_rate", 64)]), 15)
    assert [r.outcome for r in results.values()] == [Outcome.STORED]

    listed = (await get(api, f"/v1/{identity.name}/certificates"))["certificates"]
    await post(api, f"/v1/{listed[0]['name']}:revoke", {})
    async with connect(platform, identity, Device()) as refused:
        with pytest.raises(NotAuthorized):
            await refused.wait_connected(timeout=15)


async def test_files_upload_through_pre_signed_urls_and_become_available(
    platform: Platform, api: httpx.AsyncClient, online: tuple[DeviceClient, Device], tmp_path: Path
) -> None:
    device, _ = online
    small = os.urandom(300 * 1024)
    name = await asyncio.wait_for(device.upload_file(small, display_name="ecg.bin"), 60)
    stored = await get(api, f"/v1/{name}")
    assert stored["state"] == "STATE_AVAILABLE"
    assert int(stored["size_bytes"]) == len(small)
    assert stored["sha256"] == hashlib.sha256(small).hexdigest()
    download = (await get(api, f"/v1/{name}:downloadUrl"))["url"]
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(platform.ca))) as http:
        assert (await http.get(download)).content == small

    # Above the platform's multipart threshold (64 MiB): parts of 16 MiB, each with its ETag.
    large = tmp_path / "video.bin"
    large.write_bytes(os.urandom(70 * 1024 * 1024))
    name = await asyncio.wait_for(device.upload_file(large), 120)
    stored = await get(api, f"/v1/{name}")
    assert (stored["state"], int(stored["size_bytes"]), stored["display_name"]) == (
        "STATE_AVAILABLE",
        70 * 1024 * 1024,
        "video.bin",
    )

    with pytest.raises(UploadError) as refused:
        await asyncio.wait_for(device.upload_file(b"x", content_type="application/x-not-allowed"), 30)
    assert refused.value.reason == "CONTENT_TYPE_NOT_ALLOWED"
