"""Use cases of the AuthenticationService: login, token refresh, logout and the published keys.

These calls carry no bearer token, so every outcome is audited with the subject that tried.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from medmesh.runtime.audit import AuditActor, AuditTrail, Outcome, audit
from medmesh.runtime.errors import ResourceExhausted, Unauthenticated
from medmesh.runtime.resources import ResourceStore, now
from services.identity.config import IdentitySettings
from services.identity.domain import (
    MAX_USERNAME_LENGTH,
    RefreshToken,
    ServiceAccount,
    TokenGrant,
    User,
    new_credential,
    new_identifier,
    secret_matches,
    split_credential,
)
from services.identity.passwords import Passwords
from services.identity.ports import LoginFailureStore, RefreshTokenStore, ServiceAccountKeyStore, UserStore
from services.identity.signing_keys import SigningKeyManager
from services.identity.tokens import TokenIssuer

# One message for a wrong username and a wrong password: it must not reveal which it was.
_INVALID_CREDENTIALS = "the username or password is wrong"


def _invalid_credentials(message: str = _INVALID_CREDENTIALS) -> Unauthenticated:
    return Unauthenticated(message, reason="INVALID_CREDENTIALS")


def _invalid_refresh_token() -> Unauthenticated:
    return Unauthenticated(
        "the refresh token is invalid, expired or revoked; log in again", reason="REFRESH_TOKEN_INVALID"
    )


async def check_login_throttle(failures: LoginFailureStore, username: str, at: datetime) -> None:
    """RESOURCE_EXHAUSTED while `username` is locked out after repeated failures."""
    state = await failures.get(username)
    wait = state.retry_after_seconds(at) if state else 0
    if wait > 0:
        raise ResourceExhausted(
            f"too many failed attempts for this username; retry in {wait} s",
            reason="LOGIN_THROTTLED",
            metadata={"retry_after_seconds": str(wait)},
            retry_after_seconds=wait,
        )


class AuthenticationService:
    def __init__(
        self,
        *,
        users: UserStore,
        service_accounts: ResourceStore[ServiceAccount],
        service_account_keys: ServiceAccountKeyStore,
        refresh_tokens: RefreshTokenStore,
        login_failures: LoginFailureStore,
        passwords: Passwords,
        issuer: TokenIssuer,
        signing_keys: SigningKeyManager,
        trail: AuditTrail,
        settings: IdentitySettings,
        clock: Callable[[], datetime] = now,
    ) -> None:
        self._users = users
        self._service_accounts = service_accounts
        self._keys = service_account_keys
        self._refresh_tokens = refresh_tokens
        self._failures = login_failures
        self._passwords = passwords
        self._issuer = issuer
        self._signing_keys = signing_keys
        self._trail = trail
        self._settings = settings
        self._clock = clock

    # --- login ----------------------------------------------------------------------------------

    async def login_with_password(self, username: str, password: str) -> TokenGrant:
        key = username.strip().lower()[:MAX_USERNAME_LENGTH]
        try:
            await check_login_throttle(self._failures, key, self._clock())
        except ResourceExhausted:
            # Locked: the password is not even looked at.
            await self._login_denied(key, None, "throttled after repeated failures")
            raise
        user = await self._users.get_by_username(key) if key else None
        if user is None:
            await self._passwords.verify_nobody(password)  # the same time as a wrong password
            correct = False
        else:
            correct = await self._passwords.verify(user.password_hash, password)
        if user is None or not correct or user.disabled:
            # A disabled user's right password counts as a failure too: nothing tells them apart.
            await self._failures.record_failure(key, self._clock())
            why = "unknown username" if user is None else "wrong password" if not correct else "user is disabled"
            await self._login_denied(key, user, why)
            raise _invalid_credentials()
        await self._failures.reset(key)
        user = await self._rehash_if_needed(user, password)
        grant = await self._grant_for_user(user, family=new_identifier())
        await audit(
            self._trail,
            user.organization,
            user.name,
            actor=AuditActor(user.name, user.organization, user.role.value),
            description="logged in with a password",
        )
        return grant

    async def _login_denied(self, username: str, user: User | None, why: str) -> None:
        organization = user.organization if user else self._settings.manufacturer_organization
        await audit(
            self._trail,
            organization,
            user.name if user else organization,
            outcome=Outcome.DENIED,
            actor=AuditActor(subject=username),
            description=f"login refused: {why}",
        )

    async def _rehash_if_needed(self, user: User, password: str) -> User:
        """Upgrades a hash made with older argon2 parameters, while the password is at hand."""
        if not self._passwords.needs_rehash(user.password_hash):
            return user
        updated = user.with_password_hash(await self._passwords.hash(password), self._clock())
        # Losing a race with another write only postpones the upgrade to the next login.
        return updated if await self._users.replace(updated, user.revision) else user

    async def login_with_service_account_key(self, secret: str) -> TokenGrant:
        parts = split_credential(secret)
        key = await self._keys.get(parts[0]) if parts else None
        if parts is None or key is None or not secret_matches(parts[1], key.secret_hash):
            await self._key_login_denied(parts[0] if parts else "", None, "unknown key or wrong secret")
            raise _invalid_credentials("the service account key is invalid")
        if key.expired(self._clock()):
            await self._key_login_denied(key.name, key.organization, "the key has expired")
            raise _invalid_credentials("the service account key is invalid")
        account = await self._service_accounts.get(key.service_account)
        if account is None:
            await self._key_login_denied(key.name, key.organization, "the service account was deleted")
            raise _invalid_credentials("the service account key is invalid")
        access = await self._issuer.issue(account.name, account.organization, account.role)
        await audit(
            self._trail,
            account.organization,
            account.name,
            actor=AuditActor(account.name, account.organization, account.role.value),
            description=f"logged in with service account key {key.name}",
        )
        return TokenGrant(access_token=access, expires_in=self._issuer.ttl_seconds)

    async def _key_login_denied(self, key: str, organization: str | None, why: str) -> None:
        organization = organization or self._settings.manufacturer_organization
        subject = key if "/" in key else f"serviceAccountKey:{key or 'malformed'}"
        await audit(
            self._trail,
            organization,
            key if "/" in key else organization,
            outcome=Outcome.DENIED,
            actor=AuditActor(subject=subject[:254]),
            description=f"service account key login refused: {why}",
        )

    # --- refresh tokens -------------------------------------------------------------------------

    async def _grant_for_user(self, user: User, family: str) -> TokenGrant:
        access = await self._issuer.issue(user.name, user.organization, user.role, user.patient)
        at = self._clock()
        token_id = new_identifier()
        presented, secret_hash = new_credential(token_id)
        ttl = self._settings.refresh_token_ttl
        await self._refresh_tokens.insert(
            RefreshToken(
                id=token_id,
                family=family,
                subject=user.name,
                organization=user.organization,
                secret_hash=secret_hash,
                create_time=at,
                expire_time=at + ttl,
            )
        )
        return TokenGrant(
            access_token=access,
            expires_in=self._issuer.ttl_seconds,
            refresh_token=presented,
            refresh_expires_in=int(ttl.total_seconds()),
        )

    async def _presented(self, value: str) -> RefreshToken:
        """The stored token the caller proved to hold; anything else is REFRESH_TOKEN_INVALID."""
        parts = split_credential(value)
        token = await self._refresh_tokens.get(parts[0]) if parts else None
        if parts is None or token is None or not secret_matches(parts[1], token.secret_hash):
            raise _invalid_refresh_token()
        return token

    async def refresh(self, value: str) -> TokenGrant:
        token = await self._presented(value)
        if token.revoked or token.expired(self._clock()):
            await self._refresh_tokens.revoke_family(token.family)
            raise _invalid_refresh_token()
        if token.used or not await self._refresh_tokens.mark_used(token.id):
            # Used before (or by a concurrent call that won the race): the token has been copied.
            await self._refresh_tokens.revoke_family(token.family)
            await audit(
                self._trail,
                token.organization,
                token.subject,
                outcome=Outcome.DENIED,
                actor=AuditActor(subject=token.subject, organization=token.organization),
                description="refresh token reused: every token of its login is revoked",
            )
            raise Unauthenticated(
                "this refresh token was already used; every token of its login is now revoked",
                reason="REFRESH_TOKEN_REUSED",
            )
        user = await self._users.get(token.subject)
        if user is None or user.disabled:
            await self._refresh_tokens.revoke_family(token.family)
            raise _invalid_refresh_token()
        # The new tokens state the user's role as it is now, not as it was at login.
        return await self._grant_for_user(user, token.family)

    async def logout(self, value: str) -> None:
        token = await self._presented(value)
        await self._refresh_tokens.revoke_family(token.family)
        await audit(
            self._trail,
            token.organization,
            token.subject,
            actor=AuditActor(subject=token.subject, organization=token.organization),
            description="logged out: every refresh token of the login is revoked",
        )

    # --- keys -----------------------------------------------------------------------------------

    async def json_web_key_set(self) -> list[dict[str, str]]:
        return await self._signing_keys.published_jwks()
