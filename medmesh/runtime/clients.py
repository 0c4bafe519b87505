"""Channels to other services: traced, with retries left to the caller's deadline."""

from __future__ import annotations

import json

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

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


def peer_channel(service: str, address: str | None = None) -> grpc.aio.Channel:
    """An insecure channel inside the mesh (mTLS there is the platform's job, e.g. a service mesh)."""
    target = address or peer_address(service)
    if "://" not in target and not target.startswith(("dns:", "unix:", "ipv4:", "ipv6:")):
        target = f"dns:///{target}"
    return grpc.aio.insecure_channel(
        target,
        interceptors=aio_client_interceptors(),
        options=[("grpc.service_config", _SERVICE_CONFIG), ("grpc.enable_retries", 1)],
    )
