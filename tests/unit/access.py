"""What the role x organization tests of several services share: the callers and the matrix."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from medmesh.runtime.audit import AuditActor
from medmesh.runtime.auth import Principal, Role

MANUFACTURER = "organizations/manufacturer"
HOME = "organizations/clinic-a"
OTHER = "organizations/clinic-b"

ALLOWED = "ALLOWED"
ROLE = "ROLE_NOT_ALLOWED"
ACCESS = "ORGANIZATION_ACCESS_DENIED"

# method -> role -> (outcome on the caller's own organization, outcome on another one)
Matrix = Mapping[str, Mapping[Role, tuple[str, str]]]


def member(role: Role, organization: str = "") -> Principal:
    """A user with `role`; platform admins live in the manufacturer organization, others in HOME."""
    organization = organization or (MANUFACTURER if role is Role.PLATFORM_ADMIN else HOME)
    patient = f"{organization}/patients/p-1" if role is Role.PATIENT else ""
    return Principal(f"{organization}/users/{role.value}", organization, role, patient=patient)


def actor_of(principal: Principal) -> AuditActor:
    return AuditActor(principal.subject, principal.organization, str(principal.role))


def matrix_params(matrix: Matrix) -> list[Any]:
    """One pytest param (method, role, whose, expected) per cell of the matrix."""
    return [
        pytest.param(method, role, whose, outcomes[index], id=f"{method}-{role.value}-{whose}")
        for method, row in matrix.items()
        for role, outcomes in row.items()
        for index, whose in enumerate(("own", "other"))
    ]
