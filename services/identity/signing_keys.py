"""Token signing keys: creation, the rotation schedule, the published key set, and the key
source the identity service verifies its own tokens with (its database, never the network)."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from medmesh.runtime.auth import ALGORITHM
from medmesh.runtime.errors import Unavailable
from medmesh.runtime.resources import now
from services.identity.domain import KeySchedule, SigningKey, key_schedule, rotation_due
from services.identity.ports import SigningKeyStore

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def _b64url(value: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(32, "big")).decode().rstrip("=")


def public_jwk(public_key: ec.EllipticCurvePublicKey, kid: str) -> dict[str, str]:
    """RFC 7517/7518 JWK of a P-256 key, as Envoy's jwt_authn and PyJWT read it."""
    numbers = public_key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url(numbers.x),
        "y": _b64url(numbers.y),
        "kid": kid,
        "alg": ALGORITHM,
        "use": "sig",
    }


def new_kid(at: datetime) -> str:
    """Time-ordered and unique: readable in logs, and comparable for the tie-break."""
    return f"{at:%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"


def generate_signing_key(created: datetime, activate: datetime) -> SigningKey:
    private_key = ec.generate_private_key(ec.SECP256R1())
    kid = new_kid(created)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return SigningKey(
        kid=kid,
        private_key_pem=pem,
        public_jwk=public_jwk(private_key.public_key(), kid),
        create_time=created,
        activate_time=activate,
    )


class SigningKeyManager:
    """Keys live in the identity database, so every instance signs with the same key at the same
    moment: the schedule is a function of the stored keys and the clock. The key list is cached
    for a few seconds; a new key is published `publish_lead` before it signs, much longer."""

    def __init__(
        self,
        store: SigningKeyStore,
        *,
        access_token_ttl: timedelta,
        publish_lead: timedelta,
        rotation_period: timedelta,
        clock: Clock = now,
        cache_seconds: float = 5.0,
        min_reload_seconds: float = 1.0,
    ) -> None:
        self._store = store
        self._ttl = access_token_ttl
        self._lead = publish_lead
        self._rotation = rotation_period
        self._clock = clock
        # Shorter than the publication lead, so every instance knows a new key before it signs.
        self._cache_seconds = min(cache_seconds, publish_lead.total_seconds() / 2)
        self._min_reload = min_reload_seconds
        self._keys: list[SigningKey] = []
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()
        self._private: dict[str, Any] = {}
        self._public: dict[str, Any] = {}

    async def _load(self, max_age: float) -> list[SigningKey]:
        if time.monotonic() - self._loaded_at < max_age:
            return self._keys
        async with self._lock:
            # Another caller may have reloaded while this one waited.
            if time.monotonic() - self._loaded_at >= max_age:
                self._keys = await self._store.list_all()
                self._loaded_at = time.monotonic()
        return self._keys

    def invalidate(self) -> None:
        self._loaded_at = float("-inf")

    async def schedule(self, *, fresh: bool = False) -> KeySchedule:
        keys = await self._load(0.0 if fresh else self._cache_seconds)
        return key_schedule(keys, self._clock(), self._ttl)

    async def ensure_key(self) -> None:
        """Creates a first key, active at once, when there is none. Two instances racing both
        insert one; both keys are published and the schedule picks the same signer everywhere."""
        if await self._store.list_all():
            return
        at = self._clock()
        await self._store.insert(generate_signing_key(at, at))
        log.info("created the first token signing key")
        self.invalidate()

    async def rotate(self) -> tuple[SigningKey, KeySchedule]:
        """Publishes a new key now; it signs after the publication lead."""
        at = self._clock()
        key = generate_signing_key(at, at + self._lead)
        await self._store.insert(key)
        self.invalidate()
        return key, await self.schedule(fresh=True)

    async def signing_key(self) -> tuple[str, Any]:
        """(kid, private key) of the key that signs now."""
        signing = (await self.schedule()).signing
        if signing is None:
            signing = (await self.schedule(fresh=True)).signing
        if signing is None:
            raise Unavailable("no token signing key exists yet; retry shortly", reason="SIGNING_KEY_UNAVAILABLE")
        private = self._private.get(signing.kid)
        if private is None:
            private = serialization.load_pem_private_key(signing.private_key_pem.encode(), password=None)
            self._private[signing.kid] = private
        return signing.kid, private

    async def published_jwks(self) -> list[dict[str, str]]:
        return [dict(key.public_jwk) for key in (await self.schedule()).published]

    async def public_key(self, kid: str) -> Any | None:
        """The `KeySource` of the identity service's own authenticator: published keys only."""
        schedule = await self.schedule()
        key = next((k for k in schedule.published if k.kid == kid), None)
        if key is None and time.monotonic() - self._loaded_at >= self._min_reload:
            # A key another instance has just published; rate-limited against forged kids.
            schedule = await self.schedule(fresh=True)
            key = next((k for k in schedule.published if k.kid == kid), None)
        if key is None:
            return None
        public = self._public.get(kid)
        if public is None:
            public = ECAlgorithm.from_jwk(dict(key.public_jwk))
            self._public[kid] = public
        return public

    async def maintain(self) -> SigningKey | None:
        """Rotates when the signing key is due and forgets keys no longer published.
        Returns the new key if it rotated."""
        schedule = await self.schedule(fresh=True)
        rotated = None
        if rotation_due(schedule, self._clock(), self._rotation):
            rotated, schedule = await self.rotate()
            log.info("rotated the token signing key: %s signs from %s", rotated.kid, rotated.activate_time)
        if schedule.retired:
            await self._store.delete([key.kid for key in schedule.retired])
            for key in schedule.retired:
                self._private.pop(key.kid, None)
                self._public.pop(key.kid, None)
            self.invalidate()
        return rotated
