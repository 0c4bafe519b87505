"""FileService use cases against in-memory fakes: tenancy and roles, limits, the upload lifecycle,
races between completion, expiry and deletion, and one audit event per change."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import Principal, Role, acting_as, internal_principal
from medmesh.runtime.errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from services.file.domain import DeviceAssignment, Ending, File, FileDraft, FilePolicy, FileState, Settlement
from services.file.service import CreatedFile, FileService
from tests.unit.test_file_fakes import Clock, FakeDeviceDirectory, FakeFileStore, FakeStorage

ORG_A = "organizations/a"
ORG_B = "organizations/b"
HOME = "organizations/manufacturer"
PATIENT_A = f"{ORG_A}/patients/p1"

DATA = b"an ECG recording" * 50  # 800 bytes: one PUT
DIGEST = hashlib.sha256(DATA).hexdigest()
# Tiny parts, so multipart files stay small: object storage's 5 MiB minimum is the S3 adapter's business.
POLICY = FilePolicy(multipart_threshold=1000, part_size=400, sweep_grace=timedelta(minutes=15))
BIG = bytes(range(256)) * 5  # 1280 bytes: parts of 400, 400, 400, 80
BIG_DIGEST = hashlib.sha256(BIG).hexdigest()

# SN-1 is owned by the manufacturer's customer B and lent to care organization A for patient p1.
SN1 = DeviceAssignment("devices/SN-1", ORG_B, ORG_A, PATIENT_A)
SN2 = DeviceAssignment("devices/SN-2", ORG_B)  # not in care: B's data


def user(role: Role, organization: str = ORG_A, patient: str = "") -> Principal:
    return Principal(f"{organization}/users/{role.value}", organization, role, patient=patient)


PLATFORM_ADMIN = user(Role.PLATFORM_ADMIN, HOME)
ADMIN_A = user(Role.ORGANIZATION_ADMIN)
CLINICIAN_A, CLINICIAN_B = user(Role.CLINICIAN), user(Role.CLINICIAN, ORG_B)
OPERATOR_A, OPERATOR_B = user(Role.OPERATOR), user(Role.OPERATOR, ORG_B)
PATIENT = user(Role.PATIENT, patient=PATIENT_A)
ADAPTER = internal_principal("mqtt_adapter")


@pytest.fixture
def store() -> FakeFileStore:
    return FakeFileStore()


@pytest.fixture
def storage() -> FakeStorage:
    return FakeStorage()


@pytest.fixture
def devices() -> FakeDeviceDirectory:
    return FakeDeviceDirectory(SN1, SN2)


@pytest.fixture
def trail() -> RecordingAuditTrail:
    return RecordingAuditTrail("file")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(
    store: FakeFileStore, storage: FakeStorage, devices: FakeDeviceDirectory, trail: RecordingAuditTrail, clock: Clock
) -> FileService:
    return FileService(store, storage, devices, trail, POLICY, clock)


@pytest.fixture(autouse=True)
def as_clinician_of_a() -> Iterator[None]:
    """Tests act as A's clinician unless they say otherwise."""
    with acting_as(CLINICIAN_A):
        yield


def draft(**changes: Any) -> FileDraft:
    values: dict[str, Any] = {
        "content_type": "application/octet-stream",
        "size_bytes": len(DATA),
        "sha256": DIGEST,
        "display_name": "recording.bin",
        "organization": ORG_A,
    }
    return FileDraft(**{**values, **changes})


def big_draft(**changes: Any) -> FileDraft:
    return draft(**{"size_bytes": len(BIG), "sha256": BIG_DIGEST, "content_type": "video/mp4", **changes})


def descriptions(trail: RecordingAuditTrail) -> list[str]:
    return [event.description for event in trail.events]


async def uploaded(service: FileService, storage: FakeStorage, data: bytes = DATA, **changes: Any) -> File:
    """A PENDING single-PUT file whose content the client has PUT."""
    created = await service.create(draft(**changes))
    storage.put(created.file.object_key, data)
    return created.file


async def upload_parts(storage: FakeStorage, created: CreatedFile, data: bytes = BIG) -> list[tuple[int, str]]:
    assert created.upload is not None
    size = created.upload.part_size
    return [
        (number, storage.put_part(created.file.upload_id, number, data[(number - 1) * size : number * size]))
        for number, _ in created.upload.parts
    ]


# --- create --------------------------------------------------------------------------------------


async def test_create_single_upload(service: FileService, storage: FakeStorage, trail: RecordingAuditTrail) -> None:
    created = await service.create(draft(), request_id="")

    file = created.file
    assert file.state is FileState.PENDING
    assert (file.organization, file.device, file.patient) == (ORG_A, "", "")
    assert (file.size_bytes, file.sha256, file.content_type) == (len(DATA), DIGEST, "application/octet-stream")
    assert file.object_key == f"a/{file.id}"
    assert file.upload_expire_time == file.create_time + timedelta(hours=24)
    assert created.upload is not None
    assert created.upload.single_url.startswith(f"https://s3.test/files/a/{file.id}?")
    assert (created.upload.parts, created.upload.part_size) == ((), 0)
    assert created.upload.expire_time == file.upload_expire_time
    assert storage.uploads == {}  # no multipart upload for a single PUT
    assert [(e.organization, e.resource) for e in trail.events] == [(ORG_A, file.name)]
    assert trail.events[0].actor.subject == CLINICIAN_A.subject


async def test_create_multipart_plans_parts(service: FileService, storage: FakeStorage) -> None:
    created = await service.create(big_draft())

    assert created.upload is not None
    assert created.upload.single_url == ""
    assert created.upload.part_size == 400
    assert [n for n, _ in created.upload.parts] == [1, 2, 3, 4]
    assert all(f"partNumber={n}&uploadId={created.file.upload_id}" in url for n, url in created.upload.parts)
    assert storage.uploads[created.file.upload_id].key == created.file.object_key
    assert storage.uploads[created.file.upload_id].content_type == "video/mp4"


async def test_the_device_decides_the_data_organization_and_patient(service: FileService) -> None:
    created = await service.create(draft(device="devices/SN-1", organization=""))

    assert (created.file.organization, created.file.patient) == (ORG_A, PATIENT_A)
    assert created.file.object_key.startswith("a/")


async def test_a_device_not_in_care_keeps_its_data_with_its_owner(service: FileService) -> None:
    with acting_as(OPERATOR_B):
        created = await service.create(draft(device="devices/SN-2", organization=""))

    assert (created.file.organization, created.file.patient) == (ORG_B, "")


async def test_the_owner_of_a_device_in_care_cannot_upload_its_data(
    service: FileService, trail: RecordingAuditTrail
) -> None:
    with acting_as(OPERATOR_B), pytest.raises(PermissionDenied) as denied:
        await service.create(draft(device="devices/SN-1", organization=""))

    assert denied.value.reason == "ORGANIZATION_ACCESS_DENIED"
    assert trail.events == []


async def test_naming_another_organization_than_the_devices_is_invalid(service: FileService) -> None:
    with pytest.raises(InvalidArgument) as invalid:
        await service.create(draft(device="devices/SN-1", organization=ORG_B))

    assert invalid.value.reason == "DEVICE_ORGANIZATION_MISMATCH"


async def test_an_unknown_device_is_denied_to_members_and_missing_to_platform_admins(service: FileService) -> None:
    with pytest.raises(PermissionDenied):
        await service.create(draft(device="devices/NOPE", organization=""))
    with acting_as(PLATFORM_ADMIN), pytest.raises(FailedPrecondition) as missing:
        await service.create(draft(device="devices/NOPE", organization=""))

    assert missing.value.reason == "DEVICE_NOT_FOUND"
    assert [v.field for v in missing.value.field_violations] == ["file.device"]


async def test_the_device_registry_being_down_is_unavailable(
    store: FakeFileStore, storage: FakeStorage, trail: RecordingAuditTrail, clock: Clock
) -> None:
    service = FileService(store, storage, FakeDeviceDirectory(unavailable=True), trail, POLICY, clock)

    with pytest.raises(Unavailable):
        await service.create(draft(device="devices/SN-1", organization=""))
    assert store.items == {}


async def test_without_a_device_the_organization_is_required_and_must_be_the_callers(service: FileService) -> None:
    with pytest.raises(InvalidArgument) as missing:
        await service.create(draft(organization=""))
    with pytest.raises(PermissionDenied):
        await service.create(draft(organization=ORG_B))
    with pytest.raises(InvalidArgument):
        await service.create(draft(organization="organizations/-"))

    assert [v.field for v in missing.value.field_violations] == ["file.organization"]


async def test_platform_admins_upload_for_any_organization(service: FileService) -> None:
    with acting_as(PLATFORM_ADMIN):
        created = await service.create(draft(organization=ORG_B))

    assert created.file.organization == ORG_B


@pytest.mark.parametrize("role", [Role.ORGANIZATION_ADMIN, Role.CLINICIAN, Role.OPERATOR])
async def test_members_may_upload(service: FileService, role: Role) -> None:
    with acting_as(user(role)):
        assert (await service.create(draft())).file.state is FileState.PENDING


async def test_patients_may_not_upload(service: FileService, trail: RecordingAuditTrail) -> None:
    with acting_as(PATIENT), pytest.raises(PermissionDenied) as denied:
        await service.create(draft())

    assert denied.value.reason == "ROLE_NOT_ALLOWED"
    assert trail.events == []


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
        ({"size_bytes": POLICY.max_bytes + 1}, "file.size_bytes", "FILE_TOO_LARGE"),
        ({"content_type": "text/html"}, "file.content_type", "CONTENT_TYPE_NOT_ALLOWED"),
        ({"content_type": "image/png; charset=x"}, "file.content_type", "INVALID_FIELD"),
        ({"sha256": "abc"}, "file.sha256", "INVALID_FIELD"),
        ({"patient": f"{ORG_B}/patients/p9"}, "file.patient", "PATIENT_ORGANIZATION_MISMATCH"),
        ({"display_name": "a\nb"}, "file.display_name", "INVALID_FIELD"),
    ],
)
async def test_limits_are_checked_before_anything_is_stored(
    service: FileService,
    store: FakeFileStore,
    storage: FakeStorage,
    trail: RecordingAuditTrail,
    changes: dict[str, Any],
    field: str,
    reason: str,
) -> None:
    with pytest.raises(InvalidArgument) as invalid:
        await service.create(big_draft(**changes))

    assert [v.field for v in invalid.value.field_violations] == [field]
    assert invalid.value.reason == reason
    assert (store.items, storage.uploads, trail.events) == ({}, {}, [])


async def test_mime_type_and_digest_are_normalized(service: FileService) -> None:
    created = await service.create(draft(content_type="Application/Octet-Stream", sha256=DIGEST.upper()))

    assert (created.file.content_type, created.file.sha256) == ("application/octet-stream", DIGEST)


# --- idempotent create ---------------------------------------------------------------------------


async def test_a_retried_create_returns_the_same_file_with_fresh_urls(
    service: FileService, storage: FakeStorage, trail: RecordingAuditTrail, clock: Clock
) -> None:
    first = await service.create(big_draft(), request_id="req-1")
    clock.advance(minutes=10)
    again = await service.create(big_draft(), request_id="req-1")

    assert again.file == first.file
    assert again.upload is not None
    assert first.upload is not None
    assert again.upload.parts == first.upload.parts  # same upload id, same parts
    assert again.upload.expire_time == first.file.upload_expire_time
    assert len(storage.uploads) == 1
    assert len(trail.events) == 1


async def test_a_request_id_is_per_caller(service: FileService) -> None:
    mine = await service.create(draft(), request_id="req-1")
    with acting_as(OPERATOR_A):
        theirs = await service.create(draft(), request_id="req-1")

    assert mine.file.id != theirs.file.id


async def test_a_request_id_reused_for_other_content_is_refused(service: FileService) -> None:
    await service.create(draft(), request_id="req-1")

    with pytest.raises(AlreadyExists) as reused:
        await service.create(draft(size_bytes=1), request_id="req-1")

    assert reused.value.reason == "REQUEST_ID_REUSED"


async def test_a_create_losing_the_request_id_race_answers_the_winners_file(
    service: FileService, store: FakeFileStore, storage: FakeStorage, trail: RecordingAuditTrail
) -> None:
    results: list[CreatedFile] = []

    async def concurrent_retry() -> None:  # lands between this create's lookup and its insert
        results.append(await service.create(big_draft(), request_id="req-1"))

    store.before_insert = concurrent_retry
    loser = await service.create(big_draft(), request_id="req-1")

    assert loser.file == results[0].file
    assert len(store.items) == 1
    assert list(storage.uploads) == [loser.file.upload_id]  # the loser's own multipart upload was aborted
    assert len(storage.aborted) == 1
    assert len(trail.events) == 1


async def test_a_retry_after_completion_returns_the_file_without_upload(
    service: FileService, storage: FakeStorage
) -> None:
    created = await service.create(draft(), request_id="req-1")
    storage.put(created.file.object_key, DATA)
    await service.complete(created.file.name, [])

    again = await service.create(draft(), request_id="req-1")

    assert (again.file.state, again.upload) == (FileState.AVAILABLE, None)


# --- complete ------------------------------------------------------------------------------------


async def test_complete_verifies_and_makes_available(
    service: FileService, storage: FakeStorage, trail: RecordingAuditTrail, clock: Clock
) -> None:
    file = await uploaded(service, storage)
    clock.advance(minutes=1)

    done = await service.complete(file.name, [])

    assert done.state is FileState.AVAILABLE
    assert done.complete_time == clock.at
    assert done.etag != file.etag
    assert (await service.get(file.name)) == done
    assert descriptions(trail)[-1] == "file verified: AVAILABLE"


async def test_completing_again_returns_the_file_and_records_nothing(
    service: FileService, storage: FakeStorage, trail: RecordingAuditTrail
) -> None:
    file = await uploaded(service, storage)
    done = await service.complete(file.name, [])
    events = len(trail.events)

    assert await service.complete(file.name, []) == done
    assert len(trail.events) == events


async def test_completing_before_uploading_changes_nothing(service: FileService, store: FakeFileStore) -> None:
    created = await service.create(draft())

    with pytest.raises(FailedPrecondition) as early:
        await service.complete(created.file.name, [])

    assert early.value.reason == "UPLOAD_NOT_FOUND"
    assert store.items[created.file.id].state is FileState.PENDING
    assert store.settlements == {}


@pytest.mark.parametrize(
    ("content", "reason"),
    [(DATA + b"!", "SIZE_MISMATCH"), (DATA[:-1] + b"?", "CHECKSUM_MISMATCH")],
)
async def test_a_mismatch_deletes_the_object_and_fails_the_file(
    service: FileService, storage: FakeStorage, trail: RecordingAuditTrail, content: bytes, reason: str
) -> None:
    file = await uploaded(service, storage, content)

    with pytest.raises(FailedPrecondition) as mismatch:
        await service.complete(file.name, [])

    assert mismatch.value.reason == reason
    assert file.object_key not in storage.objects
    failed = await service.get(file.name)
    assert (failed.state, failed.failure_reason) == (FileState.FAILED, reason)
    assert descriptions(trail)[-1] == f"file failed verification ({reason}); content deleted"
    # The size decides without reading the object.
    assert storage.hashed == ([] if reason == "SIZE_MISMATCH" else [file.object_key])
    with pytest.raises(FailedPrecondition) as again:
        await service.complete(file.name, [])
    assert again.value.reason == reason
    with pytest.raises(FailedPrecondition) as download:
        await service.download_url(file.name)
    assert download.value.reason == "FILE_NOT_AVAILABLE"


async def test_complete_multipart_with_etags(service: FileService, storage: FakeStorage) -> None:
    created = await service.create(big_draft())
    parts = await upload_parts(storage, created)

    done = await service.complete(created.file.name, list(reversed(parts)))  # any order, quoted ETags

    assert done.state is FileState.AVAILABLE
    assert storage.objects[created.file.object_key] == BIG
    assert storage.uploads == {}


async def test_complete_multipart_without_etags_uses_the_stored_parts(
    service: FileService, storage: FakeStorage
) -> None:
    created = await service.create(big_draft())
    await upload_parts(storage, created)

    assert (await service.complete(created.file.name, [])).state is FileState.AVAILABLE


async def test_complete_multipart_with_parts_missing_changes_nothing(
    service: FileService, storage: FakeStorage, store: FakeFileStore
) -> None:
    created = await service.create(big_draft())
    parts = await upload_parts(storage, created)
    storage.uploads[created.file.upload_id].parts.pop(3)

    with pytest.raises(InvalidArgument) as named:
        await service.complete(created.file.name, parts[:2] + parts[3:])
    with pytest.raises(FailedPrecondition) as stored:
        await service.complete(created.file.name, [])
    with pytest.raises(FailedPrecondition) as refused:  # names every part, but part 3 is not there
        await service.complete(created.file.name, parts)

    assert (named.value.reason, stored.value.reason, refused.value.reason) == (
        "INVALID_PARTS",
        "UPLOAD_INCOMPLETE",
        "INVALID_PARTS",
    )
    assert store.items[created.file.id].state is FileState.PENDING
    assert created.file.upload_id in storage.uploads


async def test_parts_for_a_single_put_are_refused(service: FileService, storage: FakeStorage) -> None:
    file = await uploaded(service, storage)

    with pytest.raises(InvalidArgument):
        await service.complete(file.name, [(1, "etag")])


async def test_completing_after_the_deadline_expires_the_upload(
    service: FileService, storage: FakeStorage, trail: RecordingAuditTrail, clock: Clock
) -> None:
    created = await service.create(big_draft())
    await upload_parts(storage, created)
    clock.advance(hours=24)

    with pytest.raises(FailedPrecondition) as late:
        await service.complete(created.file.name, [])

    assert late.value.reason == "UPLOAD_EXPIRED"
    assert (await service.get(created.file.name)).state is FileState.EXPIRED
    assert storage.aborted == [created.file.upload_id]
    assert descriptions(trail)[-1] == "upload expired; content discarded"


async def test_a_sweep_deciding_during_verification_wins(
    service: FileService, storage: FakeStorage, store: FakeFileStore, trail: RecordingAuditTrail, clock: Clock
) -> None:
    file = await uploaded(service, storage)

    async def sweeper_decides() -> None:
        await store.settle(Settlement(file.id, Ending.EXPIRED, "", clock()))

    storage.while_hashing = sweeper_decides

    with pytest.raises(FailedPrecondition) as lost:
        await service.complete(file.name, [])

    assert lost.value.reason == "UPLOAD_EXPIRED"
    assert (await service.get(file.name)).state is FileState.EXPIRED
    assert file.object_key not in storage.objects  # the verified object goes too: the file expired
    assert descriptions(trail)[-1] == "upload expired; content discarded"


async def test_a_settlement_left_by_a_crash_is_finished_by_the_next_call(
    service: FileService, storage: FakeStorage, store: FakeFileStore, clock: Clock
) -> None:
    file = await uploaded(service, storage)
    await store.settle(Settlement(file.id, Ending.AVAILABLE, "", clock()))  # decided, record not yet written

    done = await service.complete(file.name, [])

    assert done.state is FileState.AVAILABLE
    assert storage.hashed == []  # it was verified before the crash


async def test_concurrent_completions_record_one_event(
    service: FileService, storage: FakeStorage, trail: RecordingAuditTrail
) -> None:
    file = await uploaded(service, storage)
    results: list[File] = []

    async def another_completion() -> None:
        results.append(await service.complete(file.name, []))

    storage.while_hashing = another_completion
    done = await service.complete(file.name, [])

    assert done == results[0]
    assert descriptions(trail).count("file verified: AVAILABLE") == 1


async def test_storage_failure_during_completion_leaves_the_file_pending(
    service: FileService, storage: FakeStorage, store: FakeFileStore
) -> None:
    file = await uploaded(service, storage)
    storage.unavailable = True

    with pytest.raises(Unavailable):
        await service.complete(file.name, [])

    assert store.items[file.id].state is FileState.PENDING
    storage.unavailable = False
    assert (await service.complete(file.name, [])).state is FileState.AVAILABLE


# --- read ----------------------------------------------------------------------------------------


async def test_other_organizations_files_are_denied_like_missing_ones(service: FileService) -> None:
    file = (await service.create(draft())).file

    for name in (file.name, "files/nothere"):
        with acting_as(CLINICIAN_B), pytest.raises(PermissionDenied) as denied:
            await service.get(name)
        assert denied.value.reason == "ORGANIZATION_ACCESS_DENIED"
    with acting_as(PLATFORM_ADMIN):
        assert (await service.get(file.name)).id == file.id
        with pytest.raises(NotFound) as missing:
            await service.get("files/nothere")
    assert missing.value.reason == "FILE_NOT_FOUND"


@pytest.mark.parametrize("call", ["get", "download_url", "complete", "delete"])
async def test_patients_have_no_access(service: FileService, storage: FakeStorage, call: str) -> None:
    file = await uploaded(service, storage)
    await service.complete(file.name, [])
    arguments: dict[str, tuple[Any, ...]] = {
        "get": (file.name,),
        "download_url": (file.name,),
        "complete": (file.name, []),
        "delete": (file.name, ""),
    }

    with acting_as(PATIENT), pytest.raises(PermissionDenied) as denied:
        await getattr(service, call)(*arguments[call])

    assert denied.value.reason == "ROLE_NOT_ALLOWED"


async def test_list_is_scoped_and_filtered(service: FileService, storage: FakeStorage) -> None:
    ecg = await uploaded(service, storage, device="devices/SN-1", organization="")
    await service.complete(ecg.name, [])
    pending = (await service.create(big_draft())).file
    with acting_as(OPERATOR_B):
        theirs = (await service.create(draft(organization=ORG_B))).file

    everything = await service.list_files(ORG_A, "", 0, "")
    by_device = await service.list_files(ORG_A, 'device = "devices/SN-1"', 0, "")
    available = await service.list_files(ORG_A, "state = AVAILABLE", 0, "")
    videos = await service.list_files(ORG_A, 'content_type = "VIDEO/mp4" AND state = STATE_PENDING', 0, "")
    by_patient = await service.list_files(ORG_A, f'patient = "{PATIENT_A}"', 0, "")

    assert {f.id for f in everything.files} == {ecg.id, pending.id}
    assert [f.id for f in by_device.files] == [ecg.id]
    assert [f.id for f in available.files] == [ecg.id]
    assert [f.id for f in videos.files] == [pending.id]
    assert [f.id for f in by_patient.files] == [ecg.id]
    with acting_as(PLATFORM_ADMIN):
        every_organization = await service.list_files("organizations/-", "", 0, "")
    assert {f.id for f in every_organization.files} == {ecg.id, pending.id, theirs.id}
    with pytest.raises(PermissionDenied):
        await service.list_files("organizations/-", "", 0, "")
    with pytest.raises(PermissionDenied):
        await service.list_files(ORG_B, "", 0, "")
    with pytest.raises(InvalidArgument) as bad:
        await service.list_files(ORG_A, "state = GONE", 0, "")
    assert bad.value.reason == "INVALID_FILTER"


async def test_list_pages(service: FileService) -> None:
    ids = sorted([(await service.create(draft())).file.id for _ in range(3)])

    first = await service.list_files(ORG_A, "", 2, "")
    second = await service.list_files(ORG_A, "", 2, first.next_page_token)

    assert [f.id for f in first.files + second.files] == ids
    assert second.next_page_token == ""


async def test_download_url_is_short_lived_attachment_and_audited(
    service: FileService, storage: FakeStorage, trail: RecordingAuditTrail, clock: Clock
) -> None:
    file = await uploaded(service, storage, display_name="ECG März.bin")
    await service.complete(file.name, [])

    with acting_as(OPERATOR_A):
        download = await service.download_url(file.name)

    assert download.expire_time == clock.at + POLICY.download_lifetime
    assert "expires=300" in download.url
    assert "response-content-type=application%2Foctet-stream" in download.url
    assert "attachment%3B%20filename%3D%22ECG%20M_rz.bin%22" in download.url
    assert descriptions(trail)[-1] == "download URL issued"
    assert trail.events[-1].actor.subject == OPERATOR_A.subject


async def test_no_download_url_before_completion(service: FileService, trail: RecordingAuditTrail) -> None:
    file = (await service.create(draft())).file

    with pytest.raises(FailedPrecondition) as pending:
        await service.download_url(file.name)

    assert pending.value.reason == "FILE_NOT_AVAILABLE"
    assert descriptions(trail) == [descriptions(trail)[0]]  # the create only


# --- delete --------------------------------------------------------------------------------------


async def test_admins_delete_available_files_with_their_content(
    service: FileService, storage: FakeStorage, store: FakeFileStore, trail: RecordingAuditTrail
) -> None:
    file = await uploaded(service, storage)
    done = await service.complete(file.name, [])

    with acting_as(ADMIN_A):
        with pytest.raises(Aborted):
            await service.delete(file.name, file.etag)  # stale etag
        await service.delete(file.name, done.etag)

    assert store.items == {}
    assert storage.objects == {}
    assert descriptions(trail)[-1] == "file deleted"
    with pytest.raises(PermissionDenied):  # gone: members cannot tell it from another organization's
        await service.get(file.name)


async def test_clinicians_and_operators_may_not_delete_verified_files(
    service: FileService, storage: FakeStorage
) -> None:
    file = await uploaded(service, storage)
    await service.complete(file.name, [])

    for member in (CLINICIAN_A, OPERATOR_A):
        with acting_as(member), pytest.raises(PermissionDenied) as denied:
            await service.delete(file.name, "")
        assert denied.value.reason == "ROLE_NOT_ALLOWED"
    assert storage.objects


async def test_deleting_a_pending_file_cancels_its_upload(
    service: FileService, storage: FakeStorage, store: FakeFileStore, trail: RecordingAuditTrail
) -> None:
    created = await service.create(big_draft())
    await upload_parts(storage, created)

    with acting_as(OPERATOR_A):
        await service.delete(created.file.name, "")

    assert store.items == {}
    assert storage.aborted == [created.file.upload_id]
    assert store.settlements[created.file.id].ending is Ending.DELETED
    assert descriptions(trail)[-1] == "file deleted"
    # A completion arriving afterwards finds nothing to complete.
    with pytest.raises(PermissionDenied):
        await service.complete(created.file.name, [])


@pytest.mark.parametrize("landed_after_delete", [False, True])
async def test_a_completion_that_loses_to_a_delete_leaves_no_content(
    service: FileService,
    storage: FakeStorage,
    store: FakeFileStore,
    trail: RecordingAuditTrail,
    landed_after_delete: bool,
) -> None:
    created = await service.create(big_draft())
    await upload_parts(storage, created)

    async def deleted_meanwhile() -> None:
        await service.delete(created.file.name, "")
        if landed_after_delete:  # the completion's CompleteMultipartUpload was still in flight
            storage.put(created.file.object_key, BIG)

    storage.while_hashing = deleted_meanwhile

    with pytest.raises(NotFound):
        await service.complete(created.file.name, [])

    assert storage.objects == {}
    assert store.items == {}
    assert descriptions(trail).count("file deleted") == 1


async def test_deleting_a_file_that_just_became_available_needs_an_admin(
    service: FileService, storage: FakeStorage, store: FakeFileStore, clock: Clock
) -> None:
    file = await uploaded(service, storage)
    await store.settle(Settlement(file.id, Ending.AVAILABLE, "", clock()))  # completed, record not yet written

    with pytest.raises(PermissionDenied) as denied:
        await service.delete(file.name, "")

    assert denied.value.reason == "ROLE_NOT_ALLOWED"
    assert store.items[file.id].state is FileState.AVAILABLE
    assert file.object_key in storage.objects


# --- expiry --------------------------------------------------------------------------------------


async def test_sweep_expires_abandoned_uploads_after_the_grace(
    service: FileService, storage: FakeStorage, store: FakeFileStore, trail: RecordingAuditTrail, clock: Clock
) -> None:
    abandoned = await service.create(big_draft())
    await upload_parts(storage, abandoned)
    single = await uploaded(service, storage)
    done = await uploaded(service, storage)
    await service.complete(done.name, [])
    clock.advance(hours=24)
    with acting_as(internal_principal("file-sweeper")):
        assert await service.sweep_expired() == []  # within the grace: a completion may still be running
        clock.advance(minutes=15, seconds=1)
        swept = await service.sweep_expired()
        assert await service.sweep_expired() == []

    assert {f.id for f in swept} == {abandoned.file.id, single.id}
    assert all(f.state is FileState.EXPIRED and f.complete_time == clock.at for f in swept)
    assert storage.aborted == [abandoned.file.upload_id]
    assert set(storage.objects) == {done.object_key}
    assert store.items[done.id].state is FileState.AVAILABLE
    expiries = [e for e in trail.events if e.description == "upload expired; content discarded"]
    assert sorted(e.resource for e in expiries) == sorted([abandoned.file.name, single.name])
    assert {e.actor.subject for e in expiries} == {"internal:file-sweeper"}


async def test_sweep_keeps_going_when_one_file_cannot_be_expired(
    service: FileService, storage: FakeStorage, store: FakeFileStore, clock: Clock
) -> None:
    first = (await service.create(draft())).file
    second = (await service.create(draft())).file
    clock.advance(hours=25)
    storage.unavailable = True

    with acting_as(ADAPTER):
        assert await service.sweep_expired() == []
        storage.unavailable = False
        assert {f.id for f in await service.sweep_expired()} == {first.id, second.id}


async def test_only_internal_callers_sweep(service: FileService) -> None:
    with acting_as(PLATFORM_ADMIN), pytest.raises(PermissionDenied):
        await service.sweep_expired()


# --- the device methods (MQTT adapter) -----------------------------------------------------------


async def test_a_device_uploads_through_the_adapter(
    service: FileService, storage: FakeStorage, trail: RecordingAuditTrail
) -> None:
    with acting_as(ADAPTER):
        created = await service.create_for_device("devices/SN-1", draft(organization=""), request_id="msg-7")
        again = await service.create_for_device("devices/SN-1", draft(organization=""), request_id="msg-7")
        storage.put(created.file.object_key, DATA)
        done = await service.complete_for_device("devices/SN-1", created.file.name, [])
        with pytest.raises(PermissionDenied) as other:
            await service.complete_for_device("devices/SN-2", created.file.name, [])

    assert again.file.id == created.file.id
    assert (created.file.device, created.file.organization, created.file.patient) == ("devices/SN-1", ORG_A, PATIENT_A)
    assert created.file.request_key == f"{ORG_A}|devices/SN-1|msg-7"
    assert done.state is FileState.AVAILABLE
    assert other.value.reason == "DEVICE_MISMATCH"
    assert [e.actor.subject for e in trail.events] == ["internal:mqtt_adapter"] * 2


async def test_users_cannot_call_the_device_methods(service: FileService) -> None:
    with acting_as(PLATFORM_ADMIN), pytest.raises(PermissionDenied):
        await service.create_for_device("devices/SN-1", draft(organization=""))


async def test_an_unknown_device_through_the_adapter_is_a_failed_precondition(service: FileService) -> None:
    with acting_as(ADAPTER), pytest.raises(FailedPrecondition) as missing:
        await service.create_for_device("devices/NOPE", draft(organization=""))

    assert missing.value.reason == "DEVICE_NOT_FOUND"


async def test_every_domain_error_names_a_reason(service: FileService) -> None:
    with pytest.raises(DomainError) as error:
        await service.get("nonsense")

    assert error.value.reason == "INVALID_NAME"


def test_policy_defaults_match_the_brief() -> None:
    policy = FilePolicy()
    assert (policy.max_bytes, policy.multipart_threshold) == (5 * 1024**3, 64 * 1024**2)
    assert policy.upload_lifetime == timedelta(hours=24)
    assert "application/dicom" in policy.allowed_types
    assert replace(policy, part_size=1).part_size == 1
