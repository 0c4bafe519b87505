"""Files: metadata of content kept in object storage, its upload plan and its lifecycle. No I/O.

A file is created PENDING with what the uploader declares (type, size, SHA-256) and ends
exactly once: AVAILABLE (content verified), FAILED (content did not match), EXPIRED (never
completed) or deleted. That ending is decided by a `Settlement`, stored with a unique insert
(the one write the database makes atomic); the file record is then brought in line with it by
whoever gets there, any number of times, with the same result.
"""

from __future__ import annotations

import math
import re
import unicodedata
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from urllib.parse import quote

# Part of this domain's vocabulary; the one definition is shared by the data-plane services.
from medmesh.runtime.directories import DeviceAssignment as DeviceAssignment
from medmesh.runtime.errors import InvalidArgument
from medmesh.runtime.resources import etag_of

NAME_PREFIX = "files/"
ORGANIZATION_PREFIX = "organizations/"
ID_PATTERN = re.compile(r"^[a-z0-9]{1,63}$")
ORGANIZATION_PATTERN = re.compile(r"^organizations/[a-z0-9-]{1,63}$")
DEVICE_PATTERN = re.compile(r"^devices/[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PATIENT_PATTERN = re.compile(r"^(organizations/[a-z0-9-]{1,63})/patients/[a-z0-9-]{1,63}$")
SESSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~/-]{0,255}$")
CONTENT_TYPE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,62}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
MAX_DISPLAY_NAME = 200

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
# S3's multipart rules: parts of 5 MiB to 5 GiB (the last may be smaller), at most 10,000 of them.
MIN_PART_SIZE = 5 * MIB
MAX_PART_SIZE = 5 * GIB
MAX_PARTS = 10_000
# medmesh plans at most this many: every part is a ~400-character URL in CreateFile's answer and
# ~100 us of signing (measured), so 10,000 would make a 4 MB answer; parts grow instead.
MAX_PLANNED_PARTS = 1_000
MAX_OBJECT_SIZE = 5 * 1024 * GIB
# What SigV4 allows a pre-signed URL to live.
MAX_URL_LIFETIME = timedelta(days=7)

DEFAULT_ALLOWED_TYPES = frozenset(
    {
        "application/octet-stream",
        "application/json",
        "text/csv",
        "image/png",
        "image/jpeg",
        "video/mp4",
        "application/pdf",
        "application/dicom",
        "application/zip",
    }
)

SIZE_MISMATCH = "SIZE_MISMATCH"
CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"


class FileState(StrEnum):
    PENDING = "PENDING"
    AVAILABLE = "AVAILABLE"
    FAILED = "FAILED"
    EXPIRED = "EXPIRED"


class Ending(StrEnum):
    """How a PENDING file ends; decided once per file (see `Settlement`)."""

    AVAILABLE = "AVAILABLE"
    FAILED = "FAILED"
    EXPIRED = "EXPIRED"
    DELETED = "DELETED"

    @property
    def discards_content(self) -> bool:
        """The object and any upload in progress must go."""
        return self is not Ending.AVAILABLE


@dataclass(frozen=True)
class Settlement:
    """The decision how file `file_id` ends; the first one stored wins, later ones are told it."""

    file_id: str
    ending: Ending
    failure_reason: str  # SIZE_MISMATCH / CHECKSUM_MISMATCH for FAILED, else ""
    decide_time: datetime


@dataclass(frozen=True)
class FilePolicy:
    """The deployment's limits (see services/file/config.py for the environment variables)."""

    max_bytes: int = 5 * GIB
    allowed_types: frozenset[str] = DEFAULT_ALLOWED_TYPES
    multipart_threshold: int = 64 * MIB
    part_size: int = 16 * MIB
    upload_lifetime: timedelta = timedelta(hours=24)
    download_lifetime: timedelta = timedelta(minutes=5)
    # The sweeper leaves an expired upload alone this long, so a CompleteFile that started just
    # before the deadline (and is still hashing) is not raced by it for no reason.
    sweep_grace: timedelta = timedelta(minutes=15)


@dataclass(frozen=True)
class UploadPlan:
    """One PUT (`part_size` 0) or a multipart upload in parts of `part_size` bytes."""

    size_bytes: int
    part_size: int = 0

    @property
    def multipart(self) -> bool:
        return self.part_size > 0

    @property
    def part_count(self) -> int:
        return math.ceil(self.size_bytes / self.part_size) if self.multipart else 0


def plan_upload(size_bytes: int, policy: FilePolicy) -> UploadPlan:
    """Single PUT below the threshold; otherwise parts of the configured size, grown (in whole
    MiB) when the content would need more than `MAX_PLANNED_PARTS` of them (S3's 10,000 only for
    objects too large for 1,000 parts of S3's largest part size)."""
    if size_bytes < policy.multipart_threshold:
        return UploadPlan(size_bytes)
    needed = math.ceil(size_bytes / MAX_PLANNED_PARTS)
    if needed > MAX_PART_SIZE:  # only near S3's 5 TiB object limit: S3's own part limit then
        needed = math.ceil(size_bytes / MAX_PARTS)
    if needed <= policy.part_size:
        return UploadPlan(size_bytes, policy.part_size)
    return UploadPlan(size_bytes, math.ceil(needed / MIB) * MIB)


@dataclass(frozen=True)
class FileDraft:
    """What an uploader declares; `organization` may be empty when `device` decides it."""

    content_type: str
    size_bytes: int
    sha256: str
    display_name: str = ""
    device: str = ""
    patient: str = ""
    session: str = ""
    organization: str = ""


@dataclass(frozen=True)
class File:
    id: str  # opaque and random
    organization: str  # the data organization, `organizations/{o}`: owner for tenancy and audit
    display_name: str
    content_type: str
    size_bytes: int  # declared
    sha256: str  # declared, lower-case hex
    device: str  # `devices/{d}` or ""
    patient: str  # opaque `organizations/{o}/patients/{p}` or ""
    session: str
    state: FileState
    failure_reason: str
    create_time: datetime
    complete_time: datetime | None
    upload_expire_time: datetime
    object_key: str  # `{organization id}/{file id}` in the files bucket
    upload_id: str  # the S3 multipart upload, "" for a single PUT
    part_size: int  # 0 for a single PUT
    request_key: str  # unique: the idempotency key of the create, or the id when none was given
    revision: int = 1

    @property
    def name(self) -> str:
        return NAME_PREFIX + self.id

    @property
    def etag(self) -> str:
        return etag_of(self.id, self.revision)

    @property
    def plan(self) -> UploadPlan:
        return UploadPlan(self.size_bytes, self.part_size)

    def settled(self, settlement: Settlement) -> File:
        """The file as `settlement` leaves it (not for DELETED: that file is gone)."""
        if settlement.ending is Ending.DELETED:
            raise ValueError("a deleted file has no state")
        return replace(
            self,
            state=FileState(settlement.ending.value),
            failure_reason=settlement.failure_reason,
            complete_time=settlement.decide_time,
            revision=self.revision + 1,
        )

    def matches(self, draft: FileDraft) -> bool:
        """Whether a retried create declares the same content as the one that created this file."""
        return (
            self.content_type == normalize_content_type(draft.content_type)
            and self.size_bytes == draft.size_bytes
            and self.sha256 == draft.sha256.lower()
            and self.display_name == draft.display_name.strip()
            and self.device == draft.device
            and self.session == draft.session
            and (not draft.patient or self.patient == draft.patient)
        )


def new_file_id() -> str:
    return uuid.uuid4().hex


def object_key(organization: str, file_id: str) -> str:
    return f"{organization.removeprefix(ORGANIZATION_PREFIX)}/{file_id}"


def request_key(organization: str, requester: str, request_id: str, file_id: str) -> str:
    """Retries collide only with the same requester's creates in the same organization."""
    return f"{organization}|{requester}|{request_id}" if request_id else f"|{file_id}"


def new_file(
    draft: FileDraft,
    organization: str,
    at: datetime,
    policy: FilePolicy,
    *,
    requester: str,
    request_id: str = "",
    upload_id: str = "",
    file_id: str = "",
) -> File:
    """A validated PENDING file of the data organization `organization`, created at `at`."""
    file_id = file_id or new_file_id()
    size_bytes = require_size(draft.size_bytes, policy)
    plan = plan_upload(size_bytes, policy)
    return File(
        id=file_id,
        organization=organization,
        display_name=require_display_name(draft.display_name),
        content_type=require_content_type(draft.content_type, policy),
        size_bytes=size_bytes,
        sha256=require_sha256(draft.sha256),
        device=require_optional(draft.device, DEVICE_PATTERN, "file.device", "devices/{device}"),
        patient=require_patient(draft.patient, organization),
        session=require_optional(draft.session, SESSION_PATTERN, "file.session", "a resource name"),
        state=FileState.PENDING,
        failure_reason="",
        create_time=at,
        complete_time=None,
        upload_expire_time=at + policy.upload_lifetime,
        object_key=object_key(organization, file_id),
        upload_id=upload_id,
        part_size=plan.part_size,
        request_key=request_key(organization, requester, request_id, file_id),
    )


def with_upload(file: File, upload_id: str) -> File:
    return replace(file, upload_id=upload_id)


def normalize_content_type(content_type: str) -> str:
    return content_type.strip().lower()


def require_content_type(content_type: str, policy: FilePolicy, field: str = "file.content_type") -> str:
    normalized = normalize_content_type(content_type)
    if not CONTENT_TYPE_PATTERN.match(normalized):
        raise InvalidArgument.for_field(field, "must be a MIME type such as image/png, without parameters")
    if normalized not in policy.allowed_types:
        raise InvalidArgument.for_field(
            field,
            f"{normalized} is not allowed; allowed: {', '.join(sorted(policy.allowed_types))}",
            reason="CONTENT_TYPE_NOT_ALLOWED",
        )
    return normalized


def require_size(size_bytes: int, policy: FilePolicy, field: str = "file.size_bytes") -> int:
    if size_bytes < 0:
        raise InvalidArgument.for_field(field, "cannot be negative")
    if size_bytes > policy.max_bytes:
        raise InvalidArgument.for_field(
            field, f"{size_bytes} bytes is over the limit of {policy.max_bytes}", reason="FILE_TOO_LARGE"
        )
    return size_bytes


def require_sha256(sha256: str, field: str = "file.sha256") -> str:
    digest = sha256.strip().lower()
    if not SHA256_PATTERN.match(digest):
        raise InvalidArgument.for_field(field, "must be the SHA-256 of the content as 64 hex digits")
    return digest


def require_display_name(display_name: str, field: str = "file.display_name") -> str:
    name = display_name.strip()
    if len(name) > MAX_DISPLAY_NAME:
        raise InvalidArgument.for_field(field, f"at most {MAX_DISPLAY_NAME} characters")
    # It becomes a download's file name: no control characters (header injection, odd names).
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise InvalidArgument.for_field(field, "must not contain control characters")
    return name


def require_optional(value: str, pattern: re.Pattern[str], field: str, shape: str) -> str:
    if value and not pattern.match(value):
        raise InvalidArgument.for_field(field, f"must look like {shape}, got {value!r}")
    return value


def require_patient(patient: str, organization: str, field: str = "file.patient") -> str:
    if not patient:
        return ""
    match = PATIENT_PATTERN.match(patient)
    if not match:
        raise InvalidArgument.for_field(field, "must look like organizations/{organization}/patients/{patient}")
    if match.group(1) != organization:
        raise InvalidArgument.for_field(
            field,
            f"must be a patient of the file's organization {organization}",
            reason="PATIENT_ORGANIZATION_MISMATCH",
        )
    return patient


def require_organization(organization: str, field: str = "file.organization") -> str:
    # `organizations/-` fits the pattern but is the AIP-159 wildcard, never an owner.
    if not ORGANIZATION_PATTERN.match(organization) or organization == ORGANIZATION_PREFIX + "-":
        raise InvalidArgument.for_field(field, "must look like organizations/{organization}", reason="INVALID_NAME")
    return organization


def parse_name(name: str, field: str = "name") -> str:
    """`files/{id}` -> id."""
    file_id = name.removeprefix(NAME_PREFIX)
    if not name.startswith(NAME_PREFIX) or not ID_PATTERN.match(file_id):
        raise InvalidArgument.for_field(field, f"must look like files/{{file}}, got {name!r}", reason="INVALID_NAME")
    return file_id


def parse_parent(parent: str, field: str = "parent") -> str:
    """`organizations/{o}` or `organizations/-` -> the same, checked."""
    if parent == ORGANIZATION_PREFIX + "-" or ORGANIZATION_PATTERN.match(parent):
        return parent
    raise InvalidArgument.for_field(
        field, f"must look like organizations/{{organization}}, got {parent!r}", reason="INVALID_NAME"
    )


def require_parts(parts: Iterable[tuple[int, str]], plan: UploadPlan, field: str = "parts") -> list[tuple[int, str]]:
    """Every part 1..N of the plan exactly once, ETags without quotes, in part order."""
    if not plan.multipart:
        listed = list(parts)
        if listed:
            raise InvalidArgument.for_field(field, "this file was uploaded with a single PUT: name no parts")
        return []
    by_number: dict[int, str] = {}
    for number, etag in parts:
        if number in by_number:
            raise InvalidArgument.for_field(field, f"part {number} is named twice")
        by_number[number] = etag.strip().strip('"')
    expected = set(range(1, plan.part_count + 1))
    if set(by_number) != expected:
        missing = sorted(expected - set(by_number))[:5]
        extra = sorted(set(by_number) - expected)[:5]
        raise InvalidArgument.for_field(
            field,
            f"must name parts 1 to {plan.part_count} exactly once (missing {missing}, unexpected {extra})",
            reason="INVALID_PARTS",
        )
    return sorted(by_number.items())


def covers_plan(parts: Iterable[tuple[int, str]], plan: UploadPlan) -> bool:
    return {number for number, _ in parts} == set(range(1, plan.part_count + 1))


def content_disposition(file: File) -> str:
    """`attachment` (never rendered inline from the storage host), with the display name as the
    suggested file name: an ASCII fallback and the exact name per RFC 6266 / RFC 8187."""
    name = file.display_name or file.id
    fallback = "".join(c if c.isascii() and (c.isalnum() or c in "._- ") else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def url_lifetime(until: datetime, at: datetime) -> timedelta | None:
    """How long an upload URL issued at `at` may live to end at `until`; None when already past."""
    remaining = until - at
    if remaining < timedelta(seconds=1):
        return None
    return min(remaining, MAX_URL_LIFETIME)
