"""gRPC servicers: translate protobuf <-> domain, nothing else."""

from __future__ import annotations

from datetime import UTC

import grpc
from google.protobuf import empty_pb2

from medmesh.identity.v1 import authentication_service_pb2 as auth_pb
from medmesh.identity.v1 import authentication_service_pb2_grpc as auth_pb_grpc
from medmesh.identity.v1 import identity_service_pb2 as pb
from medmesh.identity.v1 import identity_service_pb2_grpc as pb_grpc
from medmesh.runtime.auth import Role
from medmesh.runtime.protoconv import timestamp
from services.identity.authentication import AuthenticationService
from services.identity.domain import ServiceAccount, ServiceAccountKey, TokenGrant, User, UserChanges
from services.identity.service import IdentityService

ROLE_TO_PB = {
    Role.PLATFORM_ADMIN: pb.ROLE_PLATFORM_ADMIN,
    Role.ORGANIZATION_ADMIN: pb.ROLE_ORGANIZATION_ADMIN,
    Role.CLINICIAN: pb.ROLE_CLINICIAN,
    Role.OPERATOR: pb.ROLE_OPERATOR,
    Role.PATIENT: pb.ROLE_PATIENT,
}
ROLE_FROM_PB = {value: key for key, value in ROLE_TO_PB.items()}

# Every AuthenticationService method: they are called without a bearer token.
AUTHENTICATION_SERVICE = "medmesh.identity.v1.AuthenticationService"
IDENTITY_SERVICE = "medmesh.identity.v1.IdentityService"
PUBLIC_METHODS = frozenset(
    f"/{AUTHENTICATION_SERVICE}/{method.name}"
    for method in auth_pb.DESCRIPTOR.services_by_name["AuthenticationService"].methods
)


def user_to_pb(user: User) -> pb.User:
    return pb.User(
        name=user.name,
        username=user.username,
        display_name=user.display_name,
        role=ROLE_TO_PB[user.role],
        patient=user.patient,
        disabled=user.disabled,
        create_time=timestamp(user.create_time),
        update_time=timestamp(user.update_time),
        etag=user.etag,
    )


def service_account_to_pb(account: ServiceAccount) -> pb.ServiceAccount:
    return pb.ServiceAccount(
        name=account.name,
        display_name=account.display_name,
        role=ROLE_TO_PB[account.role],
        create_time=timestamp(account.create_time),
        etag=account.etag,
    )


def key_to_pb(key: ServiceAccountKey, secret: str = "") -> pb.ServiceAccountKey:
    message = pb.ServiceAccountKey(name=key.name, secret=secret, create_time=timestamp(key.create_time))
    if key.expire_time is not None:
        message.expire_time.CopyFrom(timestamp(key.expire_time))
    return message


def grant_to_pb(grant: TokenGrant) -> auth_pb.TokenResponse:
    return auth_pb.TokenResponse(
        access_token=grant.access_token,
        token_type="Bearer",
        expires_in=grant.expires_in,
        refresh_token=grant.refresh_token,
        refresh_expires_in=grant.refresh_expires_in,
    )


class AuthenticationServicer(auth_pb_grpc.AuthenticationServiceServicer):
    def __init__(self, service: AuthenticationService) -> None:
        self._service = service

    async def Login(self, request: auth_pb.LoginRequest, context: grpc.aio.ServicerContext) -> auth_pb.TokenResponse:
        if request.WhichOneof("credential") == "service_account_key":
            grant = await self._service.login_with_service_account_key(request.service_account_key.secret)
        else:
            grant = await self._service.login_with_password(request.password.username, request.password.password)
        return grant_to_pb(grant)

    async def RefreshToken(
        self, request: auth_pb.RefreshTokenRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb.TokenResponse:
        return grant_to_pb(await self._service.refresh(request.refresh_token))

    async def Logout(self, request: auth_pb.LogoutRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self._service.logout(request.refresh_token)
        return empty_pb2.Empty()

    async def GetJsonWebKeySet(
        self, request: auth_pb.GetJsonWebKeySetRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb.JsonWebKeySet:
        keys = await self._service.json_web_key_set()
        return auth_pb.JsonWebKeySet(keys=[auth_pb.JsonWebKey(**jwk) for jwk in keys])


class IdentityServicer(pb_grpc.IdentityServiceServicer):
    def __init__(self, service: IdentityService) -> None:
        self._service = service

    async def CreateUser(self, request: pb.CreateUserRequest, context: grpc.aio.ServicerContext) -> pb.User:
        user = await self._service.create_user(
            request.parent,
            username=request.user.username,
            display_name=request.user.display_name,
            role=ROLE_FROM_PB.get(request.user.role),
            patient=request.user.patient,
            password=request.password,
            user_id=request.user_id,
        )
        return user_to_pb(user)

    async def GetUser(self, request: pb.GetUserRequest, context: grpc.aio.ServicerContext) -> pb.User:
        return user_to_pb(await self._service.get_user(request.name))

    async def ListUsers(self, request: pb.ListUsersRequest, context: grpc.aio.ServicerContext) -> pb.ListUsersResponse:
        page = await self._service.list_users(request.parent, request.filter, request.page_size, request.page_token)
        return pb.ListUsersResponse(users=[user_to_pb(u) for u in page.users], next_page_token=page.next_page_token)

    async def UpdateUser(self, request: pb.UpdateUserRequest, context: grpc.aio.ServicerContext) -> pb.User:
        changes = UserChanges(
            display_name=request.user.display_name,
            role=ROLE_FROM_PB.get(request.user.role),
            patient=request.user.patient,
            disabled=request.user.disabled,
        )
        user = await self._service.update_user(
            request.user.name, changes, list(request.update_mask.paths), request.user.etag
        )
        return user_to_pb(user)

    async def DeleteUser(self, request: pb.DeleteUserRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self._service.delete_user(request.name, request.etag)
        return empty_pb2.Empty()

    async def ChangePassword(
        self, request: pb.ChangePasswordRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._service.change_password(request.name, request.current_password, request.new_password)
        return empty_pb2.Empty()

    async def CreateServiceAccount(
        self, request: pb.CreateServiceAccountRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServiceAccount:
        account = await self._service.create_service_account(
            request.parent,
            display_name=request.service_account.display_name,
            role=ROLE_FROM_PB.get(request.service_account.role),
            service_account_id=request.service_account_id,
        )
        return service_account_to_pb(account)

    async def GetServiceAccount(
        self, request: pb.GetServiceAccountRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServiceAccount:
        return service_account_to_pb(await self._service.get_service_account(request.name))

    async def ListServiceAccounts(
        self, request: pb.ListServiceAccountsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListServiceAccountsResponse:
        page = await self._service.list_service_accounts(request.parent, request.page_size, request.page_token)
        return pb.ListServiceAccountsResponse(
            service_accounts=[service_account_to_pb(a) for a in page.service_accounts],
            next_page_token=page.next_page_token,
        )

    async def DeleteServiceAccount(
        self, request: pb.DeleteServiceAccountRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._service.delete_service_account(request.name, request.etag)
        return empty_pb2.Empty()

    async def CreateServiceAccountKey(
        self, request: pb.CreateServiceAccountKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServiceAccountKey:
        requested = request.service_account_key
        expire_time = requested.expire_time.ToDatetime(tzinfo=UTC) if requested.HasField("expire_time") else None
        created = await self._service.create_service_account_key(request.parent, expire_time)
        return key_to_pb(created.key, created.secret)

    async def ListServiceAccountKeys(
        self, request: pb.ListServiceAccountKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListServiceAccountKeysResponse:
        keys = await self._service.list_service_account_keys(request.parent)
        return pb.ListServiceAccountKeysResponse(service_account_keys=[key_to_pb(k) for k in keys])

    async def DeleteServiceAccountKey(
        self, request: pb.DeleteServiceAccountKeyRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._service.delete_service_account_key(request.name)
        return empty_pb2.Empty()

    async def RotateSigningKey(
        self, request: pb.RotateSigningKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RotateSigningKeyResponse:
        rotation = await self._service.rotate_signing_key()
        return pb.RotateSigningKeyResponse(
            new_key_id=rotation.new_key_id,
            activate_time=timestamp(rotation.activate_time),
            published_key_ids=rotation.published_key_ids,
        )
