"""The shared runtime in a real process: health follows the database, SIGTERM drains, logs are JSON."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medmesh.organization.v1 import organization_service_pb2 as org_pb
from medmesh.organization.v1 import organization_service_pb2_grpc as org_grpc
from medmesh.runtime.settings import Settings
from medmesh.runtime.storage import object_store
from tests.integration.platform import Platform, free_ports


class ServiceProcess:
    def __init__(self, mongodb_uri: str, log_path: Path, base_env: dict[str, str]) -> None:
        (self.port,) = free_ports(1)
        self.log_path = log_path
        env = {
            **base_env,
            "MEDMESH_GRPC_PORT": str(self.port),
            "MEDMESH_MONGODB_URI": mongodb_uri,
            "MEDMESH_HEALTH_INTERVAL_SECONDS": "0.3",
            "MEDMESH_SHUTDOWN_GRACE_SECONDS": "5",
        }
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.organization"], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")

    def health(self, service: str = "") -> int:
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            reply = health_pb2_grpc.HealthStub(self.channel).Check(request, timeout=2)
        except grpc.RpcError:
            return -1
        return int(reply.status)

    def wait_health(self, status: int, within: float = 20) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.health() == status:
                return
            time.sleep(0.1)
        raise AssertionError(f"health never became {status}; log:\n{self.log_path.read_text()}")

    def log_records(self) -> list[dict[str, str]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def close(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


ServiceFactory = Callable[[str], ServiceProcess]


@pytest.fixture
def service_factory(tmp_path: Path, platform: Platform) -> Iterator[ServiceFactory]:
    """Starts organization service processes on free ports (using the platform's identity service
    for token keys); kills any still running afterwards."""
    started: list[ServiceProcess] = []

    def start(mongodb_uri: str) -> ServiceProcess:
        service = ServiceProcess(mongodb_uri, tmp_path / f"service-{len(started)}.log", platform.service_environment())
        started.append(service)
        return service

    yield start
    for service in started:
        service.close()


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_follows_the_database_and_errors_are_logged_with_trace_ids(
    service_factory: ServiceFactory, admin_token: str
) -> None:
    service = service_factory("mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=300")
    service.wait_health(NOT_SERVING)
    assert service.health("medmesh.organization.v1.OrganizationService") == NOT_SERVING
    assert service.health("liveness") == SERVING  # unready, but restarting it would not help
    stub = org_grpc.OrganizationServiceStub(service.channel)
    with pytest.raises(grpc.RpcError) as failure:
        stub.CreateOrganization(
            org_pb.CreateOrganizationRequest(organization=org_pb.Organization(display_name="x")),
            timeout=10,
            metadata=[("authorization", f"Bearer {admin_token}")],
        )
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE, failure.value.details()
    warnings = [r for r in service.log_records() if r["level"] == "WARNING" and "database unavailable" in r["message"]]
    assert warnings
    assert len(warnings[0]["trace_id"]) == 32
    assert warnings[0]["service"] == "organization"


def test_sigterm_turns_health_off_and_exits_cleanly(platform: Platform, service_factory: ServiceFactory) -> None:
    service = service_factory(platform.config.mongodb_uri)
    service.wait_health(SERVING)
    watch = health_pb2_grpc.HealthStub(service.channel).Watch(health_pb2.HealthCheckRequest(), timeout=20)
    assert next(watch).status == SERVING
    service.process.send_signal(signal.SIGTERM)
    assert next(watch).status == NOT_SERVING  # announced before the server goes away
    assert service.process.wait(timeout=15) == 0
    messages = [r["message"] for r in service.log_records()]
    assert any(m.startswith("shutting down: NOT_SERVING") for m in messages)
    assert messages[-1] == "organization stopped"


def test_object_store_client_talks_to_the_embedded_s3(platform: Platform) -> None:
    credentials = platform.config.s3_credentials()
    os.environ.update(
        MEDMESH_S3_ENDPOINT=platform.config.s3_endpoint,
        MEDMESH_S3_ACCESS_KEY=credentials.access_key,
        MEDMESH_S3_SECRET_KEY=credentials.secret_key,
    )
    try:
        store = object_store(Settings.from_env("organization"))
    finally:
        for key in ("MEDMESH_S3_ENDPOINT", "MEDMESH_S3_ACCESS_KEY", "MEDMESH_S3_SECRET_KEY"):
            os.environ.pop(key)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    store.make_bucket(bucket)
    payload = os.urandom(256 * 1024)
    store.put_object(bucket, "waveform.bin", io.BytesIO(payload), len(payload))
    reply = store.get_object(bucket, "waveform.bin")
    try:
        assert reply.read() == payload
    finally:
        reply.close()
        reply.release_conn()
