"""Domain errors: plain Python, raised by domain and service code, mapped to gRPC in one place.

Each error carries a machine-readable `reason` (UPPER_SNAKE, the google.rpc.ErrorInfo
reason), optional metadata and, for bad input, the offending fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """Base class; `code` is the name of the gRPC status code it maps to."""

    code = "UNKNOWN"
    default_reason = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.field_violations = tuple(field_violations)
        # Sent as google.rpc.RetryInfo: when the caller may try again.
        self.retry_after_seconds = retry_after_seconds


class InvalidArgument(DomainError):
    code = "INVALID_ARGUMENT"
    default_reason = "INVALID_ARGUMENT"

    @classmethod
    def for_field(cls, field: str, description: str, *, reason: str = "INVALID_FIELD") -> InvalidArgument:
        return cls(f"{field}: {description}", reason=reason, field_violations=[FieldViolation(field, description)])


class NotFound(DomainError):
    code = "NOT_FOUND"
    default_reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    code = "ALREADY_EXISTS"
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    code = "FAILED_PRECONDITION"
    default_reason = "FAILED_PRECONDITION"


class Aborted(DomainError):
    """A conditional write lost a race, for example an etag that no longer matches."""

    code = "ABORTED"
    default_reason = "ETAG_MISMATCH"


class PermissionDenied(DomainError):
    code = "PERMISSION_DENIED"
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(DomainError):
    code = "UNAUTHENTICATED"
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(DomainError):
    """Too many attempts (for example failed logins); metadata says when to retry."""

    code = "RESOURCE_EXHAUSTED"
    default_reason = "TOO_MANY_ATTEMPTS"


class Internal(DomainError):
    """A bug or an unexpected failure; details go to the log, not to the caller."""

    code = "INTERNAL"
    default_reason = "INTERNAL"


class Unavailable(DomainError):
    """A dependency (database, peer service) cannot be reached; the caller may retry."""

    code = "UNAVAILABLE"
    default_reason = "DEPENDENCY_UNAVAILABLE"
