"""Identity: who may manage users, service accounts, keys and signing keys; PERMISSION_DENIED
always before NOT_FOUND; the role rules (platform admins only in the manufacturer, patients
linked to an existing patient of their organization); audit events of every change."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

from medmesh.runtime.auth import Principal, Role, acting_as, internal_principal
from medmesh.runtime.errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from services.identity.domain import MAX_KEYS_PER_SERVICE_ACCOUNT, User, UserChanges
from tests.unit.identity_fakes import MANUFACTURER, ORG_A, ORG_B, Identity, make_identity, member, principal_of

PASSWORD = "a long enough password"
PATIENT_A = "organizations/a/patients/p1"

PLATFORM_ADMIN = member(MANUFACTURER, Role.PLATFORM_ADMIN, "root")
ADMIN_A = member(ORG_A, Role.ORGANIZATION_ADMIN, "admin")
CLINICIAN_A = member(ORG_A, Role.CLINICIAN, "clin")
OPERATOR_A = member(ORG_A, Role.OPERATOR, "op")
PATIENT_USER_A = member(ORG_A, Role.PATIENT, "pat", patient=PATIENT_A)
ADMIN_B = member(ORG_B, Role.ORGANIZATION_ADMIN, "admin")
MANUFACTURER_ADMIN = member(MANUFACTURER, Role.ORGANIZATION_ADMIN, "orgadmin")


@pytest.fixture
async def identity() -> Identity:
    service = make_identity(patients=[PATIENT_A])
    await service.signing_keys.ensure_key()
    return service


async def as_(principal: Principal, action: Callable[[], Awaitable[Any]]) -> Any:
    with acting_as(principal):
        return await action()


async def refused(principal: Principal, action: Callable[[], Awaitable[Any]], error: type[DomainError]) -> DomainError:
    with acting_as(principal), pytest.raises(error) as caught:
        await action()
    return caught.value


def create_user(
    identity: Identity,
    parent: str = ORG_A,
    role: Role | None = Role.OPERATOR,
    *,
    username: str = "new@a.test",
    patient: str = "",
    password: str = PASSWORD,
    user_id: str = "",
) -> Callable[[], Awaitable[User]]:
    return lambda: identity.management.create_user(
        parent,
        username=username,
        display_name="New user",
        role=role,
        patient=patient,
        password=password,
        user_id=user_id,
    )


# --- CreateUser ---------------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role))
async def test_platform_admin_creates_any_role_in_the_manufacturer(identity: Identity, role: Role) -> None:
    patient = "organizations/manufacturer/patients/p0" if role is Role.PATIENT else ""
    identity.patients.existing.add(patient)
    user = await as_(PLATFORM_ADMIN, create_user(identity, MANUFACTURER, role, patient=patient))
    assert user.role is role
    assert user.organization == MANUFACTURER


@pytest.mark.parametrize("role", [Role.ORGANIZATION_ADMIN, Role.CLINICIAN, Role.OPERATOR, Role.PATIENT])
async def test_organization_admins_create_members_of_their_own_organization(identity: Identity, role: Role) -> None:
    patient = PATIENT_A if role is Role.PATIENT else ""
    user = await as_(ADMIN_A, create_user(identity, ORG_A, role, patient=patient, user_id="new-user"))
    assert user.name == "organizations/a/users/new-user"
    assert user.username == "new@a.test"
    assert user.patient == patient
    assert PASSWORD not in user.password_hash
    assert await identity.passwords.verify(user.password_hash, PASSWORD)
    assert identity.users.items[user.id] == user
    event = identity.trail.events[-1]
    assert (event.organization, event.resource, event.actor.subject) == (ORG_A, user.name, ADMIN_A.subject)
    assert PASSWORD not in repr(event)


async def test_organization_admins_cannot_make_platform_admins(identity: Identity) -> None:
    error = await refused(
        MANUFACTURER_ADMIN, create_user(identity, MANUFACTURER, Role.PLATFORM_ADMIN), PermissionDenied
    )
    assert error.reason == "ROLE_NOT_ALLOWED"


@pytest.mark.parametrize("principal", [CLINICIAN_A, OPERATOR_A, PATIENT_USER_A])
async def test_other_roles_cannot_create_users(identity: Identity, principal: Principal) -> None:
    error = await refused(principal, create_user(identity), PermissionDenied)
    assert error.reason == "ROLE_NOT_ALLOWED"


async def test_no_one_creates_users_in_another_organization_but_platform_admins(identity: Identity) -> None:
    error = await refused(ADMIN_B, create_user(identity, ORG_A), PermissionDenied)
    assert error.reason == "ORGANIZATION_ACCESS_DENIED"
    await as_(PLATFORM_ADMIN, create_user(identity, ORG_B))


async def test_access_is_checked_before_the_organization_is_looked_up(identity: Identity) -> None:
    error = await refused(ADMIN_B, create_user(identity, "organizations/ghost"), PermissionDenied)
    assert error.reason == "ORGANIZATION_ACCESS_DENIED"
    assert identity.organizations.asked == []


async def test_the_organization_must_exist(identity: Identity) -> None:
    error = await refused(PLATFORM_ADMIN, create_user(identity, "organizations/ghost"), FailedPrecondition)
    assert error.reason == "ORGANIZATION_NOT_FOUND"
    assert identity.organizations.asked == ["organizations/ghost"]


async def test_platform_admins_exist_only_in_the_manufacturer(identity: Identity) -> None:
    error = await refused(PLATFORM_ADMIN, create_user(identity, ORG_A, Role.PLATFORM_ADMIN), InvalidArgument)
    assert error.reason == "ROLE_NOT_ALLOWED_IN_ORGANIZATION"
    assert error.field_violations[0].field == "user.role"


async def test_patients_name_an_existing_patient_of_their_organization(identity: Identity) -> None:
    missing = await refused(ADMIN_A, create_user(identity, role=Role.PATIENT), InvalidArgument)
    assert missing.field_violations[0].field == "user.patient"
    foreign = await refused(
        ADMIN_A, create_user(identity, role=Role.PATIENT, patient="organizations/b/patients/p1"), InvalidArgument
    )
    assert foreign.reason == "PATIENT_IN_OTHER_ORGANIZATION"
    ghost = await refused(
        ADMIN_A, create_user(identity, role=Role.PATIENT, patient="organizations/a/patients/ghost"), FailedPrecondition
    )
    assert ghost.reason == "PATIENT_NOT_FOUND"
    assert [v.field for v in ghost.field_violations] == ["user.patient"]
    not_a_patient = await refused(
        ADMIN_A, create_user(identity, role=Role.CLINICIAN, patient=PATIENT_A), InvalidArgument
    )
    assert not_a_patient.field_violations[0].field == "user.patient"


async def test_usernames_are_unique_case_insensitively(identity: Identity) -> None:
    await as_(ADMIN_A, create_user(identity, username="Same@Example.test"))
    error = await refused(ADMIN_B, create_user(identity, ORG_B, username="same@example.TEST"), AlreadyExists)
    assert error.reason == "USERNAME_ALREADY_EXISTS"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"password": "short"}, "password"),
        ({"role": None}, "user.role"),
        ({"username": "  "}, "user.username"),
        ({"username": "with space@a.test"}, "user.username"),
        ({"user_id": "Bad_Id"}, "user_id"),
    ],
)
async def test_bad_user_fields(identity: Identity, kwargs: dict[str, Any], field: str) -> None:
    error = await refused(ADMIN_A, create_user(identity, **kwargs), InvalidArgument)
    assert error.field_violations[0].field == field


# --- GetUser / ListUsers ------------------------------------------------------------------------


@pytest.fixture
async def people(identity: Identity) -> dict[str, User]:
    return {
        "admin": await identity.add_user(ORG_A, "admin", Role.ORGANIZATION_ADMIN),
        "clin": await identity.add_user(ORG_A, "clin", Role.CLINICIAN),
        "op": await identity.add_user(ORG_A, "op", Role.OPERATOR),
        "pat": await identity.add_user(ORG_A, "pat", Role.PATIENT, patient=PATIENT_A),
        "b-admin": await identity.add_user(ORG_B, "admin", Role.ORGANIZATION_ADMIN),
        "root": await identity.add_user(MANUFACTURER, "root", Role.PLATFORM_ADMIN),
        "orgadmin": await identity.add_user(MANUFACTURER, "orgadmin", Role.ORGANIZATION_ADMIN),
    }


@pytest.mark.parametrize("principal", [PLATFORM_ADMIN, ADMIN_A, CLINICIAN_A, OPERATOR_A])
async def test_members_read_their_colleagues(identity: Identity, people: dict[str, User], principal: Principal) -> None:
    user = await as_(principal, lambda: identity.management.get_user(people["op"].name))
    assert user == people["op"]


async def test_patients_read_only_themselves(identity: Identity, people: dict[str, User]) -> None:
    me = principal_of(people["pat"])
    assert await as_(me, lambda: identity.management.get_user(people["pat"].name)) == people["pat"]
    error = await refused(me, lambda: identity.management.get_user(people["op"].name), PermissionDenied)
    assert error.reason == "ROLE_NOT_ALLOWED"
    await refused(me, lambda: identity.management.list_users(ORG_A, "", 0, ""), PermissionDenied)


async def test_permission_denied_comes_before_not_found(identity: Identity, people: dict[str, User]) -> None:
    error = await refused(
        ADMIN_B, lambda: identity.management.get_user("organizations/a/users/nobody"), PermissionDenied
    )
    assert error.reason == "ORGANIZATION_ACCESS_DENIED"
    await refused(ADMIN_B, lambda: identity.management.get_user(people["op"].name), PermissionDenied)
    missing = await refused(ADMIN_A, lambda: identity.management.get_user("organizations/a/users/nobody"), NotFound)
    assert missing.reason == "USER_NOT_FOUND"
    for action in (
        lambda: identity.management.update_user(
            "organizations/a/users/nobody", UserChanges(display_name="x"), ["display_name"], ""
        ),
        lambda: identity.management.delete_user("organizations/a/users/nobody", ""),
        lambda: identity.management.change_password("organizations/a/users/nobody", "", PASSWORD),
        lambda: identity.management.get_service_account("organizations/a/serviceAccounts/nobody"),
        lambda: identity.management.list_service_account_keys("organizations/a/serviceAccounts/nobody"),
        lambda: identity.management.delete_service_account_key("organizations/a/serviceAccounts/nobody/keys/k1"),
        lambda: identity.management.delete_service_account("organizations/a/serviceAccounts/nobody", ""),
    ):
        await refused(ADMIN_B, action, PermissionDenied)
        await refused(ADMIN_A, action, NotFound)


async def test_lists_are_scoped_to_the_organization(identity: Identity, people: dict[str, User]) -> None:
    page = await as_(CLINICIAN_A, lambda: identity.management.list_users(ORG_A, "", 0, ""))
    assert {u.name for u in page.users} == {people[k].name for k in ("admin", "clin", "op", "pat")}
    error = await refused(CLINICIAN_A, lambda: identity.management.list_users(ORG_B, "", 0, ""), PermissionDenied)
    assert error.reason == "ORGANIZATION_ACCESS_DENIED"
    filtered = await as_(ADMIN_A, lambda: identity.management.list_users(ORG_A, "role = ROLE_CLINICIAN", 0, ""))
    assert [u.name for u in filtered.users] == [people["clin"].name]
    by_username = await as_(ADMIN_A, lambda: identity.management.list_users(ORG_A, 'username = "OP@A.TEST"', 0, ""))
    assert [u.name for u in by_username.users] == [people["op"].name]
    with pytest.raises(InvalidArgument):
        await as_(ADMIN_A, lambda: identity.management.list_users(ORG_A, "password_hash = x", 0, ""))


async def test_only_platform_admins_list_every_organization(identity: Identity, people: dict[str, User]) -> None:
    everyone = await as_(PLATFORM_ADMIN, lambda: identity.management.list_users("organizations/-", "", 0, ""))
    assert len(everyone.users) == len(people)
    for principal in (ADMIN_A, CLINICIAN_A, MANUFACTURER_ADMIN):
        error = await refused(
            principal, lambda: identity.management.list_users("organizations/-", "", 0, ""), PermissionDenied
        )
        assert error.reason == "ROLE_NOT_ALLOWED"


async def test_list_pages_follow_each_other(identity: Identity, people: dict[str, User]) -> None:
    first = await as_(ADMIN_A, lambda: identity.management.list_users(ORG_A, "", 3, ""))
    assert len(first.users) == 3
    assert first.next_page_token
    second = await as_(ADMIN_A, lambda: identity.management.list_users(ORG_A, "", 3, first.next_page_token))
    assert len(second.users) == 1
    assert not second.next_page_token
    with pytest.raises(InvalidArgument):  # a token of organization A's list is not one of B's
        await as_(PLATFORM_ADMIN, lambda: identity.management.list_users(ORG_B, "", 3, first.next_page_token))


async def test_without_credentials_nothing_is_answered(identity: Identity) -> None:
    with pytest.raises(Unauthenticated):
        await identity.management.get_user("organizations/a/users/x")


# --- UpdateUser / DeleteUser --------------------------------------------------------------------


def update(identity: Identity, user: User, mask: list[str], **changes: Any) -> Callable[[], Awaitable[User]]:
    return lambda: identity.management.update_user(user.name, UserChanges(**changes), mask, "")


async def test_organization_admins_update_their_members(identity: Identity, people: dict[str, User]) -> None:
    updated = await as_(
        ADMIN_A, update(identity, people["clin"], ["role", "display_name"], role=Role.OPERATOR, display_name=" Dr C ")
    )
    assert (updated.role, updated.display_name, updated.revision) == (Role.OPERATOR, "Dr C", 2)
    assert identity.users.items[updated.id] == updated
    assert "display_name, role" in identity.trail.events[-1].description
    await refused(ADMIN_B, update(identity, people["clin"], ["display_name"], display_name="x"), PermissionDenied)
    error = await refused(
        CLINICIAN_A, update(identity, people["op"], ["display_name"], display_name="x"), PermissionDenied
    )
    assert error.reason == "ROLE_NOT_ALLOWED"


async def test_nobody_changes_their_own_role_or_disables_themselves(
    identity: Identity, people: dict[str, User]
) -> None:
    me = principal_of(people["admin"])
    own_role = await refused(me, update(identity, people["admin"], ["role"], role=Role.CLINICIAN), FailedPrecondition)
    assert own_role.reason == "CANNOT_CHANGE_OWN_ROLE"
    disable = await refused(me, update(identity, people["admin"], ["disabled"], disabled=True), FailedPrecondition)
    assert disable.reason == "CANNOT_DISABLE_SELF"
    root = principal_of(people["root"])
    await refused(root, update(identity, people["root"], ["role"], role=Role.ORGANIZATION_ADMIN), FailedPrecondition)
    delete = await refused(root, lambda: identity.management.delete_user(people["root"].name, ""), FailedPrecondition)
    assert delete.reason == "CANNOT_DELETE_SELF"
    renamed = await as_(me, update(identity, people["admin"], ["display_name"], display_name="Me"))
    assert renamed.display_name == "Me"


async def test_organization_admins_cannot_promote_or_touch_platform_admins(
    identity: Identity, people: dict[str, User]
) -> None:
    manufacturer_admin = principal_of(people["orgadmin"])
    promote = update(identity, people["clin"], ["role"], role=Role.PLATFORM_ADMIN)
    await refused(ADMIN_A, promote, PermissionDenied)
    await refused(PLATFORM_ADMIN, promote, InvalidArgument)  # not in the manufacturer
    await refused(manufacturer_admin, update(identity, people["root"], ["disabled"], disabled=True), PermissionDenied)
    await refused(
        manufacturer_admin, lambda: identity.management.delete_user(people["root"].name, ""), PermissionDenied
    )
    await refused(
        manufacturer_admin,
        lambda: identity.management.change_password(people["root"].name, "", "n" * 12),
        PermissionDenied,
    )


async def test_becoming_a_patient_needs_an_existing_patient(identity: Identity, people: dict[str, User]) -> None:
    await refused(ADMIN_A, update(identity, people["op"], ["role"], role=Role.PATIENT), InvalidArgument)
    ghost = update(identity, people["op"], ["role", "patient"], role=Role.PATIENT, patient="organizations/a/patients/x")
    assert (await refused(ADMIN_A, ghost, FailedPrecondition)).reason == "PATIENT_NOT_FOUND"
    made = await as_(ADMIN_A, update(identity, people["op"], ["role", "patient"], role=Role.PATIENT, patient=PATIENT_A))
    assert made.patient == PATIENT_A
    back = await as_(ADMIN_A, update(identity, made, ["role"], role=Role.OPERATOR))
    assert back.patient == ""  # leaving ROLE_PATIENT drops the link


async def test_updates_honour_etags_and_masks(identity: Identity, people: dict[str, User]) -> None:
    stale = lambda: identity.management.update_user(  # noqa: E731
        people["op"].name, UserChanges(display_name="x"), ["display_name"], "stale-etag"
    )
    await refused(ADMIN_A, stale, Aborted)
    await refused(ADMIN_A, update(identity, people["op"], ["username"]), InvalidArgument)
    await refused(ADMIN_A, update(identity, people["op"], []), InvalidArgument)


async def test_disabling_or_deleting_a_user_revokes_their_refresh_tokens(
    identity: Identity, people: dict[str, User]
) -> None:
    for _ in range(2):
        await identity.authentication.login_with_password(people["op"].username, PASSWORD)
    assert len(identity.refresh_tokens.live_for(people["op"].name)) == 2
    await as_(ADMIN_A, update(identity, people["op"], ["disabled"], disabled=True))
    assert identity.refresh_tokens.live_for(people["op"].name) == []
    with pytest.raises(Unauthenticated):
        await identity.authentication.login_with_password(people["op"].username, PASSWORD)

    await identity.authentication.login_with_password(people["clin"].username, PASSWORD)
    await as_(ADMIN_A, lambda: identity.management.delete_user(people["clin"].name, ""))
    assert people["clin"].id not in identity.users.items
    assert identity.refresh_tokens.live_for(people["clin"].name) == []
    assert identity.trail.events[-1].description == "deleted user"


async def test_delete_rules(identity: Identity, people: dict[str, User]) -> None:
    await refused(ADMIN_B, lambda: identity.management.delete_user(people["op"].name, ""), PermissionDenied)
    await refused(CLINICIAN_A, lambda: identity.management.delete_user(people["op"].name, ""), PermissionDenied)
    await refused(ADMIN_A, lambda: identity.management.delete_user(people["op"].name, "stale"), Aborted)
    await as_(PLATFORM_ADMIN, lambda: identity.management.delete_user(people["op"].name, people["op"].etag))


# --- ChangePassword -----------------------------------------------------------------------------


async def test_users_change_their_own_password_with_the_current_one(
    identity: Identity, people: dict[str, User]
) -> None:
    op = people["op"]
    old = await identity.authentication.login_with_password(op.username, PASSWORD)
    new_password = "a brand new password"
    wrong = await refused(
        principal_of(op), lambda: identity.management.change_password(op.name, "not it", new_password), PermissionDenied
    )
    assert wrong.reason == "WRONG_PASSWORD"
    missing = await refused(
        principal_of(op), lambda: identity.management.change_password(op.name, "", new_password), InvalidArgument
    )
    assert missing.field_violations[0].field == "current_password"
    await as_(principal_of(op), lambda: identity.management.change_password(op.name, PASSWORD, new_password))
    with pytest.raises(Unauthenticated):
        await identity.authentication.refresh(old.refresh_token)
    with pytest.raises(Unauthenticated):
        await identity.authentication.login_with_password(op.username, PASSWORD)
    await identity.authentication.login_with_password(op.username, new_password)
    for event in identity.trail.events:
        assert PASSWORD not in repr(event)
        assert new_password not in repr(event)
        assert "not it" not in repr(event)


async def test_wrong_current_passwords_are_throttled_like_logins(identity: Identity, people: dict[str, User]) -> None:
    op = people["op"]
    for _ in range(5):
        await refused(
            principal_of(op), lambda: identity.management.change_password(op.name, "not it", "n" * 12), PermissionDenied
        )
    await refused(
        principal_of(op), lambda: identity.management.change_password(op.name, PASSWORD, "n" * 12), ResourceExhausted
    )


async def test_admins_set_passwords_without_the_current_one(identity: Identity, people: dict[str, User]) -> None:
    await as_(ADMIN_A, lambda: identity.management.change_password(people["op"].name, "", "set by the admin"))
    await identity.authentication.login_with_password(people["op"].username, "set by the admin")
    await as_(PLATFORM_ADMIN, lambda: identity.management.change_password(people["op"].name, "", "set by the root"))
    await identity.authentication.login_with_password(people["op"].username, "set by the root")
    assert identity.trail.events[-2].description == "password set by an administrator"
    denied = await refused(
        CLINICIAN_A,
        lambda: identity.management.change_password(people["op"].name, PASSWORD, "n" * 12),
        PermissionDenied,
    )
    assert denied.reason == "ROLE_NOT_ALLOWED"
    await refused(
        ADMIN_B, lambda: identity.management.change_password(people["op"].name, "", "n" * 12), PermissionDenied
    )


# --- service accounts and keys ------------------------------------------------------------------


def create_account(
    identity: Identity, parent: str = ORG_A, role: Role | None = Role.OPERATOR, account_id: str = "bridge"
) -> Callable[[], Awaitable[Any]]:
    return lambda: identity.management.create_service_account(
        parent, display_name="Bridge", role=role, service_account_id=account_id
    )


async def test_service_accounts_are_managed_by_admins(identity: Identity) -> None:
    account = await as_(ADMIN_A, create_account(identity))
    assert account.name == "organizations/a/serviceAccounts/bridge"
    assert await as_(ADMIN_A, lambda: identity.management.get_service_account(account.name)) == account
    assert await as_(PLATFORM_ADMIN, lambda: identity.management.get_service_account(account.name)) == account
    page = await as_(ADMIN_A, lambda: identity.management.list_service_accounts(ORG_A, 0, ""))
    assert page.service_accounts == [account]
    assert (await as_(ADMIN_B, lambda: identity.management.list_service_accounts(ORG_B, 0, ""))).service_accounts == []
    for principal in (CLINICIAN_A, OPERATOR_A, PATIENT_USER_A):
        await refused(principal, create_account(identity, account_id="other"), PermissionDenied)
        await refused(principal, lambda: identity.management.get_service_account(account.name), PermissionDenied)
        await refused(principal, lambda: identity.management.list_service_accounts(ORG_A, 0, ""), PermissionDenied)
    await refused(ADMIN_B, create_account(identity, account_id="other"), PermissionDenied)
    await refused(ADMIN_B, lambda: identity.management.get_service_account(account.name), PermissionDenied)


async def test_service_account_role_rules(identity: Identity) -> None:
    patient = await refused(ADMIN_A, create_account(identity, role=Role.PATIENT), InvalidArgument)
    assert patient.field_violations[0].field == "service_account.role"
    await refused(ADMIN_A, create_account(identity, role=None), InvalidArgument)
    await refused(MANUFACTURER_ADMIN, create_account(identity, MANUFACTURER, Role.PLATFORM_ADMIN), PermissionDenied)
    await refused(PLATFORM_ADMIN, create_account(identity, ORG_A, Role.PLATFORM_ADMIN), InvalidArgument)
    robot = await as_(PLATFORM_ADMIN, create_account(identity, MANUFACTURER, Role.PLATFORM_ADMIN, "robot"))
    assert robot.role is Role.PLATFORM_ADMIN
    # The manufacturer's organization admin may not take it over either.
    await refused(
        MANUFACTURER_ADMIN, lambda: identity.management.create_service_account_key(robot.name, None), PermissionDenied
    )
    await refused(
        MANUFACTURER_ADMIN, lambda: identity.management.delete_service_account(robot.name, ""), PermissionDenied
    )
    missing_org = await refused(PLATFORM_ADMIN, create_account(identity, "organizations/ghost"), FailedPrecondition)
    assert missing_org.reason == "ORGANIZATION_NOT_FOUND"


async def test_keys_are_created_listed_and_deleted(identity: Identity) -> None:
    account = await as_(ADMIN_A, create_account(identity))
    expiry = identity.clock() + timedelta(days=1, microseconds=1234)
    created = await as_(ADMIN_A, lambda: identity.management.create_service_account_key(account.name, expiry))
    assert created.secret.startswith(created.key.id + ".")
    assert created.key.expire_time == expiry - timedelta(microseconds=234)  # BSON keeps milliseconds
    assert created.secret.split(".")[1] not in repr(created.key)
    listed = await as_(ADMIN_A, lambda: identity.management.list_service_account_keys(account.name))
    assert listed == [created.key]
    assert created.secret not in repr(identity.trail.events)
    await refused(CLINICIAN_A, lambda: identity.management.list_service_account_keys(account.name), PermissionDenied)
    other = await as_(ADMIN_A, create_account(identity, account_id="other"))
    wrong_parent = f"{other.name}/keys/{created.key.id}"
    assert (
        await refused(ADMIN_A, lambda: identity.management.delete_service_account_key(wrong_parent), NotFound)
    ).reason == "SERVICE_ACCOUNT_KEY_NOT_FOUND"
    await as_(ADMIN_A, lambda: identity.management.delete_service_account_key(created.key.name))
    assert await as_(ADMIN_A, lambda: identity.management.list_service_account_keys(account.name)) == []


async def test_key_expiry_must_be_in_the_future_and_keys_are_limited(identity: Identity) -> None:
    account = await as_(ADMIN_A, create_account(identity))
    past = identity.clock() - timedelta(seconds=1)
    await refused(ADMIN_A, lambda: identity.management.create_service_account_key(account.name, past), InvalidArgument)
    for _ in range(MAX_KEYS_PER_SERVICE_ACCOUNT):
        await as_(ADMIN_A, lambda: identity.management.create_service_account_key(account.name, None))
    limit = await refused(
        ADMIN_A, lambda: identity.management.create_service_account_key(account.name, None), FailedPrecondition
    )
    assert limit.reason == "SERVICE_ACCOUNT_KEY_LIMIT"


async def test_deleting_a_service_account_deletes_its_keys(identity: Identity) -> None:
    account = await as_(ADMIN_A, create_account(identity))
    created = await as_(ADMIN_A, lambda: identity.management.create_service_account_key(account.name, None))
    await refused(ADMIN_B, lambda: identity.management.delete_service_account(account.name, ""), PermissionDenied)
    await as_(ADMIN_A, lambda: identity.management.delete_service_account(account.name, account.etag))
    assert identity.service_account_keys.items == {}
    assert account.id not in identity.service_accounts.items
    with pytest.raises(Unauthenticated):
        await identity.authentication.login_with_service_account_key(created.secret)


# --- RotateSigningKey ---------------------------------------------------------------------------


async def test_only_platform_admins_rotate_signing_keys(identity: Identity) -> None:
    for principal in (ADMIN_A, MANUFACTURER_ADMIN, CLINICIAN_A):
        error = await refused(principal, identity.management.rotate_signing_key, PermissionDenied)
        assert error.reason == "ROLE_NOT_ALLOWED"
    before = (await identity.signing_keys.schedule(fresh=True)).published_kids()
    rotation = await as_(PLATFORM_ADMIN, identity.management.rotate_signing_key)
    assert rotation.activate_time == identity.clock() + identity.settings.jwks_publish_lead
    assert rotation.published_key_ids == [rotation.new_key_id, *before]
    event = identity.trail.events[-1]
    assert (event.organization, event.resource) == (MANUFACTURER, f"signingKeys/{rotation.new_key_id}")
    assert event.actor.subject == PLATFORM_ADMIN.subject
    stored = identity.signing_key_store.items[rotation.new_key_id]
    assert stored.private_key_pem not in repr(identity.trail.events)


async def test_internal_callers_may_act_as_the_platform(identity: Identity) -> None:
    await as_(internal_principal("patient"), create_user(identity, ORG_B, Role.CLINICIAN))
