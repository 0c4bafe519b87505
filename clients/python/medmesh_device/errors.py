"""Exceptions the SDK raises or hands to the `on_error` callback. All derive from `DeviceError`."""

from __future__ import annotations

from dataclasses import dataclass


class DeviceError(Exception):
    """Base class of everything the device SDK reports."""


class InvalidMessage(DeviceError, ValueError):
    """Something the caller asked to send breaks the protocol (bad metric, id, size...); not sent."""


class ClientClosed(DeviceError):
    """The client was stopped before the operation finished."""


class OutboxFull(DeviceError):
    """Too many observations wait for their acks; the platform or the link is behind."""


class ConnectionRefused(DeviceError):
    """The adapter refused the connection (CONNACK return code `code`)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"connection refused (CONNACK {code}): {message}")
        self.code = code


class NotAuthorized(ConnectionRefused):
    """CONNACK 5 (or 4): unknown, revoked or expired certificate or credentials, or wrong client id.

    Retried at most once a minute: the credentials will not get better by themselves."""


class ServerUnavailable(ConnectionRefused):
    """CONNACK 3: the platform could not check the device now; retried with back-off."""


class ConnectionLost(DeviceError):
    """The connection could not be made or was lost; the client reconnects with back-off."""


class SubscriptionRefused(DeviceError):
    """The adapter refused a subscription to one of the device's own topics (SUBACK 0x80)."""


@dataclass(frozen=True)
class Rejection:
    """One observation the platform refused; it will be refused again, so it is not resent."""

    id: str
    reason: str
    description: str = ""


class CloudError(DeviceError):
    """A message on the device's `errors` topic: why something the device sent was refused."""

    def __init__(
        self,
        topic: str,
        reason: str,
        description: str = "",
        rejected: tuple[Rejection, ...] = (),
        retry_after_seconds: float | None = None,
        message_ids: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(f"{reason} on {topic or '?'}: {description}" if description else f"{reason} on {topic or '?'}")
        self.topic = topic
        self.reason = reason
        self.description = description
        self.rejected = rejected
        self.retry_after_seconds = retry_after_seconds
        self.message_ids = message_ids  # UNAVAILABLE: the observations not stored, when given


class MalformedCloudMessage(DeviceError):
    """The platform sent something this SDK cannot read (not JSON, missing fields)."""

    def __init__(self, topic: str, problem: str) -> None:
        super().__init__(f"cannot read the message on {topic}: {problem}")
        self.topic = topic
        self.problem = problem


class HandlerError(DeviceError):
    """A callback of the application (configuration) raised; the exception is the __cause__."""

    def __init__(self, handler: str, error: BaseException) -> None:
        super().__init__(f"{handler} handler failed: {type(error).__name__}: {error}")
        self.handler = handler


class UploadError(DeviceError):
    """A file upload failed: refused by the platform (`reason` from `files/responses`) or by storage."""

    def __init__(self, reason: str, description: str = "", file: str = "") -> None:
        super().__init__(f"{reason}: {description}" if description else reason)
        self.reason = reason
        self.description = description
        self.file = file
