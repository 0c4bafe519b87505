"""Identity: passwords, login, back-off, refresh tokens, logout, service account keys, and the
audit events they leave (never with a secret in them)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import timedelta
from typing import Any, Literal

import jwt
import pytest
from argon2 import PasswordHasher
from cryptography.hazmat.primitives.asymmetric import ec

from medmesh.runtime.audit import AuditEvent, Outcome
from medmesh.runtime.auth import JwksCache, Principal, Role, TokenSettings, TokenVerifier, acting_as
from medmesh.runtime.errors import ResourceExhausted, Unauthenticated
from services.identity.domain import TokenGrant, User, lock_duration
from services.identity.passwords import Passwords
from tests.unit.identity_fakes import (
    MANUFACTURER,
    ORG_A,
    Identity,
    cheap_hasher,
    make_identity,
    member,
)

PASSWORD = "a long enough password"


@pytest.fixture
async def identity() -> Identity:
    service = make_identity()
    await service.signing_keys.ensure_key()
    return service


@pytest.fixture
async def alice(identity: Identity) -> User:
    return await identity.add_user(ORG_A, "alice", Role.CLINICIAN, username="alice@a.test")


def verifier(identity: Identity) -> TokenVerifier:
    """What every other service does: keys fetched from the published JWKS."""
    return TokenVerifier(JwksCache(identity.authentication.json_web_key_set), identity.token_settings)


def event_text(event: AuditEvent) -> str:
    return repr(event)


def assert_no_secret_in_audit(identity: Identity, *secrets: str) -> None:
    assert identity.trail.events, "expected audit events"
    for event in identity.trail.events:
        text = event_text(event)
        for secret in secrets:
            if secret:
                assert secret not in text, f"secret leaked into {event}"


# --- passwords ----------------------------------------------------------------------------------


async def test_password_hash_verifies_only_the_right_password() -> None:
    passwords = Passwords(cheap_hasher())
    hashed = await passwords.hash(PASSWORD)
    assert hashed.startswith("$argon2id$")
    assert PASSWORD not in hashed
    assert await passwords.verify(hashed, PASSWORD)
    assert not await passwords.verify(hashed, PASSWORD + "!")
    assert not await passwords.verify("not a hash", PASSWORD)


async def test_needs_rehash_when_parameters_change() -> None:
    weak = Passwords(cheap_hasher())
    stronger = Passwords(PasswordHasher(time_cost=2, memory_cost=16, parallelism=1))
    hashed = await weak.hash(PASSWORD)
    assert not weak.needs_rehash(hashed)
    assert stronger.needs_rehash(hashed)
    assert stronger.needs_rehash("garbage")


async def test_unknown_users_cost_a_verification_too() -> None:
    calls: list[str] = []

    class CountingHasher(PasswordHasher):
        def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
            calls.append("verify")
            return super().verify(hash, password)

    passwords = Passwords(CountingHasher(time_cost=1, memory_cost=8, parallelism=1))
    await passwords.verify_nobody(PASSWORD)
    assert calls == ["verify"]


# --- login --------------------------------------------------------------------------------------


async def test_login_issues_tokens_that_verify_with_the_published_keys(identity: Identity, alice: User) -> None:
    grant = await identity.authentication.login_with_password("alice@a.test", PASSWORD)
    assert grant.expires_in == 900
    assert grant.refresh_token
    assert grant.refresh_expires_in == 30 * 86400
    principal = await verifier(identity).verify(grant.access_token)
    assert principal.subject == alice.name
    assert principal.organization == ORG_A
    assert principal.role is Role.CLINICIAN
    claims = jwt.decode(grant.access_token, options={"verify_signature": False})
    assert claims["iss"] == "medmesh"
    assert claims["aud"] == "medmesh"
    assert claims["exp"] - claims["iat"] == 900
    assert claims["jti"]
    assert "patient" not in claims
    header = jwt.get_unverified_header(grant.access_token)
    schedule = await identity.signing_keys.schedule()
    assert schedule.signing is not None
    assert header["kid"] == schedule.signing.kid
    assert header["alg"] == "ES256"


async def test_patient_tokens_name_the_patient(identity: Identity) -> None:
    patient = "organizations/a/patients/p1"
    await identity.add_user(ORG_A, "pat", Role.PATIENT, patient=patient, username="pat@a.test")
    grant = await identity.authentication.login_with_password("pat@a.test", PASSWORD)
    principal = await verifier(identity).verify(grant.access_token)
    assert principal.role is Role.PATIENT
    assert principal.patient == patient


async def test_usernames_are_case_insensitive(identity: Identity, alice: User) -> None:
    grant = await identity.authentication.login_with_password("  ALICE@A.Test ", PASSWORD)
    assert (await verifier(identity).verify(grant.access_token)).subject == alice.name


async def failed_login(identity: Identity, username: str, password: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as refused:
        await identity.authentication.login_with_password(username, password)
    return refused.value


async def test_wrong_password_unknown_user_and_disabled_user_look_the_same(identity: Identity, alice: User) -> None:
    await identity.add_user(ORG_A, "dora", Role.OPERATOR, disabled=True, username="dora@a.test")
    wrong = await failed_login(identity, "alice@a.test", "not the password")
    unknown = await failed_login(identity, "nobody@a.test", PASSWORD)
    disabled = await failed_login(identity, "dora@a.test", PASSWORD)
    for error in (wrong, unknown, disabled):
        assert error.reason == "INVALID_CREDENTIALS"
        assert error.metadata == {}
    assert wrong.message == unknown.message == disabled.message


async def test_login_audits_success_and_failure(identity: Identity, alice: User) -> None:
    grant = await identity.authentication.login_with_password("alice@a.test", PASSWORD)
    await failed_login(identity, "alice@a.test", "not the password")
    await failed_login(identity, "ghost@a.test", "ghost password 1")
    success, wrong, unknown = identity.trail.events
    assert success.outcome is Outcome.SUCCEEDED
    assert (success.organization, success.resource, success.actor.subject) == (ORG_A, alice.name, alice.name)
    assert wrong.outcome is Outcome.DENIED
    assert (wrong.organization, wrong.resource, wrong.actor.subject) == (ORG_A, alice.name, "alice@a.test")
    assert "wrong password" in wrong.description
    assert unknown.outcome is Outcome.DENIED
    assert (unknown.organization, unknown.actor.subject) == (MANUFACTURER, "ghost@a.test")
    assert all(event.service == "identity" for event in identity.trail.events)
    assert_no_secret_in_audit(
        identity, PASSWORD, "not the password", "ghost password 1", grant.access_token, grant.refresh_token
    )


async def test_login_upgrades_an_outdated_hash(identity: Identity) -> None:
    old = Passwords(PasswordHasher(time_cost=1, memory_cost=16, parallelism=1))
    user = await identity.add_user(ORG_A, "olga", Role.OPERATOR, username="olga@a.test")
    outdated = replace(user, password_hash=await old.hash(PASSWORD))
    identity.users.put(outdated)
    await identity.authentication.login_with_password("olga@a.test", PASSWORD)
    stored = identity.users.items[user.id]
    assert stored.password_hash != outdated.password_hash
    assert not identity.passwords.needs_rehash(stored.password_hash)
    assert stored.revision == outdated.revision + 1
    await identity.authentication.login_with_password("olga@a.test", PASSWORD)  # and it still works


# --- back-off -----------------------------------------------------------------------------------


def test_lock_durations_double_and_are_capped() -> None:
    assert [lock_duration(n).total_seconds() for n in range(7)] == [0, 0, 0, 0, 0, 30, 60]
    assert lock_duration(9).total_seconds() == 480
    assert lock_duration(10).total_seconds() == 900
    assert lock_duration(10_000).total_seconds() == 900


async def throttled(identity: Identity, username: str, password: str) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as refused:
        await identity.authentication.login_with_password(username, password)
    assert refused.value.reason == "LOGIN_THROTTLED"
    return refused.value


async def test_five_failures_lock_the_username_even_for_the_right_password(identity: Identity, alice: User) -> None:
    for _ in range(5):
        await failed_login(identity, "alice@a.test", "not the password")
    locked = await throttled(identity, "alice@a.test", PASSWORD)
    assert locked.metadata == {"retry_after_seconds": "30"}
    identity.clock.advance(10)
    assert (await throttled(identity, "ALICE@a.test", PASSWORD)).metadata == {"retry_after_seconds": "20"}
    identity.clock.advance(20)
    await identity.authentication.login_with_password("alice@a.test", PASSWORD)  # unlocked; resets
    for _ in range(4):
        await failed_login(identity, "alice@a.test", "not the password")
    await identity.authentication.login_with_password("alice@a.test", PASSWORD)  # 4 failures: no lock


async def test_the_lock_doubles_with_each_further_failure(identity: Identity, alice: User) -> None:
    for _ in range(5):
        await failed_login(identity, "alice@a.test", "not the password")
    identity.clock.advance(30)
    await failed_login(identity, "alice@a.test", "not the password")  # the 6th
    assert (await throttled(identity, "alice@a.test", PASSWORD)).metadata == {"retry_after_seconds": "60"}


async def test_locked_logins_do_not_check_the_password(identity: Identity, alice: User) -> None:
    for _ in range(5):
        await failed_login(identity, "alice@a.test", "not the password")
    verified: list[str] = []
    original = identity.passwords.verify

    async def spy(password_hash: str, password: str) -> bool:
        verified.append(password)
        return await original(password_hash, password)

    identity.passwords.verify = spy  # type: ignore[method-assign]
    await throttled(identity, "alice@a.test", PASSWORD)
    assert verified == []
    assert identity.trail.events[-1].outcome is Outcome.DENIED
    assert "throttled" in identity.trail.events[-1].description


async def test_unknown_usernames_are_throttled_the_same_way(identity: Identity) -> None:
    for _ in range(5):
        await failed_login(identity, "ghost@a.test", "whatever password")
    assert (await throttled(identity, "ghost@a.test", "whatever password")).metadata == {"retry_after_seconds": "30"}


# --- refresh tokens -----------------------------------------------------------------------------


async def login(identity: Identity, username: str = "alice@a.test") -> TokenGrant:
    return await identity.authentication.login_with_password(username, PASSWORD)


async def test_refresh_rotates_the_refresh_token(identity: Identity, alice: User) -> None:
    first = await login(identity)
    second = await identity.authentication.refresh(first.refresh_token)
    assert second.refresh_token != first.refresh_token
    assert (await verifier(identity).verify(second.access_token)).subject == alice.name
    first_id, second_id = first.refresh_token.split(".")[0], second.refresh_token.split(".")[0]
    assert identity.refresh_tokens.items[first_id].used
    assert identity.refresh_tokens.items[first_id].family == identity.refresh_tokens.items[second_id].family
    # Only hashes are stored.
    stored = repr(identity.refresh_tokens.items) + str([t.secret_hash for t in identity.refresh_tokens.items.values()])
    assert first.refresh_token.split(".")[1] not in stored
    third = await identity.authentication.refresh(second.refresh_token)
    assert third.refresh_token


async def test_reusing_a_refresh_token_revokes_its_family(identity: Identity, alice: User) -> None:
    first = await login(identity)
    other_login = await login(identity)
    second = await identity.authentication.refresh(first.refresh_token)
    with pytest.raises(Unauthenticated) as reused:
        await identity.authentication.refresh(first.refresh_token)
    assert reused.value.reason == "REFRESH_TOKEN_REUSED"
    with pytest.raises(Unauthenticated) as revoked:
        await identity.authentication.refresh(second.refresh_token)
    assert revoked.value.reason == "REFRESH_TOKEN_INVALID"
    # Another login of the same user is another family: untouched.
    await identity.authentication.refresh(other_login.refresh_token)
    reuse_event = next(e for e in identity.trail.events if "reused" in e.description)
    assert reuse_event.outcome is Outcome.DENIED
    assert (reuse_event.organization, reuse_event.resource) == (ORG_A, alice.name)
    assert_no_secret_in_audit(identity, first.refresh_token, second.refresh_token, PASSWORD)


async def test_losing_the_refresh_race_counts_as_reuse(identity: Identity, alice: User) -> None:
    first = await login(identity)
    identity.refresh_tokens.lose_next_race = True
    with pytest.raises(Unauthenticated) as reused:
        await identity.authentication.refresh(first.refresh_token)
    assert reused.value.reason == "REFRESH_TOKEN_REUSED"
    assert not identity.refresh_tokens.live_for(alice.name)


@pytest.mark.parametrize(
    "token",
    ["", "garbage", "nodot", ".secret", "id.", "0123.wrong-secret"],
)
async def test_malformed_or_unknown_refresh_tokens_are_invalid(identity: Identity, alice: User, token: str) -> None:
    await login(identity)
    with pytest.raises(Unauthenticated) as refused:
        await identity.authentication.refresh(token)
    assert refused.value.reason == "REFRESH_TOKEN_INVALID"


async def test_a_wrong_secret_for_a_real_token_id_is_invalid_and_revokes_nothing(
    identity: Identity, alice: User
) -> None:
    grant = await login(identity)
    token_id = grant.refresh_token.split(".")[0]
    with pytest.raises(Unauthenticated) as refused:
        await identity.authentication.refresh(f"{token_id}.guessed")
    assert refused.value.reason == "REFRESH_TOKEN_INVALID"
    await identity.authentication.refresh(grant.refresh_token)  # still fine


async def test_expired_refresh_tokens_are_invalid(identity: Identity, alice: User) -> None:
    grant = await login(identity)
    identity.clock.advance(identity.settings.refresh_token_ttl.total_seconds())
    with pytest.raises(Unauthenticated) as refused:
        await identity.authentication.refresh(grant.refresh_token)
    assert refused.value.reason == "REFRESH_TOKEN_INVALID"


async def test_logout_revokes_the_family(identity: Identity, alice: User) -> None:
    first = await login(identity)
    second = await identity.authentication.refresh(first.refresh_token)
    await identity.authentication.logout(second.refresh_token)
    with pytest.raises(Unauthenticated) as refused:
        await identity.authentication.refresh(second.refresh_token)
    assert refused.value.reason == "REFRESH_TOKEN_INVALID"
    await identity.authentication.logout(second.refresh_token)  # logging out twice is fine
    with pytest.raises(Unauthenticated):
        await identity.authentication.logout("garbage.token")
    logout_event = next(e for e in identity.trail.events if "logged out" in e.description)
    assert (logout_event.organization, logout_event.resource, logout_event.actor.subject) == (
        ORG_A,
        alice.name,
        alice.name,
    )
    assert_no_secret_in_audit(identity, first.refresh_token, second.refresh_token)


async def test_disabled_or_deleted_users_cannot_refresh(identity: Identity, alice: User) -> None:
    grant = await login(identity)
    identity.users.put(replace(alice, disabled=True, revision=alice.revision + 1))
    with pytest.raises(Unauthenticated) as refused:
        await identity.authentication.refresh(grant.refresh_token)
    assert refused.value.reason == "REFRESH_TOKEN_INVALID"

    bob = await identity.add_user(ORG_A, "bob", Role.OPERATOR, username="bob@a.test")
    grant = await login(identity, "bob@a.test")
    del identity.users.items[bob.id]
    with pytest.raises(Unauthenticated):
        await identity.authentication.refresh(grant.refresh_token)


async def test_refresh_states_the_current_role(identity: Identity, alice: User) -> None:
    grant = await login(identity)
    identity.users.put(replace(alice, role=Role.OPERATOR, revision=alice.revision + 1))
    refreshed = await identity.authentication.refresh(grant.refresh_token)
    assert (await verifier(identity).verify(refreshed.access_token)).role is Role.OPERATOR


# --- service account keys -----------------------------------------------------------------------


async def make_key(identity: Identity, account_id: str = "ehr", **expiry: Any) -> tuple[str, str]:
    """(service account name, key secret) made by organization A's admin."""
    with acting_as(member(ORG_A, Role.ORGANIZATION_ADMIN, "admin")):
        account = await identity.management.create_service_account(
            ORG_A, display_name="EHR bridge", role=Role.OPERATOR, service_account_id=account_id
        )
        expire_time = identity.clock() + timedelta(**expiry) if expiry else None
        created = await identity.management.create_service_account_key(account.name, expire_time)
    return account.name, created.secret


async def test_a_service_account_key_logs_in_with_the_accounts_role(identity: Identity) -> None:
    account, secret = await make_key(identity)
    grant = await identity.authentication.login_with_service_account_key(secret)
    assert grant.refresh_token == ""
    assert grant.refresh_expires_in == 0
    principal = await verifier(identity).verify(grant.access_token)
    assert (principal.subject, principal.organization, principal.role) == (account, ORG_A, Role.OPERATOR)
    event = identity.trail.events[-1]
    assert (event.organization, event.resource, event.outcome) == (ORG_A, account, Outcome.SUCCEEDED)
    assert_no_secret_in_audit(identity, secret, secret.split(".")[1], grant.access_token)


async def refused_key(identity: Identity, secret: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as refused:
        await identity.authentication.login_with_service_account_key(secret)
    assert refused.value.reason == "INVALID_CREDENTIALS"
    assert identity.trail.events[-1].outcome is Outcome.DENIED
    return refused.value


async def test_expired_keys_are_refused(identity: Identity) -> None:
    _account, secret = await make_key(identity, hours=1)
    await identity.authentication.login_with_service_account_key(secret)
    identity.clock.advance(3600)
    await refused_key(identity, secret)
    assert "expired" in identity.trail.events[-1].description


async def test_deleted_keys_wrong_secrets_and_deleted_accounts_are_refused(identity: Identity) -> None:
    account, secret = await make_key(identity)
    key_id = secret.split(".")[0]
    await refused_key(identity, f"{key_id}.not-the-secret")
    await refused_key(identity, "no-dot-at-all")
    with acting_as(member(ORG_A, Role.ORGANIZATION_ADMIN, "admin")):
        await identity.management.delete_service_account_key(f"{account}/keys/{key_id}")
    await refused_key(identity, secret)

    account, secret = await make_key(identity, "bridge")
    del identity.service_accounts.items[account]  # keys left behind cannot log in
    await refused_key(identity, secret)
    assert_no_secret_in_audit(identity, secret.split(".")[1])


async def test_identity_verifies_its_own_tokens_from_its_store(identity: Identity, alice: User) -> None:
    grant = await login(identity)
    own = TokenVerifier(identity.signing_keys, identity.token_settings)
    principal = await own.verify(grant.access_token)
    assert isinstance(principal, Principal)
    assert principal.token == grant.access_token
    claims = jwt.decode(grant.access_token, options={"verify_signature": False})
    stranger = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(Unauthenticated) as unknown:
        await own.verify(jwt.encode(claims, stranger, algorithm="ES256", headers={"kid": "nope"}))
    assert unknown.value.reason == "TOKEN_KEY_UNKNOWN"
    kid = jwt.get_unverified_header(grant.access_token)["kid"]
    with pytest.raises(Unauthenticated) as wrong_key:
        await own.verify(jwt.encode(claims, stranger, algorithm="ES256", headers={"kid": kid}))
    assert wrong_key.value.reason == "TOKEN_INVALID"


# --- verified tokens remembered -----------------------------------------------------------------


class SwitchableKeys:
    def __init__(self, kid: str, key: Any) -> None:
        self.keys = {kid: key}

    async def public_key(self, kid: str) -> Any | None:
        return self.keys.get(kid)


def signed(private: ec.EllipticCurvePrivateKey, kid: str, expires_in: float) -> str:
    now = time.time()
    claims: dict[str, Any] = {
        "sub": "organizations/a/users/u",
        "org": ORG_A,
        "role": "clinician",
        "iss": "medmesh",
        "aud": "medmesh",
    }
    claims |= {"iat": int(now), "exp": int(now + expires_in)}  # whole seconds, as PyJWT reads them
    return jwt.encode(claims, private, algorithm="ES256", headers={"kid": kid})


async def test_a_token_verified_once_is_not_checked_again_until_it_expires_or_its_key_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    keys = SwitchableKeys("k1", private.public_key())
    verifier = TokenVerifier(keys, TokenSettings(leeway_seconds=0))
    token, short = signed(private, "k1", 600), signed(private, "k1", 2)  # valid for 1 to 2 s
    decodes = 0
    decode = jwt.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal decodes
        decodes += 1
        return decode(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    first = await verifier.verify(token)
    assert await verifier.verify(token) == first
    assert decodes == 1
    # A token whose signature does not hold is never taken for a remembered one.
    with pytest.raises(Unauthenticated):
        await verifier.verify(token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"))

    await verifier.verify(short)
    await asyncio.sleep(jwt.decode(short, options={"verify_signature": False})["exp"] - time.time() + 0.05)
    with pytest.raises(Unauthenticated) as expired:
        await verifier.verify(short)
    assert expired.value.reason == "TOKEN_EXPIRED"

    del keys.keys["k1"]  # the key is withdrawn
    with pytest.raises(Unauthenticated) as withdrawn:
        await verifier.verify(token)
    assert withdrawn.value.reason == "TOKEN_KEY_UNKNOWN"


async def test_remembered_tokens_are_bounded() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    verifier = TokenVerifier(SwitchableKeys("k1", private.public_key()), remembered=2)
    tokens = [signed(private, "k1", 600 + i) for i in range(3)]
    for token in tokens:
        await verifier.verify(token)

    assert list(verifier._verified) == tokens[1:]
