"""The device data plane over the real platform: configuration twin, observations, commands,
files and alerts, through the gateway (REST) and the internal methods the MQTT adapter uses."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import struct_pb2

from medmesh.device.v1 import device_credential_service_pb2 as device_credential_pb
from medmesh.device.v1 import device_credential_service_pb2_grpc as device_credential_grpc
from medmesh.device.v1 import device_internal_service_pb2 as device_internal_pb
from medmesh.device.v1 import device_internal_service_pb2_grpc as device_internal_grpc
from medmesh.observation.v1 import observation_service_pb2 as observation_pb
from medmesh.observation.v1 import observation_service_pb2_grpc as observation_grpc
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


@dataclass
class Clinic:
    organization: str
    admin: Member
    clinician: Member
    operator: Member
    patient: str
    device: str


@pytest.fixture(scope="module")
def clinic(platform: Platform, rest: httpx.Client) -> Iterator[Clinic]:
    organization = create_organization(rest, unique("Data clinic"))
    admin = create_member(platform, rest, organization, "ROLE_ORGANIZATION_ADMIN")
    clinician = create_member(platform, admin.http, organization, "ROLE_CLINICIAN")
    operator = create_member(platform, admin.http, organization, "ROLE_OPERATOR")
    patient = create_patient(clinician.http, organization)["name"]
    device = create_device(admin.http, organization, model="Monitor-1")
    ok(admin.http.post(f"/v1/{device}:assign", json={"patient": patient}))
    yield Clinic(organization, admin, clinician, operator, patient, device)
    for member in (admin, clinician, operator):
        member.http.close()


@pytest.fixture(scope="module")
def internal(platform: Platform) -> list[tuple[str, str]]:
    """The mesh credential, as the MQTT adapter presents it to internal methods."""
    token = json.loads((platform.state_dir / "internal-token.json").read_text())["token"]
    return [("x-medmesh-internal", token), ("x-medmesh-caller", "mqtt_adapter")]


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- configuration twin -------------------------------------------------------------------------


def test_config_with_a_stale_etag_is_refused_and_the_reported_version_catches_up(
    platform: Platform, clinic: Clinic, internal: list[tuple[str, str]]
) -> None:
    http = clinic.operator.http
    config_name = f"{clinic.device}/config"
    first = ok(http.patch(f"/v1/{config_name}", json={"desired": {"sample_rate_hz": 250, "alarm": True}}))
    second = ok(
        http.patch(
            f"/v1/{config_name}", json={"desired": {"sample_rate_hz": 500, "alarm": True}, "etag": first["etag"]}
        )
    )
    assert int(second["desired_version"]) == int(first["desired_version"]) + 1
    stale = http.patch(f"/v1/{config_name}", json={"desired": {"sample_rate_hz": 1}, "etag": first["etag"]})
    assert stale.status_code == 409, stale.text
    assert stale.json()["code"] == 10  # ABORTED
    assert ok(http.get(f"/v1/{config_name}"))["in_sync"] is False

    with grpc.insecure_channel(platform.grpc_address("device")) as channel:
        stub = device_internal_grpc.DeviceInternalServiceStub(channel)
        pending = stub.GetPendingConfig(
            device_internal_pb.GetPendingConfigRequest(device=clinic.device), metadata=internal, timeout=10
        )
        assert pending.desired_version == int(second["desired_version"])
        assert dict(pending.desired) == {"sample_rate_hz": 500, "alarm": True}
        reported = struct_pb2.Struct()
        reported.update({"sample_rate_hz": 500, "alarm": True})
        stub.ReportConfig(
            device_internal_pb.ReportConfigRequest(
                device=clinic.device, reported=reported, reported_version=pending.desired_version
            ),
            metadata=internal,
            timeout=10,
        )
        caught_up = stub.GetPendingConfig(
            device_internal_pb.GetPendingConfigRequest(device=clinic.device), metadata=internal, timeout=10
        )
    assert caught_up.desired_version == 0  # nothing pending any more
    config = ok(http.get(f"/v1/{config_name}"))
    assert config["in_sync"] is True
    assert config["reported_version"] == second["desired_version"]


# --- observations -------------------------------------------------------------------------------


def _batch(device: str, start: datetime, values: list[float], prefix: str) -> list[dict[str, Any]]:
    return [
        {
            "message_id": f"{prefix}-{i}",
            "metric": "heart_rate",
            "time": _rfc3339(start + timedelta(seconds=i)),
            "numeric_value": value,
            "unit": "/min",
        }
        for i, value in enumerate(values)
    ]


def test_a_batch_sent_twice_is_stored_once_and_pages_and_aggregates_are_exact(
    platform: Platform, clinic: Clinic
) -> None:
    http = clinic.operator.http
    rng = random.Random(7)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    values = [round(rng.uniform(50, 150), 3) for _ in range(90)]
    batch = _batch(clinic.device, start, values, unique("m"))
    first = ok(http.post(f"/v1/{clinic.device}/observations:batchCreate", json={"observations": batch}))
    assert [r["outcome"] for r in first["results"]] == ["OUTCOME_STORED"] * 90
    again = ok(http.post(f"/v1/{clinic.device}/observations:batchCreate", json={"observations": batch}))
    assert [r["outcome"] for r in again["results"]] == ["OUTCOME_DUPLICATE"] * 90
    bad = ok(
        http.post(
            f"/v1/{clinic.device}/observations:batchCreate",
            json={"observations": [{**batch[0], "message_id": unique("x"), "metric": "Not A Metric"}]},
        )
    )
    assert bad["results"][0]["outcome"] == "OUTCOME_REJECTED"

    # Three pages of 30: no gap, no repeat, in time order; the patient sees the same series.
    window = (
        f'metric = "heart_rate" AND time >= "{_rfc3339(start)}" AND time < "{_rfc3339(start + timedelta(seconds=90))}"'
    )
    seen: list[dict[str, Any]] = []
    token = ""
    pages = 0
    while True:
        page = ok(
            http.get(
                f"/v1/{clinic.device}/observations",
                params={"filter": window, "page_size": 30, "page_token": token},
            )
        )
        seen += page["observations"]
        pages += 1
        token = page.get("next_page_token", "")
        if not token:
            break
    assert pages in {3, 4}  # the last page may come back empty
    assert [o["numeric_value"] for o in seen] == values
    assert len({o["name"] for o in seen}) == 90
    assert {o["patient"] for o in seen} == {clinic.patient}
    by_patient = ok(
        clinic.clinician.http.get(f"/v1/{clinic.patient}/observations", params={"filter": window, "page_size": 100})
    )
    assert [o["numeric_value"] for o in by_patient["observations"]] == values

    # Aggregates in 30 s bins, checked against the values computed here.
    aggregate = ok(
        http.post(
            f"/v1/{clinic.device}/observations:aggregate",
            json={
                "metrics": ["heart_rate"],
                "start_time": _rfc3339(start),
                "end_time": _rfc3339(start + timedelta(seconds=90)),
                "bin_size": "30s",
            },
        )
    )
    bins = aggregate["bins"]
    assert len(bins) == 3
    for index, found in enumerate(bins):
        chunk = values[index * 30 : (index + 1) * 30]
        mean = sum(chunk) / len(chunk)
        deviation = math.sqrt(sum((v - mean) ** 2 for v in chunk) / len(chunk))  # population
        assert found["start_time"].startswith(_rfc3339(start + timedelta(seconds=30 * index))[:19])
        assert int(found["count"]) == 30
        assert found["min"] == pytest.approx(min(chunk))
        assert found["max"] == pytest.approx(max(chunk))
        assert found["mean"] == pytest.approx(mean)
        assert found["standard_deviation"] == pytest.approx(deviation)

    latest = ok(http.get(f"/v1/{clinic.device}/observations:latest"))
    assert [o["numeric_value"] for o in latest["observations"] if o["metric"] == "heart_rate"] == [values[-1]]


def test_the_adapter_ingest_path_is_idempotent(
    platform: Platform, clinic: Clinic, internal: list[tuple[str, str]]
) -> None:
    moment = datetime.now(UTC) - timedelta(minutes=5)
    items = []
    for i in range(5):
        item = observation_pb.Observation(message_id=f"adapter-{unique('a')}-{i}", metric="spo2", numeric_value=97 + i)
        item.time.FromDatetime(moment + timedelta(seconds=i))
        items.append(item)
    request = observation_pb.WriteObservationsRequest(device=clinic.device, observations=items)
    with grpc.insecure_channel(platform.grpc_address("observation")) as channel:
        stub = observation_grpc.ObservationInternalServiceStub(channel)
        first = stub.WriteObservations(request, metadata=internal, timeout=10)
        second = stub.WriteObservations(request, metadata=internal, timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            stub.WriteObservations(request, timeout=10)  # no mesh credential
    stored, duplicate = (
        observation_pb.ObservationResult.OUTCOME_STORED,
        observation_pb.ObservationResult.OUTCOME_DUPLICATE,
    )
    assert [r.outcome for r in first.results] == [stored] * 5
    assert [r.outcome for r in second.results] == [duplicate] * 5
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- alerts -------------------------------------------------------------------------------------


def test_a_threshold_rule_raises_and_clears_an_alert_on_ingest(clinic: Clinic) -> None:
    metric = f"hr_{unique('r').replace('-', '_')}"
    rule = ok(
        clinic.clinician.http.post(
            f"/v1/{clinic.organization}/alertRules",
            json={
                "display_name": "Tachycardia",
                "metric": metric,
                "operator": "OPERATOR_GREATER_THAN",
                "threshold": 120,
                "duration": "30s",
                "severity": "SEVERITY_MAJOR",
                "device": clinic.device,
            },
        )
    )
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)

    def send(offsets_values: list[tuple[int, float]]) -> None:
        observations = [
            {
                "message_id": unique("al"),
                "metric": metric,
                "time": _rfc3339(start + timedelta(seconds=offset)),
                "numeric_value": value,
            }
            for offset, value in offsets_values
        ]
        result = ok(
            clinic.operator.http.post(
                f"/v1/{clinic.device}/observations:batchCreate", json={"observations": observations}
            )
        )
        assert {r["outcome"] for r in result["results"]} == {"OUTCOME_STORED"}

    def alerts(state: str) -> list[dict[str, Any]]:
        reply = ok(
            clinic.clinician.http.get(
                f"/v1/{clinic.organization}/alerts",
                params={"filter": f'state = {state} AND device = "{clinic.device}"'},
            )
        )
        return [a for a in reply.get("alerts", []) if a.get("rule") == rule["name"]]

    send([(0, 130), (10, 135), (20, 140)])
    assert alerts("STATE_ACTIVE") == []  # above the threshold for 20 s only
    send([(31, 128)])
    (raised,) = eventually(lambda: alerts("STATE_ACTIVE"))
    assert raised["severity"] == "SEVERITY_MAJOR"
    assert raised["patient"] == clinic.patient
    send([(40, 90)])
    (cleared,) = eventually(lambda: alerts("STATE_CLEARED"))
    assert cleared["name"] == raised["name"]
    assert cleared["cleared_by"].startswith("rule:")
    assert alerts("STATE_ACTIVE") == []


# --- commands -----------------------------------------------------------------------------------


def test_a_command_for_an_offline_device_expires(clinic: Clinic) -> None:
    command = ok(
        clinic.operator.http.post(
            f"/v1/{clinic.device}/commands", json={"command_name": "reboot", "ttl": "1s", "timeout": "10s"}
        )
    )
    assert command["state"] == "STATE_PENDING"
    expired = eventually(
        lambda: ok(clinic.operator.http.get(f"/v1/{command['name']}"))["state"] == "STATE_EXPIRED", within=20
    )
    assert expired
    cancel = clinic.operator.http.post(f"/v1/{command['name']}:cancel", json={})
    assert cancel.status_code == 400  # FAILED_PRECONDITION: final state


# --- files --------------------------------------------------------------------------------------


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "--silent", "--show-error", *args], capture_output=True, text=True, timeout=60)


def test_a_1mb_file_goes_through_pre_signed_urls_and_a_wrong_checksum_is_refused(
    platform: Platform, clinic: Clinic, tmp_path: Path
) -> None:
    payload = os.urandom(1024 * 1024)
    source = tmp_path / "ecg.bin"
    source.write_bytes(payload)
    http = clinic.operator.http

    def start(sha256: str) -> dict[str, Any]:
        return ok(
            http.post(
                "/v1/files",
                json={
                    "display_name": "ecg.bin",
                    "content_type": "application/octet-stream",
                    "size_bytes": len(payload),
                    "sha256": sha256,
                    "device": clinic.device,
                },
            )
        )

    created = start(hashlib.sha256(payload).hexdigest())
    url = created["upload"]["single_url"]
    assert url.startswith(f"https://localhost:{platform.config.port('gateway_s3')}/")
    upload = _curl("--cacert", str(platform.ca), "--fail", "--upload-file", str(source), url)
    assert upload.returncode == 0, upload.stderr
    done = ok(http.post(f"/v1/{created['file']['name']}:complete", json={}))
    assert done["state"] == "STATE_AVAILABLE"
    assert done["organization"] == clinic.organization
    download = ok(http.get(f"/v1/{created['file']['name']}:downloadUrl"))["url"]
    target = tmp_path / "back.bin"
    fetched = _curl("--cacert", str(platform.ca), "--fail", "--output", str(target), download)
    assert fetched.returncode == 0, fetched.stderr
    assert target.read_bytes() == payload

    wrong = start("0" * 64)
    upload = _curl("--cacert", str(platform.ca), "--fail", "--upload-file", str(source), wrong["upload"]["single_url"])
    assert upload.returncode == 0, upload.stderr
    refused = http.post(f"/v1/{wrong['file']['name']}:complete", json={})
    assert refused.status_code == 400, refused.text  # FAILED_PRECONDITION
    assert "CHECKSUM_MISMATCH" in refused.text
    assert ok(http.get(f"/v1/{wrong['file']['name']}"))["state"] == "STATE_FAILED"


# --- device identity ----------------------------------------------------------------------------


def test_a_certificate_issued_from_a_csr_is_valid_until_revoked_and_relay_credentials_verify(
    platform: Platform, clinic: Clinic, internal: list[tuple[str, str]]
) -> None:
    serial = clinic.device.removeprefix("devices/")
    key = ec.generate_private_key(ec.SECP256R1())  # stays here, as on a device
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    http = clinic.operator.http
    issued = ok(http.post(f"/v1/{clinic.device}:issueCertificate", json={"csr": csr}))
    certificate = x509.load_pem_x509_certificate(issued["pem"].encode())
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert certificate.public_key().public_bytes(*der) == key.public_key().public_bytes(*der)
    wrong = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SOMEONE-ELSE")])
    )
    refused = http.post(
        f"/v1/{clinic.device}:issueCertificate",
        json={"csr": wrong.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()},
    )
    assert refused.status_code == 400, refused.text

    check = device_credential_pb.CheckCertificateRequest(pem=issued["pem"])
    with grpc.insecure_channel(platform.grpc_address("device")) as channel:
        stub = device_credential_grpc.DeviceCredentialInternalServiceStub(channel)
        valid = stub.CheckCertificate(check, metadata=internal, timeout=10)
        assert (valid.valid, valid.device) == (True, clinic.device)
        ok(http.post(f"/v1/{issued['name']}:revoke", json={"reason": "REVOCATION_REASON_KEY_COMPROMISE"}))
        revoked = stub.CheckCertificate(check, metadata=internal, timeout=10)
        assert (revoked.valid, revoked.reason) == (False, device_credential_pb.CheckCertificateResponse.REASON_REVOKED)

        relay = ok(http.post(f"/v1/{clinic.device}:createTemporaryCredentials", json={"ttl": "300s"}))
        verify = device_credential_pb.VerifyTemporaryCredentialsRequest
        good = stub.VerifyTemporaryCredentials(
            verify(username=relay["username"], password=relay["password"]), metadata=internal, timeout=10
        )
        bad = stub.VerifyTemporaryCredentials(
            verify(username=relay["username"], password="not-it"), metadata=internal, timeout=10
        )
    assert (good.valid, good.device) == (True, clinic.device)
    assert not bad.valid
