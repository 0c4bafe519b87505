"""PHI stays in the patient service, and every PHI read is audited exactly once."""

from __future__ import annotations

import ipaddress
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from bson import json_util
from pymongo import MongoClient

from tests.integration.people import (
    Member,
    create_device,
    create_member,
    create_organization,
    create_patient,
    eventually,
    ok,
    unique,
)
from tests.integration.platform import Platform

PATIENT_DATABASE = "medmesh_patient"


@dataclass
class Clinic:
    organization: str
    admin: Member
    clinician: Member
    operator: Member


@pytest.fixture(scope="module")
def clinic(platform: Platform, rest: httpx.Client) -> Clinic:
    organization = create_organization(rest, unique("PHI clinic"))
    admin = create_member(platform, rest, organization, "ROLE_ORGANIZATION_ADMIN")
    clinician = create_member(platform, admin.http, organization, "ROLE_CLINICIAN")
    operator = create_member(platform, admin.http, organization, "ROLE_OPERATOR")
    return Clinic(organization, admin, clinician, operator)


def _markers() -> dict[str, str]:
    return {
        "given_name": unique("Givenmarker"),
        "family_name": unique("Familymarker"),
        "national_id": unique("Nidmarker"),
        "email": f"{unique('mailmarker')}@example.test",
        "phone": f"+1555{int(time.time() * 1000) % 10**7:07d}",
        "address": unique("Addressmarker Street"),
    }


def _audit_events(http: httpx.Client, organization: str, filter_text: str) -> list[dict[str, Any]]:
    reply = ok(http.get(f"/v1/{organization}/auditEvents", params={"filter": filter_text, "page_size": 100}))
    return list(reply.get("audit_events", []))


def test_phi_never_leaves_the_patient_service(platform: Platform, rest: httpx.Client, clinic: Clinic) -> None:
    markers = _markers()
    patient = create_patient(
        clinic.clinician.http,
        clinic.organization,
        given_name=markers["given_name"],
        family_name=markers["family_name"],
        national_id=markers["national_id"],
        birth_date={"year": 1931, "month": 7, "day": 23},
        contact={"email": markers["email"], "phone": markers["phone"], "address": markers["address"]},
    )
    name = patient["name"]

    # Every flow the project has, by every kind of user.
    device = create_device(clinic.operator.http, clinic.organization)
    ok(clinic.operator.http.patch(f"/v1/{name}", params={"update_mask": "devices"}, json={"devices": [device]}))
    ok(
        clinic.clinician.http.patch(
            f"/v1/{name}", params={"update_mask": "contact"}, json={"contact": {**patient["contact"]}}
        )
    )
    for http in (clinic.clinician.http, clinic.admin.http, clinic.operator.http, rest):
        ok(http.get(f"/v1/{name}"))
        ok(http.get(f"/v1/{clinic.organization}/patients"))
        ok(http.get(f"/v1/{clinic.organization}/patients", params={"filter": f'devices = "{device}"'}))
        ok(http.get(f"/v1/{device}"))
        ok(http.get("/v1/devices"))
        ok(http.get(f"/v1/{clinic.organization}"))
    ok(clinic.operator.http.patch(f"/v1/{device}", params={"update_mask": "model"}, json={"model": "ECG-13"}))
    patient_user = create_member(platform, clinic.admin.http, clinic.organization, "ROLE_PATIENT", patient=name)
    ok(patient_user.http.get(f"/v1/{name}"))
    tokens = platform.login(patient_user.username, patient_user.password)
    ok(patient_user.http.post("/v1/auth:refresh", json={"refresh_token": tokens["refresh_token"]}))
    ok(clinic.admin.http.get(f"/v1/{clinic.organization}/users"))
    ok(rest.get("/v1/organizations/-/auditEvents"))
    patient_user.http.close()
    # Audit events are delivered asynchronously: wait for this patient's to arrive first.
    assert eventually(lambda: _audit_events(rest, clinic.organization, f'resource = "{name}"'))
    time.sleep(1.0)

    found: list[str] = []
    lowered = {key: value.lower() for key, value in markers.items()}
    mongo: MongoClient[dict[str, Any]]
    with MongoClient(platform.config.mongodb_uri) as mongo:
        databases = [d for d in mongo.list_database_names() if d.startswith("medmesh_")]
        assert PATIENT_DATABASE in databases
        inside = json_util.dumps(list(mongo[PATIENT_DATABASE]["patients"].find({}))).lower()
        assert all(value in inside for value in lowered.values())  # the scan can see markers where they are
        for database in databases:
            if database == PATIENT_DATABASE:
                continue
            for collection in mongo[database].list_collection_names():
                text = json_util.dumps(list(mongo[database][collection].find({}))).lower()
                found += [f"{database}.{collection}: {key}" for key, value in lowered.items() if value in text]
    assert len(databases) > 1
    assert not found, found
    # Nor in any log of the platform (services, gateway, stores).
    for log in (platform.state_dir / "logs").glob("*.log"):
        text = log.read_text(errors="replace").lower()
        assert not [key for key, value in lowered.items() if value in text], log.name


def test_each_phi_read_is_audited_once(platform: Platform, rest: httpx.Client, clinic: Clinic) -> None:
    patient = create_patient(clinic.clinician.http, clinic.organization)
    name = patient["name"]
    read_filter = f'resource = "{name}" AND method = "medmesh.patient.v1.PatientService/GetPatient"'
    ok(clinic.clinician.http.get(f"/v1/{name}"))
    ok(clinic.admin.http.get(f"/v1/{name}"))  # PHI withheld: not a PHI read

    events = eventually(lambda: _audit_events(clinic.admin.http, clinic.organization, read_filter))
    time.sleep(1.5)  # a duplicate delivery would show up by now
    events = _audit_events(clinic.admin.http, clinic.organization, read_filter)
    assert len(events) == 1, json.dumps(events, indent=1)
    (event,) = events
    assert event["actor"]["subject"] == clinic.clinician.name
    assert event["actor"]["role"] == "clinician"
    assert event["outcome"] == "OUTCOME_SUCCEEDED"
    assert set(event["phi_fields_read"]) == {"given_name", "family_name", "birth_date", "sex", "contact", "national_id"}
    # The client address Envoy saw (for a loopback client Envoy reports the host's own address).
    assert ipaddress.ip_address(event["source_ip"])
    assert len(event["trace_id"]) == 32
    for value in (patient["given_name"], patient["family_name"], patient["national_id"]):
        assert value not in json.dumps(event)

    # A list that returns PHI is one read event for each patient on the page.
    ok(clinic.clinician.http.get(f"/v1/{clinic.organization}/patients", params={"page_size": 1000}))
    list_filter = f'resource = "{name}" AND method = "medmesh.patient.v1.PatientService/ListPatients"'
    assert eventually(lambda: len(_audit_events(rest, clinic.organization, list_filter)) == 1)

    # A PHI change names the fields changed, not their values.
    ok(clinic.clinician.http.patch(f"/v1/{name}", params={"update_mask": "national_id"}, json={"national_id": "N-2"}))
    change_filter = f'resource = "{name}" AND method = "medmesh.patient.v1.PatientService/UpdatePatient"'
    changes = eventually(lambda: _audit_events(rest, clinic.organization, change_filter))
    assert [e["phi_fields_changed"] for e in changes] == [["national_id"]]


def test_audit_trail_is_append_only_and_filterable(rest: httpx.Client, clinic: Clinic) -> None:
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 2))
    device = create_device(clinic.admin.http, clinic.organization)
    by_actor = f'actor = "{clinic.admin.name}" AND resource = "{device}" AND event_time >= "{since}"'
    events = eventually(lambda: _audit_events(rest, clinic.organization, by_actor))
    assert [e["method"] for e in events] == ["medmesh.device.v1.DeviceService/CreateDevice"]
    future = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    assert _audit_events(rest, clinic.organization, f'resource = "{device}" AND event_time >= "{future}"') == []
    # No update or delete API exists, over REST or gRPC.
    event = events[0]["name"]
    assert rest.delete(f"/v1/{event}").status_code in {404, 405}
    assert rest.patch(f"/v1/{event}", json={"description": "x"}).status_code in {404, 405}
