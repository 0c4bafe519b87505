"""The file servicers: protobuf <-> domain, and whole calls through the shared interceptor
(validation, rich errors with the reason clients branch on)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import grpc
import pytest
from grpc_status import rpc_status

from medmesh.file.v1 import file_service_pb2 as pb
from medmesh.file.v1 import file_service_pb2_grpc as pb_grpc
from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import Authenticator, Principal, Role, TokenVerifier, internal_principal
from medmesh.runtime.interceptors import RequestInterceptor
from services.file.domain import DeviceAssignment, File, FileDraft, FilePolicy, FileState
from services.file.service import CreatedFile, FileService, UploadTarget
from services.file.servicer import (
    FileInternalServicer,
    FileServicer,
    created_to_pb,
    draft_from_pb,
    parts_from_pb,
    to_pb,
)
from tests.rich_status import unpack_details
from tests.unit.test_file_fakes import Clock, FakeDeviceDirectory, FakeFileStore, FakeStorage

ORG_A = "organizations/a"
AT = datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)
DATA = b"x" * 500
DIGEST = hashlib.sha256(DATA).hexdigest()
FILE = File(
    id="f1",
    organization=ORG_A,
    display_name="ecg.bin",
    content_type="application/octet-stream",
    size_bytes=500,
    sha256=DIGEST,
    device="devices/SN-1",
    patient=f"{ORG_A}/patients/p1",
    session="devices/SN-1/sessions/s1",
    state=FileState.FAILED,
    failure_reason="CHECKSUM_MISMATCH",
    create_time=AT,
    complete_time=AT + timedelta(minutes=1),
    upload_expire_time=AT + timedelta(hours=24),
    object_key="a/f1",
    upload_id="",
    part_size=0,
    request_key="|f1",
    revision=2,
)


# --- conversions ---------------------------------------------------------------------------------


def test_to_pb() -> None:
    message = to_pb(FILE)

    assert message.name == "files/f1"
    assert (message.display_name, message.content_type, message.size_bytes, message.sha256) == (
        "ecg.bin",
        "application/octet-stream",
        500,
        DIGEST,
    )
    assert (message.device, message.patient, message.session, message.organization) == (
        "devices/SN-1",
        f"{ORG_A}/patients/p1",
        "devices/SN-1/sessions/s1",
        ORG_A,
    )
    assert (message.state, message.failure_reason) == (pb.File.STATE_FAILED, "CHECKSUM_MISMATCH")
    assert message.create_time.ToDatetime(tzinfo=UTC) == AT
    assert message.complete_time.ToDatetime(tzinfo=UTC) == AT + timedelta(minutes=1)
    assert message.upload_expire_time.ToDatetime(tzinfo=UTC) == AT + timedelta(hours=24)
    assert message.etag == FILE.etag


def test_a_pending_file_has_no_complete_time() -> None:
    message = to_pb(File(**{**FILE.__dict__, "state": FileState.PENDING, "complete_time": None}))

    assert message.state == pb.File.STATE_PENDING
    assert not message.HasField("complete_time")


@pytest.mark.parametrize("state", list(FileState))
def test_every_state_converts(state: FileState) -> None:
    assert pb.File.State.Name(to_pb(File(**{**FILE.__dict__, "state": state})).state) == f"STATE_{state.value}"


def test_created_to_pb() -> None:
    upload = UploadTarget("", ((1, "https://s/1"), (2, "https://s/2")), 5 * 1024**2, AT)

    response = created_to_pb(CreatedFile(FILE, upload))
    without = created_to_pb(CreatedFile(FILE, None))

    assert response.file.name == "files/f1"
    assert [(p.part_number, p.url) for p in response.upload.parts] == [(1, "https://s/1"), (2, "https://s/2")]
    assert (response.upload.single_url, response.upload.part_size) == ("", 5 * 1024**2)
    assert response.upload.expire_time.ToDatetime(tzinfo=UTC) == AT
    assert not without.HasField("upload")


def test_draft_and_parts_from_pb() -> None:
    message = pb.File(
        content_type="image/png",
        size_bytes=3,
        sha256=DIGEST,
        display_name="x",
        device="devices/d",
        patient="organizations/a/patients/p",
        session="s",
        organization=ORG_A,
    )

    assert draft_from_pb(message) == FileDraft("image/png", 3, DIGEST, "x", "devices/d", message.patient, "s", ORG_A)
    assert parts_from_pb([pb.CompletedPart(part_number=2, etag='"e"')]) == [(2, '"e"')]


# --- over gRPC, through the shared interceptor ---------------------------------------------------


class HeaderAuthenticator(Authenticator):
    """Stands in for token verification: the test names the caller in metadata."""

    principals: ClassVar[dict[str, Principal]] = {
        "clinician": Principal("organizations/a/users/c", ORG_A, Role.CLINICIAN),
        "admin": Principal("organizations/a/users/a", ORG_A, Role.ORGANIZATION_ADMIN),
        "outsider": Principal("organizations/b/users/c", "organizations/b", Role.CLINICIAN),
        "adapter": internal_principal("mqtt_adapter"),
    }

    def __init__(self) -> None:
        super().__init__(TokenVerifier(keys=None))  # type: ignore[arg-type]

    async def authenticate(self, method: str, metadata: Mapping[str, str]) -> Principal | None:
        return self.principals[metadata["x-test-caller"]]


@dataclass
class Running:
    files: Any
    internal: Any
    storage: FakeStorage
    trail: RecordingAuditTrail
    clock: Clock


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    trail, storage, clock = RecordingAuditTrail("file"), FakeStorage(), Clock()
    devices = FakeDeviceDirectory(DeviceAssignment("devices/SN-1", "organizations/m", ORG_A, f"{ORG_A}/patients/p1"))
    policy = FilePolicy(multipart_threshold=1000, part_size=400)
    service = FileService(FakeFileStore(), storage, devices, trail, policy, clock)
    server = grpc.aio.server(interceptors=[RequestInterceptor("file.medmesh", HeaderAuthenticator())])
    pb_grpc.add_FileServiceServicer_to_server(FileServicer(service), server)  # type: ignore[no-untyped-call]
    pb_grpc.add_FileInternalServiceServicer_to_server(  # type: ignore[no-untyped-call]
        FileInternalServicer(service), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Running(
                pb_grpc.FileServiceStub(channel),  # type: ignore[no-untyped-call]
                pb_grpc.FileInternalServiceStub(channel),  # type: ignore[no-untyped-call]
                storage,
                trail,
                clock,
            )
    finally:
        await server.stop(grace=None)


def as_(caller: str) -> list[tuple[str, str]]:
    return [("x-test-caller", caller)]


async def call_error(call: Any) -> tuple[grpc.StatusCode, str, list[str]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    status = rpc_status.from_call(caught.value)
    assert status is not None
    infos, bad_requests = unpack_details(status)
    assert len(infos) == 1
    assert infos[0].domain == "file.medmesh"
    fields = [v.field for b in bad_requests for v in b.field_violations]
    return caught.value.code(), infos[0].reason, fields


def new_file(**changes: Any) -> pb.File:
    values: dict[str, Any] = {
        "content_type": "application/octet-stream",
        "size_bytes": len(DATA),
        "sha256": DIGEST,
        "display_name": "ecg.bin",
        "organization": ORG_A,
    }
    return pb.File(**{**values, **changes})


async def test_grpc_upload_lifecycle(running: Running) -> None:
    files = running.files
    created = await files.CreateFile(pb.CreateFileRequest(file=new_file()), metadata=as_("clinician"))
    assert created.file.state == pb.File.STATE_PENDING
    assert created.upload.single_url.startswith("https://s3.test/files/a/")
    running.storage.put(f"a/{created.file.name.removeprefix('files/')}", DATA)

    done = await files.CompleteFile(pb.CompleteFileRequest(name=created.file.name), metadata=as_("clinician"))
    got = await files.GetFile(pb.GetFileRequest(name=created.file.name), metadata=as_("clinician"))
    listed = await files.ListFiles(
        pb.ListFilesRequest(parent=ORG_A, filter="state = AVAILABLE"), metadata=as_("clinician")
    )
    download = await files.GetFileDownloadUrl(
        pb.GetFileDownloadUrlRequest(name=created.file.name), metadata=as_("clinician")
    )
    await files.DeleteFile(pb.DeleteFileRequest(name=created.file.name, etag=done.etag), metadata=as_("admin"))

    assert done.state == pb.File.STATE_AVAILABLE
    assert got == done
    assert [f.name for f in listed.files] == [created.file.name]
    assert download.url.startswith("https://s3.test/files/a/")
    assert download.expire_time.ToDatetime(tzinfo=UTC) == running.clock.at + timedelta(minutes=5)
    assert running.storage.objects == {}
    assert [e.description.split(" ")[0:2] for e in running.trail.events] == [
        ["file", "created"],
        ["file", "verified:"],
        ["download", "URL"],
        ["file", "deleted"],
    ]
    assert all(e.method.startswith("medmesh.file.v1.FileService/") for e in running.trail.events)


async def test_grpc_checksum_mismatch_is_failed_precondition_with_its_reason(running: Running) -> None:
    created = await running.files.CreateFile(pb.CreateFileRequest(file=new_file()), metadata=as_("clinician"))
    running.storage.put(f"a/{created.file.name.removeprefix('files/')}", b"y" * len(DATA))

    code, reason, _ = await call_error(
        running.files.CompleteFile(pb.CompleteFileRequest(name=created.file.name), metadata=as_("clinician"))
    )
    got = await running.files.GetFile(pb.GetFileRequest(name=created.file.name), metadata=as_("clinician"))

    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CHECKSUM_MISMATCH")
    assert (got.state, got.failure_reason) == (pb.File.STATE_FAILED, "CHECKSUM_MISMATCH")


async def test_grpc_multipart_with_etags(running: Running) -> None:
    data = bytes(range(256)) * 5
    file = new_file(size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), content_type="video/mp4")
    created = await running.files.CreateFile(pb.CreateFileRequest(file=file), metadata=as_("clinician"))
    upload_id = created.upload.parts[0].url.rsplit("uploadId=", 1)[1]
    size = created.upload.part_size
    parts = [
        pb.CompletedPart(
            part_number=p.part_number,
            etag=running.storage.put_part(upload_id, p.part_number, data[(p.part_number - 1) * size :][:size]),
        )
        for p in created.upload.parts
    ]

    done = await running.files.CompleteFile(
        pb.CompleteFileRequest(name=created.file.name, parts=parts), metadata=as_("clinician")
    )

    assert (len(created.upload.parts), done.state) == (4, pb.File.STATE_AVAILABLE)


async def test_grpc_permission_denied_before_not_found(running: Running) -> None:
    code, reason, _ = await call_error(
        running.files.GetFile(pb.GetFileRequest(name="files/nothere"), metadata=as_("outsider"))
    )

    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ORGANIZATION_ACCESS_DENIED")


@pytest.mark.parametrize(
    ("file", "field"),
    [
        (new_file(sha256="abc"), "file.sha256"),
        (new_file(content_type="not a type"), "file.content_type"),
        (new_file(size_bytes=-1), "file.size_bytes"),
        (new_file(device="SN-1"), "file.device"),
        (new_file(patient="patients/p1"), "file.patient"),
    ],
)
async def test_grpc_invalid_fields_are_named(running: Running, file: pb.File, field: str) -> None:
    code, _, fields = await call_error(
        running.files.CreateFile(pb.CreateFileRequest(file=file), metadata=as_("clinician"))
    )

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == [field]
    assert running.trail.events == []


async def test_grpc_device_upload_and_sweep(running: Running) -> None:
    created = await running.internal.CreateDeviceFile(
        pb.CreateDeviceFileRequest(
            device="devices/SN-1",
            content_type="application/json",
            size_bytes=len(DATA),
            sha256=DIGEST,
            request_id="msg-1",
        ),
        metadata=as_("adapter"),
    )
    assert (created.file.organization, created.file.patient) == (ORG_A, f"{ORG_A}/patients/p1")
    running.clock.advance(hours=25)

    swept = await running.internal.SweepExpiredUploads(pb.SweepExpiredUploadsRequest(), metadata=as_("adapter"))
    code, reason, _ = await call_error(
        running.internal.CompleteDeviceFile(
            pb.CompleteDeviceFileRequest(device="devices/SN-1", name=created.file.name), metadata=as_("adapter")
        )
    )

    assert list(swept.expired_files) == [created.file.name]
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "UPLOAD_EXPIRED")
