"""Channels to other services: traced, credentialed, with retries left to the caller's deadline."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from medmesh.identity.v1 import authentication_service_pb2 as auth_pb
from medmesh.identity.v1 import authentication_service_pb2_grpc as auth_pb_grpc
from medmesh.runtime.auth import (
    INTERNAL_HEADER,
    Authenticator,
    JwksCache,
    TokenSettings,
    TokenVerifier,
    current_call,
    internal_token_from_env,
)
from medmesh.runtime.settings import peer_address

# Transparent retry of UNAVAILABLE, so a rolling restart of a peer is not an error.
_SERVICE_CONFIG = json.dumps(
    {
        # Every address DNS returns (a headless Kubernetes Service: every ready pod), per call.
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


class CallerCredentials(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Calls made while serving a request carry that request's bearer token and client address,
    so the peer authorizes (and audits) the original caller, not the service in between. Every
    call also carries the mesh's internal credential, which only internal-only methods accept.
    """

    def __init__(self, caller: str, internal_token: str) -> None:
        self._caller = caller
        self._internal_token = internal_token

    async def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Awaitable[Any]], details: Any, request: Any
    ) -> Any:
        metadata = list(details.metadata or ())
        present = {key for key, _ in metadata}
        call = current_call()
        if call is not None:
            if "authorization" not in present and call.principal is not None and call.principal.token:
                metadata.append(("authorization", f"Bearer {call.principal.token}"))
            if "x-forwarded-for" not in present and call.source_ip:
                metadata.append(("x-forwarded-for", call.source_ip))
        if self._internal_token and INTERNAL_HEADER not in present:
            metadata += [(INTERNAL_HEADER, self._internal_token), ("x-medmesh-caller", self._caller)]
        forwarded = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        return await continuation(forwarded, request)


def peer_channel(service: str, address: str | None = None, *, caller: str = "") -> grpc.aio.Channel:
    """An insecure channel inside the mesh (mTLS there is the platform's job, e.g. a service mesh)."""
    target = address or peer_address(service)
    if "://" not in target and not target.startswith(("dns:", "unix:", "ipv4:", "ipv6:")):
        target = f"dns:///{target}"
    return grpc.aio.insecure_channel(
        target,
        interceptors=[*aio_client_interceptors(), CallerCredentials(caller, internal_token_from_env())],
        options=[
            ("grpc.service_config", _SERVICE_CONFIG),
            ("grpc.enable_retries", 1),
            # gRPC's default reconnect backoff grows to 120 s: a peer back from an outage would
            # wait that long for its callers (for example queued audit events) to notice.
            ("grpc.max_reconnect_backoff_ms", 5000),
        ],
    )


def jwks_fetcher(identity: grpc.aio.Channel, timeout: float = 3.0) -> Callable[[], Awaitable[list[dict[str, str]]]]:
    """Fetches the published token keys from the identity service."""
    stub = auth_pb_grpc.AuthenticationServiceStub(identity)

    async def fetch() -> list[dict[str, str]]:
        reply = await stub.GetJsonWebKeySet(auth_pb.GetJsonWebKeySetRequest(), timeout=timeout)
        return [
            {"kty": k.kty, "crv": k.crv, "x": k.x, "y": k.y, "kid": k.kid, "alg": k.alg, "use": k.use}
            for k in reply.keys
        ]

    return fetch


def service_authenticator(
    identity: grpc.aio.Channel,
    *,
    public_methods: frozenset[str] = frozenset(),
    internal_methods: frozenset[str] = frozenset(),
) -> Authenticator:
    """The authenticator of a service other than identity: keys from identity, settings from env."""
    verifier = TokenVerifier(JwksCache(jwks_fetcher(identity)), TokenSettings.from_env())
    return Authenticator(
        verifier,
        public_methods=public_methods,
        internal_methods=internal_methods,
        internal_token=internal_token_from_env(),
    )
