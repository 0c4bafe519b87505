"""Object storage through the minio SDK, against any S3 API (SeaweedFS embedded, S3 in production)."""

from __future__ import annotations

from minio import Minio

from medmesh.runtime.settings import Settings


def object_store(settings: Settings) -> Minio:
    return Minio(
        settings.s3_endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=settings.s3_secure,
        region=settings.s3_region,
    )
