"""In-memory fakes of the file service's ports, shared by the test_file_* files, and the tests that
hold them to the behaviour of the real adapters they stand in for (unique keys, S3's multipart rules)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest

from medmesh.runtime.errors import AlreadyExists, FailedPrecondition, Unavailable
from services.file.domain import DeviceAssignment, Ending, File, Settlement
from tests.unit.fakes import InMemoryRepository

Hook = Callable[[], Awaitable[None]]


class FakeFileStore(InMemoryRepository[File]):
    """`FileRepository` in memory: the unique `request_key` index and first-wins settlements."""

    def __init__(self) -> None:
        super().__init__("file")
        self.settlements: dict[str, Settlement] = {}
        self.before_insert: Hook | None = None  # plays a concurrent writer

    async def insert(self, resource: File) -> None:
        await asyncio.sleep(0)  # lets concurrent calls interleave, as database round trips do
        if self.before_insert is not None:
            hook, self.before_insert = self.before_insert, None
            await hook()
        if any(f.request_key == resource.request_key for f in self.items.values()):
            raise AlreadyExists(f"file {resource.id!r} already exists", reason="FILE_ALREADY_EXISTS")
        await super().insert(resource)

    async def find_by_request_key(self, request_key: str) -> File | None:
        return next((f for f in self.items.values() if f.request_key == request_key), None)

    async def settle(self, settlement: Settlement) -> Settlement:
        await asyncio.sleep(0)
        return self.settlements.setdefault(settlement.file_id, settlement)

    async def settlement(self, file_id: str) -> Settlement | None:
        return self.settlements.get(file_id)


@dataclass
class MultipartUpload:
    key: str
    content_type: str
    parts: dict[int, bytes] = field(default_factory=dict)


def etag_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()  # what S3 answers for a part: its MD5


class FakeStorage:
    """`FileStorage` in memory, with S3's rules: ETags must match, completing twice is no error."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.uploads: dict[str, MultipartUpload] = {}
        self.aborted: list[str] = []
        self.unavailable = False
        self.hashed: list[str] = []
        self.while_hashing: Hook | None = None  # plays a concurrent caller during verification
        self._next_upload = 0

    # What a client does with the URLs.
    def put(self, key: str, data: bytes) -> None:
        self.objects[key] = data

    def put_part(self, upload_id: str, number: int, data: bytes) -> str:
        self.uploads[upload_id].parts[number] = data
        return f'"{etag_of(data)}"'

    def _available(self) -> None:
        if self.unavailable:
            raise Unavailable("object storage unavailable", reason="OBJECT_STORAGE_UNAVAILABLE")

    async def start_multipart(self, key: str, content_type: str) -> str:
        self._available()
        self._next_upload += 1
        upload_id = f"upload-{self._next_upload}"
        self.uploads[upload_id] = MultipartUpload(key, content_type)
        return upload_id

    def presign_put(self, key: str, lifetime: timedelta, at: datetime) -> str:
        return f"https://s3.test/files/{key}?expires={int(lifetime.total_seconds())}"

    async def presign_parts(
        self, key: str, upload_id: str, part_count: int, lifetime: timedelta, at: datetime
    ) -> list[str]:
        return [f"https://s3.test/files/{key}?partNumber={n}&uploadId={upload_id}" for n in range(1, part_count + 1)]

    def presign_get(self, key: str, lifetime: timedelta, at: datetime, content_type: str, disposition: str) -> str:
        return (
            f"https://s3.test/files/{key}?expires={int(lifetime.total_seconds())}"
            f"&response-content-type={quote(content_type, safe='')}"
            f"&response-content-disposition={quote(disposition, safe='')}"
        )

    async def uploaded_parts(self, key: str, upload_id: str) -> list[tuple[int, str]] | None:
        self._available()
        upload = self.uploads.get(upload_id)
        if upload is None:
            return None
        return sorted((number, etag_of(data)) for number, data in upload.parts.items())

    async def complete_multipart(self, key: str, upload_id: str, parts: Sequence[tuple[int, str]]) -> None:
        self._available()
        upload = self.uploads.get(upload_id)
        if upload is None:
            return
        for number, etag in parts:
            if number not in upload.parts or etag_of(upload.parts[number]) != etag:
                raise FailedPrecondition("object storage refused the parts", reason="INVALID_PARTS")
        self.objects[key] = b"".join(upload.parts[number] for number, _ in parts)
        del self.uploads[upload_id]

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        self._available()
        if self.uploads.pop(upload_id, None) is not None:
            self.aborted.append(upload_id)

    async def size(self, key: str) -> int | None:
        self._available()
        data = self.objects.get(key)
        return None if data is None else len(data)

    async def sha256(self, key: str) -> str | None:
        self._available()
        self.hashed.append(key)
        if self.while_hashing is not None:
            hook, self.while_hashing = self.while_hashing, None
            await hook()
        data = self.objects.get(key)
        return None if data is None else hashlib.sha256(data).hexdigest()

    async def delete(self, key: str) -> None:
        self._available()
        self.objects.pop(key, None)


class FakeDeviceDirectory:
    """The device registry: assignments by device name."""

    def __init__(self, *assignments: DeviceAssignment, unavailable: bool = False) -> None:
        self.assignments = {a.device: a for a in assignments}
        self.unavailable = unavailable
        self.asked: list[str] = []

    async def assignment(self, device: str) -> DeviceAssignment | None:
        self.asked.append(device)
        if self.unavailable:
            raise Unavailable(f"cannot look up device {device!r}: UNAVAILABLE", reason="DEVICE_SERVICE_UNAVAILABLE")
        return self.assignments.get(device)


class Clock:
    """A clock the test moves; millisecond precision, like `medmesh.runtime.resources.now`."""

    def __init__(self, at: datetime = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def advance(self, **delta: float) -> None:
        self.at += timedelta(**delta)


# --- the fakes hold to what the real adapters do ---------------------------------------------------


async def test_storage_fake_refuses_a_wrong_etag_and_keeps_the_upload() -> None:
    storage = FakeStorage()
    upload_id = await storage.start_multipart("a/f", "video/mp4")
    etag = storage.put_part(upload_id, 1, b"x")

    with pytest.raises(FailedPrecondition):
        await storage.complete_multipart("a/f", upload_id, [(1, "0" * 32)])
    await storage.complete_multipart("a/f", upload_id, [(1, etag.strip('"'))])
    await storage.complete_multipart("a/f", upload_id, [(1, etag.strip('"'))])  # again: no error, like S3

    assert storage.objects["a/f"] == b"x"
    assert await storage.uploaded_parts("a/f", upload_id) is None


async def test_store_fake_keeps_the_first_settlement() -> None:
    store = FakeFileStore()
    at = datetime(2026, 1, 1, tzinfo=UTC)

    first = await store.settle(Settlement("f", Ending.EXPIRED, "", at))
    second = await store.settle(Settlement("f", Ending.AVAILABLE, "", at))

    assert first == second == Settlement("f", Ending.EXPIRED, "", at)
