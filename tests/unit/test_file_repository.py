"""FileRepository's document mapping and settlements (the MongoDB round trip itself is the shared
MongoRepository's; the unique indexes are checked against FerretDB by running the service)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from services.file.domain import Ending, File, FileState, Settlement
from services.file.repository import FileRepository, settlement_document, settlement_from_document

AT = datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)
FILE = File(
    id="f1",
    organization="organizations/a",
    display_name="ecg.bin",
    content_type="application/octet-stream",
    size_bytes=6 * 1024**3,  # past 32 bits
    sha256="ab" * 32,
    device="devices/SN-1",
    patient="organizations/a/patients/p1",
    session="devices/SN-1/sessions/s1",
    state=FileState.PENDING,
    failure_reason="",
    create_time=AT,
    complete_time=None,
    upload_expire_time=AT + timedelta(hours=24),
    object_key="a/f1",
    upload_id="u-1",
    part_size=16 * 1024**2,
    request_key="organizations/a|devices/SN-1|m1",
    revision=1,
)


@pytest.fixture
def repository() -> FileRepository:
    # The mapping needs no database; the repository only looks its collections up.
    return FileRepository(cast(Any, {"files": None, "file_settlements": None}))


def test_document_shape(repository: FileRepository) -> None:
    document = repository.to_document(FILE)

    assert document["_id"] == "f1"
    assert document["state"] == "PENDING"  # a plain string: filters compare strings
    assert document["size_bytes"] == 6 * 1024**3
    assert document["complete_time"] is None
    assert set(document) == {
        "_id", "organization", "display_name", "content_type", "size_bytes", "sha256", "device", "patient",
        "session", "state", "failure_reason", "create_time", "complete_time", "upload_expire_time",
        "object_key", "upload_id", "part_size", "request_key", "revision",
    }  # fmt: skip


@pytest.mark.parametrize(
    "file",
    [
        FILE,
        replace(FILE, state=FileState.FAILED, failure_reason="CHECKSUM_MISMATCH", complete_time=AT, revision=2),
        replace(FILE, device="", patient="", session="", upload_id="", part_size=0),
    ],
)
def test_round_trip(repository: FileRepository, file: File) -> None:
    assert repository.from_document(repository.to_document(file)) == file


def test_settlement_round_trip() -> None:
    settlement = Settlement("f1", Ending.FAILED, "SIZE_MISMATCH", AT)

    document = settlement_document(settlement)

    assert document == {"_id": "f1", "ending": "FAILED", "failure_reason": "SIZE_MISMATCH", "decide_time": AT}
    assert settlement_from_document(document) == settlement
