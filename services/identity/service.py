"""Use cases of the IdentityService: users, service accounts and their keys, signing-key rotation.

Every method checks the caller's access to the owning organization before it looks anything
up, so a caller from another organization gets PERMISSION_DENIED, never NOT_FOUND.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from medmesh.runtime.audit import AuditTrail, Outcome, audit
from medmesh.runtime.auth import ALL_ORGANIZATIONS, Principal, Role, current_principal
from medmesh.runtime.directories import OrganizationDirectory, require_existing_organization
from medmesh.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from medmesh.runtime.filtering import Condition, Converter
from medmesh.runtime.resources import (
    ResourceStore,
    check_etag,
    delete_checked,
    list_page,
    now,
    replace_checked,
    resolve_update_mask,
)
from services.identity.authentication import check_login_throttle
from services.identity.config import IdentitySettings
from services.identity.domain import (
    MAX_KEYS_PER_SERVICE_ACCOUNT,
    USER_UPDATABLE_FIELDS,
    ServiceAccount,
    ServiceAccountKey,
    User,
    UserChanges,
    check_patient_link,
    check_role_in_organization,
    child_id,
    new_credential,
    new_identifier,
    normalize_username,
    parse_organization,
    parse_service_account_key_name,
    parse_service_account_name,
    parse_user_name,
    require_display_name,
    require_password,
    require_role,
)
from services.identity.passwords import Passwords
from services.identity.ports import (
    LoginFailureStore,
    PatientDirectory,
    RefreshTokenStore,
    ServiceAccountKeyStore,
    UserStore,
)
from services.identity.signing_keys import SigningKeyManager

ADMINS = (Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN)


def _role(written: str) -> str:
    return Role(written.lower().removeprefix("role_")).value


def _boolean(written: str) -> bool:
    if written.lower() not in {"true", "false"}:
        raise ValueError("expected true or false")
    return written.lower() == "true"


USER_FILTER_FIELDS: dict[str, tuple[str, Converter]] = {
    "role": ("role", _role),
    "username": ("username", lambda written: written.strip().lower()),
    "disabled": ("disabled", _boolean),
}


@dataclass(frozen=True)
class UserPage:
    users: list[User]
    next_page_token: str


@dataclass(frozen=True)
class ServiceAccountPage:
    service_accounts: list[ServiceAccount]
    next_page_token: str


@dataclass(frozen=True)
class CreatedKey:
    key: ServiceAccountKey
    secret: str  # shown once; only its hash is stored


@dataclass(frozen=True)
class Rotation:
    new_key_id: str
    activate_time: datetime
    published_key_ids: list[str]  # newest first


def _may_grant(principal: Principal, role: Role) -> None:
    """Only platform admins make (or manage) platform admins: an organization admin of the
    manufacturer must not be able to promote anyone, or take over a platform admin."""
    if role is Role.PLATFORM_ADMIN and not (principal.is_platform_admin or principal.is_internal):
        raise PermissionDenied(
            "only platform admins may grant or manage ROLE_PLATFORM_ADMIN",
            reason="ROLE_NOT_ALLOWED",
            metadata={"role": str(principal.role), "allowed": Role.PLATFORM_ADMIN.value},
        )


class IdentityService:
    def __init__(
        self,
        *,
        users: UserStore,
        service_accounts: ResourceStore[ServiceAccount],
        service_account_keys: ServiceAccountKeyStore,
        refresh_tokens: RefreshTokenStore,
        login_failures: LoginFailureStore,
        passwords: Passwords,
        organizations: OrganizationDirectory,
        patients: PatientDirectory,
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
        self._organizations = organizations
        self._patients = patients
        self._signing_keys = signing_keys
        self._trail = trail
        self._settings = settings
        self._clock = clock

    # --- peers ----------------------------------------------------------------------------------

    async def _require_patient(self, patient: str, field: str) -> None:
        if not await self._patients.exists(patient):
            raise FailedPrecondition(
                f"patient {patient!r} does not exist",
                reason="PATIENT_NOT_FOUND",
                metadata={"patient": patient},
                field_violations=[FieldViolation(field, "names a patient that does not exist")],
            )

    async def _check_membership(self, role: Role, patient: str, organization: str, known_patient: str = "") -> str:
        """The role fits the organization and a patient user's record exists; the patient link."""
        check_role_in_organization(role, organization, self._settings.manufacturer_organization, "user.role")
        patient = check_patient_link(role, patient, organization, "user.patient")
        if patient and patient != known_patient:
            await self._require_patient(patient, "user.patient")
        return patient

    # --- users ----------------------------------------------------------------------------------

    async def _user(self, name: str) -> User:
        user = await self._users.get(name)
        if user is None:
            raise NotFound(f"user {name!r} does not exist", reason="USER_NOT_FOUND", metadata={"user": name})
        return user

    async def create_user(
        self,
        parent: str,
        *,
        username: str,
        display_name: str,
        role: Role | None,
        patient: str,
        password: str,
        user_id: str = "",
    ) -> User:
        organization = parse_organization(parent)
        principal = current_principal()
        principal.require_access(organization)
        principal.require_role(*ADMINS, action="create users")
        role = require_role(role, "user.role")
        _may_grant(principal, role)
        username = normalize_username(username)
        display_name = require_display_name(display_name, "user.display_name")
        require_password(password, "password")
        name = f"{organization}/users/{child_id(user_id, 'user_id')}"
        await require_existing_organization(self._organizations, organization, "parent")
        patient = await self._check_membership(role, patient, organization)
        if await self._users.get_by_username(username) is not None:
            raise _username_taken(username)
        at = self._clock()
        user = User(
            id=name,
            organization=organization,
            username=username,
            display_name=display_name,
            role=role,
            password_hash=await self._passwords.hash(password),
            create_time=at,
            update_time=at,
            patient=patient,
        )
        await self._users.insert(user)
        await audit(self._trail, organization, user.name, description=f"created user with role {role.value}")
        return user

    async def get_user(self, name: str) -> User:
        organization = parse_user_name(name)
        principal = current_principal()
        principal.require_access(organization, name)
        if principal.role is Role.PATIENT and principal.subject != name:
            raise PermissionDenied(
                "patients may read only their own user", reason="ROLE_NOT_ALLOWED", metadata={"resource": name}
            )
        return await self._user(name)

    async def list_users(self, parent: str, filter_text: str, page_size: int, page_token: str) -> UserPage:
        principal = current_principal()
        scope: list[Condition] = []
        if parent == ALL_ORGANIZATIONS:
            principal.require_role(Role.PLATFORM_ADMIN, action="list the users of every organization")
        else:
            organization = parse_organization(parent)
            principal.require_access(organization)
            if principal.role is Role.PATIENT:
                raise PermissionDenied(
                    "patients may not list users", reason="ROLE_NOT_ALLOWED", metadata={"resource": organization}
                )
            scope.append(Condition("organization", True, organization))
        users, token = await list_page(self._users, filter_text, USER_FILTER_FIELDS, page_size, page_token, scope)
        return UserPage(users, token)

    async def update_user(self, name: str, changes: UserChanges, mask: list[str], etag: str) -> User:
        organization = parse_user_name(name, "user.name")
        principal = current_principal()
        principal.require_access(organization, name)
        principal.require_role(*ADMINS, action="update users")
        fields = resolve_update_mask(mask, USER_UPDATABLE_FIELDS, "user")
        current = await self._user(name)
        check_etag(current.id, current.revision, etag)
        _may_grant(principal, current.role)
        updated = current.updated(changes, fields, self._clock())
        if principal.subject == name:
            if updated.role is not current.role:
                raise FailedPrecondition("nobody may change their own role", reason="CANNOT_CHANGE_OWN_ROLE")
            if updated.disabled and not current.disabled:
                raise FailedPrecondition("nobody may disable themselves", reason="CANNOT_DISABLE_SELF")
        _may_grant(principal, updated.role)
        await self._check_membership(updated.role, updated.patient, organization, current.patient)
        saved = await replace_checked(self._users, updated, current)
        if saved.disabled and not current.disabled:
            await self._refresh_tokens.revoke_subject(saved.name)
        await audit(self._trail, organization, name, description=f"updated {', '.join(sorted(fields))}")
        return saved

    async def delete_user(self, name: str, etag: str) -> None:
        organization = parse_user_name(name)
        principal = current_principal()
        principal.require_access(organization, name)
        principal.require_role(*ADMINS, action="delete users")
        if principal.subject == name:
            raise FailedPrecondition("nobody may delete themselves", reason="CANNOT_DELETE_SELF")
        current = await self._user(name)
        _may_grant(principal, current.role)
        await delete_checked(self._users, current, etag)
        await self._refresh_tokens.revoke_subject(name)
        await audit(self._trail, organization, name, description="deleted user")

    async def change_password(self, name: str, current_password: str, new_password: str) -> None:
        """Users change their own with the current password (PERMISSION_DENIED WRONG_PASSWORD
        if wrong, throttled like logins); admins of the user's organization without it."""
        organization = parse_user_name(name)
        principal = current_principal()
        principal.require_access(organization, name)
        require_password(new_password, "new_password")
        own = principal.subject == name
        if own:
            user = await self._user(name)
            await self._verify_own_password(user, current_password)
        else:
            principal.require_role(*ADMINS, action="set other users' passwords")
            user = await self._user(name)
            _may_grant(principal, user.role)
        updated = user.with_password_hash(await self._passwords.hash(new_password), self._clock())
        await replace_checked(self._users, updated, user)
        await self._refresh_tokens.revoke_subject(name)
        await audit(
            self._trail,
            organization,
            name,
            description="changed own password" if own else "password set by an administrator",
        )

    async def _verify_own_password(self, user: User, current_password: str) -> None:
        # Counted with failed logins: a stolen access token must not become a password oracle.
        await check_login_throttle(self._failures, user.username, self._clock())
        if not current_password:
            raise InvalidArgument.for_field(
                "current_password", "is required to change your own password", reason="REQUIRED_FIELD"
            )
        if not await self._passwords.verify(user.password_hash, current_password):
            await self._failures.record_failure(user.username, self._clock())
            await audit(
                self._trail,
                user.organization,
                user.name,
                outcome=Outcome.DENIED,
                description="password change refused: wrong current password",
            )
            raise PermissionDenied("the current password is wrong", reason="WRONG_PASSWORD")
        await self._failures.reset(user.username)

    # --- service accounts -----------------------------------------------------------------------

    async def _service_account(self, name: str) -> ServiceAccount:
        account = await self._service_accounts.get(name)
        if account is None:
            raise NotFound(
                f"service account {name!r} does not exist",
                reason="SERVICE_ACCOUNT_NOT_FOUND",
                metadata={"service_account": name},
            )
        return account

    @staticmethod
    def _require_admin_of(principal: Principal, organization: str, resource: str = "") -> None:
        principal.require_access(organization, resource)
        principal.require_role(*ADMINS, action="manage service accounts")

    async def create_service_account(
        self, parent: str, *, display_name: str, role: Role | None, service_account_id: str = ""
    ) -> ServiceAccount:
        organization = parse_organization(parent)
        principal = current_principal()
        self._require_admin_of(principal, organization)
        role = require_role(role, "service_account.role")
        if role is Role.PATIENT:
            raise InvalidArgument.for_field(
                "service_account.role", "a service account cannot be ROLE_PATIENT", reason="ROLE_NOT_ALLOWED_HERE"
            )
        _may_grant(principal, role)
        check_role_in_organization(role, organization, self._settings.manufacturer_organization, "service_account.role")
        display_name = require_display_name(display_name, "service_account.display_name", required=True)
        name = f"{organization}/serviceAccounts/{child_id(service_account_id, 'service_account_id')}"
        await require_existing_organization(self._organizations, organization, "parent")
        account = ServiceAccount(
            id=name, organization=organization, display_name=display_name, role=role, create_time=self._clock()
        )
        await self._service_accounts.insert(account)
        await audit(self._trail, organization, name, description=f"created service account with role {role.value}")
        return account

    async def get_service_account(self, name: str) -> ServiceAccount:
        organization = parse_service_account_name(name)
        self._require_admin_of(current_principal(), organization, name)
        return await self._service_account(name)

    async def list_service_accounts(self, parent: str, page_size: int, page_token: str) -> ServiceAccountPage:
        organization = parse_organization(parent)
        self._require_admin_of(current_principal(), organization)
        scope = [Condition("organization", True, organization)]
        accounts, token = await list_page(self._service_accounts, "", {}, page_size, page_token, scope)
        return ServiceAccountPage(accounts, token)

    async def delete_service_account(self, name: str, etag: str) -> None:
        organization = parse_service_account_name(name)
        principal = current_principal()
        self._require_admin_of(principal, organization, name)
        current = await self._service_account(name)
        _may_grant(principal, current.role)
        await delete_checked(self._service_accounts, current, etag)
        # Keys of a deleted account cannot log in anyway (login checks the account); this tidies up.
        await self._keys.delete_for_service_account(name)
        await audit(self._trail, organization, name, description="deleted service account and its keys")

    async def create_service_account_key(self, parent: str, expire_time: datetime | None) -> CreatedKey:
        organization = parse_service_account_name(parent, "parent")
        principal = current_principal()
        self._require_admin_of(principal, organization, parent)
        account = await self._service_account(parent)
        _may_grant(principal, account.role)
        at = self._clock()
        if expire_time is not None:
            if expire_time <= at:
                raise InvalidArgument.for_field("service_account_key.expire_time", "must be in the future")
            # BSON dates keep milliseconds: the stored key equals the returned one.
            expire_time = expire_time.replace(microsecond=expire_time.microsecond // 1000 * 1000)
        existing = await self._keys.list(
            [Condition("service_account", True, parent)], None, MAX_KEYS_PER_SERVICE_ACCOUNT
        )
        if len(existing) >= MAX_KEYS_PER_SERVICE_ACCOUNT:
            raise FailedPrecondition(
                f"a service account has at most {MAX_KEYS_PER_SERVICE_ACCOUNT} keys; delete one first",
                reason="SERVICE_ACCOUNT_KEY_LIMIT",
                metadata={"service_account": parent},
            )
        key_id = new_identifier()
        secret, secret_hash = new_credential(key_id)
        key = ServiceAccountKey(
            id=key_id,
            service_account=parent,
            organization=organization,
            secret_hash=secret_hash,
            create_time=at,
            expire_time=expire_time,
        )
        await self._keys.insert(key)
        await audit(self._trail, organization, key.name, description="created service account key")
        return CreatedKey(key, secret)

    async def list_service_account_keys(self, parent: str) -> list[ServiceAccountKey]:
        organization = parse_service_account_name(parent, "parent")
        self._require_admin_of(current_principal(), organization, parent)
        await self._service_account(parent)
        return await self._keys.list([Condition("service_account", True, parent)], None, 1000)

    async def delete_service_account_key(self, name: str) -> None:
        organization, account_name, key_id = parse_service_account_key_name(name)
        principal = current_principal()
        self._require_admin_of(principal, organization, name)
        account = await self._service_account(account_name)
        _may_grant(principal, account.role)
        key = await self._keys.get(key_id)
        if key is None or key.service_account != account_name:
            raise NotFound(
                f"service account key {name!r} does not exist",
                reason="SERVICE_ACCOUNT_KEY_NOT_FOUND",
                metadata={"service_account_key": name},
            )
        await self._keys.delete(key.id)
        await audit(self._trail, organization, name, description="deleted service account key")

    # --- signing keys ---------------------------------------------------------------------------

    async def rotate_signing_key(self) -> Rotation:
        current_principal().require_role(Role.PLATFORM_ADMIN, action="rotate the token signing key")
        key, schedule = await self._signing_keys.rotate()
        await audit(
            self._trail,
            self._settings.manufacturer_organization,
            f"signingKeys/{key.kid}",
            description=f"signing key rotation: published now, signs from {key.activate_time.isoformat()}",
        )
        return Rotation(key.kid, key.activate_time, schedule.published_kids())


def _username_taken(username: str) -> AlreadyExists:
    return AlreadyExists("this username is taken", reason="USERNAME_ALREADY_EXISTS", metadata={"username": username})
