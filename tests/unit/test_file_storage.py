"""The S3 adapter without S3: URLs are signed for the public address with no network call, and
failures to reach storage become domain errors. (tests/integration/test_file_storage.py runs it
against a real SeaweedFS.)"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import urllib3
from minio import Minio

from medmesh.runtime.errors import Unavailable
from medmesh.runtime.settings import Settings
from services.file.storage import S3FileStorage, default_public_endpoint, public_signer

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("MEDMESH_S3_ENDPOINT", f"127.0.0.1:{closed_port()}")
    monkeypatch.setenv("MEDMESH_S3_REGION", "eu-central-1")
    return Settings.from_env("file")


@pytest.fixture
def storage(settings: Settings) -> Iterator[S3FileStorage]:
    # Nothing listens on either address: any network call would fail (fast: no retries).
    internal = Minio(
        settings.s3_endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=False,
        region=settings.s3_region,
        http_client=urllib3.PoolManager(retries=False, timeout=1.0),
    )
    adapter = S3FileStorage(internal, public_signer(settings, f"https://localhost:{closed_port()}"), "medmesh-files")
    yield adapter
    adapter.close()


def query(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}


def test_put_urls_are_signed_for_the_public_https_address(storage: S3FileStorage) -> None:
    url = storage.presign_put("a/f1", timedelta(hours=24), AT)

    address = urlsplit(url)
    assert address.scheme == "https"
    assert address.hostname == "localhost"
    assert address.path == "/medmesh-files/a/f1"  # path style: the gateway passes host and path on
    signed = query(url)
    assert signed["X-Amz-Expires"] == "86400"
    assert signed["X-Amz-Date"] == "20260301T120000Z"
    assert signed["X-Amz-Credential"].endswith("/20260301/eu-central-1/s3/aws4_request")
    assert signed["X-Amz-SignedHeaders"] == "host"
    assert storage.presign_put("a/f1", timedelta(hours=24), AT) == url  # deterministic: no hidden state


async def test_part_urls_carry_the_upload(storage: S3FileStorage) -> None:
    urls = await storage.presign_parts("a/f1", "upload-7", 3, timedelta(hours=1), AT)

    assert [(query(url)["partNumber"], query(url)["uploadId"]) for url in urls] == [
        ("1", "upload-7"),
        ("2", "upload-7"),
        ("3", "upload-7"),
    ]


def test_download_urls_set_the_response_headers(storage: S3FileStorage) -> None:
    url = storage.presign_get("a/f1", timedelta(minutes=5), AT, "image/png", 'attachment; filename="x.png"')

    signed = query(url)
    assert signed["response-content-type"] == "image/png"
    assert signed["response-content-disposition"] == 'attachment; filename="x.png"'
    assert signed["X-Amz-Expires"] == "300"


def test_the_default_public_endpoint_is_the_internal_one(settings: Settings) -> None:
    assert default_public_endpoint(settings) == f"http://{settings.s3_endpoint}"


@pytest.mark.parametrize("endpoint", ["localhost:9443", "ftp://host", "https://host/prefix", "https://"])
def test_a_public_endpoint_must_be_scheme_and_host(settings: Settings, endpoint: str) -> None:
    with pytest.raises(ValueError, match="MEDMESH_S3_PUBLIC_ENDPOINT"):
        public_signer(settings, endpoint)


async def test_unreachable_storage_is_unavailable(storage: S3FileStorage) -> None:
    with pytest.raises(Unavailable) as down:
        await storage.size("a/f1")
    with pytest.raises(Unavailable):
        await storage.check()

    assert down.value.reason == "OBJECT_STORAGE_UNAVAILABLE"
