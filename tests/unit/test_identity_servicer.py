"""Identity over gRPC, in-process: the two servicers behind the shared interceptor and the
identity service's own authenticator; the JWKS as other services fetch it; the patient and
organization directories against local fake peers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import jwt
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from medmesh.identity.v1 import authentication_service_pb2 as auth_pb
from medmesh.identity.v1 import authentication_service_pb2_grpc as auth_pb_grpc
from medmesh.identity.v1 import identity_service_pb2 as pb
from medmesh.identity.v1 import identity_service_pb2_grpc as pb_grpc
from medmesh.patient.v1 import patient_service_pb2 as patient_pb
from medmesh.patient.v1 import patient_service_pb2_grpc as patient_pb_grpc
from medmesh.runtime.auth import Authenticator, JwksCache, Role, TokenVerifier
from medmesh.runtime.clients import jwks_fetcher
from medmesh.runtime.errors import Unavailable
from medmesh.runtime.interceptors import RequestInterceptor
from services.identity.patients import GrpcPatientDirectory
from services.identity.servicer import (
    PUBLIC_METHODS,
    ROLE_FROM_PB,
    ROLE_TO_PB,
    AuthenticationServicer,
    IdentityServicer,
)
from services.identity.startup import BootstrapAdmin, bootstrap_admin
from tests.rich_status import unpack_details
from tests.unit.identity_fakes import MANUFACTURER, Identity, make_identity

ADMIN = BootstrapAdmin("admin@medmesh.local", "first admin password")


@dataclass
class Served:
    identity: Identity
    channel: grpc.aio.Channel
    auth: auth_pb_grpc.AuthenticationServiceStub
    stub: pb_grpc.IdentityServiceStub


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    identity = make_identity()
    await identity.signing_keys.ensure_key()
    await bootstrap_admin(identity.users, identity.passwords, ADMIN, identity.trail, MANUFACTURER)
    authenticator = Authenticator(
        TokenVerifier(identity.signing_keys, identity.token_settings), public_methods=PUBLIC_METHODS
    )
    server = grpc.aio.server(interceptors=[RequestInterceptor("identity.medmesh", authenticator)])
    auth_pb_grpc.add_AuthenticationServiceServicer_to_server(  # type: ignore[no-untyped-call]
        AuthenticationServicer(identity.authentication), server
    )
    pb_grpc.add_IdentityServiceServicer_to_server(IdentityServicer(identity.management), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Served(
            identity,
            channel,
            auth_pb_grpc.AuthenticationServiceStub(channel),  # type: ignore[no-untyped-call]
            pb_grpc.IdentityServiceStub(channel),  # type: ignore[no-untyped-call]
        )
    finally:
        await channel.close()
        await server.stop(grace=None)


async def admin_login(served: Served) -> auth_pb.TokenResponse:
    request = auth_pb.LoginRequest(
        password=auth_pb.PasswordCredential(username=ADMIN.username, password=ADMIN.password)
    )
    reply: auth_pb.TokenResponse = await served.auth.Login(request)
    return reply


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def error_info(error: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    status = rpc_status.from_call(error)
    assert status is not None
    infos, _ = unpack_details(status)
    assert len(infos) == 1
    return infos[0].reason, dict(infos[0].metadata)


def test_every_authentication_method_is_public_and_nothing_else() -> None:
    assert {
        "/medmesh.identity.v1.AuthenticationService/Login",
        "/medmesh.identity.v1.AuthenticationService/RefreshToken",
        "/medmesh.identity.v1.AuthenticationService/Logout",
        "/medmesh.identity.v1.AuthenticationService/GetJsonWebKeySet",
    } == PUBLIC_METHODS


def test_every_role_maps_to_the_protobuf_enum_and_back() -> None:
    assert set(ROLE_TO_PB) == set(Role)
    assert set(ROLE_FROM_PB) == set(pb.Role.values()) - {pb.ROLE_UNSPECIFIED}
    assert ROLE_TO_PB[Role.PLATFORM_ADMIN] == pb.ROLE_PLATFORM_ADMIN
    assert ROLE_TO_PB[Role.PATIENT] == pb.ROLE_PATIENT


async def test_login_and_jwks_over_grpc_verify_like_every_other_service(served: Served) -> None:
    tokens = await admin_login(served)
    assert tokens.token_type == "Bearer"
    assert tokens.expires_in == 900
    assert tokens.refresh_token
    assert tokens.refresh_expires_in == 30 * 86400
    jwks = await served.auth.GetJsonWebKeySet(auth_pb.GetJsonWebKeySetRequest())
    assert [k.kid for k in jwks.keys] == [jwt.get_unverified_header(tokens.access_token)["kid"]]
    assert (jwks.keys[0].kty, jwks.keys[0].crv, jwks.keys[0].alg, jwks.keys[0].use) == ("EC", "P-256", "ES256", "sig")
    other_service = TokenVerifier(JwksCache(jwks_fetcher(served.channel)))
    principal = await other_service.verify(tokens.access_token)
    assert (principal.subject, principal.role) == ("organizations/manufacturer/users/admin", Role.PLATFORM_ADMIN)

    refreshed = await served.auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=tokens.refresh_token))
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await served.auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=tokens.refresh_token))
    assert reused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(reused.value)[0] == "REFRESH_TOKEN_REUSED"
    with pytest.raises(grpc.aio.AioRpcError) as revoked:
        await served.auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=refreshed.refresh_token))
    assert error_info(revoked.value)[0] == "REFRESH_TOKEN_INVALID"
    await served.auth.Logout(auth_pb.LogoutRequest(refresh_token=refreshed.refresh_token))


async def test_wrong_credentials_and_throttling_over_grpc(served: Served) -> None:
    wrong = auth_pb.LoginRequest(password=auth_pb.PasswordCredential(username=ADMIN.username, password="nope"))
    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await served.auth.Login(wrong)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(refused.value) == ("INVALID_CREDENTIALS", {})
    with pytest.raises(grpc.aio.AioRpcError) as throttled:
        await admin_login(served)
    assert throttled.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(throttled.value) == ("LOGIN_THROTTLED", {"retry_after_seconds": "30"})
    status = rpc_status.from_call(throttled.value)
    assert status is not None
    (retry,) = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    info = error_details_pb2.RetryInfo()
    retry.Unpack(info)
    assert info.retry_delay.ToTimedelta().total_seconds() == 30


async def test_identity_methods_need_a_token(served: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await served.stub.GetUser(pb.GetUserRequest(name="organizations/manufacturer/users/admin"))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_user_lifecycle_over_grpc(served: Served) -> None:
    token = (await admin_login(served)).access_token
    created = await served.stub.CreateUser(
        pb.CreateUserRequest(
            parent="organizations/a",
            user=pb.User(username="Carol@A.test", display_name="Carol", role=pb.ROLE_CLINICIAN),
            user_id="carol",
            password="carol's long password",
        ),
        metadata=bearer(token),
    )
    assert (created.name, created.username, created.role) == (
        "organizations/a/users/carol",
        "carol@a.test",
        pb.ROLE_CLINICIAN,
    )
    assert created.etag
    assert created.create_time.seconds
    assert not created.disabled
    assert "password" not in str(created)

    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await served.stub.CreateUser(
            pb.CreateUserRequest(
                parent="organizations/a", user=pb.User(username="x", role=pb.ROLE_OPERATOR), password="short"
            ),
            metadata=bearer(token),
        )
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    updated = await served.stub.UpdateUser(
        pb.UpdateUserRequest(
            user=pb.User(name=created.name, disabled=True, etag=created.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["disabled"]),
        ),
        metadata=bearer(token),
    )
    assert updated.disabled
    assert updated.etag != created.etag
    listed = await served.stub.ListUsers(
        pb.ListUsersRequest(parent="organizations/-", filter="disabled = true"), metadata=bearer(token)
    )
    assert [u.name for u in listed.users] == [created.name]
    await served.stub.ChangePassword(
        pb.ChangePasswordRequest(name=created.name, new_password="a new long password"), metadata=bearer(token)
    )
    await served.stub.DeleteUser(pb.DeleteUserRequest(name=created.name), metadata=bearer(token))
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await served.stub.GetUser(pb.GetUserRequest(name=created.name), metadata=bearer(token))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(gone.value)[0] == "USER_NOT_FOUND"


async def test_service_accounts_and_rotation_over_grpc(served: Served) -> None:
    token = (await admin_login(served)).access_token
    account = await served.stub.CreateServiceAccount(
        pb.CreateServiceAccountRequest(
            parent="organizations/a", service_account=pb.ServiceAccount(display_name="EHR", role=pb.ROLE_OPERATOR)
        ),
        metadata=bearer(token),
    )
    expiry = datetime.now(UTC) + timedelta(days=1)
    requested = pb.ServiceAccountKey()
    requested.expire_time.FromDatetime(expiry)
    key = await served.stub.CreateServiceAccountKey(
        pb.CreateServiceAccountKeyRequest(parent=account.name, service_account_key=requested), metadata=bearer(token)
    )
    assert key.secret
    assert key.name.startswith(account.name + "/keys/")
    assert key.expire_time.ToDatetime(tzinfo=UTC) == expiry.replace(microsecond=expiry.microsecond // 1000 * 1000)
    listed = await served.stub.ListServiceAccountKeys(
        pb.ListServiceAccountKeysRequest(parent=account.name), metadata=bearer(token)
    )
    assert [(k.name, k.secret) for k in listed.service_account_keys] == [(key.name, "")]
    machine = await served.auth.Login(
        auth_pb.LoginRequest(service_account_key=auth_pb.ServiceAccountKeyCredential(secret=key.secret))
    )
    assert machine.refresh_token == ""
    assert machine.refresh_expires_in == 0
    accounts = await served.stub.ListServiceAccounts(
        pb.ListServiceAccountsRequest(parent="organizations/a"), metadata=bearer(token)
    )
    assert [a.name for a in accounts.service_accounts] == [account.name]

    rotation = await served.stub.RotateSigningKey(pb.RotateSigningKeyRequest(), metadata=bearer(token))
    assert rotation.published_key_ids[0] == rotation.new_key_id
    assert len(rotation.published_key_ids) == 2
    assert rotation.activate_time.ToDatetime(tzinfo=UTC) == served.identity.clock() + timedelta(seconds=120)
    jwks = await served.auth.GetJsonWebKeySet(auth_pb.GetJsonWebKeySetRequest())
    assert [k.kid for k in jwks.keys] == list(rotation.published_key_ids)
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await served.stub.RotateSigningKey(pb.RotateSigningKeyRequest(), metadata=bearer(machine.access_token))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


# --- the patient directory against a fake patient service --------------------------------------


class FakePatientService(patient_pb_grpc.PatientServiceServicer):
    """Knows one patient; refuses another as PERMISSION_DENIED; everything else is NOT_FOUND."""

    def __init__(self) -> None:
        self.seen_authorization: list[str] = []

    async def GetPatient(
        self, request: patient_pb.GetPatientRequest, context: grpc.aio.ServicerContext
    ) -> patient_pb.Patient:
        metadata = dict(context.invocation_metadata() or ())
        self.seen_authorization.append(str(metadata.get("authorization", "")))
        if request.name == "organizations/a/patients/known":
            return patient_pb.Patient(name=request.name)
        if request.name == "organizations/a/patients/hidden":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such patient")
        raise AssertionError("unreachable")


async def test_patient_directory_reads_absent_and_hidden_patients_as_missing() -> None:
    servicer = FakePatientService()
    server = grpc.aio.server()
    patient_pb_grpc.add_PatientServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            directory = GrpcPatientDirectory(channel)
            assert await directory.exists("organizations/a/patients/known") is True
            assert await directory.exists("organizations/a/patients/hidden") is False
            assert await directory.exists("organizations/a/patients/ghost") is False
    finally:
        await server.stop(grace=None)


async def test_patient_directory_unreachable_is_unavailable() -> None:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await server.stop(grace=None)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(Unavailable) as caught:
            await GrpcPatientDirectory(channel, timeout=2.0).exists("organizations/a/patients/known")
    assert caught.value.reason == "PATIENT_SERVICE_UNAVAILABLE"
