"""A small world of tenants and people, made through the public REST API like a portal would."""

from __future__ import annotations

import secrets
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.integration.platform import Platform


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def client(platform: Platform, token: str | None = None) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(platform.ca))
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=platform.gateway, verify=context, timeout=20.0, headers=headers)


def ok(reply: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert reply.status_code == status, f"{reply.request.method} {reply.request.url}: {reply.status_code} {reply.text}"
    data: dict[str, Any] = reply.json() if reply.content else {}
    return data


@dataclass
class Member:
    """A user who has logged in: their resource name, role, token and an HTTP client using it."""

    name: str
    username: str
    password: str
    role: str
    token: str
    http: httpx.Client = field(repr=False)

    @property
    def organization(self) -> str:
        return "/".join(self.name.split("/")[:2])


def create_organization(admin: httpx.Client, display_name: str) -> str:
    return str(ok(admin.post("/v1/organizations", json={"display_name": display_name}))["name"])


def create_member(platform: Platform, creator: httpx.Client, organization: str, role: str, patient: str = "") -> Member:
    username = f"{unique(role.lower())}@example.test"
    password = secrets.token_urlsafe(16)
    user: dict[str, Any] = {"username": username, "display_name": f"Test {role}", "role": role}
    if patient:
        user["patient"] = patient
    created = ok(creator.post(f"/v1/{organization}/users", json={"user": user, "password": password}))
    token = platform.login(username, password)["access_token"]
    return Member(created["name"], username, password, role, token, client(platform, token))


def create_patient(clinician: httpx.Client, organization: str, **phi: Any) -> dict[str, Any]:
    body = {
        "given_name": phi.get("given_name", "Ada"),
        "family_name": phi.get("family_name", unique("Lovelace")),
        "birth_date": phi.get("birth_date", {"year": 1980, "month": 12, "day": 10}),
        "sex": phi.get("sex", "SEX_FEMALE"),
        "contact": phi.get("contact", {"email": "ada@example.test", "phone": "+44 20 0000 0000", "address": "London"}),
        "national_id": phi.get("national_id", unique("NID")),
    }
    return ok(clinician.post(f"/v1/{organization}/patients", json=body))


def create_device(creator: httpx.Client, organization: str, model: str = "ECG-12") -> str:
    serial = unique("SN").upper()
    reply = creator.post(
        "/v1/devices", params={"device_id": serial}, json={"organization": organization, "model": model}
    )
    return str(ok(reply)["name"])


def eventually(check: Callable[[], Any], within: float = 15.0, interval: float = 0.2) -> Any:
    """Polls `check` until it returns something truthy (audit delivery is asynchronous)."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)
