"""DeviceRepository's document mapping (the MongoDB round trip itself is the shared MongoRepository's)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import pytest

from services.device.domain import Device
from services.device.repository import DeviceRepository

AT = datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)
LENT = Device(
    id="SN-1",
    organization="organizations/home",
    display_name="Pump 1",
    model="IP-7",
    create_time=AT,
    update_time=AT,
    revision=4,
    device_type="infusion-pump",
    firmware_version="2.1.0",
    hardware_version="C",
    care_organization="organizations/care",
    patient="organizations/care/patients/p-1",
    uid="0f3c",
)


@pytest.fixture
def repository() -> DeviceRepository:
    return DeviceRepository(cast(Any, {"devices": None}))


def test_document_shape(repository: DeviceRepository) -> None:
    assert repository.to_document(LENT) == {
        "_id": "SN-1",
        "organization": "organizations/home",
        "display_name": "Pump 1",
        "model": "IP-7",
        "device_type": "infusion-pump",
        "firmware_version": "2.1.0",
        "hardware_version": "C",
        "care_organization": "organizations/care",
        "patient": "organizations/care/patients/p-1",
        # An array: the list scope `organizations = X` matches the owner or the care organization.
        "organizations": ["organizations/home", "organizations/care"],
        "uid": "0f3c",
        "create_time": AT,
        "update_time": AT,
        "revision": 4,
    }


def test_an_unlent_device_is_visible_to_its_owner_only(repository: DeviceRepository) -> None:
    own = Device("SN-2", "organizations/home", "", "", AT, AT)

    assert repository.to_document(own)["organizations"] == ["organizations/home"]


@pytest.mark.parametrize("device", [LENT, Device("SN-2", "organizations/home", "", "", AT, AT, uid="u")])
def test_round_trip(repository: DeviceRepository, device: Device) -> None:
    assert repository.from_document(repository.to_document(device)) == device


def test_a_registration_stored_before_the_new_fields(repository: DeviceRepository) -> None:
    legacy = {
        "_id": "SN-OLD",
        "organization": "organizations/home",
        "display_name": "Old",
        "model": "PO-200",
        "create_time": AT,
        "update_time": AT,
        "revision": 2,
    }

    device = repository.from_document(legacy)

    assert device == Device("SN-OLD", "organizations/home", "Old", "PO-200", AT, AT, 2)
    assert device.state_key == "SN-OLD"  # keyed by serial until it has a uid
    assert device.organizations == ("organizations/home",)
