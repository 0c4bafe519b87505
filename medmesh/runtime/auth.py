"""Who is calling: bearer-token verification and the principal every service authorizes against.

Envoy checks the access token at the edge; every service checks it again here (defence in
depth) and keeps the resulting `Principal` in a context variable for the duration of the call.
Calls between services either carry the end user's token (made on their behalf) or, for the
internal-only methods no gateway routes (audit ingest, adapter calls), the mesh's internal
credential.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import jwt
from jwt.algorithms import ECAlgorithm
from opentelemetry import trace

from medmesh.runtime.errors import PermissionDenied, Unauthenticated

ALGORITHM = "ES256"
ALL_ORGANIZATIONS = "organizations/-"
INTERNAL_HEADER = "x-medmesh-internal"
# Methods every service answers without a token: probes.
ALWAYS_PUBLIC = frozenset({"/grpc.health.v1.Health/Check"})


class Role(StrEnum):
    """The roles of the access token's `role` claim."""

    PLATFORM_ADMIN = "platform_admin"
    ORGANIZATION_ADMIN = "organization_admin"
    CLINICIAN = "clinician"
    OPERATOR = "operator"
    PATIENT = "patient"


@dataclass(frozen=True)
class Principal:
    """The caller: a user, a service account, or (for internal methods) another service."""

    subject: str  # organizations/{o}/users/{u}, organizations/{o}/serviceAccounts/{s}, or internal:{service}
    organization: str  # organizations/{o}; empty for internal callers
    role: Role | None  # None for internal callers
    patient: str = ""  # for Role.PATIENT: organizations/{o}/patients/{p}
    token: str = field(default="", repr=False)  # the bearer token, forwarded on calls made on the caller's behalf

    @property
    def is_internal(self) -> bool:
        return self.role is None

    @property
    def is_platform_admin(self) -> bool:
        return self.role is Role.PLATFORM_ADMIN

    @property
    def sees_every_organization(self) -> bool:
        """Platform admins (and internal callers) act across organizations; PHI rules still apply."""
        return self.is_internal or self.is_platform_admin

    def can_access(self, organization: str) -> bool:
        """May act on resources owned by `organization` (PHI rules come on top of this)."""
        return self.sees_every_organization or organization == self.organization

    def require_access(self, organization: str, resource: str = "") -> None:
        """PERMISSION_DENIED unless `can_access`; call before looking the resource up (so before NOT_FOUND)."""
        if not self.can_access(organization):
            raise PermissionDenied(
                f"{self.subject} may not access {resource or organization}",
                reason="ORGANIZATION_ACCESS_DENIED",
                metadata={"resource": resource or organization, "organization": organization},
            )

    def require_role(self, *roles: Role, action: str = "do this") -> None:
        if self.is_internal or self.role in roles:
            return
        raise PermissionDenied(
            f"role {self.role} may not {action}",
            reason="ROLE_NOT_ALLOWED",
            metadata={"role": str(self.role), "allowed": ",".join(sorted(roles))},
        )


@dataclass(frozen=True)
class CallContext:
    """What the audit trail needs to know about the current call."""

    principal: Principal | None  # None in public methods (login, JWKS)
    method: str = ""
    source_ip: str = ""

    @property
    def trace_id(self) -> str:
        context = trace.get_current_span().get_span_context()
        return format(context.trace_id, "032x") if context.is_valid else ""


_current_call: ContextVar[CallContext | None] = ContextVar("medmesh_call", default=None)


def current_call() -> CallContext | None:
    """The call being served, or None in background work."""
    return _current_call.get()


def current_principal() -> Principal:
    call = _current_call.get()
    if call is None or call.principal is None:
        raise Unauthenticated("this call carries no credentials", reason="CREDENTIALS_MISSING")
    return call.principal


@contextmanager
def acting_as(principal: Principal | None, method: str = "", source_ip: str = "") -> Iterator[CallContext]:
    """Runs a block as `principal`: used by the interceptor, background work and tests."""
    call = CallContext(principal, method, source_ip)
    reset = _current_call.set(call)
    try:
        yield call
    finally:
        _current_call.reset(reset)


def manufacturer_organization_id() -> str:
    """The manufacturer's organization id (the platform admins' home), the same in every service."""
    return os.environ.get("MEDMESH_MANUFACTURER_ORGANIZATION", "").strip() or "manufacturer"


def internal_principal(service: str) -> Principal:
    return Principal(subject=f"internal:{service}", organization="", role=None)


# --- tokens -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSettings:
    issuer: str = "medmesh"
    audience: str = "medmesh"
    # Tolerated clock difference between the identity service and a verifier.
    leeway_seconds: float = 5.0

    @classmethod
    def from_env(cls) -> TokenSettings:
        return cls(
            issuer=os.environ.get("MEDMESH_JWT_ISSUER", "").strip() or "medmesh",
            audience=os.environ.get("MEDMESH_JWT_AUDIENCE", "").strip() or "medmesh",
        )


def principal_from_claims(claims: Mapping[str, Any], token: str = "") -> Principal:
    try:
        role = Role(claims["role"])
        return Principal(
            subject=str(claims["sub"]),
            organization=str(claims["org"]),
            role=role,
            patient=str(claims.get("patient", "")),
            token=token,
        )
    except (KeyError, ValueError) as error:
        raise Unauthenticated("the access token lacks medmesh claims", reason="TOKEN_INVALID") from error


class KeySource(Protocol):
    async def public_key(self, kid: str) -> Any | None:
        """The public key with this id, or None if it is not (or no longer) published."""


class TokenVerifier:
    """Verifies ES256 access tokens against published keys and returns their principal.

    A token verified once is remembered (at most `remembered` of them, the least recently used
    forgotten first): a client's next calls with it skip the ES256 signature check, the largest
    cost of authenticating a call. A remembered token is still refused once it expires or once its
    key is no longer published.
    """

    def __init__(self, keys: KeySource, settings: TokenSettings | None = None, remembered: int = 10_000) -> None:
        self._keys = keys
        self._settings = settings or TokenSettings()
        self._remembered = remembered
        self._verified: OrderedDict[str, tuple[str, float, Principal]] = OrderedDict()  # token -> kid, exp, who

    async def verify(self, token: str) -> Principal:
        known = self._verified.get(token)
        if known is not None:
            kid, expires, principal = known
            if time.time() <= expires + self._settings.leeway_seconds and await self._keys.public_key(kid) is not None:
                self._verified.move_to_end(token)
                return principal
            del self._verified[token]  # checked in full below, and refused with the reason why
        principal, kid, expires = await self._verify(token)
        self._verified[token] = (kid, expires, principal)
        while len(self._verified) > self._remembered:
            self._verified.popitem(last=False)
        return principal

    async def _verify(self, token: str) -> tuple[Principal, str, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as error:
            raise Unauthenticated("the access token is malformed", reason="TOKEN_INVALID") from error
        if header.get("alg") != ALGORITHM or not isinstance(header.get("kid"), str):
            raise Unauthenticated(f"access tokens are {ALGORITHM} with a kid", reason="TOKEN_INVALID")
        key = await self._keys.public_key(header["kid"])
        if key is None:
            raise Unauthenticated("the access token's signing key is unknown", reason="TOKEN_KEY_UNKNOWN")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self._settings.audience,
                issuer=self._settings.issuer,
                leeway=self._settings.leeway_seconds,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as error:
            raise Unauthenticated("the access token has expired", reason="TOKEN_EXPIRED") from error
        except jwt.InvalidTokenError as error:
            raise Unauthenticated(f"the access token is invalid: {error}", reason="TOKEN_INVALID") from error
        return principal_from_claims(claims, token), header["kid"], float(claims["exp"])


JwksFetch = Callable[[], Awaitable[list[dict[str, str]]]]


class JwksCache:
    """Published keys fetched from the identity service, refreshed periodically and on an unknown kid.

    A rotated key is published before it signs, so the periodic refresh normally has it in
    time; the refetch on an unknown kid covers a verifier that started between the two, and is
    rate-limited so forged kids cannot hammer the identity service.
    """

    def __init__(self, fetch: JwksFetch, max_age: float = 60.0, min_refetch_interval: float = 1.0) -> None:
        self._fetch = fetch
        self._max_age = max_age
        self._min_refetch = min_refetch_interval
        self._keys: dict[str, Any] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def public_key(self, kid: str) -> Any | None:
        age = time.monotonic() - self._fetched_at
        if kid in self._keys and age < self._max_age:
            return self._keys[kid]
        if kid not in self._keys and age < self._min_refetch:
            return None
        async with self._lock:
            # Another caller may have refreshed while this one waited.
            if time.monotonic() - self._fetched_at >= self._min_refetch:
                await self._refresh()
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        try:
            jwks = await self._fetch()
        except Exception as error:
            if self._keys:  # keep verifying with the keys already known
                self._fetched_at = time.monotonic() - self._max_age + self._min_refetch
                return
            raise Unauthenticated("cannot fetch the token signing keys", reason="SIGNING_KEYS_UNAVAILABLE") from error
        self._keys = {jwk["kid"]: ECAlgorithm.from_jwk(jwk) for jwk in jwks if jwk.get("alg") == ALGORITHM}
        self._fetched_at = time.monotonic()


# --- the server side -------------------------------------------------------------------------


def _bearer(metadata: Mapping[str, str]) -> str:
    value = metadata.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if not value:
        raise Unauthenticated("this call needs an access token (Bearer)", reason="CREDENTIALS_MISSING")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'", reason="TOKEN_INVALID")
    return token.strip()


def source_ip(metadata: Mapping[str, str], peer: str) -> str:
    """The client address: the last X-Forwarded-For entry (appended by the edge gateway), else the peer."""
    forwarded = metadata.get("x-forwarded-for", "")
    if forwarded:
        return forwarded.split(",")[-1].strip()
    # grpc peers look like ipv4:127.0.0.1:5000 or ipv6:[::1]:5000
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


class Authenticator:
    """Decides who is calling a method; used by the shared request interceptor."""

    def __init__(
        self,
        verifier: TokenVerifier,
        *,
        public_methods: frozenset[str] = frozenset(),
        internal_methods: frozenset[str] = frozenset(),
        internal_token: str = "",
    ) -> None:
        self._verifier = verifier
        self._public = public_methods | ALWAYS_PUBLIC
        self._internal = internal_methods
        self._internal_token = internal_token

    def is_public(self, method: str) -> bool:
        return method in self._public

    async def authenticate(self, method: str, metadata: Mapping[str, str]) -> Principal | None:
        """The caller's principal; None for public methods. Raises Unauthenticated."""
        if method in self._public:
            return None
        if method in self._internal:
            presented = metadata.get(INTERNAL_HEADER, "")
            # Fails closed when no internal credential is configured.
            if not self._internal_token or not hmac.compare_digest(presented.encode(), self._internal_token.encode()):
                raise Unauthenticated("internal method: mesh credential missing or wrong", reason="INTERNAL_ONLY")
            return internal_principal(metadata.get("x-medmesh-caller", "unknown"))
        return await self._verifier.verify(_bearer(metadata))


def internal_token_from_env() -> str:
    return os.environ.get("MEDMESH_INTERNAL_TOKEN", "").strip()
