"""The configuration twin: desired versions (race-safe), the device's reports, what is pending,
who may read and change it, what is audited; the servicers' Struct conversions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf import field_mask_pb2, json_format, struct_pb2

from medmesh.device.v1 import device_internal_service_pb2 as internal_pb
from medmesh.device.v1 import device_service_pb2 as pb
from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import Principal, Role, acting_as, internal_principal
from medmesh.runtime.errors import Aborted, InvalidArgument, NotFound, PermissionDenied, Unavailable
from medmesh.runtime.resources import now
from services.device import twin
from services.device.domain import Device
from services.device.internal import DeviceInternal
from services.device.internal_servicer import DeviceInternalServicer
from services.device.service import DeviceService
from services.device.servicer import DeviceServicer
from services.device.twin import DesiredConfig, ReportedConfig
from tests.unit.fakes import FakeOrganizationDirectory, InMemoryRepository
from tests.unit.test_device_fakes import FakePatientDirectory, InMemoryConfigStore, InMemoryStatusStore

MANUFACTURER = "organizations/manufacturer"
HOME = "organizations/home"
CARE = "organizations/care"
OTHER = "organizations/other"
CONFIG = "devices/SN-1/config"
ADMIN = Principal(f"{MANUFACTURER}/users/admin", MANUFACTURER, Role.PLATFORM_ADMIN)
HOME_OPERATOR = Principal(f"{HOME}/users/op", HOME, Role.OPERATOR)
ADAPTER = internal_principal("mqtt_adapter")


def a_device(serial: str = "SN-1", **values: Any) -> Device:
    at = now()
    return replace(Device(serial, HOME, "Pump", "IP-7", at, at, uid=f"uid-{serial}"), **values)


@pytest.fixture(autouse=True)
def _as_home_operator() -> Iterator[None]:
    with acting_as(HOME_OPERATOR):
        yield


@pytest.fixture
def store() -> InMemoryRepository[Device]:
    store: InMemoryRepository[Device] = InMemoryRepository("device")
    store.put(a_device())
    return store


@pytest.fixture
def configs() -> InMemoryConfigStore:
    return InMemoryConfigStore()


@pytest.fixture
def trail() -> RecordingAuditTrail:
    return RecordingAuditTrail("device")


@pytest.fixture
def service(
    store: InMemoryRepository[Device], configs: InMemoryConfigStore, trail: RecordingAuditTrail
) -> DeviceService:
    return DeviceService(
        store,
        FakeOrganizationDirectory({HOME, CARE, OTHER}),
        trail,
        patients=FakePatientDirectory(),
        configs=configs,
        statuses=InMemoryStatusStore(),
    )


@pytest.fixture
def internal(store: InMemoryRepository[Device], configs: InMemoryConfigStore) -> DeviceInternal:
    return DeviceInternal(store, configs, InMemoryStatusStore())


# --- domain -------------------------------------------------------------------------------------


def test_the_size_limit_is_on_compact_json() -> None:
    overhead = len(json.dumps({"k": ""}, separators=(",", ":")))
    just_fits = {"k": "x" * (twin.MAX_CONFIG_BYTES - overhead)}

    assert twin.require_config(just_fits, "f") == just_fits
    with pytest.raises(InvalidArgument) as caught:
        twin.require_config({"k": "x" * (twin.MAX_CONFIG_BYTES - overhead + 1)}, "f")
    assert caught.value.reason == "CONFIG_TOO_LARGE"
    assert [v.field for v in caught.value.field_violations] == ["f"]


def test_non_ascii_counts_in_bytes() -> None:
    with pytest.raises(InvalidArgument):
        twin.require_config({"k": "é" * (twin.MAX_CONFIG_BYTES // 2)}, "f")


@pytest.mark.parametrize("number", [float("nan"), float("inf"), -float("inf")])
def test_numbers_json_cannot_carry_are_invalid(number: float) -> None:
    with pytest.raises(InvalidArgument):
        twin.require_config({"rate": number}, "f")


def test_integral_doubles_are_kept_as_integers() -> None:
    values = twin.require_config({"rate": 5.0, "ratio": 0.5, "list": [1.0, {"n": 2.0}], "on": True}, "f")

    assert values == {"rate": 5, "ratio": 0.5, "list": [1, {"n": 2}], "on": True}
    assert isinstance(values["rate"], int)
    assert values["on"] is True


@pytest.mark.parametrize(
    ("paths", "keys"),
    [([], None), (["*"], None), (["desired"], None), (["desired.mode", "desired.rate"], {"mode", "rate"})],
)
def test_desired_masks(paths: list[str], keys: set[str] | None) -> None:
    assert twin.resolve_desired_mask(paths) == keys


@pytest.mark.parametrize("paths", [["reported"], ["desired."], ["desired_version"], ["desired", "etag"]])
def test_bad_desired_masks(paths: list[str]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        twin.resolve_desired_mask(paths)
    assert caught.value.reason == "FIELD_NOT_UPDATABLE"


def test_a_masked_key_absent_from_the_request_is_removed() -> None:
    current = {"mode": "home", "rate": 5, "alarm": {"high": 120}}

    merged = twin.merged_desired(current, {"rate": 10, "extra": 1}, {"rate", "alarm"})

    assert merged == {"mode": "home", "rate": 10}
    assert current == {"mode": "home", "rate": 5, "alarm": {"high": 120}}


def test_in_sync_and_pending() -> None:
    at = now()
    d3 = DesiredConfig("k", 3, {"a": 1}, at)

    assert twin.DeviceConfig("devices/x", None, None).in_sync
    assert twin.DeviceConfig("devices/x", None, None).pending is None
    assert twin.DeviceConfig("devices/x", d3, None).pending == d3
    assert twin.DeviceConfig("devices/x", d3, ReportedConfig("k", 2, {}, at)).pending == d3
    synced = twin.DeviceConfig("devices/x", d3, ReportedConfig("k", 3, {"a": 1}, at))
    assert synced.in_sync
    assert synced.pending is None


# --- GetDeviceConfig / UpdateDeviceConfig ----------------------------------------------------------


async def test_a_new_device_has_an_empty_twin(service: DeviceService) -> None:
    config = await service.get_config(CONFIG)

    assert (config.name, config.desired, config.reported) == (CONFIG, None, None)
    assert (config.desired_version, config.reported_version, config.in_sync) == (0, 0, True)
    assert config.etag == twin.config_etag("devices/SN-1", 0)


async def test_each_change_makes_the_next_version(
    service: DeviceService, configs: InMemoryConfigStore, trail: RecordingAuditTrail
) -> None:
    first = await service.update_config(CONFIG, {"mode": "home", "rate": 5}, [], "")
    second = await service.update_config(CONFIG, {"rate": 10}, ["desired.rate"], first.etag)
    read = await service.get_config(CONFIG)

    assert (first.desired_version, second.desired_version) == (1, 2)
    assert second.desired is not None
    assert second.desired.values == {"mode": "home", "rate": 10}
    assert read == second
    assert second.etag != first.etag
    assert not second.in_sync
    assert configs.versions("uid-SN-1") == [1, 2]
    assert [(e.organization, e.resource, e.description) for e in trail.events] == [
        (HOME, CONFIG, "desired configuration version 1"),
        (HOME, CONFIG, "desired configuration version 2"),
    ]
    assert trail.events[0].actor.subject == HOME_OPERATOR.subject


async def test_a_stale_etag_is_aborted(service: DeviceService, configs: InMemoryConfigStore) -> None:
    first = await service.update_config(CONFIG, {"rate": 5}, [], "")
    await service.update_config(CONFIG, {"rate": 6}, [], "")

    with pytest.raises(Aborted) as caught:
        await service.update_config(CONFIG, {"rate": 7}, [], first.etag)

    assert caught.value.metadata == {"resource": CONFIG}
    assert configs.versions("uid-SN-1") == [1, 2]


async def test_the_same_configuration_again_makes_no_version(
    service: DeviceService, trail: RecordingAuditTrail
) -> None:
    first = await service.update_config(CONFIG, {"rate": 5.0}, [], "")
    again = await service.update_config(CONFIG, {"rate": 5}, ["desired"], first.etag)
    nothing = await service.update_config("devices/SN-1/config", {}, ["desired.absent"], "")

    assert again.desired_version == nothing.desired_version == 1
    assert len(trail.events) == 1


async def test_an_oversized_configuration_is_invalid_and_stores_nothing(
    service: DeviceService, configs: InMemoryConfigStore, trail: RecordingAuditTrail
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.update_config(CONFIG, {"blob": "x" * twin.MAX_CONFIG_BYTES}, [], "")

    assert caught.value.reason == "CONFIG_TOO_LARGE"
    assert [v.field for v in caught.value.field_violations] == ["device_config.desired"]
    assert configs.desired == {}
    assert trail.events == []


async def test_a_lent_devices_configuration_is_audited_under_the_care_organization(
    service: DeviceService, store: InMemoryRepository[Device], trail: RecordingAuditTrail
) -> None:
    store.put(a_device(care_organization=CARE, patient=f"{CARE}/patients/p"))
    clinician = Principal(f"{CARE}/users/doc", CARE, Role.CLINICIAN)

    with acting_as(clinician):
        config = await service.update_config(CONFIG, {"protocol": "long-measurement"}, [], "")

    assert config.desired_version == 1
    assert [(e.organization, e.resource, e.actor.subject) for e in trail.events] == [(CARE, CONFIG, clinician.subject)]


@pytest.mark.parametrize("name", ["devices/SN-1", "devices/SN-1/configs", "devices//config", "config"])
async def test_malformed_config_names_are_invalid(service: DeviceService, name: str) -> None:
    with pytest.raises(InvalidArgument) as reading:
        await service.get_config(name)
    with pytest.raises(InvalidArgument) as writing:
        await service.update_config(name, {}, [], "")

    assert reading.value.reason == writing.value.reason == "INVALID_NAME"
    assert [v.field for v in writing.value.field_violations] == ["device_config.name"]


ALLOWED = "ALLOWED"


@pytest.mark.parametrize(
    ("caller", "read", "write"),
    [
        (ADMIN, ALLOWED, ALLOWED),
        (Principal(f"{HOME}/users/a", HOME, Role.ORGANIZATION_ADMIN), ALLOWED, ALLOWED),
        (Principal(f"{HOME}/users/c", HOME, Role.CLINICIAN), ALLOWED, ALLOWED),
        (Principal(f"{HOME}/users/p", HOME, Role.PATIENT, patient=f"{HOME}/patients/p"), "ROLE_NOT_ALLOWED", "x"),
        (Principal(f"{CARE}/users/o", CARE, Role.OPERATOR), ALLOWED, ALLOWED),
        (Principal(f"{CARE}/users/c", CARE, Role.CLINICIAN), ALLOWED, ALLOWED),
        (Principal(f"{OTHER}/users/a", OTHER, Role.ORGANIZATION_ADMIN), "ORGANIZATION_ACCESS_DENIED", "x"),
    ],
    ids=lambda value: value.subject if isinstance(value, Principal) else value,
)
async def test_who_may_read_and_change_a_lent_devices_configuration(
    service: DeviceService,
    store: InMemoryRepository[Device],
    configs: InMemoryConfigStore,
    caller: Principal,
    read: str,
    write: str,
) -> None:
    store.put(a_device(care_organization=CARE))

    with acting_as(caller):
        if read != ALLOWED:
            with pytest.raises(PermissionDenied) as reading:
                await service.get_config(CONFIG)
            with pytest.raises(PermissionDenied) as writing:
                await service.update_config(CONFIG, {"a": 1}, [], "")
            assert reading.value.reason == writing.value.reason == read
            assert configs.desired == {}
            return
        await service.get_config(CONFIG)
        assert (await service.update_config(CONFIG, {"a": 1}, [], "")).desired_version == 1


async def test_a_missing_devices_configuration(service: DeviceService) -> None:
    with pytest.raises(PermissionDenied):
        await service.get_config("devices/SN-404/config")
    with acting_as(ADMIN), pytest.raises(NotFound) as caught:
        await service.update_config("devices/SN-404/config", {"a": 1}, [], "")

    assert caught.value.reason == "DEVICE_NOT_FOUND"


async def test_a_service_started_without_a_configuration_store_says_so(store: InMemoryRepository[Device]) -> None:
    service = DeviceService(store, FakeOrganizationDirectory({HOME}), RecordingAuditTrail())

    with pytest.raises(Unavailable) as caught:
        await service.get_config(CONFIG)

    assert caught.value.reason == "NOT_CONFIGURED"


# --- races: versions are taken by insert, never lost -----------------------------------------------


async def test_a_change_that_loses_the_version_with_an_etag_is_aborted(
    service: DeviceService, configs: InMemoryConfigStore, trail: RecordingAuditTrail
) -> None:
    read = await service.get_config(CONFIG)

    async def another_writer(config: DesiredConfig) -> None:
        configs.before_insert = None
        await configs.insert_desired(replace(config, values={"theirs": True}))

    configs.before_insert = another_writer
    with pytest.raises(Aborted):
        await service.update_config(CONFIG, {"mine": True}, [], read.etag)

    current = await configs.current_desired("uid-SN-1")
    assert current is not None
    assert (current.version, current.values) == (1, {"theirs": True})
    assert trail.events == []


async def test_a_change_without_an_etag_takes_the_next_free_version(
    service: DeviceService, configs: InMemoryConfigStore, trail: RecordingAuditTrail
) -> None:
    async def another_writer(config: DesiredConfig) -> None:
        configs.before_insert = None
        await configs.insert_desired(replace(config, values={"theirs": True}))

    configs.before_insert = another_writer
    mine = await service.update_config(CONFIG, {"mine": True}, [], "")

    assert mine.desired_version == 2
    assert [c.values for c in sorted(configs.desired.values(), key=lambda c: c.version)] == [
        {"theirs": True},
        {"mine": True},
    ]
    assert len(trail.events) == 1


async def test_a_change_that_never_finds_a_free_version_gives_up(
    service: DeviceService, configs: InMemoryConfigStore
) -> None:
    async def always_first(config: DesiredConfig) -> None:
        configs.desired[(config.device_key, config.version)] = replace(config, values={"theirs": config.version})

    configs.before_insert = always_first
    with pytest.raises(Aborted):
        await service.update_config(CONFIG, {"mine": True}, [], "")

    assert configs.versions("uid-SN-1") == [1, 2, 3]


async def test_concurrent_changes_get_distinct_gapless_versions(
    service: DeviceService, configs: InMemoryConfigStore, trail: RecordingAuditTrail
) -> None:
    configs.yield_between = True  # every store call lets the other writers run

    async def change(i: int) -> int | None:
        try:
            return (await service.update_config(CONFIG, {"writer": i}, [], "")).desired_version
        except Aborted:
            return None

    results = await asyncio.gather(*(change(i) for i in range(12)))

    won = sorted(v for v in results if v is not None)
    assert won == list(range(1, len(won) + 1))  # every version once, none skipped
    assert configs.versions("uid-SN-1") == won
    assert len(trail.events) == len(won)
    # Each stored version holds the values of the writer that was told it got it.
    for i, version in enumerate(results):
        if version is not None:
            assert configs.desired[("uid-SN-1", version)].values == {"writer": i}


# --- the device's side (internal) ------------------------------------------------------------------


async def test_the_handshake_with_the_device(service: DeviceService, internal: DeviceInternal) -> None:
    await service.update_config(CONFIG, {"rate": 5}, [], "")

    with acting_as(ADAPTER):
        pending = await internal.pending_config("devices/SN-1")
        still = await internal.report_config("devices/SN-1", {"rate": 4}, 0, None)
        done = await internal.report_config("devices/SN-1", {"rate": 5.0}, 1, None)
        after = await internal.pending_config("devices/SN-1")

    assert pending is not None
    assert (pending.version, pending.values) == (1, {"rate": 5})
    assert still == pending
    assert done is None
    assert after is None
    config = await service.get_config(CONFIG)
    assert config.in_sync
    assert config.reported is not None
    assert (config.reported.version, config.reported.values) == (1, {"rate": 5})


async def test_nothing_is_pending_before_anything_is_desired(internal: DeviceInternal) -> None:
    with acting_as(ADAPTER):
        assert await internal.pending_config("devices/SN-1") is None
        assert await internal.report_config("devices/SN-1", {"factory": True}, 0, None) is None


async def test_a_version_the_platform_never_issued_is_refused(
    service: DeviceService, internal: DeviceInternal, configs: InMemoryConfigStore
) -> None:
    await service.update_config(CONFIG, {"rate": 5}, [], "")

    with acting_as(ADAPTER), pytest.raises(InvalidArgument) as caught:
        await internal.report_config("devices/SN-1", {"rate": 9}, 2, None)

    assert caught.value.reason == "REPORTED_VERSION_AHEAD"
    assert caught.value.metadata == {"reported_version": "2", "desired_version": "1"}
    assert configs.reported_configs == {}


async def test_an_oversized_report_is_refused(internal: DeviceInternal, configs: InMemoryConfigStore) -> None:
    with acting_as(ADAPTER), pytest.raises(InvalidArgument) as caught:
        await internal.report_config("devices/SN-1", {"blob": "x" * twin.MAX_CONFIG_BYTES}, 0, None)

    assert caught.value.reason == "CONFIG_TOO_LARGE"
    assert configs.reported_configs == {}


async def test_the_report_does_not_make_a_callers_etag_stale(service: DeviceService, internal: DeviceInternal) -> None:
    read = await service.update_config(CONFIG, {"rate": 5}, [], "")
    with acting_as(ADAPTER):
        await internal.report_config("devices/SN-1", {"rate": 5}, 1, None)

    changed = await service.update_config(CONFIG, {"rate": 6}, [], read.etag)

    assert changed.desired_version == 2


async def test_a_report_time_from_the_future_is_taken_as_now(
    internal: DeviceInternal, configs: InMemoryConfigStore
) -> None:
    with acting_as(ADAPTER):
        await internal.report_config("devices/SN-1", {}, 0, datetime.now(UTC) + timedelta(days=1))

    assert configs.reported_configs["uid-SN-1"].update_time <= datetime.now(UTC)


async def test_internal_calls_for_unknown_devices_and_from_users(internal: DeviceInternal) -> None:
    with acting_as(ADAPTER), pytest.raises(NotFound):
        await internal.pending_config("devices/SN-404")
    with pytest.raises(PermissionDenied) as caught:
        await internal.report_config("devices/SN-1", {}, 0, None)

    assert caught.value.reason == "INTERNAL_ONLY"


async def test_a_serial_registered_again_starts_with_an_empty_twin(
    service: DeviceService, store: InMemoryRepository[Device], configs: InMemoryConfigStore
) -> None:
    await service.update_config(CONFIG, {"rate": 5}, [], "")
    configs.desired[("uid-SN-1", 1)] = replace(configs.desired[("uid-SN-1", 1)])  # left behind by a crash
    store.put(a_device(uid="uid-SN-1-again"))

    config = await service.get_config(CONFIG)

    assert (config.desired, config.desired_version) == (None, 0)


async def test_deleting_a_device_forgets_its_twin(
    service: DeviceService, internal: DeviceInternal, configs: InMemoryConfigStore
) -> None:
    await service.update_config(CONFIG, {"rate": 5}, [], "")
    with acting_as(ADAPTER):
        await internal.report_config("devices/SN-1", {"rate": 5}, 1, None)

    with acting_as(ADMIN):
        await service.delete("devices/SN-1", "")

    assert configs.desired == {}
    assert configs.reported_configs == {}


# --- servicers ---------------------------------------------------------------------------------------


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


async def test_servicer_round_trip(service: DeviceService, internal: DeviceInternal) -> None:
    servicer = DeviceServicer(service)
    internal_servicer = DeviceInternalServicer(internal)
    desired = {"mode": "home", "alarm": {"high": 120, "low": 40.5}, "steps": [1, 2], "on": True, "note": None}

    empty = await servicer.GetDeviceConfig(pb.GetDeviceConfigRequest(name=CONFIG), None)
    updated = await servicer.UpdateDeviceConfig(
        pb.UpdateDeviceConfigRequest(device_config=pb.DeviceConfig(name=CONFIG, desired=struct(desired))), None
    )
    masked = await servicer.UpdateDeviceConfig(
        pb.UpdateDeviceConfigRequest(
            device_config=pb.DeviceConfig(name=CONFIG, desired=struct({"mode": "clinic"}), etag=updated.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["desired.mode"]),
        ),
        None,
    )
    with acting_as(ADAPTER):
        pending = await internal_servicer.GetPendingConfig(
            internal_pb.GetPendingConfigRequest(device="devices/SN-1"), None
        )
        after_report = await internal_servicer.ReportConfig(
            internal_pb.ReportConfigRequest(device="devices/SN-1", reported=pending.desired, reported_version=2), None
        )
    read = await servicer.GetDeviceConfig(pb.GetDeviceConfigRequest(name=CONFIG), None)

    assert (empty.name, empty.desired_version, empty.in_sync, empty.HasField("desired")) == (CONFIG, 0, True, False)
    assert updated.desired == struct(desired)
    assert updated.HasField("desired_update_time")
    assert not updated.HasField("reported")
    assert masked.desired_version == 2
    assert json_format.MessageToDict(masked.desired) == {**desired, "mode": "clinic"}
    assert (pending.desired_version, pending.desired) == (2, masked.desired)
    assert after_report == internal_pb.PendingConfig()
    assert (read.in_sync, read.reported_version, read.reported) == (True, 2, masked.desired)
    assert read.etag == masked.etag
