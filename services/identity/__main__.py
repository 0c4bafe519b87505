"""Runs the identity service: `python -m services.identity`."""

from __future__ import annotations

import asyncio
import contextlib

from medmesh.identity.v1 import authentication_service_pb2_grpc as auth_pb_grpc
from medmesh.identity.v1 import identity_service_pb2_grpc as pb_grpc
from medmesh.runtime.audit_outbox import OutboxAuditTrail
from medmesh.runtime.auth import Authenticator, TokenSettings, TokenVerifier, internal_token_from_env
from medmesh.runtime.clients import peer_channel
from medmesh.runtime.directories import GrpcOrganizationDirectory
from medmesh.runtime.mongo import connect, readiness
from medmesh.runtime.server import ServiceBinding, configure_process, serve
from medmesh.runtime.settings import Settings
from services.identity.authentication import AuthenticationService
from services.identity.config import IdentitySettings
from services.identity.passwords import Passwords
from services.identity.patients import GrpcPatientDirectory
from services.identity.repository import (
    LoginFailureRepository,
    RefreshTokenRepository,
    ServiceAccountKeyRepository,
    ServiceAccountRepository,
    SigningKeyRepository,
    UserRepository,
)
from services.identity.service import IdentityService
from services.identity.servicer import (
    AUTHENTICATION_SERVICE,
    IDENTITY_SERVICE,
    PUBLIC_METHODS,
    AuthenticationServicer,
    IdentityServicer,
)
from services.identity.signing_keys import SigningKeyManager
from services.identity.startup import Maintenance, bootstrap_admin, load_bootstrap_admin
from services.identity.tokens import TokenIssuer


async def main() -> None:
    settings = Settings.from_env("identity")
    configure_process(settings)
    identity = IdentitySettings.from_env()
    admin = load_bootstrap_admin(identity.bootstrap_admin_file) if identity.bootstrap_admin_file else None
    token_settings = TokenSettings.from_env()
    client, database = connect(settings)
    organization_channel = peer_channel("organization", caller="identity")
    patient_channel = peer_channel("patient", caller="identity")
    audit_channel = peer_channel("audit", caller="identity")
    trail = OutboxAuditTrail(database, "identity", audit_channel)

    users = UserRepository(database)
    service_accounts = ServiceAccountRepository(database)
    service_account_keys = ServiceAccountKeyRepository(database)
    refresh_tokens = RefreshTokenRepository(database)
    login_failures = LoginFailureRepository(database)
    signing_key_store = SigningKeyRepository(database)
    signing_keys = SigningKeyManager(
        signing_key_store,
        access_token_ttl=identity.access_token_ttl,
        publish_lead=identity.jwks_publish_lead,
        rotation_period=identity.signing_key_rotation,
    )
    passwords = Passwords()
    issuer = TokenIssuer(signing_keys, token_settings, identity.access_token_ttl)
    authentication = AuthenticationService(
        users=users,
        service_accounts=service_accounts,
        service_account_keys=service_account_keys,
        refresh_tokens=refresh_tokens,
        login_failures=login_failures,
        passwords=passwords,
        issuer=issuer,
        signing_keys=signing_keys,
        trail=trail,
        settings=identity,
    )
    management = IdentityService(
        users=users,
        service_accounts=service_accounts,
        service_account_keys=service_account_keys,
        refresh_tokens=refresh_tokens,
        login_failures=login_failures,
        passwords=passwords,
        organizations=GrpcOrganizationDirectory(organization_channel),
        patients=GrpcPatientDirectory(patient_channel),
        signing_keys=signing_keys,
        trail=trail,
        settings=identity,
    )
    maintenance = Maintenance(signing_keys, refresh_tokens, login_failures, trail, identity.manufacturer_organization)
    bindings = [
        ServiceBinding(
            AUTHENTICATION_SERVICE,
            AuthenticationServicer(authentication),
            auth_pb_grpc.add_AuthenticationServiceServicer_to_server,
        ),
        ServiceBinding(IDENTITY_SERVICE, IdentityServicer(management), pb_grpc.add_IdentityServiceServicer_to_server),
    ]

    async def first_run() -> None:
        await signing_keys.ensure_key()
        if admin is not None:
            await bootstrap_admin(users, passwords, admin, trail, identity.manufacturer_organization)

    # Ready = the database answers, the indexes exist (the unique username index before any user
    # is written), a signing key exists and the bootstrap admin is in place.
    ready = readiness(
        database,
        users,
        service_accounts,
        service_account_keys,
        refresh_tokens,
        login_failures,
        signing_key_store,
        trail,
        setup=[first_run],
    )
    background: dict[str, asyncio.Task[None]] = {}

    async def start() -> None:
        await passwords.prepare()
        background["upkeep"] = asyncio.create_task(maintenance.run(), name="identity-upkeep")
        background["outbox"] = asyncio.create_task(trail.run(), name="identity-audit-outbox")

    async def stop() -> None:
        if "upkeep" in background:
            background["upkeep"].cancel()
        # The outbox delivers what it holds, then stops its flusher.
        await trail.close()
        for task in background.values():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for channel in (organization_channel, patient_channel, audit_channel):
            await channel.close()
        await client.close()

    authenticator = Authenticator(
        # Identity verifies tokens against its own key store, never over the network.
        TokenVerifier(signing_keys, token_settings),
        public_methods=PUBLIC_METHODS,
        internal_token=internal_token_from_env(),
    )
    await serve(settings, bindings, ready, on_start=start, on_stop=stop, authenticator=authenticator)


if __name__ == "__main__":
    asyncio.run(main())
