from __future__ import annotations

import ssl
from collections.abc import Iterator

import grpc
import httpx
import pytest

from tests.integration.platform import Platform, new_platform


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """The whole platform (FerretDB, SeaweedFS, services, adapter, Envoy), once per session."""
    running = new_platform(tmp_path_factory.mktemp("medmesh-state"))
    running.up()
    try:
        yield running
    finally:
        leftovers = running.down()
        assert not leftovers, f"processes left after medmesh down: {leftovers}"


@pytest.fixture(scope="session")
def admin_token(platform: Platform) -> str:
    """An access token of the first platform admin (created by `medmesh up`)."""
    return platform.admin_token()


@pytest.fixture(scope="session")
def anonymous_rest(platform: Platform) -> Iterator[httpx.Client]:
    """REST through the gateway without credentials."""
    context = ssl.create_default_context(cafile=str(platform.ca))
    with httpx.Client(base_url=platform.gateway, verify=context, timeout=10.0) as client:
        yield client


@pytest.fixture(scope="session")
def rest(platform: Platform, admin_token: str) -> Iterator[httpx.Client]:
    """REST through the gateway as the platform admin."""
    context = ssl.create_default_context(cafile=str(platform.ca))
    headers = {"authorization": f"Bearer {admin_token}"}
    with httpx.Client(base_url=platform.gateway, verify=context, timeout=10.0, headers=headers) as client:
        yield client


@pytest.fixture(scope="session")
def gateway_channel(platform: Platform, admin_token: str) -> Iterator[grpc.Channel]:
    """A native gRPC client through Envoy, over TLS trusting the local CA, as the platform admin."""
    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=platform.ca.read_bytes()),
        grpc.access_token_call_credentials(admin_token),
    )
    with grpc.secure_channel(f"localhost:{platform.config.port('gateway')}", credentials) as channel:
        yield channel
