"""The file service's environment: defaults as documented, limits refused at start-up."""

from __future__ import annotations

from datetime import timedelta

import pytest

from medmesh.runtime.settings import Settings
from services.file.config import FileConfig
from services.file.domain import DEFAULT_ALLOWED_TYPES, GIB, MIB


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in ("MEDMESH_S3_ENDPOINT", "MEDMESH_S3_SECURE"):
        monkeypatch.delenv(name, raising=False)
    return Settings.from_env("file")


def test_defaults(settings: Settings) -> None:
    config = FileConfig.from_env(settings, {})

    assert config.bucket == "medmesh-files"
    assert config.public_endpoint == "http://127.0.0.1:8333"  # the internal endpoint
    assert config.sweep_interval_seconds == 300
    policy = config.policy
    assert (policy.max_bytes, policy.multipart_threshold, policy.part_size) == (5 * GIB, 64 * MIB, 16 * MIB)
    assert policy.allowed_types == DEFAULT_ALLOWED_TYPES
    assert (policy.upload_lifetime, policy.download_lifetime, policy.sweep_grace) == (
        timedelta(hours=24),
        timedelta(minutes=5),
        timedelta(minutes=15),
    )


def test_overrides(settings: Settings) -> None:
    config = FileConfig.from_env(
        settings,
        {
            "MEDMESH_FILE_BUCKET": "other",
            "MEDMESH_S3_PUBLIC_ENDPOINT": "https://localhost:9443",
            "MEDMESH_FILE_MAX_BYTES": "1000000",
            "MEDMESH_FILE_ALLOWED_TYPES": " Image/PNG , text/plain,",
            "MEDMESH_FILE_MULTIPART_THRESHOLD": str(8 * MIB),
            "MEDMESH_FILE_PART_BYTES": str(5 * MIB),
            "MEDMESH_FILE_UPLOAD_EXPIRE_SECONDS": "2",
            "MEDMESH_FILE_DOWNLOAD_URL_SECONDS": "60",
            "MEDMESH_FILE_SWEEP_SECONDS": "1",
            "MEDMESH_FILE_SWEEP_GRACE_SECONDS": "0",
        },
    )

    assert (config.bucket, config.public_endpoint, config.sweep_interval_seconds) == (
        "other",
        "https://localhost:9443",
        1,
    )
    assert config.policy.allowed_types == frozenset({"image/png", "text/plain"})
    assert (config.policy.max_bytes, config.policy.multipart_threshold, config.policy.part_size) == (
        1_000_000,
        8 * MIB,
        5 * MIB,
    )
    assert config.policy.upload_lifetime == timedelta(seconds=2)
    assert config.policy.sweep_grace == timedelta(0)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MEDMESH_FILE_PART_BYTES", str(4 * MIB)),  # under S3's minimum part
        ("MEDMESH_FILE_UPLOAD_EXPIRE_SECONDS", str(8 * 86400)),  # longer than a pre-signed URL lives
        ("MEDMESH_FILE_MAX_BYTES", "lots"),
        ("MEDMESH_FILE_ALLOWED_TYPES", "image/png,html"),
        ("MEDMESH_FILE_SWEEP_SECONDS", "0"),
    ],
)
def test_bad_values_name_the_variable(settings: Settings, name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        FileConfig.from_env(settings, {name: value})
