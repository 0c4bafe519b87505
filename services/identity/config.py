"""The identity service's own settings, from environment variables with local defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from medmesh.runtime.auth import manufacturer_organization_id

ORGANIZATION_PREFIX = "organizations/"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def _seconds(name: str, default: float) -> timedelta:
    value = float(_env(name, str(default)))
    if value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value}")
    return timedelta(seconds=value)


@dataclass(frozen=True)
class IdentitySettings:
    # The one organization whose members may hold ROLE_PLATFORM_ADMIN.
    manufacturer_organization: str = "organizations/manufacturer"
    access_token_ttl: timedelta = timedelta(seconds=900)
    refresh_token_ttl: timedelta = timedelta(days=30)
    # How long a new key is published before it signs: longer than any verifier caches the JWKS.
    jwks_publish_lead: timedelta = timedelta(seconds=120)
    signing_key_rotation: timedelta = timedelta(days=30)
    bootstrap_admin_file: str = ""

    @classmethod
    def from_env(cls) -> IdentitySettings:
        return cls(
            manufacturer_organization=ORGANIZATION_PREFIX + manufacturer_organization_id(),
            access_token_ttl=_seconds("MEDMESH_ACCESS_TOKEN_TTL_SECONDS", 900),
            refresh_token_ttl=_seconds("MEDMESH_REFRESH_TOKEN_TTL_SECONDS", 30 * 86400),
            jwks_publish_lead=_seconds("MEDMESH_JWKS_PUBLISH_LEAD_SECONDS", 120),
            signing_key_rotation=_seconds("MEDMESH_SIGNING_KEY_ROTATION_SECONDS", 30 * 86400),
            bootstrap_admin_file=_env("MEDMESH_BOOTSTRAP_ADMIN_FILE", ""),
        )
