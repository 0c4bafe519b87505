"""HTTPS/JSON through Envoy against the real services and FerretDB."""

from __future__ import annotations

import ssl
import uuid
from typing import Any

import httpx
import pytest

from tests.integration.platform import Platform


def _org(rest: httpx.Client, display_name: str = "Clinic A") -> dict[str, Any]:
    reply = rest.post("/v1/organizations", json={"display_name": display_name})
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def _serial() -> str:
    return f"SN-{uuid.uuid4().hex[:10].upper()}"


def _field_violations(reply: httpx.Response) -> list[str]:
    details = reply.json()["details"]
    return [v["field"] for d in details if d["@type"].endswith("BadRequest") for v in d["field_violations"]]


def _error_info(reply: httpx.Response) -> dict[str, Any]:
    infos = [d for d in reply.json()["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
    assert len(infos) == 1, reply.text
    return dict(infos[0])


def test_create_organization_returns_resource_name(rest: httpx.Client) -> None:
    organization = _org(rest, "Clinic A")
    assert organization["name"].startswith("organizations/")
    assert organization["display_name"] == "Clinic A"
    assert organization["kind"] == "KIND_CARE_PROVIDER"
    assert organization["etag"]
    fetched = rest.get(f"/v1/{organization['name']}")
    assert fetched.status_code == 200
    assert fetched.json() == organization


def test_create_device_by_serial_then_duplicate_is_409(rest: httpx.Client) -> None:
    organization = _org(rest)
    serial = _serial()
    body = {"organization": organization["name"], "display_name": "Pulse oximeter"}
    created = rest.post(f"/v1/devices?device_id={serial}", json=body)
    assert created.status_code == 200, created.text
    assert created.json()["name"] == f"devices/{serial}"
    assert created.json()["organization"] == organization["name"]

    again = rest.post(f"/v1/devices?device_id={serial}", json=body)
    assert again.status_code == 409
    assert again.json()["code"] == 6  # ALREADY_EXISTS
    info = _error_info(again)
    assert info["reason"] == "DEVICE_ALREADY_EXISTS"
    assert info["domain"] == "device.medmesh"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/devices?device_id=bad%20serial!", {"organization": "organizations/x"}, "device_id"),
        ("/v1/devices?device_id=SN-OK", {"organization": "Organizations/Bad Name"}, "device.organization"),
        ("/v1/organizations", {"display_name": "x" * 201}, "organization.display_name"),
        ("/v1/organizations", {"display_name": "   "}, "organization.display_name"),
        ("/v1/devices?device_id=SN-NO-ORG", {"display_name": "no owner"}, "device.organization"),
    ],
)
def test_invalid_input_is_400_naming_the_field(rest: httpx.Client, path: str, body: dict[str, str], field: str) -> None:
    reply = rest.post(path, json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["code"] == 3  # INVALID_ARGUMENT
    assert field in _field_violations(reply)


def test_malformed_json_is_400(rest: httpx.Client) -> None:
    reply = rest.post("/v1/organizations", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 400


def test_device_for_missing_organization_is_refused(rest: httpx.Client) -> None:
    reply = rest.post(f"/v1/devices?device_id={_serial()}", json={"organization": "organizations/does-not-exist"})
    assert reply.status_code == 400
    assert reply.json()["code"] == 9  # FAILED_PRECONDITION
    assert _error_info(reply)["reason"] == "ORGANIZATION_NOT_FOUND"


def test_unknown_resources_are_404(rest: httpx.Client) -> None:
    for path, reason in [
        ("/v1/devices/SN-NEVER-MADE", "DEVICE_NOT_FOUND"),
        ("/v1/organizations/never-made", "ORGANIZATION_NOT_FOUND"),
    ]:
        reply = rest.get(path)
        assert reply.status_code == 404, path
        assert _error_info(reply)["reason"] == reason


def test_list_pages_have_no_gap_or_repeat_and_filter_applies(rest: httpx.Client) -> None:
    organization = _org(rest, "Paging clinic")
    other = _org(rest, "Other clinic")
    serials = sorted(_serial() for _ in range(7))
    for serial in serials:
        created = rest.post(f"/v1/devices?device_id={serial}", json={"organization": organization["name"]})
        assert created.status_code == 200
    rest.post(f"/v1/devices?device_id={_serial()}", json={"organization": other["name"]})

    seen: list[str] = []
    token = ""
    pages = 0
    query = f'organization = "{organization["name"]}"'
    while True:
        reply = rest.get("/v1/devices", params={"filter": query, "page_size": 3, "page_token": token})
        assert reply.status_code == 200, reply.text
        seen += [d["name"] for d in reply.json()["devices"]]
        pages += 1
        token = reply.json()["next_page_token"]
        if not token:
            break
    assert pages == 3
    assert seen == [f"devices/{s}" for s in serials]


def test_bad_page_tokens_are_400(rest: httpx.Client) -> None:
    garbage = rest.get("/v1/devices", params={"page_token": "not-a-token"})
    assert garbage.status_code == 400
    assert _field_violations(garbage) == ["page_token"]

    _org(rest, "Token clinic A")
    _org(rest, "Token clinic B")
    first = rest.get("/v1/organizations", params={"page_size": 1})
    token = first.json()["next_page_token"]
    assert token
    other_filter = rest.get(
        "/v1/organizations", params={"page_size": 1, "page_token": token, "filter": "kind = KIND_MANUFACTURER"}
    )
    assert other_filter.status_code == 400
    assert _error_info(other_filter)["reason"] == "INVALID_PAGE_TOKEN"


def test_bad_filter_is_400(rest: httpx.Client) -> None:
    reply = rest.get("/v1/devices", params={"filter": 'serial_number = "x" OR model = "y"'})
    assert reply.status_code == 400
    assert _field_violations(reply) == ["filter"]


def test_update_with_mask_and_etag(rest: httpx.Client) -> None:
    organization = _org(rest, "Before")
    name = organization["name"]
    renamed = rest.patch(
        f"/v1/{name}",
        params={"update_mask": "display_name"},
        json={"display_name": "After", "kind": "KIND_MANUFACTURER", "etag": organization["etag"]},
    )
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["display_name"] == "After"
    assert renamed.json()["kind"] == "KIND_CARE_PROVIDER"  # not in the mask: unchanged
    assert renamed.json()["etag"] != organization["etag"]

    stale = rest.patch(
        f"/v1/{name}",
        params={"update_mask": "display_name"},
        json={"display_name": "Lost", "etag": organization["etag"]},
    )
    assert stale.status_code == 409
    assert stale.json()["code"] == 10  # ABORTED
    assert rest.get(f"/v1/{name}").json()["display_name"] == "After"

    not_updatable = rest.patch(f"/v1/{name}", params={"update_mask": "create_time"}, json={})
    assert not_updatable.status_code == 400
    assert _field_violations(not_updatable) == ["update_mask"]


def test_device_update_and_delete(rest: httpx.Client) -> None:
    first, second = _org(rest, "Owner 1"), _org(rest, "Owner 2")
    serial = _serial()
    device = rest.post(
        f"/v1/devices?device_id={serial}", json={"organization": first["name"], "model": "PO-200"}
    ).json()
    moved = rest.patch(
        f"/v1/devices/{serial}",
        params={"update_mask": "organization,display_name"},
        json={"organization": second["name"], "display_name": "Ward 3 oximeter"},
    )
    assert moved.status_code == 200, moved.text
    assert moved.json()["organization"] == second["name"]
    assert moved.json()["model"] == "PO-200"

    stale_delete = rest.delete(f"/v1/devices/{serial}", params={"etag": device["etag"]})
    assert stale_delete.status_code == 409
    deleted = rest.delete(f"/v1/devices/{serial}", params={"etag": moved.json()["etag"]})
    assert deleted.status_code == 200
    assert rest.get(f"/v1/devices/{serial}").status_code == 404


def test_unknown_route_is_404(rest: httpx.Client) -> None:
    assert rest.get("/v1/nothing-here").status_code == 404


def test_tls12_client_is_refused(platform: Platform) -> None:
    context = ssl.create_default_context(cafile=str(platform.ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with httpx.Client(verify=context) as client, pytest.raises(httpx.ConnectError):
        client.get(f"{platform.gateway}/v1/organizations")


def test_tls13_client_is_accepted(platform: Platform) -> None:
    context = ssl.create_default_context(cafile=str(platform.ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with httpx.Client(verify=context) as client:
        assert client.get(f"{platform.gateway}/.well-known/jwks.json").status_code == 200
