"""Role x action x resource over REST through the gateway: own organization, another organization,
PHI and non-PHI. Every row is one request made by a real logged-in user of that role."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.integration.people import (
    Member,
    create_device,
    create_member,
    create_organization,
    create_patient,
    ok,
    unique,
)
from tests.integration.platform import Platform

PHI_FIELDS = ("given_name", "family_name", "birth_date", "sex", "contact", "national_id")
ROLES = ("platform_admin", "org_admin", "clinician", "operator", "patient")


@dataclass
class World:
    """Organizations A and B; in A one member of every role, in B an admin and a clinician."""

    a: str
    b: str
    members: dict[str, Member]
    admin: httpx.Client
    b_admin: Member
    b_clinician: Member
    patient_a: dict[str, Any]  # the patient the `patient` member is
    other_patient_a: dict[str, Any]
    patient_b: dict[str, Any]
    device_a: str
    device_b: str

    def as_role(self, role: str) -> httpx.Client:
        return self.admin if role == "platform_admin" else self.members[role].http


@pytest.fixture(scope="session")
def world(platform: Platform, rest: httpx.Client) -> Iterator[World]:
    a = create_organization(rest, unique("Clinic A"))
    b = create_organization(rest, unique("Clinic B"))
    org_admin = create_member(platform, rest, a, "ROLE_ORGANIZATION_ADMIN")
    clinician = create_member(platform, org_admin.http, a, "ROLE_CLINICIAN")
    operator = create_member(platform, org_admin.http, a, "ROLE_OPERATOR")
    patient_a = create_patient(clinician.http, a)
    other_patient_a = create_patient(clinician.http, a)
    patient = create_member(platform, org_admin.http, a, "ROLE_PATIENT", patient=patient_a["name"])
    b_admin = create_member(platform, rest, b, "ROLE_ORGANIZATION_ADMIN")
    b_clinician = create_member(platform, b_admin.http, b, "ROLE_CLINICIAN")
    patient_b = create_patient(b_clinician.http, b)
    members = {"org_admin": org_admin, "clinician": clinician, "operator": operator, "patient": patient}
    world = World(
        a=a,
        b=b,
        members=members,
        admin=rest,
        b_admin=b_admin,
        b_clinician=b_clinician,
        patient_a=patient_a,
        other_patient_a=other_patient_a,
        patient_b=patient_b,
        device_a=create_device(rest, a),
        device_b=create_device(rest, b),
    )
    yield world
    for member in [*members.values(), b_admin, b_clinician]:
        member.http.close()


def _has_phi(patient: dict[str, Any]) -> bool:
    return any(patient.get(f) not in (None, "", {}, "SEX_UNSPECIFIED") for f in PHI_FIELDS)


def _reason(reply: httpx.Response) -> str:
    for detail in reply.json().get("details", []):
        if detail.get("@type", "").endswith("google.rpc.ErrorInfo"):
            return str(detail["reason"])
    return ""


Request = Callable[[World, httpx.Client], httpx.Response]


@dataclass(frozen=True)
class Case:
    resource: str
    action: str
    scope: str  # "own" (organization A), "other" (organization B) or "all"
    request: Request
    allowed: tuple[str, ...]  # roles answered 200; everyone else PERMISSION_DENIED (403)
    phi_for: tuple[str, ...] | None = None  # for patient reads: roles that get PHI back


def _new_org_name(world: World, http: httpx.Client) -> httpx.Response:
    return http.patch(f"/v1/{world.a}", params={"update_mask": "display_name"}, json={"display_name": unique("A")})


def _throwaway_org(world: World) -> str:
    return create_organization(world.admin, unique("Throwaway"))


def _throwaway_patient(world: World, organization: str) -> str:
    clinician = world.members["clinician"].http if organization == world.a else world.b_clinician.http
    return str(create_patient(clinician, organization)["name"])


def _throwaway_device(world: World, organization: str) -> str:
    return create_device(world.admin, organization)


CASES = [
    # Organizations
    Case("organization", "get", "own", lambda w, h: h.get(f"/v1/{w.a}"), ROLES),
    Case("organization", "get", "other", lambda w, h: h.get(f"/v1/{w.b}"), ("platform_admin",)),
    Case(
        "organization",
        "create",
        "all",
        lambda w, h: h.post("/v1/organizations", json={"display_name": unique("New")}),
        ("platform_admin",),
    ),
    Case("organization", "update", "own", _new_org_name, ("platform_admin", "org_admin")),
    Case(
        "organization",
        "update",
        "other",
        lambda w, h: h.patch(f"/v1/{w.b}", params={"update_mask": "display_name"}, json={"display_name": "X"}),
        ("platform_admin",),
    ),
    Case("organization", "delete", "other", lambda w, h: h.delete(f"/v1/{_throwaway_org(w)}"), ("platform_admin",)),
    # Devices
    Case(
        "device",
        "create",
        "own",
        lambda w, h: h.post("/v1/devices", params={"device_id": unique("D").upper()}, json={"organization": w.a}),
        ("platform_admin", "org_admin", "operator"),
    ),
    Case(
        "device",
        "create",
        "other",
        lambda w, h: h.post("/v1/devices", params={"device_id": unique("D").upper()}, json={"organization": w.b}),
        ("platform_admin",),
    ),
    Case(
        "device",
        "get",
        "own",
        lambda w, h: h.get(f"/v1/{w.device_a}"),
        ("platform_admin", "org_admin", "clinician", "operator"),
    ),
    Case("device", "get", "other", lambda w, h: h.get(f"/v1/{w.device_b}"), ("platform_admin",)),
    Case(
        "device",
        "update",
        "own",
        lambda w, h: h.patch(f"/v1/{w.device_a}", params={"update_mask": "model"}, json={"model": unique("M")}),
        ("platform_admin", "org_admin", "operator"),
    ),
    Case(
        "device",
        "update",
        "other",
        lambda w, h: h.patch(f"/v1/{w.device_b}", params={"update_mask": "model"}, json={"model": "M"}),
        ("platform_admin",),
    ),
    Case(
        "device",
        "delete",
        "own",
        lambda w, h: h.delete(f"/v1/{_throwaway_device(w, w.a)}"),
        ("platform_admin", "org_admin"),
    ),
    Case("device", "delete", "other", lambda w, h: h.delete(f"/v1/{_throwaway_device(w, w.b)}"), ("platform_admin",)),
    # Patients: the PHI walled garden
    Case(
        "patient",
        "create",
        "own",
        lambda w, h: h.post(f"/v1/{w.a}/patients", json={"given_name": "New", "family_name": unique("P")}),
        ("org_admin", "clinician"),
        phi_for=("clinician",),
    ),
    Case(
        "patient",
        "create",
        "other",
        lambda w, h: h.post(f"/v1/{w.b}/patients", json={"given_name": "New", "family_name": unique("P")}),
        (),
    ),
    Case(
        "patient",
        "get",
        "own",
        lambda w, h: h.get(f"/v1/{w.patient_a['name']}"),
        ROLES,
        phi_for=("clinician", "patient"),
    ),
    Case(
        "patient",
        "get another patient",
        "own",
        lambda w, h: h.get(f"/v1/{w.other_patient_a['name']}"),
        ("platform_admin", "org_admin", "clinician", "operator"),
        phi_for=("clinician",),
    ),
    Case(
        "patient",
        "get",
        "other",
        lambda w, h: h.get(f"/v1/{w.patient_b['name']}"),
        ("platform_admin",),
        phi_for=(),
    ),
    Case(
        "patient",
        "list",
        "own",
        lambda w, h: h.get(f"/v1/{w.a}/patients"),
        ("platform_admin", "org_admin", "clinician", "operator"),
        phi_for=("clinician",),
    ),
    Case("patient", "list", "other", lambda w, h: h.get(f"/v1/{w.b}/patients"), ("platform_admin",), phi_for=()),
    Case(
        "patient",
        "update non-PHI",
        "own",
        lambda w, h: h.patch(
            f"/v1/{w.other_patient_a['name']}", params={"update_mask": "devices"}, json={"devices": [w.device_a]}
        ),
        ("org_admin", "clinician", "operator"),
    ),
    Case(
        "patient",
        "update PHI",
        "own",
        lambda w, h: h.patch(
            f"/v1/{w.other_patient_a['name']}", params={"update_mask": "given_name"}, json={"given_name": "Grace"}
        ),
        ("clinician",),
    ),
    Case(
        "patient",
        "update PHI",
        "other",
        lambda w, h: h.patch(
            f"/v1/{w.patient_b['name']}", params={"update_mask": "given_name"}, json={"given_name": "Grace"}
        ),
        (),
    ),
    Case(
        "patient",
        "delete",
        "own",
        lambda w, h: h.delete(f"/v1/{_throwaway_patient(w, w.a)}"),
        ("org_admin", "clinician"),
    ),
    Case("patient", "delete", "other", lambda w, h: h.delete(f"/v1/{_throwaway_patient(w, w.b)}"), ()),
    # Users (membership)
    Case(
        "user",
        "create",
        "own",
        lambda w, h: h.post(
            f"/v1/{w.a}/users",
            json={
                "user": {"username": f"{unique('u')}@example.test", "role": "ROLE_OPERATOR"},
                "password": "correct horse battery",
            },
        ),
        ("platform_admin", "org_admin"),
    ),
    Case(
        "user",
        "create",
        "other",
        lambda w, h: h.post(
            f"/v1/{w.b}/users",
            json={
                "user": {"username": f"{unique('u')}@example.test", "role": "ROLE_OPERATOR"},
                "password": "correct horse battery",
            },
        ),
        ("platform_admin",),
    ),
    Case(
        "user",
        "get colleague",
        "own",
        lambda w, h: h.get(f"/v1/{w.members['operator'].name}"),
        ("platform_admin", "org_admin", "clinician", "operator"),
    ),
    Case(
        "user",
        "list",
        "own",
        lambda w, h: h.get(f"/v1/{w.a}/users"),
        ("platform_admin", "org_admin", "clinician", "operator"),
    ),
    Case("user", "list", "other", lambda w, h: h.get(f"/v1/{w.b}/users"), ("platform_admin",)),
    Case("user", "get", "other", lambda w, h: h.get(f"/v1/{w.b_admin.name}"), ("platform_admin",)),
    # Audit trail
    Case("audit", "list", "own", lambda w, h: h.get(f"/v1/{w.a}/auditEvents"), ("platform_admin", "org_admin")),
    Case("audit", "list", "other", lambda w, h: h.get(f"/v1/{w.b}/auditEvents"), ("platform_admin",)),
    Case("audit", "list", "all", lambda w, h: h.get("/v1/organizations/-/auditEvents"), ("platform_admin",)),
]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.resource}-{c.action}-{c.scope}".replace(" ", "_"))
def test_role_action_resource(world: World, case: Case, role: str) -> None:
    reply = case.request(world, world.as_role(role))
    if role not in case.allowed:
        assert reply.status_code == 403, f"{role} {case}: {reply.status_code} {reply.text}"
        assert reply.json()["code"] == 7  # PERMISSION_DENIED, as google.rpc.Status
        reasons = {"ORGANIZATION_ACCESS_DENIED", "ROLE_NOT_ALLOWED", "PHI_WRITE_DENIED", "PATIENT_ACCESS_DENIED"}
        assert _reason(reply) in reasons, reply.text
        return
    body = ok(reply)
    if case.phi_for is None:
        return
    patients = body.get("patients", [body])
    assert patients, reply.text
    for patient in patients:
        assert _has_phi(patient) == (role in case.phi_for), f"{role} {case}: {patient}"
        assert patient.get("phi_withheld", False) == (role not in case.phi_for)


def test_lists_show_only_the_callers_organization(world: World) -> None:
    for role in ("org_admin", "clinician", "operator"):
        http = world.as_role(role)
        devices = ok(http.get("/v1/devices", params={"page_size": 1000}))["devices"]
        assert world.device_a in {d["name"] for d in devices}
        assert {d["organization"] for d in devices} == {world.a}, role
        organizations = ok(http.get("/v1/organizations"))["organizations"]
        assert [o["name"] for o in organizations] == [world.a]
    everything = ok(world.admin.get("/v1/devices", params={"page_size": 1000}))["devices"]
    assert {world.device_a, world.device_b} <= {d["name"] for d in everything}


def test_permission_denied_comes_before_not_found(world: World) -> None:
    clinician = world.members["clinician"].http
    # Another organization's patient that does not exist: PERMISSION_DENIED, not NOT_FOUND.
    assert clinician.get(f"/v1/{world.b}/patients/{'0' * 32}").status_code == 403
    assert clinician.get(f"/v1/{world.a}/patients/{'0' * 32}").status_code == 404
    # Device names carry no organization: unknown and foreign devices look the same to members.
    assert clinician.get("/v1/devices/NO-SUCH-DEVICE").status_code == 403
    assert world.admin.get("/v1/devices/NO-SUCH-DEVICE").status_code == 404
    assert world.members["org_admin"].http.get(f"/v1/{world.b}/users/nobody").status_code == 403


def test_patient_member_sees_only_their_own_record(world: World) -> None:
    patient = world.members["patient"]
    own = ok(patient.http.get(f"/v1/{world.patient_a['name']}"))
    assert own["family_name"] == world.patient_a["family_name"]
    assert patient.http.get(f"/v1/{world.other_patient_a['name']}").status_code == 403
    assert patient.http.get("/v1/devices").status_code == 403
