"""The file service's S3 adapter against a real SeaweedFS, with clients that are real HTTP clients (curl).

This module starts its own SeaweedFS (`weed mini`, every port on a free 127.0.0.1 port, S3
identities from a file, telemetry off) and stops it afterwards. The file service's use cases run
on top of the real adapter with in-memory fakes for the database and the device registry, so an
upload goes exactly as a device's would: CreateFile -> PUT to the pre-signed URL(s) -> CompleteFile
-> download through a pre-signed GET URL.

URLs are signed for `http://localhost:<port>` while the service itself talks to
`127.0.0.1:<port>`: the signature covers the host the client uses, not the one the service uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pytest
from minio import Minio

from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import Principal, Role, acting_as, internal_principal
from medmesh.runtime.errors import FailedPrecondition
from medmesh.runtime.resources import now
from medmesh.runtime.settings import Settings
from services.file.domain import MIB, FileDraft, FilePolicy, FileState
from services.file.service import FileService
from services.file.storage import S3FileStorage
from tests.integration.platform import free_ports
from tests.integration.stores import stop
from tests.unit.test_file_fakes import Clock, FakeDeviceDirectory, FakeFileStore

ACCESS_KEY = "file-test"
SECRET_KEY = "file-test-secret"
BUCKET = "medmesh-files"
ORG_A = "organizations/a"
CLINICIAN = Principal("organizations/a/users/c", ORG_A, Role.CLINICIAN)
SWEEPER = internal_principal("file-sweeper")
# Small enough that 12 MB is multipart; parts at S3's 5 MiB minimum.
POLICY = FilePolicy(multipart_threshold=5 * MIB, part_size=5 * MIB, upload_lifetime=timedelta(hours=1))

PORT_FLAGS = (
    "admin.port",
    "admin.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


@dataclass(frozen=True)
class SeaweedFS:
    endpoint: str  # 127.0.0.1:<s3 port>, for the service
    public_endpoint: str  # http://localhost:<s3 port>, for clients
    process: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    identities = root / "s3.json"
    identity = {
        "name": "medmesh",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    identities.write_text(json.dumps({"identities": [identity]}))
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    argv = [
        str(Path(sys.executable).with_name("weed")),
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        f"-s3.config={identities}",
    ]
    with (root / "weed.log").open("wb") as log:
        # Its own process group: weed mini runs its parts as children, all stopped together.
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"127.0.0.1:{ports['s3.port']}"
    try:
        wait_for_s3(endpoint, process, root / "weed.log")
        yield SeaweedFS(endpoint, f"http://localhost:{ports['s3.port']}", process)
    finally:
        stop(process, timeout=20, group=True)
    with pytest.raises(ProcessLookupError):  # nothing of it is left: weed mini's children neither
        os.killpg(process.pid, 0)


def wait_for_s3(endpoint: str, process: subprocess.Popen[bytes], log: Path, within: float = 30.0) -> None:
    client = Minio(endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False, region="us-east-1")
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited: {log.read_text()[-2000:]}")
        try:
            client.list_buckets()  # authenticated: the identities are loaded too
            return
        except Exception:
            time.sleep(0.2)
    raise RuntimeError(f"SeaweedFS S3 not up within {within}s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
async def storage(seaweedfs: SeaweedFS) -> AsyncIterator[S3FileStorage]:
    settings = replace(
        Settings.from_env("file"),
        s3_endpoint=seaweedfs.endpoint,
        s3_access_key=ACCESS_KEY,
        s3_secret_key=SECRET_KEY,
        s3_secure=False,
        s3_region="us-east-1",
    )
    adapter = S3FileStorage.from_settings(settings, BUCKET, seaweedfs.public_endpoint)
    await adapter.ensure_bucket()
    await adapter.ensure_bucket()  # idempotent: every replica runs it at start-up
    await adapter.check()
    yield adapter
    adapter.close()


@pytest.fixture
def clock() -> Clock:
    # Real time: S3 checks the signing time of every URL.
    return Clock(now())


@pytest.fixture
def files(storage: S3FileStorage, clock: Clock) -> Iterator[FileService]:
    with acting_as(CLINICIAN):
        yield FileService(FakeFileStore(), storage, FakeDeviceDirectory(), RecordingAuditTrail("file"), POLICY, clock)


def curl(*arguments: str, output: str = os.devnull) -> tuple[int, dict[str, str]]:
    """Runs curl; returns the HTTP status and the response headers (lower-case names)."""
    done = subprocess.run(
        ["curl", "-sS", "-D", "-", "-o", output, "-w", "%{http_code}", *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    *header_lines, status = done.stdout.rstrip().split("\n")
    headers = {}
    for line in header_lines:
        name, separator, value = line.partition(":")
        if separator:
            headers[name.strip().lower()] = value.strip()
    return int(status), headers


def upload(url: str, path: Path) -> tuple[int, dict[str, str]]:
    return curl("--upload-file", str(path), url)


def download(url: str, path: Path) -> tuple[int, dict[str, str]]:
    return curl(url, output=str(path))


def content(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def a_draft(data: bytes, **changes: object) -> FileDraft:
    values: dict[str, object] = {
        "content_type": "application/octet-stream",
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "display_name": "recording.bin",
        "organization": ORG_A,
    }
    return FileDraft(**{**values, **changes})  # type: ignore[arg-type]


async def test_one_megabyte_up_and_down_through_presigned_urls(
    files: FileService, storage: S3FileStorage, tmp_path: Path
) -> None:
    data = content(tmp_path / "ecg.bin", 1_000_000)
    created = await files.create(a_draft(data, display_name="ECG 1.bin"))
    assert created.upload is not None
    assert created.upload.single_url.startswith("http://localhost:")

    status, _ = upload(created.upload.single_url, tmp_path / "ecg.bin")
    assert status == 200
    done = await files.complete(created.file.name, [])
    assert done.state is FileState.AVAILABLE

    link = await files.download_url(done.name)
    status, headers = download(link.url, tmp_path / "back.bin")
    assert status == 200
    assert (tmp_path / "back.bin").read_bytes() == data
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-disposition"].startswith('attachment; filename="ECG 1.bin"')


async def test_urls_verify_only_as_signed(files: FileService, tmp_path: Path) -> None:
    data = content(tmp_path / "x.bin", 1000)
    created = await files.create(a_draft(data))
    assert created.upload is not None

    another_key = created.upload.single_url.replace(created.file.id, "0" * 32)
    status, _ = upload(another_key, tmp_path / "x.bin")
    assert status == 403  # the signature covers the path: a URL cannot be pointed elsewhere

    other_host = created.upload.single_url.replace("http://localhost:", "http://127.0.0.1:")
    status, _ = upload(other_host, tmp_path / "x.bin")
    assert status == 403  # ... and the host it was signed for


async def test_a_wrong_checksum_is_refused_and_the_object_deleted(
    files: FileService, storage: S3FileStorage, tmp_path: Path
) -> None:
    data = content(tmp_path / "x.bin", 1_000_000)
    created = await files.create(a_draft(data, sha256=hashlib.sha256(b"something else").hexdigest()))
    assert created.upload is not None
    status, _ = upload(created.upload.single_url, tmp_path / "x.bin")
    assert status == 200
    assert await storage.size(created.file.object_key) == len(data)

    with pytest.raises(FailedPrecondition) as refused:
        await files.complete(created.file.name, [])

    assert refused.value.reason == "CHECKSUM_MISMATCH"
    assert await storage.size(created.file.object_key) is None
    assert (await files.get(created.file.name)).state is FileState.FAILED


async def test_twelve_megabytes_in_five_mebibyte_parts(
    files: FileService, storage: S3FileStorage, tmp_path: Path
) -> None:
    data = content(tmp_path / "video.mp4", 12_000_000)
    created = await files.create(a_draft(data, content_type="video/mp4"))
    assert created.upload is not None
    assert (created.upload.single_url, created.upload.part_size) == ("", 5 * MIB)
    assert [number for number, _ in created.upload.parts] == [1, 2, 3]

    etags = []
    for number, url in created.upload.parts:
        part = tmp_path / f"part{number}"
        part.write_bytes(data[(number - 1) * 5 * MIB : number * 5 * MIB])
        status, headers = upload(url, part)
        assert status == 200
        etags.append((number, headers["etag"]))
    done = await files.complete(created.file.name, list(reversed(etags)))

    assert done.state is FileState.AVAILABLE
    assert await storage.size(created.file.object_key) == 12_000_000
    assert await storage.sha256(created.file.object_key) == hashlib.sha256(data).hexdigest()
    link = await files.download_url(done.name)
    status, headers = download(link.url, tmp_path / "back.mp4")
    assert status == 200
    assert headers["content-type"] == "video/mp4"
    assert (tmp_path / "back.mp4").read_bytes() == data


async def test_abandoned_uploads_are_cleaned_up(
    files: FileService, storage: S3FileStorage, clock: Clock, tmp_path: Path
) -> None:
    data = content(tmp_path / "video.mp4", 6 * MIB)
    multipart = await files.create(a_draft(data, content_type="video/mp4"))
    assert multipart.upload is not None
    (tmp_path / "part1").write_bytes(data[: 5 * MIB])
    (tmp_path / "part2").write_bytes(data[5 * MIB :])
    assert upload(multipart.upload.parts[0][1], tmp_path / "part1")[0] == 200
    small = content(tmp_path / "small.bin", 1000)
    single = await files.create(a_draft(small))
    assert single.upload is not None
    assert upload(single.upload.single_url, tmp_path / "small.bin")[0] == 200
    assert await storage.uploaded_parts(multipart.file.object_key, multipart.file.upload_id) is not None

    clock.advance(hours=1, minutes=16)  # past the deadline and the sweeper's grace
    with acting_as(SWEEPER):
        swept = await files.sweep_expired()

    assert {f.id for f in swept} == {multipart.file.id, single.file.id}
    assert {f.state for f in swept} == {FileState.EXPIRED}
    assert await storage.uploaded_parts(multipart.file.object_key, multipart.file.upload_id) is None
    assert await storage.size(single.file.object_key) is None
    # The client's remaining URL is useless now.
    status, _ = upload(multipart.upload.parts[1][1], tmp_path / "part2")
    assert status == 404
    assert await storage.size(multipart.file.object_key) is None
