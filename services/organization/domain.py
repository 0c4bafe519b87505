"""Organizations: the tenants every other resource belongs to. Plain Python, no I/O."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from medmesh.runtime.errors import InvalidArgument
from medmesh.runtime.resources import etag_of

NAME_PREFIX = "organizations/"
ID_PATTERN = re.compile(r"^[a-z0-9-]{1,63}$")
UPDATABLE_FIELDS = ("display_name", "kind")
MAX_DISPLAY_NAME = 200


class OrganizationKind(StrEnum):
    MANUFACTURER = "MANUFACTURER"
    CARE_PROVIDER = "CARE_PROVIDER"


@dataclass(frozen=True)
class Organization:
    id: str
    display_name: str
    kind: OrganizationKind
    create_time: datetime
    update_time: datetime
    revision: int = 1

    @property
    def name(self) -> str:
        return NAME_PREFIX + self.id

    @property
    def etag(self) -> str:
        return etag_of(self.id, self.revision)

    def updated(self, changes: OrganizationChanges, fields: set[str], at: datetime) -> Organization:
        values = {f: getattr(changes, f) for f in fields}
        if "display_name" in values:
            values["display_name"] = require_display_name(values["display_name"], "organization.display_name")
        if "kind" in values and values["kind"] is None:
            raise InvalidArgument.for_field("organization.kind", "cannot be KIND_UNSPECIFIED", reason="REQUIRED_FIELD")
        return replace(self, **values, update_time=at, revision=self.revision + 1)


@dataclass(frozen=True)
class OrganizationChanges:
    """New values for an update; only the fields in the update mask are applied."""

    display_name: str = ""
    kind: OrganizationKind | None = None


def new_organization_id() -> str:
    return uuid.uuid4().hex


def parse_name(name: str, field: str = "name") -> str:
    """`organizations/{id}` -> id."""
    if not name.startswith(NAME_PREFIX) or not ID_PATTERN.match(name[len(NAME_PREFIX) :]):
        raise InvalidArgument.for_field(
            field, f"must look like organizations/{{id}}, got {name!r}", reason="INVALID_NAME"
        )
    return name[len(NAME_PREFIX) :]


def require_display_name(value: str, field: str) -> str:
    value = value.strip()
    if not value:
        raise InvalidArgument.for_field(field, "is required", reason="REQUIRED_FIELD")
    if len(value) > MAX_DISPLAY_NAME:
        raise InvalidArgument.for_field(field, f"at most {MAX_DISPLAY_NAME} characters")
    return value
