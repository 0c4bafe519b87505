"""The server interceptor every service runs: validate, call, map errors to rich status."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import grpc
import protovalidate
from google.protobuf import message as pb_message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from pymongo.errors import ConnectionFailure, OperationFailure

from medmesh.runtime.auth import Authenticator, acting_as, source_ip
from medmesh.runtime.errors import DomainError, FieldViolation, Internal, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _busy(error: OperationFailure) -> bool:
    """FerretDB's SQLite answers `database is locked` when writers wait past its busy timeout:
    overload, not a bug, so the caller is told to retry (UNAVAILABLE) rather than INTERNAL."""
    return "SQLITE_BUSY" in str(error) or "database is locked" in str(error)


def to_rpc_status(error: DomainError, domain: str) -> status_pb2.Status:
    """The one mapping from a domain error to google.rpc.Status with exactly one ErrorInfo
    (plus BadRequest for bad fields and RetryInfo when the caller may retry later)."""
    status = status_pb2.Status(code=code_pb2.Code.Value(error.code), message=error.message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=domain, metadata=error.metadata))
    if error.retry_after_seconds is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromTimedelta(timedelta(seconds=error.retry_after_seconds))
        status.details.add().Pack(retry)
    if error.field_violations:
        status.details.add().Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in error.field_violations
                ]
            )
        )
    return status


def _field_path(violation: protovalidate.Violation) -> str:
    path = ""
    field = violation.proto.field
    for element in field.elements if field is not None else []:
        path += ("." if path else "") + element.field_name
        subscript = element.subscript
        if subscript is not None and getattr(subscript, "value", None) is not None:
            path += f"[{subscript.value}]"
    return path


def validation_error(message: pb_message.Message, violations: list[protovalidate.Violation]) -> InvalidArgument:
    fields = [FieldViolation(_field_path(v), v.proto.message or v.proto.rule_id) for v in violations]
    summary = "; ".join(f"{f.field}: {f.description}" for f in fields)
    return InvalidArgument(
        f"invalid {message.DESCRIPTOR.name}: {summary}", reason="INVALID_REQUEST", field_violations=fields
    )


class RequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates the caller, runs protovalidate, calls the handler, turns errors into rich status.

    The caller is known (or refused with UNAUTHENTICATED) before the request is validated, and
    the handler runs with the caller's principal in `medmesh.runtime.auth.current_principal()`.
    Handlers raise DomainError; nothing else in a service knows about status codes.
    An unexpected exception is logged with its trace and answered as INTERNAL with an
    ErrorInfo, never with an empty reply.
    """

    def __init__(self, error_domain: str, authenticator: Authenticator | None = None) -> None:
        self._domain = error_domain
        self._validator = protovalidate.Validator()
        self._authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            # Streaming methods (reflection, Health.Watch) pass through unchanged; medmesh's own
            # APIs are unary, so every one of them is authenticated below.
            return handler
        inner: Behavior = handler.unary_unary
        method = handler_call_details.method

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                metadata = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
                principal = None
                if self._authenticator is not None:
                    principal = await self._authenticator.authenticate(method, metadata)
                with acting_as(principal, method, source_ip(metadata, context.peer() or "")):
                    violations = self._validator.collect_violations(request)
                    if violations:
                        raise validation_error(request, violations)
                    return await inner(request, context)
            except DomainError as error:
                await context.abort_with_status(rpc_status.to_status(to_rpc_status(error, self._domain)))
            except (ConnectionFailure, OperationFailure) as error:
                if isinstance(error, OperationFailure) and not _busy(error):
                    log.exception("unhandled error in %s", method)
                    internal = Internal("internal error; the service log has the details")
                    await context.abort_with_status(rpc_status.to_status(to_rpc_status(internal, self._domain)))
                log.warning("database unavailable in %s: %s", method, error)
                unavailable = Unavailable(
                    "the service's database is unavailable, retry later", reason="DATABASE_UNAVAILABLE"
                )
                await context.abort_with_status(rpc_status.to_status(to_rpc_status(unavailable, self._domain)))
            except grpc.aio.AbortError:
                raise
            except Exception:
                log.exception("unhandled error in %s", method)
                internal = Internal("internal error; the service log has the details")
                await context.abort_with_status(rpc_status.to_status(to_rpc_status(internal, self._domain)))

        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
