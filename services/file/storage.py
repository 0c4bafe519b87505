"""Object storage for file content: the only code of the file service that touches S3.

Two minio clients: one talks to S3 from inside the mesh (`MEDMESH_S3_ENDPOINT`); the other
only signs URLs, for the address clients use (`MEDMESH_S3_PUBLIC_ENDPOINT`), and has its region
set so signing is pure computation with no network call. minio is synchronous: every call that
does I/O runs in a thread, and hashing (which reads whole objects) in a small pool of its own, so
a few large verifications cannot take every thread other requests need.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Protocol, TypeVar
from urllib.parse import urlsplit

from minio import Minio
from minio.datatypes import Part
from minio.error import MinioException, S3Error
from urllib3.exceptions import HTTPError

from medmesh.runtime.errors import FailedPrecondition, Internal, Unavailable
from medmesh.runtime.settings import Settings
from medmesh.runtime.storage import object_store

log = logging.getLogger(__name__)

T = TypeVar("T")

# Read size when hashing: measured here, 1 MiB and 8 MiB chunks hash a SeaweedFS object equally
# fast (~500 MB/s, SHA-256 itself ~1.5 GB/s); smaller chunks cost Python overhead.
HASH_CHUNK = 1024 * 1024
# S3 refuses these completions; the client can fix its part list and try again.
_BAD_PARTS = {"InvalidPart", "InvalidPartOrder", "EntityTooSmall"}

PartList = Sequence[tuple[int, str]]  # (part number, ETag)


class FileStorage(Protocol):
    """What the file service needs of object storage."""

    async def start_multipart(self, key: str, content_type: str) -> str:
        """Starts a multipart upload; returns its upload id."""

    def presign_put(self, key: str, lifetime: timedelta, at: datetime) -> str:
        """A URL to PUT the whole object, valid from `at` for `lifetime`."""

    async def presign_parts(
        self, key: str, upload_id: str, part_count: int, lifetime: timedelta, at: datetime
    ) -> list[str]:
        """URLs to PUT parts 1 to `part_count` of a multipart upload, in part order."""

    def presign_get(self, key: str, lifetime: timedelta, at: datetime, content_type: str, disposition: str) -> str:
        """A URL to GET the object, answered with these Content-Type and Content-Disposition headers."""

    async def uploaded_parts(self, key: str, upload_id: str) -> list[tuple[int, str]] | None:
        """The parts uploaded so far, None when the upload no longer exists (completed or aborted)."""

    async def complete_multipart(self, key: str, upload_id: str, parts: PartList) -> None:
        """Assembles the object; an upload that no longer exists is not an error (the object decides)."""

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """Discards an upload and its parts; idempotent."""

    async def size(self, key: str) -> int | None:
        """The stored object's size, None when there is no object."""

    async def sha256(self, key: str) -> str | None:
        """SHA-256 (hex) of the stored object, streamed through; None when there is no object."""

    async def delete(self, key: str) -> None:
        """Removes the object; idempotent."""


def public_signer(settings: Settings, public_endpoint: str) -> Minio:
    """A client that only signs, for `scheme://host[:port]` as clients reach S3."""
    address = urlsplit(public_endpoint)
    if address.scheme not in {"http", "https"} or not address.netloc or address.path not in {"", "/"}:
        raise ValueError(f"MEDMESH_S3_PUBLIC_ENDPOINT must look like https://host[:port], got {public_endpoint!r}")
    return Minio(
        address.netloc,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=address.scheme == "https",
        region=settings.s3_region,  # given, so signing never asks S3 where the bucket is
    )


def default_public_endpoint(settings: Settings) -> str:
    return f"{'https' if settings.s3_secure else 'http'}://{settings.s3_endpoint}"


class S3FileStorage:
    """`FileStorage` on any S3 API, one bucket, through minio."""

    def __init__(self, client: Minio, signer: Minio, bucket: str, hash_workers: int = 2) -> None:
        self._client = client
        self._signer = signer
        self.bucket = bucket
        self._hashing = ThreadPoolExecutor(max_workers=hash_workers, thread_name_prefix="file-sha256")

    @classmethod
    def from_settings(cls, settings: Settings, bucket: str, public_endpoint: str) -> S3FileStorage:
        return cls(object_store(settings), public_signer(settings, public_endpoint), bucket)

    def close(self) -> None:
        self._hashing.shutdown(wait=False, cancel_futures=True)

    # --- set-up and health ---------------------------------------------------------------------

    async def ensure_bucket(self) -> None:
        """Creates the bucket if missing (idempotent; another instance may create it concurrently)."""

        def create() -> None:
            if self._client.bucket_exists(self.bucket):
                return
            try:
                self._client.make_bucket(self.bucket)
            except S3Error as error:
                if error.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise

        await self._run(create, "create the files bucket")

    async def check(self) -> None:
        """Raises unless the bucket answers: part of the service's readiness."""
        if not await self._run(lambda: self._client.bucket_exists(self.bucket), "reach the files bucket"):
            raise Unavailable(f"bucket {self.bucket!r} does not exist", reason="OBJECT_STORAGE_UNAVAILABLE")

    # --- uploads -------------------------------------------------------------------------------

    async def start_multipart(self, key: str, content_type: str) -> str:
        return await self._run(
            lambda: self._client._create_multipart_upload(self.bucket, key, {"Content-Type": content_type}),
            "start a multipart upload",
        )

    def presign_put(self, key: str, lifetime: timedelta, at: datetime) -> str:
        return self._signer.get_presigned_url("PUT", self.bucket, key, expires=lifetime, request_date=at)

    async def presign_parts(
        self, key: str, upload_id: str, part_count: int, lifetime: timedelta, at: datetime
    ) -> list[str]:
        # ~100 us per URL (measured): off the event loop for a plan of hundreds of parts.
        return await asyncio.to_thread(
            lambda: [self.presign_part(key, upload_id, n, lifetime, at) for n in range(1, part_count + 1)]
        )

    def presign_part(self, key: str, upload_id: str, part_number: int, lifetime: timedelta, at: datetime) -> str:
        return self._signer.get_presigned_url(
            "PUT",
            self.bucket,
            key,
            expires=lifetime,
            request_date=at,
            extra_query_params={"partNumber": str(part_number), "uploadId": upload_id},
        )

    def presign_get(self, key: str, lifetime: timedelta, at: datetime, content_type: str, disposition: str) -> str:
        return self._signer.get_presigned_url(
            "GET",
            self.bucket,
            key,
            expires=lifetime,
            request_date=at,
            response_headers={"response-content-type": content_type, "response-content-disposition": disposition},
        )

    async def uploaded_parts(self, key: str, upload_id: str) -> list[tuple[int, str]] | None:
        def list_parts() -> list[tuple[int, str]] | None:
            parts: list[tuple[int, str]] = []
            marker: str | None = None
            while True:
                try:
                    page = self._client._list_parts(self.bucket, key, upload_id, part_number_marker=marker)
                except S3Error as error:
                    if error.code == "NoSuchUpload":
                        return None
                    raise
                parts += [(part.part_number, part.etag) for part in page.parts]
                if not page.is_truncated or not page.parts:
                    return parts
                marker = page.next_part_number_marker or str(page.parts[-1].part_number)

        return await self._run(list_parts, "list uploaded parts")

    async def complete_multipart(self, key: str, upload_id: str, parts: PartList) -> None:
        def complete() -> None:
            try:
                self._client._complete_multipart_upload(
                    self.bucket, key, upload_id, [Part(number, etag) for number, etag in parts]
                )
            except S3Error as error:
                if error.code == "NoSuchUpload":
                    return  # completed by an earlier call, or aborted: the object (or its absence) tells
                if error.code in _BAD_PARTS:
                    raise FailedPrecondition(
                        f"object storage refused the parts: {error.message}",
                        reason="INVALID_PARTS",
                        metadata={"storage_error": error.code},
                    ) from error
                raise

        await self._run(complete, "complete the multipart upload")

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        def abort() -> None:
            try:
                self._client._abort_multipart_upload(self.bucket, key, upload_id)
            except S3Error as error:
                if error.code != "NoSuchUpload":
                    raise

        await self._run(abort, "abort the multipart upload")

    # --- objects -------------------------------------------------------------------------------

    async def size(self, key: str) -> int | None:
        def stat() -> int | None:
            try:
                return int(self._client.stat_object(self.bucket, key).size or 0)
            except S3Error as error:
                if error.code in {"NoSuchKey", "NoSuchObject"}:
                    return None
                raise

        return await self._run(stat, "read the object's size")

    async def sha256(self, key: str) -> str | None:
        def digest() -> str | None:
            try:
                response = self._client.get_object(self.bucket, key)
            except S3Error as error:
                if error.code in {"NoSuchKey", "NoSuchObject"}:
                    return None
                raise
            try:
                hashed = hashlib.sha256()
                for chunk in response.stream(HASH_CHUNK):
                    hashed.update(chunk)  # releases the GIL for chunks this size
                return hashed.hexdigest()
            finally:
                response.close()
                response.release_conn()

        return await self._run(digest, "read the object", executor=self._hashing)

    async def delete(self, key: str) -> None:
        await self._run(lambda: self._client.remove_object(self.bucket, key), "delete the object")

    async def _run(self, call: Callable[[], T], doing: str, executor: ThreadPoolExecutor | None = None) -> T:
        """Runs a blocking minio call in a thread; S3 and network failures become domain errors."""
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, call)
        except S3Error as error:
            log.error("object storage refused to %s: %s %s", doing, error.code, error.message)
            raise Internal(f"object storage refused to {doing}", reason="OBJECT_STORAGE_ERROR") from error
        except (MinioException, HTTPError, OSError) as error:
            log.warning("cannot %s: %r", doing, error)
            raise Unavailable(
                f"cannot {doing}: object storage unavailable", reason="OBJECT_STORAGE_UNAVAILABLE"
            ) from error
