"""Shared runtime: filters, page tokens, error mapping, request validation, and servicer conversions."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
import jwt
import protovalidate
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2
from grpc_status import rpc_status
from pymongo.errors import ConnectionFailure, OperationFailure

from medmesh.device.v1 import device_service_pb2 as device_pb
from medmesh.organization.v1 import organization_service_pb2 as organization_pb
from medmesh.organization.v1 import organization_service_pb2_grpc as organization_pb_grpc
from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import Authenticator, TokenVerifier
from medmesh.runtime.errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from medmesh.runtime.filtering import Condition, Converter, mongo_query, parse_filter
from medmesh.runtime.interceptors import RequestInterceptor, to_rpc_status, validation_error
from medmesh.runtime.mongo import create_query_index
from medmesh.runtime.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, PageRequest, encode_token, page_request
from medmesh.runtime.protoconv import timestamp
from medmesh.runtime.resources import check_etag, etag_of, now, page_of, resolve_update_mask
from medmesh.runtime.tasks import BackgroundTasks, stop_requested
from services.device import servicer as device_servicer
from services.device.domain import Device
from services.organization import servicer as organization_servicer
from services.organization.domain import Organization, OrganizationKind
from services.organization.service import FILTER_FIELDS as ORGANIZATION_FILTER_FIELDS
from services.organization.service import OrganizationService
from tests.rich_status import Details, unpack_details
from tests.unit.fakes import InMemoryRepository


def _state(written: str) -> int:
    try:
        return {"ACTIVE": 1, "RETIRED": 2}[written]
    except KeyError:
        raise ValueError(f"unknown state {written}") from None


FIELDS: dict[str, tuple[str, Converter]] = {
    "display_name": ("display_name", str),
    "organization": ("organization", str),
    "state": ("state_key", _state),
}

# 2024-01-02T03:04:05.678Z and a later moment, as epoch seconds + nanos.
CREATED = datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
CREATED_SECONDS, CREATED_NANOS = 1704164645, 678_000_000
UPDATED = datetime(2024, 6, 1, 0, 0, 0, 1000, tzinfo=UTC)


def filter_violation(text: str, fields: dict[str, tuple[str, Converter]] = FIELDS) -> str:
    with pytest.raises(InvalidArgument) as caught:
        parse_filter(text, fields)
    assert caught.value.reason == "INVALID_FILTER"
    assert [v.field for v in caught.value.field_violations] == ["filter"]
    return caught.value.field_violations[0].description


# --- filter parser --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", "\t\n "])
def test_empty_filter_is_no_conditions(text: str) -> None:
    assert parse_filter(text, FIELDS) == []


def test_quoted_string_with_escaped_quotes_and_backslashes() -> None:
    conditions = parse_filter(r'display_name = "say \"hi\" \\ bye"', FIELDS)
    assert conditions == [Condition("display_name", True, 'say "hi" \\ bye')]


def test_quoted_string_may_contain_keywords_and_operators() -> None:
    conditions = parse_filter('display_name = "a AND b != c = d"', FIELDS)
    assert conditions == [Condition("display_name", True, "a AND b != c = d")]


def test_empty_quoted_string_is_a_value() -> None:
    assert parse_filter('display_name != ""', FIELDS) == [Condition("display_name", False, "")]


def test_enum_word_goes_through_the_converter_to_the_stored_key() -> None:
    assert parse_filter("state = RETIRED", FIELDS) == [Condition("state_key", True, 2)]


def test_bare_word_values_may_hold_slashes_dots_and_dashes() -> None:
    conditions = parse_filter("organization = organizations/clinic-a.b", FIELDS)
    assert conditions == [Condition("organization", True, "organizations/clinic-a.b")]


def test_whitespace_is_free_around_tokens() -> None:
    text = '  state=ACTIVE\tAND\n display_name!="x"   AND organization =  "organizations/a"  '
    assert parse_filter(text, FIELDS) == [
        Condition("state_key", True, 1),
        Condition("display_name", False, "x"),
        Condition("organization", True, "organizations/a"),
    ]


def test_organization_kind_filter_accepts_enum_names_with_and_without_prefix() -> None:
    assert parse_filter("kind = KIND_MANUFACTURER", ORGANIZATION_FILTER_FIELDS) == [
        Condition("kind", True, "MANUFACTURER")
    ]
    assert parse_filter("kind != CARE_PROVIDER", ORGANIZATION_FILTER_FIELDS) == [
        Condition("kind", False, "CARE_PROVIDER")
    ]


def test_unknown_field_names_the_allowed_ones() -> None:
    description = filter_violation('colour = "red"')
    assert "'colour'" in description
    assert "display_name, organization, state" in description


def test_converter_error_names_the_field() -> None:
    assert "state" in filter_violation("state = GONE")


@pytest.mark.parametrize(
    "text",
    [
        'display_name = "x" and state = ACTIVE',  # AND is upper case
        'display_name = "x" OR state = ACTIVE',
        'display_name = "x" state = ACTIVE',
        'display_name = "x" AND',
        "AND display_name = x",
        "display_name",
        "display_name =",
        "= x",
        '"display_name" = "x"',
        "display_name = 'x'",
        'display_name = "open',
        "display_name = 42",
        "display_name : x",
        "NOT display_name = x",
        "display_name = x extra",
    ],
)
def test_malformed_filters_are_rejected(text: str) -> None:
    filter_violation(text)


@pytest.mark.parametrize("text", ["display_name = =", "display_name != !="])
def test_an_operator_is_not_a_value(text: str) -> None:
    filter_violation(text)


def test_condition_matches_equal_and_not_equal() -> None:
    organization = Organization("a", "Acme", OrganizationKind.MANUFACTURER, CREATED, CREATED)
    assert Condition("kind", True, "MANUFACTURER").matches(organization)
    assert not Condition("kind", False, "MANUFACTURER").matches(organization)
    assert Condition("display_name", False, "Other").matches(organization)
    assert not Condition("display_name", True, "Other").matches(organization)


def test_mongo_query_shapes() -> None:
    equal = Condition("model", True, "PO-200")
    not_equal = Condition("organization", False, "organizations/a")

    assert mongo_query([]) == {}
    assert mongo_query([equal]) == {"model": "PO-200"}
    assert mongo_query([not_equal]) == {"organization": {"$ne": "organizations/a"}}
    assert mongo_query([equal, not_equal]) == {
        "$and": [{"model": "PO-200"}, {"organization": {"$ne": "organizations/a"}}]
    }


def test_mongo_query_of_a_parsed_filter() -> None:
    conditions = parse_filter('state = ACTIVE AND display_name != "x"', FIELDS)
    assert mongo_query(conditions) == {"$and": [{"state_key": 1}, {"display_name": {"$ne": "x"}}]}


# --- page tokens ----------------------------------------------------------------------------------


def decode(token: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))


def encode(data: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def page_token_violation(token: str, query: str) -> str:
    with pytest.raises(InvalidArgument) as caught:
        page_request(10, token, query)
    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    assert [v.field for v in caught.value.field_violations] == ["page_token"]
    return caught.value.field_violations[0].description


@pytest.mark.parametrize("after", ["org-3", "SN/with spaces & ünïcode", ""])
def test_page_token_round_trip(after: str) -> None:
    query = 'model = "PO-200"'
    token = encode_token(after, query)

    assert re.fullmatch(r"[A-Za-z0-9_-]+", token), "tokens must be URL-safe and unpadded"
    assert page_request(25, token, query) == PageRequest(size=25, after=after)


def test_page_request_without_token_starts_at_the_beginning() -> None:
    assert page_request(7, "", "x") == PageRequest(size=7, after=None)


@pytest.mark.parametrize(
    ("requested", "size"), [(0, DEFAULT_PAGE_SIZE), (1, 1), (MAX_PAGE_SIZE, MAX_PAGE_SIZE), (5000, MAX_PAGE_SIZE)]
)
def test_page_size_defaults_and_caps(requested: int, size: int) -> None:
    assert page_request(requested, "", "").size == size


def test_page_token_from_another_query_is_rejected() -> None:
    token = encode_token("org-3", 'kind = "A"')
    assert "different filter" in page_token_violation(token, 'kind = "B"')


def test_page_token_with_a_tampered_fingerprint_is_rejected() -> None:
    token = encode_token("org-3", "")
    data = decode(token)
    data["q"] = "0" * 16

    page_token_violation(encode(data), "")


@pytest.mark.parametrize(
    "token",
    [
        "garbage!",
        "e30",  # {}
        encode({"a": 3, "q": "x"}),
        encode({"a": "x", "q": None}),
        encode(["a", "q"]),
        encode("just a string"),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    ],
)
def test_malformed_page_tokens_are_rejected(token: str) -> None:
    assert "not a token this service issued" in page_token_violation(token, "")


def test_truncated_page_token_is_rejected() -> None:
    token = encode_token("org-3", "")
    page_token_violation(token[:-5], "")


def test_page_of_returns_a_token_only_when_more_items_exist() -> None:
    organizations = [Organization(f"o-{i}", "x", OrganizationKind.MANUFACTURER, CREATED, CREATED) for i in range(4)]
    page = PageRequest(size=3, after=None)

    kept, token = page_of(organizations, page, "q")
    assert [o.id for o in kept] == ["o-0", "o-1", "o-2"]
    assert page_request(3, token, "q").after == "o-2"

    assert page_of(organizations[:3], page, "q") == (organizations[:3], "")


# --- etags, masks, clock --------------------------------------------------------------------------


def test_etag_depends_on_id_and_revision() -> None:
    etag = etag_of("acme", 1)
    assert re.fullmatch(r"[0-9a-f]{16}", etag)
    assert etag == etag_of("acme", 1)
    assert etag != etag_of("acme", 2)
    assert etag != etag_of("acme2", 1)


def test_check_etag() -> None:
    check_etag("acme", 3, "")
    check_etag("acme", 3, etag_of("acme", 3))
    with pytest.raises(Aborted) as caught:
        check_etag("acme", 3, etag_of("acme", 2))
    assert (caught.value.code, caught.value.reason) == ("ABORTED", "ETAG_MISMATCH")
    assert caught.value.metadata == {"resource": "acme"}


def test_update_mask_star_means_every_updatable_field() -> None:
    assert resolve_update_mask(["*"], ("a", "b"), "thing") == {"a", "b"}
    assert resolve_update_mask(["b"], ("a", "b"), "thing") == {"b"}


def test_now_is_utc_with_millisecond_precision() -> None:
    moment = now()
    assert moment.tzinfo is UTC
    assert moment.microsecond % 1000 == 0
    assert abs((datetime.now(UTC) - moment).total_seconds()) < 5


# --- errors to google.rpc.Status ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code", "grpc_code"),
    [
        (DomainError("x"), 2, grpc.StatusCode.UNKNOWN),
        (InvalidArgument("x"), 3, grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("x"), 5, grpc.StatusCode.NOT_FOUND),
        (AlreadyExists("x"), 6, grpc.StatusCode.ALREADY_EXISTS),
        (PermissionDenied("x"), 7, grpc.StatusCode.PERMISSION_DENIED),
        (FailedPrecondition("x"), 9, grpc.StatusCode.FAILED_PRECONDITION),
        (Aborted("x"), 10, grpc.StatusCode.ABORTED),
        (Internal("x"), 13, grpc.StatusCode.INTERNAL),
        (Unavailable("x"), 14, grpc.StatusCode.UNAVAILABLE),
        (Unauthenticated("x"), 16, grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_status_code_numbers(error: DomainError, code: int, grpc_code: grpc.StatusCode) -> None:
    status = to_rpc_status(error, "test.medmesh")

    assert status.code == code
    assert rpc_status.to_status(status).code == grpc_code
    infos, bad_requests = unpack_details(status)
    assert [(i.reason, i.domain) for i in infos] == [(error.default_reason, "test.medmesh")]
    assert bad_requests == []


def test_status_carries_message_reason_domain_and_metadata() -> None:
    error = NotFound(
        "organization 'x' does not exist", reason="ORGANIZATION_NOT_FOUND", metadata={"organization": "organizations/x"}
    )

    status = to_rpc_status(error, "organization.medmesh")

    assert (status.code, status.message) == (code_pb2.NOT_FOUND, "organization 'x' does not exist")
    assert len(status.details) == 1
    (info,), _ = unpack_details(status)
    assert (info.reason, info.domain) == ("ORGANIZATION_NOT_FOUND", "organization.medmesh")
    assert dict(info.metadata) == {"organization": "organizations/x"}


def test_status_has_a_bad_request_only_with_field_violations() -> None:
    error = InvalidArgument(
        "two problems",
        reason="INVALID_REQUEST",
        field_violations=[FieldViolation("device_id", "bad"), FieldViolation("device.organization", "worse")],
    )

    status = to_rpc_status(error, "device.medmesh")

    infos, bad_requests = unpack_details(status)
    assert [i.reason for i in infos] == ["INVALID_REQUEST"]
    assert len(bad_requests) == 1
    assert [(v.field, v.description) for v in bad_requests[0].field_violations] == [
        ("device_id", "bad"),
        ("device.organization", "worse"),
    ]
    # A failed precondition may also name a field; other errors without violations get no BadRequest.
    precondition = FailedPrecondition("x", field_violations=[FieldViolation("device.organization", "missing")])
    assert len(unpack_details(to_rpc_status(precondition, "d"))[1]) == 1
    assert unpack_details(to_rpc_status(InvalidArgument("no fields"), "d"))[1] == []


# --- protovalidate violations to InvalidArgument --------------------------------------------------

VALIDATOR = protovalidate.Validator()


def validated(request: device_pb.CreateDeviceRequest) -> InvalidArgument:
    violations = VALIDATOR.collect_violations(request)
    assert violations, "expected the request to be invalid"
    return validation_error(request, violations)


def test_validation_error_names_a_top_level_field() -> None:
    error = validated(
        device_pb.CreateDeviceRequest(device_id="bad id", device=device_pb.Device(organization="organizations/a"))
    )

    assert (error.code, error.reason) == ("INVALID_ARGUMENT", "INVALID_REQUEST")
    assert [v.field for v in error.field_violations] == ["device_id"]
    assert "pattern" in error.field_violations[0].description
    assert error.message.startswith("invalid CreateDeviceRequest: device_id: ")


def test_validation_error_names_a_nested_field_with_its_path() -> None:
    error = validated(device_pb.CreateDeviceRequest(device_id="SN-1", device=device_pb.Device(organization="clinic")))

    assert [v.field for v in error.field_violations] == ["device.organization"]


def test_validation_error_lists_every_violation() -> None:
    error = validated(
        device_pb.CreateDeviceRequest(device_id="bad id", device=device_pb.Device(organization="x", model="m" * 101))
    )

    assert sorted(v.field for v in error.field_violations) == ["device.model", "device.organization", "device_id"]


def test_validation_error_for_a_missing_required_message() -> None:
    error = validated(device_pb.CreateDeviceRequest(device_id="SN-1"))

    assert [(v.field, v.description) for v in error.field_violations] == [("device", "value is required")]


def test_a_valid_request_has_no_violations() -> None:
    request = device_pb.CreateDeviceRequest(device_id="SN-1", device=device_pb.Device(organization="organizations/a"))
    assert VALIDATOR.collect_violations(request) == []


# --- the interceptor end to end -------------------------------------------------------------------


class BrokenRepository(InMemoryRepository[Organization]):
    failure: Exception = RuntimeError("boom")

    async def get(self, resource_id: str) -> Organization | None:
        if resource_id.startswith("broken"):
            raise self.failure
        return await super().get(resource_id)


class StaticKeys:
    """A key source holding one key pair's public half, as the JWKS would."""

    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())

    async def public_key(self, kid: str) -> Any | None:
        return self.private.public_key() if kid == "k1" else None

    def token(self, **claims: Any) -> str:
        at = int(time.time())
        body = {"iss": "medmesh", "aud": "medmesh", "iat": at, "exp": at + 60, **claims}
        return jwt.encode(body, self.private, algorithm="ES256", headers={"kid": "k1"})


ADMIN_CLAIMS = {
    "sub": "organizations/manufacturer/users/admin",
    "org": "organizations/manufacturer",
    "role": "platform_admin",
}


class BearerToken(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ())]
        if self.token:
            metadata.append(("authorization", f"Bearer {self.token}"))
        forwarded = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        return await continuation(forwarded, request)


@pytest.fixture
async def organization_server() -> AsyncIterator[tuple[int, BrokenRepository, StaticKeys]]:
    """The organization servicer behind the shared interceptor, authenticating with a test key."""
    store = BrokenRepository("organization")
    keys = StaticKeys()
    authenticator = Authenticator(TokenVerifier(keys), public_methods=frozenset())
    server = grpc.aio.server(interceptors=[RequestInterceptor("organization.medmesh", authenticator)])
    service = OrganizationService(store, RecordingAuditTrail(), "manufacturer")
    organization_pb_grpc.add_OrganizationServiceServicer_to_server(  # type: ignore[no-untyped-call]
        organization_servicer.OrganizationServicer(service), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, store, keys
    finally:
        await server.stop(grace=None)


@pytest.fixture
async def organization_stub(
    organization_server: tuple[int, BrokenRepository, StaticKeys],
) -> AsyncIterator[tuple[Any, BrokenRepository]]:
    port, store, keys = organization_server
    interceptors = [BearerToken(keys.token(**ADMIN_CLAIMS))]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=interceptors) as channel:
        yield organization_pb_grpc.OrganizationServiceStub(channel), store  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "CREDENTIALS_MISSING"),
        ("not-a-jwt", "TOKEN_INVALID"),
        ("expired", "TOKEN_EXPIRED"),
        ("unknown-kid", "TOKEN_KEY_UNKNOWN"),
    ],
)
async def test_interceptor_authenticates_before_validating(
    organization_server: tuple[int, BrokenRepository, StaticKeys], token: str, reason: str
) -> None:
    port, _, keys = organization_server
    if token == "expired":
        token = keys.token(**ADMIN_CLAIMS, exp=int(time.time()) - 600)
    elif token == "unknown-kid":
        token = jwt.encode({**ADMIN_CLAIMS}, keys.private, algorithm="ES256", headers={"kid": "k2"})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=[BearerToken(token)]) as channel:
        stub = organization_pb_grpc.OrganizationServiceStub(channel)  # type: ignore[no-untyped-call]
        # An invalid request: without valid credentials it is UNAUTHENTICATED, not INVALID_ARGUMENT.
        code, infos, _ = await call_status(stub.GetOrganization(organization_pb.GetOrganizationRequest(name="x")))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert [i.reason for i in infos] == [reason]


async def test_handlers_see_the_callers_principal(
    organization_server: tuple[int, BrokenRepository, StaticKeys],
) -> None:
    port, _, keys = organization_server
    clinician = {"sub": "organizations/a/users/c", "org": "organizations/a", "role": "clinician"}
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", interceptors=[BearerToken(keys.token(**clinician))]
    ) as channel:
        stub = organization_pb_grpc.OrganizationServiceStub(channel)  # type: ignore[no-untyped-call]
        request = organization_pb.GetOrganizationRequest(name="organizations/b")
        code, infos, _ = await call_status(stub.GetOrganization(request))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert [i.reason for i in infos] == ["ORGANIZATION_ACCESS_DENIED"]


async def call_status(call: Any) -> tuple[grpc.StatusCode, *Details]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    status = rpc_status.from_call(caught.value)
    assert status is not None, "the reply carries no google.rpc.Status"
    return caught.value.code(), *unpack_details(status)


async def test_interceptor_rejects_an_invalid_request_before_the_handler(
    organization_stub: tuple[Any, BrokenRepository],
) -> None:
    stub, _ = organization_stub

    code, infos, bad_requests = await call_status(
        stub.GetOrganization(organization_pb.GetOrganizationRequest(name="broken/Nope"))
    )

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [(i.reason, i.domain) for i in infos] == [("INVALID_REQUEST", "organization.medmesh")]
    assert [v.field for v in bad_requests[0].field_violations] == ["name"]


async def test_interceptor_maps_domain_errors(organization_stub: tuple[Any, BrokenRepository]) -> None:
    stub, _ = organization_stub

    code, infos, bad_requests = await call_status(
        stub.GetOrganization(organization_pb.GetOrganizationRequest(name="organizations/ghost"))
    )

    assert code == grpc.StatusCode.NOT_FOUND
    assert [i.reason for i in infos] == ["ORGANIZATION_NOT_FOUND"]
    assert bad_requests == []


@pytest.mark.parametrize(
    ("failure", "code", "reason"),
    [
        (RuntimeError("boom"), grpc.StatusCode.INTERNAL, "INTERNAL"),
        (ConnectionFailure("db down"), grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE"),
        # FerretDB's SQLite, overloaded: writers waited past the busy timeout.
        (
            OperationFailure("UpdateAll: database is locked (5) (SQLITE_BUSY)", code=1),
            grpc.StatusCode.UNAVAILABLE,
            "DATABASE_UNAVAILABLE",
        ),
        (OperationFailure("unknown operator: $frob", code=2), grpc.StatusCode.INTERNAL, "INTERNAL"),
    ],
)
async def test_interceptor_maps_unexpected_failures(
    organization_stub: tuple[Any, BrokenRepository], failure: Exception, code: grpc.StatusCode, reason: str
) -> None:
    stub, store = organization_stub
    store.failure = failure

    got_code, infos, _ = await call_status(
        stub.GetOrganization(organization_pb.GetOrganizationRequest(name="organizations/broken"))
    )

    assert got_code == code
    assert [i.reason for i in infos] == [reason]


# --- servicer conversions -------------------------------------------------------------------------


def assert_timestamp(stamp: Timestamp, moment: datetime) -> None:
    assert stamp.ToDatetime(tzinfo=UTC) == moment


def test_timestamp_conversion() -> None:
    stamp = timestamp(CREATED)
    assert (stamp.seconds, stamp.nanos) == (CREATED_SECONDS, CREATED_NANOS)


@pytest.mark.parametrize(
    ("kind", "pb_kind"),
    [
        (OrganizationKind.MANUFACTURER, organization_pb.Organization.KIND_MANUFACTURER),
        (OrganizationKind.CARE_PROVIDER, organization_pb.Organization.KIND_CARE_PROVIDER),
    ],
)
def test_organization_to_pb(kind: OrganizationKind, pb_kind: int) -> None:
    organization = Organization("acme", "Acme", kind, CREATED, UPDATED, revision=4)

    message = organization_servicer.to_pb(organization)

    assert message.name == "organizations/acme"
    assert message.display_name == "Acme"
    assert message.kind == pb_kind
    assert (message.create_time.seconds, message.create_time.nanos) == (CREATED_SECONDS, CREATED_NANOS)
    assert_timestamp(message.update_time, UPDATED)
    assert message.etag == etag_of("acme", 4)


def test_every_organization_kind_has_a_protobuf_kind() -> None:
    kinds = {
        organization_servicer.to_pb(Organization("a", "A", kind, CREATED, CREATED)).kind for kind in OrganizationKind
    }
    assert organization_pb.Organization.KIND_UNSPECIFIED not in kinds
    assert len(kinds) == len(OrganizationKind)


def test_device_to_pb() -> None:
    device = Device("SN-1", "organizations/a", "Bed 3", "PO-200", CREATED, UPDATED, revision=2)

    message = device_servicer.to_pb(device)

    assert (message.name, message.organization, message.display_name, message.model) == (
        "devices/SN-1",
        "organizations/a",
        "Bed 3",
        "PO-200",
    )
    assert (message.create_time.seconds, message.create_time.nanos) == (CREATED_SECONDS, CREATED_NANOS)
    assert_timestamp(message.update_time, UPDATED)
    assert message.etag == etag_of("SN-1", 2)
    assert message.etag != device_servicer.to_pb(Device("SN-1", "organizations/a", "", "", CREATED, UPDATED, 3)).etag


# --- background loops -----------------------------------------------------------------------------


async def test_a_loop_stops_when_cancelled_even_if_a_library_swallows_the_cancellation() -> None:
    rounds = 0

    async def swallowing_call() -> None:
        # What PyMongo's server selection does with a cancellation while the database is down.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)

    async def loop() -> None:
        nonlocal rounds
        while not stop_requested():
            rounds += 1
            await swallowing_call()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.12)
    task.cancel()
    await asyncio.wait_for(task, 1)  # returns instead of looping on
    assert rounds >= 2


# --- query indexes --------------------------------------------------------------------------------


class _Admin:
    def __init__(self, build_info: dict[str, Any]) -> None:
        self.build_info = build_info

    async def command(self, name: str) -> dict[str, Any]:
        assert name == "buildInfo"
        return self.build_info


class _Collection:
    """Just what create_query_index touches: the backend's buildInfo and create_index."""

    def __init__(self, build_info: dict[str, Any]) -> None:
        client = type("Client", (), {"admin": _Admin(build_info)})()
        self.database = type("Database", (), {"client": client})()
        self.created: list[list[tuple[str, int]]] = []

    async def create_index(self, keys: list[tuple[str, int]]) -> None:
        self.created.append(keys)


@pytest.mark.parametrize(
    ("build_info", "created"),
    [
        ({"version": "7.0.14"}, [[("device", 1), ("time", 1)]]),  # MongoDB
        ({"version": "7.0.42", "ferretdbFeatures": {}}, []),  # FerretDB: it would scan anyway
    ],
)
async def test_query_indexes_are_made_where_the_backend_uses_them(
    build_info: dict[str, Any], created: list[list[tuple[str, int]]]
) -> None:
    collection = _Collection(build_info)

    await create_query_index(collection, [("device", 1), ("time", 1)])  # type: ignore[arg-type]

    assert collection.created == created


async def test_background_tasks_are_kept_until_done_and_cancelled_on_close() -> None:
    tasks = BackgroundTasks()
    finished = asyncio.Event()

    async def quick() -> None:
        finished.set()

    async def forever() -> None:
        await asyncio.Event().wait()

    tasks.spawn(quick())
    hanging = tasks.spawn(forever())
    await finished.wait()
    await asyncio.sleep(0)

    await tasks.close()

    assert hanging.cancelled()
