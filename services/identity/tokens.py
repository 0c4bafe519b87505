"""Access tokens: ES256 JWTs that `medmesh.runtime.auth.TokenVerifier` and Envoy's jwt_authn accept."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import datetime, timedelta

import jwt

from medmesh.runtime.auth import ALGORITHM, Role, TokenSettings
from medmesh.runtime.resources import now
from services.identity.signing_keys import SigningKeyManager


class TokenIssuer:
    def __init__(
        self,
        keys: SigningKeyManager,
        settings: TokenSettings,
        access_token_ttl: timedelta,
        clock: Callable[[], datetime] = now,
    ) -> None:
        self._keys = keys
        self._settings = settings
        self._ttl = access_token_ttl
        self._clock = clock

    @property
    def ttl_seconds(self) -> int:
        return int(self._ttl.total_seconds())

    async def issue(self, subject: str, organization: str, role: Role, patient: str = "") -> str:
        """A signed access token stating who the subject is and what it may do."""
        kid, private_key = await self._keys.signing_key()
        issued = int(self._clock().timestamp())
        claims: dict[str, object] = {
            "iss": self._settings.issuer,
            "aud": self._settings.audience,
            "sub": subject,
            "org": organization,
            "role": role.value,
            "iat": issued,
            "exp": issued + self.ttl_seconds,
            "jti": secrets.token_urlsafe(16),
        }
        if role is Role.PATIENT:
            claims["patient"] = patient
        return jwt.encode(claims, private_key, algorithm=ALGORITHM, headers={"kid": kid})
