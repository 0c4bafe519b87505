"""What the identity service does besides answering calls: the first platform admin, the first
signing key, and periodic upkeep (automatic key rotation, purging what has expired)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from medmesh.runtime.audit import AuditTrail, audit
from medmesh.runtime.auth import Role, acting_as, internal_principal
from medmesh.runtime.errors import AlreadyExists, DomainError
from medmesh.runtime.resources import now
from medmesh.runtime.tasks import stop_requested
from services.identity.domain import User, normalize_username, require_password
from services.identity.passwords import Passwords
from services.identity.ports import LoginFailureStore, RefreshTokenStore, UserStore
from services.identity.signing_keys import SigningKeyManager

log = logging.getLogger(__name__)

BOOTSTRAP_USER_ID = "admin"
# Failure counters untouched this long are forgotten (any lock is long over by then).
LOGIN_FAILURE_MEMORY = timedelta(days=1)


@dataclass(frozen=True)
class BootstrapAdmin:
    username: str
    password: str = field(repr=False)


def load_bootstrap_admin(path: str) -> BootstrapAdmin:
    """Reads `{"username": ..., "password": ...}`; a bad file stops the service at start."""
    try:
        data = json.loads(Path(path).read_text())
        return BootstrapAdmin(
            username=normalize_username(str(data["username"]), "username"),
            password=require_password(str(data["password"]), "password"),
        )
    except (OSError, ValueError, KeyError, TypeError, DomainError) as error:
        # Never echo the file: it holds a password.
        raise SystemExit(
            f"MEDMESH_BOOTSTRAP_ADMIN_FILE {path!r} is not a usable admin file: {type(error).__name__}"
        ) from None


async def bootstrap_admin(
    users: UserStore,
    passwords: Passwords,
    admin: BootstrapAdmin,
    trail: AuditTrail,
    manufacturer: str,
    clock: Callable[[], datetime] = now,
) -> User | None:
    """Creates `{manufacturer}/users/admin` as platform admin unless that username exists.
    Idempotent; of instances starting together one inserts and the others see the duplicate."""
    if await users.get_by_username(admin.username) is not None:
        return None
    at = clock()
    user = User(
        id=f"{manufacturer}/users/{BOOTSTRAP_USER_ID}",
        organization=manufacturer,
        username=admin.username,
        display_name="Platform administrator",
        role=Role.PLATFORM_ADMIN,
        password_hash=await passwords.hash(admin.password),
        create_time=at,
        update_time=at,
    )
    try:
        await users.insert(user)
    except AlreadyExists:
        log.info("bootstrap admin already created (by another instance, or the id is taken)")
        return None
    with acting_as(internal_principal("identity")):
        await audit(trail, manufacturer, user.name, description="created the bootstrap platform admin")
    log.info("created the bootstrap platform admin %s", user.name)
    return user


class Maintenance:
    """Periodic upkeep, on every instance (each step is safe to run concurrently)."""

    def __init__(
        self,
        keys: SigningKeyManager,
        refresh_tokens: RefreshTokenStore,
        login_failures: LoginFailureStore,
        trail: AuditTrail,
        manufacturer: str,
        *,
        interval_seconds: float = 60.0,
        clock: Callable[[], datetime] = now,
    ) -> None:
        self._keys = keys
        self._refresh_tokens = refresh_tokens
        self._failures = login_failures
        self._trail = trail
        self._manufacturer = manufacturer
        self._interval = interval_seconds
        self._clock = clock

    async def run_once(self) -> None:
        rotated = await self._keys.maintain()
        if rotated is not None:
            with acting_as(internal_principal("identity")):
                await audit(
                    self._trail,
                    self._manufacturer,
                    f"signingKeys/{rotated.kid}",
                    description=f"automatic signing key rotation: signs from {rotated.activate_time.isoformat()}",
                )
        at = self._clock()
        await self._refresh_tokens.purge_expired(at)
        await self._failures.purge(at - LOGIN_FAILURE_MEMORY)

    async def run(self) -> None:
        while not stop_requested():
            try:
                await self.run_once()
            except Exception:  # a database hiccup must not end the upkeep for good
                log.exception("identity upkeep failed; retrying later")
            # Jitter, so instances started together do not all rotate in the same instant.
            await asyncio.sleep(self._interval * random.uniform(0.75, 1.25))
