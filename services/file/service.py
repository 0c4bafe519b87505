"""Use cases of the file service: who may upload, see, download and delete files; how uploads end.

Tenancy. A file belongs to its data organization: the care organization of the device it comes
from (else the device's owner), or the organization named at creation. Members of it and
platform admins may act on the file; patients may not. File names carry no organization, so a
caller who is not a platform admin is told PERMISSION_DENIED for another organization's file and
for one that does not exist alike.

Roles:
- create and complete uploads, read metadata, list, get download URLs: organization admins,
  clinicians, operators, platform admins;
- delete: organization and platform admins any file; clinicians and operators only files that
  are not AVAILABLE (cancelling an upload or clearing a failed one): verified data is kept;
- the device methods and the expiry sweep: internal callers (the MQTT adapter, the sweeper).

Audit: one event per change (created, AVAILABLE, FAILED, EXPIRED, deleted) and per download
URL issued, on the file's organization.

Races. Completion, expiry and deletion of a PENDING file can run at once (two replicas, a
client's retry, the sweeper). Which one wins is a `Settlement`, stored by unique insert; the
losers apply the winner's settlement instead of their own, so the record and the object
always agree with it. An audit event is written by whoever actually changed the record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

from medmesh.runtime.audit import AuditTrail, audit
from medmesh.runtime.auth import ALL_ORGANIZATIONS, Principal, Role, current_principal
from medmesh.runtime.directories import DeviceAssignment, DeviceDirectory
from medmesh.runtime.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from medmesh.runtime.filtering import Comparison, Condition, Converter, rfc3339_timestamp
from medmesh.runtime.resources import ResourceStore, check_etag, list_page, now
from services.file.domain import (
    CHECKSUM_MISMATCH,
    DEVICE_PATTERN,
    PATIENT_PATTERN,
    SIZE_MISMATCH,
    Ending,
    File,
    FileDraft,
    FilePolicy,
    FileState,
    Settlement,
    content_disposition,
    covers_plan,
    new_file,
    normalize_content_type,
    parse_name,
    parse_parent,
    require_organization,
    require_parts,
    url_lifetime,
    with_upload,
)
from services.file.storage import FileStorage

log = logging.getLogger(__name__)

READERS = (Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN, Role.CLINICIAN, Role.OPERATOR)
WRITERS = (Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN, Role.CLINICIAN, Role.OPERATOR)
# On top of WRITERS, to delete a file whose content was verified.
DELETE_AVAILABLE_ROLES = (Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN)
SWEEP_BATCH = 100


class FileStore(ResourceStore[File], Protocol):
    async def find_by_request_key(self, request_key: str) -> File | None: ...

    async def settle(self, settlement: Settlement) -> Settlement:
        """Stores `settlement` unless the file has one already; returns the one that counts."""

    async def settlement(self, file_id: str) -> Settlement | None: ...


def _device_name(written: str) -> str:
    if not DEVICE_PATTERN.match(written):
        raise ValueError("must be a device name like devices/{device}")
    return written


def _patient_name(written: str) -> str:
    if not PATIENT_PATTERN.match(written):
        raise ValueError("must be a patient name like organizations/{organization}/patients/{patient}")
    return written


def _state(written: str) -> str:
    try:
        return FileState(written.removeprefix("STATE_")).value
    except ValueError:
        raise ValueError(f"must be one of {', '.join(s.value for s in FileState)}") from None


FILTER_FIELDS: dict[str, tuple[str, Converter]] = {
    "device": ("device", _device_name),
    "patient": ("patient", _patient_name),
    "session": ("session", str),
    "state": ("state", _state),
    "content_type": ("content_type", normalize_content_type),
    "create_time": ("create_time", rfc3339_timestamp),
}


@dataclass(frozen=True)
class UploadTarget:
    """Where to PUT a PENDING file's content: one URL, or one per part."""

    single_url: str
    parts: tuple[tuple[int, str], ...]  # (part number, URL)
    part_size: int
    expire_time: datetime


@dataclass(frozen=True)
class CreatedFile:
    file: File
    upload: UploadTarget | None  # None once the file is no longer PENDING (a retried create)


@dataclass(frozen=True)
class DownloadUrl:
    url: str
    expire_time: datetime


@dataclass(frozen=True)
class FilePage:
    files: list[File]
    next_page_token: str


def _denied(principal: Principal, name: str) -> PermissionDenied:
    return PermissionDenied(
        f"{principal.subject} may not access {name}",
        reason="ORGANIZATION_ACCESS_DENIED",
        metadata={"resource": name},
    )


def _not_pending(file: File) -> FailedPrecondition:
    """Why a file that has ended cannot be completed."""
    if file.state is FileState.FAILED:
        return FailedPrecondition(
            f"file {file.name!r} failed verification ({file.failure_reason}); create a new file",
            reason=file.failure_reason or "FILE_FAILED",
            metadata={"file": file.name},
        )
    return FailedPrecondition(
        f"the upload of {file.name!r} expired at {file.upload_expire_time.isoformat()}; create a new file",
        reason="UPLOAD_EXPIRED",
        metadata={"file": file.name},
    )


class FileService:
    def __init__(
        self,
        store: FileStore,
        storage: FileStorage,
        devices: DeviceDirectory,
        trail: AuditTrail,
        policy: FilePolicy,
        clock: Callable[[], datetime] = now,
    ) -> None:
        self._store = store
        self._storage = storage
        self._devices = devices
        self._trail = trail
        self._policy = policy
        self._clock = clock

    # --- create ------------------------------------------------------------------------------

    async def create(self, draft: FileDraft, request_id: str = "") -> CreatedFile:
        """A user's upload: the organization comes from the device if one is named."""
        principal = current_principal()
        principal.require_role(*WRITERS, action="upload files")
        if draft.device:
            assignment = await self._assignment(principal, draft.device, "file.device")
            organization = assignment.data_organization
            principal.require_access(organization, draft.device)
            if draft.organization and draft.organization != organization:
                raise InvalidArgument.for_field(
                    "file.organization",
                    f"the data of {draft.device} belongs to {organization}; leave this empty or name it",
                    reason="DEVICE_ORGANIZATION_MISMATCH",
                )
            draft = _with_assigned_patient(draft, assignment)
        else:
            if not draft.organization:
                raise InvalidArgument.for_field("file.organization", "name the organization, or a device")
            organization = require_organization(draft.organization)
            principal.require_access(organization, organization)
        return await self._create(draft, organization, principal.subject, request_id)

    async def create_for_device(self, device: str, draft: FileDraft, request_id: str = "") -> CreatedFile:
        """An upload a device asked for through a mesh-internal caller that authenticated it."""
        principal = current_principal()
        principal.require_role(action="upload files for a device")  # internal callers only
        assignment = await self._assignment(principal, device, "device")
        draft = _with_assigned_patient(replace(draft, device=device), assignment)
        return await self._create(draft, assignment.data_organization, device, request_id)

    async def _create(self, draft: FileDraft, organization: str, requester: str, request_id: str) -> CreatedFile:
        file = new_file(draft, organization, self._clock(), self._policy, requester=requester, request_id=request_id)
        if request_id:
            earlier = await self._store.find_by_request_key(file.request_key)
            if earlier is not None:
                return await self._replay(earlier, draft)
        if file.plan.multipart:
            file = with_upload(file, await self._storage.start_multipart(file.object_key, file.content_type))
        try:
            await self._store.insert(file)
        except AlreadyExists:
            # The same request_id raced this one and won: its file is the answer.
            await self._discard_upload(file)
            earlier = await self._store.find_by_request_key(file.request_key)
            if earlier is None:
                raise
            return await self._replay(earlier, draft)
        except Exception:
            await self._discard_upload(file)
            raise
        await audit(
            self._trail,
            file.organization,
            file.name,
            description=f"file created ({file.content_type}, {file.size_bytes} bytes); upload started",
        )
        return CreatedFile(file, await self._upload_target(file))

    async def _replay(self, earlier: File, draft: FileDraft) -> CreatedFile:
        if not earlier.matches(draft):
            raise AlreadyExists(
                f"request_id was already used for {earlier.name} with different content",
                reason="REQUEST_ID_REUSED",
                metadata={"file": earlier.name},
            )
        pending = earlier.state is FileState.PENDING
        return CreatedFile(earlier, await self._upload_target(earlier) if pending else None)

    async def _upload_target(self, file: File) -> UploadTarget | None:
        at = self._clock()
        lifetime = url_lifetime(file.upload_expire_time, at)
        if lifetime is None:
            return None
        expire_time = at + lifetime
        if not file.plan.multipart:
            return UploadTarget(self._storage.presign_put(file.object_key, lifetime, at), (), 0, expire_time)
        urls = await self._storage.presign_parts(file.object_key, file.upload_id, file.plan.part_count, lifetime, at)
        return UploadTarget("", tuple(enumerate(urls, start=1)), file.part_size, expire_time)

    async def _assignment(self, principal: Principal, device: str, field: str) -> DeviceAssignment:
        assignment = await self._devices.assignment(device)
        if assignment is None:
            if not principal.sees_every_organization:
                raise _denied(principal, device)  # saying "no such device" would reveal which exist
            raise FailedPrecondition(
                f"device {device!r} does not exist",
                reason="DEVICE_NOT_FOUND",
                metadata={"device": device},
                field_violations=[FieldViolation(field, "names a device that does not exist")],
            )
        return assignment

    # --- complete ----------------------------------------------------------------------------

    async def complete(self, name: str, parts: Sequence[tuple[int, str]]) -> File:
        principal = current_principal()
        principal.require_role(*WRITERS, action="complete uploads")
        return await self._complete(await self._find(principal, name), parts)

    async def complete_for_device(self, device: str, name: str, parts: Sequence[tuple[int, str]]) -> File:
        principal = current_principal()
        principal.require_role(action="complete uploads for a device")  # internal callers only
        file = await self._find(principal, name)
        if file.device != device:
            raise PermissionDenied(
                f"{device} may complete only its own uploads", reason="DEVICE_MISMATCH", metadata={"file": name}
            )
        return await self._complete(file, parts)

    async def _complete(self, file: File, parts: Sequence[tuple[int, str]]) -> File:
        if file.state is not FileState.PENDING:
            if file.state is FileState.AVAILABLE:
                return file  # a retry of a completion that succeeded
            raise _not_pending(file)
        earlier = await self._store.settlement(file.id)
        if earlier is not None:  # decided, but the record was not updated (a crash): finish that
            return _report(await self._apply(file, earlier))
        at = self._clock()
        if at >= file.upload_expire_time:
            return _report(await self._settle(file, Settlement(file.id, Ending.EXPIRED, "", at)))
        if file.plan.multipart:
            await self._assemble(file, parts)
        elif parts:
            require_parts(parts, file.plan)  # names the mistake
        verdict = await self._verify(file)
        if verdict is None:
            # Nothing stored: not uploaded yet, or discarded by a delete or expiry that just won.
            decided = await self._store.settlement(file.id)
            if decided is None:
                raise _nothing_uploaded(file)
            return _report(await self._apply(file, decided))
        ending, reason = verdict
        return _report(await self._settle(file, Settlement(file.id, ending, reason, self._clock())))

    async def _assemble(self, file: File, given: Sequence[tuple[int, str]]) -> None:
        """Completes the multipart upload with every part of the plan (as given, or as stored)."""
        if given:
            parts = require_parts(given, file.plan)
        else:
            stored = await self._storage.uploaded_parts(file.object_key, file.upload_id)
            if stored is None:
                return  # already assembled by an earlier call; the object is checked next
            if not covers_plan(stored, file.plan):
                raise FailedPrecondition(
                    f"{len(stored)} of {file.plan.part_count} parts are uploaded; upload the rest, then complete",
                    reason="UPLOAD_INCOMPLETE",
                    metadata={"file": file.name},
                )
            parts = sorted(stored)
        await self._storage.complete_multipart(file.object_key, file.upload_id, parts)

    async def _verify(self, file: File) -> tuple[Ending, str] | None:
        """The stored object against the declaration: size first (cheap), then SHA-256 (reads it
        all); None when there is no object."""
        size = await self._storage.size(file.object_key)
        if size is None:
            return None
        if size != file.size_bytes:
            return Ending.FAILED, SIZE_MISMATCH
        digest = await self._storage.sha256(file.object_key)
        if digest is None:
            return None
        if digest != file.sha256:
            return Ending.FAILED, CHECKSUM_MISMATCH
        return Ending.AVAILABLE, ""

    # --- settling ----------------------------------------------------------------------------

    async def _settle(self, file: File, proposed: Settlement) -> File | None:
        """Proposes how `file` ends; applies whichever settlement won. None: the file was deleted."""
        return await self._apply(file, await self._store.settle(proposed))

    async def _apply(self, file: File, settlement: Settlement) -> File | None:
        """Brings content and record in line with `settlement`; idempotent, so anyone may (re)run it."""
        if settlement.ending.discards_content:
            await self._discard_upload(file, quietly=False)
            await self._storage.delete(file.object_key)
        if settlement.ending is Ending.DELETED:
            if await self._store.delete(file.id):
                await audit(self._trail, file.organization, file.name, description="file deleted")
            return None
        settled = file.settled(settlement)
        if await self._store.replace(settled, file.revision):
            await audit(self._trail, file.organization, file.name, description=_describe(settlement))
            return settled
        return await self._store.get(file.id)  # someone else applied it (or deleted the file)

    async def _discard_upload(self, file: File, *, quietly: bool = True) -> None:
        if not file.upload_id:
            return
        try:
            await self._storage.abort_multipart(file.object_key, file.upload_id)
        except DomainError:
            if not quietly:
                raise
            # Left to a bucket lifecycle rule that aborts incomplete multipart uploads.
            log.warning("could not abort the multipart upload of %s", file.name, exc_info=True)

    # --- read --------------------------------------------------------------------------------

    async def get(self, name: str) -> File:
        principal = current_principal()
        principal.require_role(*READERS, action="read files")
        return await self._find(principal, name)

    async def list_files(self, parent: str, filter_text: str, page_size: int, page_token: str) -> FilePage:
        organization = parse_parent(parent)
        principal = current_principal()
        # `organizations/-` passes require_access only for platform admins (and internal callers).
        principal.require_access(organization, organization)
        principal.require_role(*READERS, action="list files")
        scope = [] if organization == ALL_ORGANIZATIONS else [Condition("organization", True, organization)]
        files, token = await list_page(self._store, filter_text, FILTER_FIELDS, page_size, page_token, scope)
        return FilePage(files, token)

    async def download_url(self, name: str) -> DownloadUrl:
        principal = current_principal()
        principal.require_role(*READERS, action="download files")
        file = await self._find(principal, name)
        if file.state is not FileState.AVAILABLE:
            raise FailedPrecondition(
                f"file {name!r} is {file.state.value}; only AVAILABLE files can be downloaded",
                reason="FILE_NOT_AVAILABLE",
                metadata={"file": name, "state": file.state.value},
            )
        at = self._clock()
        lifetime = self._policy.download_lifetime
        url = self._storage.presign_get(file.object_key, lifetime, at, file.content_type, content_disposition(file))
        await audit(self._trail, file.organization, file.name, description="download URL issued")
        return DownloadUrl(url, at + lifetime)

    # --- delete ------------------------------------------------------------------------------

    async def delete(self, name: str, etag: str) -> None:
        principal = current_principal()
        principal.require_role(*WRITERS, action="delete files")
        file = await self._find(principal, name)
        check_etag(file.id, file.revision, etag)
        if file.state is FileState.PENDING:
            decided = await self._store.settle(Settlement(file.id, Ending.DELETED, "", self._clock()))
            if decided.ending is Ending.DELETED:
                await self._apply(file, decided)
                return
            # It ended otherwise a moment ago: record that, then delete it as an ended file.
            ended = await self._apply(file, decided)
            if ended is None:
                return
            file = ended
        if file.state is FileState.AVAILABLE:
            principal.require_role(*DELETE_AVAILABLE_ROLES, action="delete verified (AVAILABLE) files")
        # Content first: a record without content can be deleted again; content without a record would leak.
        await self._discard_upload(file, quietly=False)
        await self._storage.delete(file.object_key)
        if await self._store.delete(file.id):
            await audit(self._trail, file.organization, file.name, description="file deleted")

    # --- expiry ------------------------------------------------------------------------------

    async def sweep_expired(self, limit: int = SWEEP_BATCH) -> list[File]:
        """Expires PENDING files past `upload_expire_time` (plus the grace); returns those it expired."""
        principal = current_principal()
        principal.require_role(action="sweep expired uploads")  # internal callers only
        at = self._clock()
        due = [
            Condition("state", True, FileState.PENDING.value),
            Condition("upload_expire_time", True, at - self._policy.sweep_grace, Comparison.LESS),
        ]
        expired: list[File] = []
        for file in await self._store.list(due, None, limit or SWEEP_BATCH):
            try:
                result = await self._settle(file, Settlement(file.id, Ending.EXPIRED, "", at))
            except DomainError:
                log.warning("could not expire %s; next sweep", file.name, exc_info=True)
                continue
            if result is not None and result.state is FileState.EXPIRED:
                expired.append(result)
        return expired

    # --- helpers -----------------------------------------------------------------------------

    async def _find(self, principal: Principal, name: str) -> File:
        file_id = parse_name(name)
        file = await self._store.get(file_id)
        if file is None or not principal.can_access(file.organization):
            if not principal.sees_every_organization:
                raise _denied(principal, name)
            raise NotFound(f"file {name!r} does not exist", reason="FILE_NOT_FOUND", metadata={"file": name})
        return file


def _with_assigned_patient(draft: FileDraft, assignment: DeviceAssignment) -> FileDraft:
    if draft.patient or not assignment.patient:
        return draft
    return replace(draft, patient=assignment.patient)


def _nothing_uploaded(file: File) -> FailedPrecondition:
    return FailedPrecondition(
        f"nothing has been uploaded for {file.name!r} yet; upload the content, then complete",
        reason="UPLOAD_NOT_FOUND",
        metadata={"file": file.name},
    )


def _describe(settlement: Settlement) -> str:
    if settlement.ending is Ending.AVAILABLE:
        return "file verified: AVAILABLE"
    if settlement.ending is Ending.FAILED:
        return f"file failed verification ({settlement.failure_reason}); content deleted"
    return "upload expired; content discarded"


def _report(file: File | None) -> File:
    """What a completion answers once the file has ended: the file, or why it is not AVAILABLE."""
    if file is None:
        raise NotFound("the file was deleted while completing", reason="FILE_NOT_FOUND")
    if file.state is FileState.AVAILABLE:
        return file
    if file.state is FileState.PENDING:  # only if the record was replaced under us; let the caller retry
        raise FailedPrecondition(f"file {file.name!r} is still PENDING; retry", reason="FILE_BUSY")
    raise _not_pending(file)
