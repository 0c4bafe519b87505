"""Tokens at the gateway (401) and at every service directly (UNAUTHENTICATED); login, refresh,
logout, back-off, service accounts, key rotation and the first-run admin."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pymongo import MongoClient

from medmesh.audit.v1 import audit_service_pb2 as audit_pb
from medmesh.audit.v1 import audit_service_pb2_grpc as audit_grpc
from medmesh.device.v1 import device_service_pb2 as device_pb
from medmesh.device.v1 import device_service_pb2_grpc as device_grpc
from medmesh.identity.v1 import identity_service_pb2 as identity_pb
from medmesh.identity.v1 import identity_service_pb2_grpc as identity_grpc
from medmesh.organization.v1 import organization_service_pb2 as org_pb
from medmesh.organization.v1 import organization_service_pb2_grpc as org_grpc
from medmesh.patient.v1 import patient_service_pb2 as patient_pb
from medmesh.patient.v1 import patient_service_pb2_grpc as patient_grpc
from tests.integration.people import client, create_member, create_organization, ok, unique
from tests.integration.platform import Platform

# One authenticated read per service, sent straight to the service (bypassing Envoy).
DIRECT_CALLS = {
    "organization": lambda ch: org_grpc.OrganizationServiceStub(ch).ListOrganizations(
        org_pb.ListOrganizationsRequest(), timeout=10, metadata=_META
    ),
    "device": lambda ch: device_grpc.DeviceServiceStub(ch).ListDevices(
        device_pb.ListDevicesRequest(), timeout=10, metadata=_META
    ),
    "patient": lambda ch: patient_grpc.PatientServiceStub(ch).ListPatients(
        patient_pb.ListPatientsRequest(parent="organizations/-"), timeout=10, metadata=_META
    ),
    "identity": lambda ch: identity_grpc.IdentityServiceStub(ch).ListUsers(
        identity_pb.ListUsersRequest(parent="organizations/-"), timeout=10, metadata=_META
    ),
    "audit": lambda ch: audit_grpc.AuditServiceStub(ch).ListAuditEvents(
        audit_pb.ListAuditEventsRequest(parent="organizations/-"), timeout=10, metadata=_META
    ),
}
_META: list[tuple[str, str]] = []  # set per call by _direct


def _direct(platform: Platform, service: str, token: str | None) -> grpc.StatusCode:
    _META.clear()
    if token is not None:
        _META.append(("authorization", f"Bearer {token}"))
    with grpc.insecure_channel(platform.grpc_address(service)) as channel:
        try:
            DIRECT_CALLS[service](channel)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))  # type: ignore[no-any-return]


def _signing_key(platform: Platform, kid: str) -> Any:
    """The identity service's private key with this kid, read from its own database."""
    mongo: MongoClient[dict[str, Any]]
    with MongoClient(platform.config.mongodb_uri) as mongo:
        document = mongo["medmesh_identity"]["signing_keys"].find_one({"_id": kid})
    assert document is not None, f"no signing key {kid}"
    pem = next(v for k, v in document.items() if "private" in k and isinstance(v, str | bytes))
    return serialization.load_pem_private_key(pem.encode() if isinstance(pem, str) else pem, password=None)


@pytest.fixture(scope="module")
def forged(platform: Platform, admin_token: str) -> dict[str, str]:
    """Tokens that must all be refused, built from a real one."""
    header = jwt.get_unverified_header(admin_token)
    claims = _claims(admin_token)
    head, _payload, signature = admin_token.split(".")
    tampered_claims = {**claims, "org": "organizations/someone-else"}
    tampered = f"{head}.{_b64(json.dumps(tampered_claims).encode())}.{signature}"
    stranger = ec.generate_private_key(ec.SECP256R1())
    wrong_key = jwt.encode({**claims}, stranger, algorithm="ES256", headers={"kid": header["kid"]})
    past = datetime.now(UTC) - timedelta(hours=1)
    expired_claims = {**claims, "iat": int((past - timedelta(minutes=15)).timestamp()), "exp": int(past.timestamp())}
    expired = jwt.encode(expired_claims, _signing_key(platform, header["kid"]), algorithm="ES256", headers=header)
    other_audience = jwt.encode(
        {**claims, "aud": "someone-else"}, _signing_key(platform, header["kid"]), algorithm="ES256", headers=header
    )
    return {
        "tampered": tampered,
        "wrong-key": wrong_key,
        "expired": expired,
        "wrong-audience": other_audience,
        "garbage": "not-a-jwt",
    }


KINDS = ["missing", "tampered", "wrong-key", "expired", "wrong-audience", "garbage"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["/v1/organizations", "/v1/devices", "/v1/organizations/-/patients"])
def test_envoy_refuses_bad_tokens_with_401(
    platform: Platform, forged: dict[str, str], anonymous_rest: httpx.Client, kind: str, path: str
) -> None:
    headers = {} if kind == "missing" else {"authorization": f"Bearer {forged[kind]}"}
    reply = anonymous_rest.get(path, headers=headers)
    if kind == "wrong-audience":  # a valid token for someone else: Envoy says 403
        assert (reply.status_code, reply.json()["code"]) == (403, 7), reply.text
        return
    assert reply.status_code == 401, reply.text
    assert reply.json()["code"] == 16  # UNAUTHENTICATED


@pytest.mark.parametrize("kind", KINDS)
def test_grpc_through_envoy_refuses_bad_tokens(platform: Platform, forged: dict[str, str], kind: str) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=platform.ca.read_bytes())
    metadata = [] if kind == "missing" else [("authorization", f"Bearer {forged[kind]}")]
    address = f"localhost:{platform.config.port('gateway')}"
    with grpc.secure_channel(address, credentials) as channel, pytest.raises(grpc.RpcError) as refused:
        org_grpc.OrganizationServiceStub(channel).ListOrganizations(
            org_pb.ListOrganizationsRequest(), timeout=10, metadata=metadata
        )
    expected = grpc.StatusCode.PERMISSION_DENIED if kind == "wrong-audience" else grpc.StatusCode.UNAUTHENTICATED
    assert refused.value.code() == expected


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("service", sorted(DIRECT_CALLS))
def test_services_refuse_bad_tokens_sent_directly(
    platform: Platform, forged: dict[str, str], admin_token: str, service: str, kind: str
) -> None:
    token = None if kind == "missing" else forged[kind]
    assert _direct(platform, service, token) == grpc.StatusCode.UNAUTHENTICATED
    assert _direct(platform, service, admin_token) == grpc.StatusCode.OK  # the real one is fine


def test_internal_methods_are_neither_routed_nor_open(platform: Platform, admin_token: str) -> None:
    request = audit_pb.WriteAuditEventsRequest(
        audit_events=[audit_pb.AuditEvent(name="organizations/manufacturer/auditEvents/forged0000000000000000")]
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=platform.ca.read_bytes())
    address = f"localhost:{platform.config.port('gateway')}"
    metadata = [("authorization", f"Bearer {admin_token}"), ("x-medmesh-internal", "x")]
    with grpc.secure_channel(address, credentials) as channel, pytest.raises(grpc.RpcError) as through_envoy:
        audit_grpc.AuditIngestServiceStub(channel).WriteAuditEvents(request, timeout=10, metadata=metadata)
    assert through_envoy.value.code() == grpc.StatusCode.UNIMPLEMENTED  # not routed
    with grpc.insecure_channel(platform.grpc_address("audit")) as channel, pytest.raises(grpc.RpcError) as direct:
        audit_grpc.AuditIngestServiceStub(channel).WriteAuditEvents(
            request, timeout=10, metadata=[("authorization", f"Bearer {admin_token}")]
        )
    assert direct.value.code() == grpc.StatusCode.UNAUTHENTICATED  # a user token is not the mesh credential


def test_public_routes_need_no_token(anonymous_rest: httpx.Client) -> None:
    jwks = ok(anonymous_rest.get("/.well-known/jwks.json"))
    assert jwks["keys"]
    assert all(k["kty"] == "EC" and k["alg"] == "ES256" and k["kid"] for k in jwks["keys"])
    refused = anonymous_rest.post("/v1/auth:login", json={"password": {"username": "nobody@x", "password": "wrong"}})
    assert refused.status_code == 401  # reached the identity service, which said no


def test_first_run_admin_and_cli_token(platform: Platform) -> None:
    _username, _ = platform.admin_credentials()
    token = platform.cli("token")
    assert token.returncode == 0, token.stderr
    claims = _claims(token.stdout.strip())
    assert claims["role"] == "platform_admin"
    assert claims["org"] == "organizations/manufacturer"
    with client(platform, token.stdout.strip()) as http:
        ok(http.get("/v1/organizations/manufacturer"))
    assert platform.cli("token").stdout == token.stdout  # reused while fresh
    assert platform.cli("logout").returncode == 0


@pytest.fixture(scope="module")
def clinic(platform: Platform, rest: httpx.Client) -> str:
    return create_organization(rest, unique("Auth clinic"))


def _login(anonymous_rest: httpx.Client, username: str, password: str) -> httpx.Response:
    return anonymous_rest.post("/v1/auth:login", json={"password": {"username": username, "password": password}})


def test_refresh_rotates_and_reuse_revokes_the_family(
    platform: Platform, rest: httpx.Client, anonymous_rest: httpx.Client, clinic: str
) -> None:
    member = create_member(platform, rest, clinic, "ROLE_OPERATOR")
    first = ok(_login(anonymous_rest, member.username, member.password))
    second = ok(anonymous_rest.post("/v1/auth:refresh", json={"refresh_token": first["refresh_token"]}))
    assert second["refresh_token"] != first["refresh_token"]
    assert _claims(second["access_token"])["sub"] == member.name
    reused = anonymous_rest.post("/v1/auth:refresh", json={"refresh_token": first["refresh_token"]})
    assert reused.status_code == 401
    # The stolen token's family is revoked: the legitimate newer one stops working too.
    assert anonymous_rest.post("/v1/auth:refresh", json={"refresh_token": second["refresh_token"]}).status_code == 401

    third = ok(_login(anonymous_rest, member.username, member.password))
    ok(anonymous_rest.post("/v1/auth:logout", json={"refresh_token": third["refresh_token"]}))
    assert anonymous_rest.post("/v1/auth:refresh", json={"refresh_token": third["refresh_token"]}).status_code == 401
    member.http.close()


def test_repeated_failures_back_off(
    platform: Platform, rest: httpx.Client, anonymous_rest: httpx.Client, clinic: str
) -> None:
    member = create_member(platform, rest, clinic, "ROLE_OPERATOR")
    for _ in range(5):
        assert _login(anonymous_rest, member.username, "wrong password!").status_code == 401
    locked = _login(anonymous_rest, member.username, member.password)  # even the right password
    assert locked.status_code == 429, locked.text
    assert locked.json()["code"] == 8  # RESOURCE_EXHAUSTED
    # Unknown usernames are throttled the same way: nothing tells them apart.
    ghost = f"{unique('ghost')}@example.test"
    answers = [_login(anonymous_rest, ghost, "wrong password!").status_code for _ in range(6)]
    assert answers == [401] * 5 + [429]
    member.http.close()


def test_service_account_key_logs_in_with_its_role(
    platform: Platform, rest: httpx.Client, anonymous_rest: httpx.Client, clinic: str
) -> None:
    account = ok(
        rest.post(f"/v1/{clinic}/serviceAccounts", json={"display_name": "EHR bridge", "role": "ROLE_OPERATOR"})
    )
    key = ok(rest.post(f"/v1/{account['name']}/keys", json={}))
    assert key["secret"]
    listed = ok(rest.get(f"/v1/{account['name']}/keys"))["service_account_keys"]
    assert [k["name"] for k in listed] == [key["name"]]
    assert not listed[0].get("secret")
    tokens = ok(anonymous_rest.post("/v1/auth:login", json={"service_account_key": {"secret": key["secret"]}}))
    assert not tokens.get("refresh_token")
    assert _claims(tokens["access_token"])["sub"] == account["name"]
    with client(platform, tokens["access_token"]) as machine:
        ok(machine.get("/v1/devices"))
        assert machine.post(f"/v1/{clinic}/patients", json={"given_name": "X"}).status_code == 403
    ok(rest.delete(f"/v1/{key['name']}"))
    gone = anonymous_rest.post("/v1/auth:login", json={"service_account_key": {"secret": key["secret"]}})
    assert gone.status_code == 401


def test_key_rotation_keeps_old_tokens_valid(platform: Platform, rest: httpx.Client, admin_token: str) -> None:
    old_kid = jwt.get_unverified_header(admin_token)["kid"]
    rotation = ok(rest.post("/v1/signingKeys:rotate", json={}))
    new_kid = rotation["new_key_id"]
    assert new_kid != old_kid
    assert {old_kid, new_kid} <= set(rotation["published_key_ids"])
    activate = datetime.fromisoformat(rotation["activate_time"].replace("Z", "+00:00"))
    # Published ahead of use: Envoy and the services learn the key before any token carries it.
    time.sleep(max(0.0, (activate - datetime.now(UTC)).total_seconds()) + 1.5)
    fresh = platform.admin_token()
    assert jwt.get_unverified_header(fresh)["kid"] == new_kid
    for token in (admin_token, fresh):
        with client(platform, token) as http:
            ok(http.get("/v1/organizations"))
        for service in DIRECT_CALLS:
            assert _direct(platform, service, token) == grpc.StatusCode.OK, service
