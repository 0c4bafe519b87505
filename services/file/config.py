"""The file service's settings from the environment, checked once at start-up.

| variable | default | meaning |
|---|---|---|
| MEDMESH_FILE_BUCKET | medmesh-files | the one bucket, created if missing |
| MEDMESH_S3_PUBLIC_ENDPOINT | the internal endpoint | `scheme://host[:port]` pre-signed URLs are signed for |
| MEDMESH_FILE_MAX_BYTES | 5 GiB | largest declared size |
| MEDMESH_FILE_ALLOWED_TYPES | see `DEFAULT_ALLOWED_TYPES` | comma-separated MIME types |
| MEDMESH_FILE_MULTIPART_THRESHOLD | 64 MiB | from this size on, multipart |
| MEDMESH_FILE_PART_BYTES | 16 MiB | part size (>= 5 MiB; grown to stay within 10,000 parts) |
| MEDMESH_FILE_UPLOAD_EXPIRE_SECONDS | 86400 | time to upload and complete (<= 7 days: URL limit) |
| MEDMESH_FILE_DOWNLOAD_URL_SECONDS | 300 | lifetime of a download URL |
| MEDMESH_FILE_SWEEP_SECONDS | 300 | how often the sweeper looks for expired uploads |
| MEDMESH_FILE_SWEEP_GRACE_SECONDS | 900 | how long past expiry the sweeper waits |
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from medmesh.runtime.settings import Settings
from services.file.domain import (
    CONTENT_TYPE_PATTERN,
    DEFAULT_ALLOWED_TYPES,
    GIB,
    MAX_OBJECT_SIZE,
    MAX_PART_SIZE,
    MAX_URL_LIFETIME,
    MIB,
    MIN_PART_SIZE,
    FilePolicy,
)
from services.file.storage import default_public_endpoint


@dataclass(frozen=True)
class FileConfig:
    bucket: str
    public_endpoint: str
    sweep_interval_seconds: float
    policy: FilePolicy

    @classmethod
    def from_env(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> FileConfig:
        """Raises ValueError naming the variable when a value makes no sense."""
        env = os.environ if environ is None else environ

        def text(name: str, default: str) -> str:
            return env.get(name, "").strip() or default

        def number(name: str, default: float, low: float, high: float = math.inf) -> float:
            raw = text(name, str(default))
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{name} must be a number, got {raw!r}") from None
            if not low <= value <= high:
                bounds = f"at least {low:.0f}" if high == math.inf else f"between {low:.0f} and {high:.0f}"
                raise ValueError(f"{name} must be {bounds}, got {raw}")
            return value

        allowed = frozenset(t.strip().lower() for t in text("MEDMESH_FILE_ALLOWED_TYPES", "").split(",") if t.strip())
        bad = sorted(t for t in allowed if not CONTENT_TYPE_PATTERN.match(t))
        if bad:
            raise ValueError(f"MEDMESH_FILE_ALLOWED_TYPES has entries that are not MIME types: {bad}")
        part_size = int(number("MEDMESH_FILE_PART_BYTES", 16 * MIB, MIN_PART_SIZE, MAX_PART_SIZE))
        policy = FilePolicy(
            max_bytes=int(number("MEDMESH_FILE_MAX_BYTES", 5 * GIB, 0, MAX_OBJECT_SIZE)),
            allowed_types=allowed or DEFAULT_ALLOWED_TYPES,
            multipart_threshold=int(number("MEDMESH_FILE_MULTIPART_THRESHOLD", 64 * MIB, MIN_PART_SIZE)),
            part_size=part_size,
            upload_lifetime=timedelta(
                seconds=number("MEDMESH_FILE_UPLOAD_EXPIRE_SECONDS", 86400, 1, MAX_URL_LIFETIME.total_seconds())
            ),
            download_lifetime=timedelta(
                seconds=number("MEDMESH_FILE_DOWNLOAD_URL_SECONDS", 300, 1, MAX_URL_LIFETIME.total_seconds())
            ),
            sweep_grace=timedelta(seconds=number("MEDMESH_FILE_SWEEP_GRACE_SECONDS", 900, 0)),
        )
        return cls(
            bucket=text("MEDMESH_FILE_BUCKET", "medmesh-files"),
            public_endpoint=text("MEDMESH_S3_PUBLIC_ENDPOINT", default_public_endpoint(settings)),
            sweep_interval_seconds=number("MEDMESH_FILE_SWEEP_SECONDS", 300, 1),
            policy=policy,
        )
