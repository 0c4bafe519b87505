"""Identity: signing keys (published ahead, switch at activation, old keys kept until their tokens
expired, then dropped), the JWKS format Envoy and PyJWT read, automatic rotation and upkeep,
and the first-run admin."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import timedelta
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import JwksCache, Role, TokenVerifier
from medmesh.runtime.errors import Unauthenticated, Unavailable
from services.identity.config import IdentitySettings
from services.identity.domain import RETIRED_KEY_GRACE, SigningKey, key_schedule, rotation_due
from services.identity.passwords import Passwords
from services.identity.signing_keys import SigningKeyManager, generate_signing_key
from services.identity.startup import BootstrapAdmin, Maintenance, bootstrap_admin, load_bootstrap_admin
from tests.unit.identity_fakes import (
    MANUFACTURER,
    ORG_A,
    FakeClock,
    Identity,
    InMemorySigningKeys,
    InMemoryUsers,
    cheap_hasher,
    make_identity,
)

TTL = timedelta(seconds=900)
LEAD = timedelta(seconds=120)


def b64decode(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


# --- the schedule, as a pure function -----------------------------------------------------------


def test_schedule_publishes_ahead_switches_at_activation_and_drops_after_the_last_token() -> None:
    clock = FakeClock()
    first = generate_signing_key(clock(), clock())
    clock.advance(3600)
    second = generate_signing_key(clock(), clock() + LEAD)
    keys = [first, second]

    published_ahead = key_schedule(keys, clock(), TTL)
    assert published_ahead.signing == first
    assert published_ahead.pending == (second,)
    assert published_ahead.published_kids() == [second.kid, first.kid]  # newest first

    just_before = key_schedule(keys, second.activate_time - timedelta(milliseconds=1), TTL)
    assert just_before.signing == first
    at_activation = key_schedule(keys, second.activate_time, TTL)
    assert at_activation.signing == second
    assert at_activation.published_kids() == [second.kid, first.kid]  # tokens of the first are still valid

    drop = second.activate_time + TTL + RETIRED_KEY_GRACE
    still_kept = key_schedule(keys, drop - timedelta(milliseconds=1), TTL)
    assert still_kept.published_kids() == [second.kid, first.kid]
    assert still_kept.retired == ()
    dropped = key_schedule(keys, drop, TTL)
    assert dropped.published_kids() == [second.kid]
    assert dropped.retired == (first,)


def test_equal_activation_times_are_broken_by_the_larger_kid() -> None:
    clock = FakeClock()
    one, other = generate_signing_key(clock(), clock()), generate_signing_key(clock(), clock())
    winner = max(one, other, key=lambda k: k.kid)
    for order in ([one, other], [other, one]):
        assert key_schedule(order, clock(), TTL).signing == winner


def test_no_active_key_means_no_signer_and_rotation_due_rules() -> None:
    clock = FakeClock()
    future = generate_signing_key(clock(), clock() + LEAD)
    assert key_schedule([future], clock(), TTL).signing is None
    current = generate_signing_key(clock(), clock())
    period = timedelta(days=30)
    assert not rotation_due(
        key_schedule([current], clock() + timedelta(days=29), TTL), clock() + timedelta(days=29), period
    )
    assert rotation_due(key_schedule([current], clock() + period, TTL), clock() + period, period)
    pending = generate_signing_key(clock() + period, clock() + period + LEAD)
    assert not rotation_due(key_schedule([current, pending], clock() + period, TTL), clock() + period, period)


def test_jwks_entries_are_standard_p256_keys() -> None:
    key = generate_signing_key(FakeClock()(), FakeClock()())
    jwk = key.public_jwk
    assert set(jwk) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"], jwk["kid"]) == ("EC", "P-256", "ES256", "sig", key.kid)
    for coordinate in ("x", "y"):
        assert "=" not in jwk[coordinate]
        assert "+" not in jwk[coordinate]
        assert "/" not in jwk[coordinate]
        assert len(b64decode(jwk[coordinate])) == 32
    private = serialization.load_pem_private_key(key.private_key_pem.encode(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    numbers = private.public_key().public_numbers()
    assert int.from_bytes(b64decode(jwk["x"]), "big") == numbers.x
    assert int.from_bytes(b64decode(jwk["y"]), "big") == numbers.y
    assert "PRIVATE" not in json.dumps(jwk)
    assert "d" not in jwk


# --- the manager, over a store and a clock ------------------------------------------------------


def manager(store: InMemorySigningKeys, clock: FakeClock, **overrides: timedelta) -> SigningKeyManager:
    return SigningKeyManager(
        store,
        access_token_ttl=overrides.get("ttl", TTL),
        publish_lead=overrides.get("lead", LEAD),
        rotation_period=overrides.get("rotation", timedelta(days=30)),
        clock=clock,
        cache_seconds=0.0,
        min_reload_seconds=0.0,
    )


async def test_first_key_is_made_once_and_racing_instances_agree() -> None:
    clock = FakeClock()
    store = InMemorySigningKeys()
    one, other = manager(store, clock), manager(store, clock)
    await asyncio.gather(one.ensure_key(), other.ensure_key())
    assert 1 <= len(store.items) <= 2
    assert (await one.signing_key())[0] == (await other.signing_key())[0]
    count = len(store.items)
    await one.ensure_key()
    assert len(store.items) == count


async def test_without_keys_signing_is_unavailable() -> None:
    with pytest.raises(Unavailable):
        await manager(InMemorySigningKeys(), FakeClock()).signing_key()


async def verify_with_jwks(identity: Identity, token: str) -> str:
    """Verifies like every other service: a JwksCache fed with the published key set."""
    principal = await TokenVerifier(JwksCache(identity.authentication.json_web_key_set)).verify(token)
    return principal.subject


async def test_rotation_without_downtime() -> None:
    # The clock starts 5 minutes in the past: both tokens are unexpired (and not from the future) in real time.
    clock = FakeClock()
    identity = make_identity(clock=clock)
    await identity.signing_keys.ensure_key()
    await identity.add_user(ORG_A, "alice", Role.CLINICIAN, username="alice@a.test")
    old_kid = (await identity.signing_keys.signing_key())[0]
    old_token = (
        await identity.authentication.login_with_password("alice@a.test", "a long enough password")
    ).access_token

    new, schedule = await identity.signing_keys.rotate()
    assert schedule.published_kids() == [new.kid, old_kid]
    jwks_kids = [k["kid"] for k in await identity.authentication.json_web_key_set()]
    assert jwks_kids == [new.kid, old_kid]  # published before it signs
    assert (await identity.signing_keys.signing_key())[0] == old_kid

    clock.advance(LEAD.total_seconds())
    assert (await identity.signing_keys.signing_key())[0] == new.kid
    new_token = (
        await identity.authentication.login_with_password("alice@a.test", "a long enough password")
    ).access_token
    assert jwt.get_unverified_header(new_token)["kid"] == new.kid
    for token in (old_token, new_token):
        assert await verify_with_jwks(identity, token) == "organizations/a/users/alice"

    clock.advance((TTL + RETIRED_KEY_GRACE).total_seconds() - 1)
    assert [k["kid"] for k in await identity.authentication.json_web_key_set()] == [new.kid, old_kid]
    clock.advance(1)
    assert [k["kid"] for k in await identity.authentication.json_web_key_set()] == [new.kid]
    assert await identity.signing_keys.public_key(old_kid) is None  # identity's own verifier forgets it too
    with pytest.raises(Unauthenticated) as refused:
        await TokenVerifier(identity.signing_keys).verify(old_token)
    assert refused.value.reason == "TOKEN_KEY_UNKNOWN"
    await identity.signing_keys.maintain()
    assert set(identity.signing_key_store.items) == {new.kid}


async def test_automatic_rotation_when_the_key_is_old_and_none_is_pending() -> None:
    clock = FakeClock()
    identity = make_identity(clock=clock, settings=IdentitySettings(signing_key_rotation=timedelta(days=30)))
    await identity.signing_keys.ensure_key()
    upkeep = Maintenance(
        identity.signing_keys,
        identity.refresh_tokens,
        identity.login_failures,
        identity.trail,
        MANUFACTURER,
        clock=clock,
    )
    await upkeep.run_once()
    assert len(identity.signing_key_store.items) == 1
    clock.advance(timedelta(days=30).total_seconds())
    await upkeep.run_once()
    assert len(identity.signing_key_store.items) == 2
    event = identity.trail.events[-1]
    assert event.organization == MANUFACTURER
    assert event.resource.startswith("signingKeys/")
    assert event.actor.subject == "internal:identity"
    await upkeep.run_once()  # a successor is pending: no second rotation
    assert len(identity.signing_key_store.items) == 2


async def test_upkeep_purges_expired_refresh_tokens_and_old_failure_counters() -> None:
    clock = FakeClock()
    identity = make_identity(clock=clock)
    await identity.signing_keys.ensure_key()
    await identity.add_user(ORG_A, "alice", Role.CLINICIAN, username="alice@a.test")
    await identity.authentication.login_with_password("alice@a.test", "a long enough password")
    await identity.login_failures.record_failure("ghost", clock())
    upkeep = Maintenance(
        identity.signing_keys,
        identity.refresh_tokens,
        identity.login_failures,
        identity.trail,
        MANUFACTURER,
        clock=clock,
    )
    await upkeep.run_once()
    assert len(identity.refresh_tokens.items) == 1
    assert "ghost" in identity.login_failures.items
    clock.advance(identity.settings.refresh_token_ttl.total_seconds() + 1)
    await upkeep.run_once()
    assert identity.refresh_tokens.items == {}
    assert identity.login_failures.items == {}


async def test_the_key_list_is_cached_but_unknown_kids_reload() -> None:
    clock = FakeClock()
    store = InMemorySigningKeys()
    cached = SigningKeyManager(
        store,
        access_token_ttl=TTL,
        publish_lead=LEAD,
        rotation_period=timedelta(days=30),
        clock=clock,
        cache_seconds=60.0,
        min_reload_seconds=0.0,
    )
    await cached.ensure_key()
    await cached.signing_key()
    reads = store.lists
    for _ in range(5):
        await cached.published_jwks()
    assert store.lists == reads
    another_instance = generate_signing_key(clock(), clock() + LEAD)
    await store.insert(another_instance)
    assert await cached.public_key(another_instance.kid) is not None  # reloaded on the unknown kid
    assert await cached.public_key("forged") is None


# --- first-run admin ----------------------------------------------------------------------------

ADMIN = BootstrapAdmin("admin@medmesh.local", "first admin password")


async def test_bootstrap_creates_the_platform_admin_once() -> None:
    users = InMemoryUsers()
    passwords = Passwords(cheap_hasher())
    trail = RecordingAuditTrail(service="identity")
    created = await bootstrap_admin(users, passwords, ADMIN, trail, MANUFACTURER)
    assert created is not None
    assert (created.name, created.role, created.username) == (
        "organizations/manufacturer/users/admin",
        Role.PLATFORM_ADMIN,
        "admin@medmesh.local",
    )
    assert await passwords.verify(created.password_hash, ADMIN.password)
    assert await bootstrap_admin(users, passwords, ADMIN, trail, MANUFACTURER) is None
    assert list(users.items) == [created.id]
    assert len(trail.events) == 1
    assert ADMIN.password not in repr(trail.events)


async def test_bootstrap_tolerates_a_racing_instance() -> None:
    users = InMemoryUsers()
    passwords = Passwords(cheap_hasher())
    trail = RecordingAuditTrail(service="identity")
    results = await asyncio.gather(*(bootstrap_admin(users, passwords, ADMIN, trail, MANUFACTURER) for _ in range(3)))
    assert sum(result is not None for result in results) == 1
    assert len(users.items) == 1


async def test_bootstrap_admin_can_log_in() -> None:
    identity = make_identity()
    await identity.signing_keys.ensure_key()
    await bootstrap_admin(identity.users, identity.passwords, ADMIN, identity.trail, MANUFACTURER)
    grant = await identity.authentication.login_with_password(ADMIN.username, ADMIN.password)
    principal = await TokenVerifier(identity.signing_keys).verify(grant.access_token)
    assert (principal.role, principal.organization) == (Role.PLATFORM_ADMIN, MANUFACTURER)


def test_bootstrap_file_is_read_and_bad_ones_stop_the_service(tmp_path: Path) -> None:
    good = tmp_path / "admin.json"
    good.write_text(json.dumps({"username": " Admin@Medmesh.local ", "password": "first admin password"}))
    assert load_bootstrap_admin(str(good)) == BootstrapAdmin("admin@medmesh.local", "first admin password")
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"username": "admin", "password": "secret-ish"}))
    for path in (short, tmp_path / "missing.json"):
        with pytest.raises(SystemExit) as stopped:
            load_bootstrap_admin(str(path))
        assert "secret-ish" not in str(stopped.value)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDMESH_MANUFACTURER_ORGANIZATION", "acme")
    monkeypatch.setenv("MEDMESH_ACCESS_TOKEN_TTL_SECONDS", "60")
    monkeypatch.setenv("MEDMESH_JWKS_PUBLISH_LEAD_SECONDS", "3")
    settings = IdentitySettings.from_env()
    assert settings.manufacturer_organization == "organizations/acme"
    assert settings.access_token_ttl == timedelta(seconds=60)
    assert settings.jwks_publish_lead == timedelta(seconds=3)
    assert settings.refresh_token_ttl == timedelta(days=30)
    assert settings.signing_key_rotation == timedelta(days=30)
    monkeypatch.setenv("MEDMESH_ACCESS_TOKEN_TTL_SECONDS", "0")
    with pytest.raises(ValueError, match="positive"):
        IdentitySettings.from_env()


def test_signing_keys_never_show_their_private_key_in_repr() -> None:
    key: SigningKey = generate_signing_key(FakeClock()(), FakeClock()())
    assert "PRIVATE" not in repr(key)
