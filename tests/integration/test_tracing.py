"""One trace across services: device -> organization over gRPC, and the MongoDB calls under them.

The services export over OTLP to a collector this test runs, so what is checked is
what an operator's collector (Jaeger, Tempo, ...) would receive.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from medmesh.device.v1 import device_service_pb2 as device_pb
from medmesh.device.v1 import device_service_pb2_grpc as device_grpc
from medmesh.organization.v1 import organization_service_pb2 as org_pb
from medmesh.organization.v1 import organization_service_pb2_grpc as org_grpc
from tests.integration.devices import MqttDevice, register_device, tls_context
from tests.integration.people import eventually
from tests.integration.platform import Platform, free_ports
from tests.integration.stores import ServiceProcess


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, bytes, str]] = []  # (service.name, trace id, span name)

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
            )
            for scope in resource_spans.scope_spans:
                self.spans += [(service, span.trace_id, span.name) for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


def _serving(address: str, within: float = 20) -> None:
    deadline = time.monotonic() + within
    with grpc.insecure_channel(address) as channel:
        while time.monotonic() < deadline:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"{address} never became SERVING")


def test_a_request_is_one_trace_across_services_and_database(
    platform: Platform, collector: tuple[Collector, int], tmp_path: Path, admin_token: str
) -> None:
    servicer, collector_port = collector
    organization_port, device_port = free_ports(2)
    bearer = [("authorization", f"Bearer {admin_token}")]
    common = {
        **platform.service_environment(),
        "MEDMESH_MONGODB_URI": platform.config.mongodb_uri,
        "MEDMESH_ORGANIZATION_ADDR": f"127.0.0.1:{organization_port}",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector_port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    processes = []
    for module, port in (("services.organization", organization_port), ("services.device", device_port)):
        log = (tmp_path / f"{module}.log").open("wb")
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", module],
                env={**common, "MEDMESH_GRPC_PORT": str(port)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        _serving(f"127.0.0.1:{organization_port}")
        _serving(f"127.0.0.1:{device_port}")
        with grpc.insecure_channel(f"127.0.0.1:{organization_port}") as channel:
            organization = org_grpc.OrganizationServiceStub(channel).CreateOrganization(
                org_pb.CreateOrganizationRequest(organization=org_pb.Organization(display_name="Traced")),
                timeout=10,
                metadata=bearer,
            )
        with grpc.insecure_channel(f"127.0.0.1:{device_port}") as channel:
            device_grpc.DeviceServiceStub(channel).CreateDevice(
                device_pb.CreateDeviceRequest(
                    device_id=f"TRACE-{uuid.uuid4().hex[:8]}", device=device_pb.Device(organization=organization.name)
                ),
                timeout=10,
                metadata=bearer,
            )

        def create_device_trace() -> dict[str, set[str]]:
            traces: dict[bytes, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
            for service, trace_id, name in servicer.spans:
                traces[trace_id][service].add(name)
            for spans in traces.values():
                if "/medmesh.device.v1.DeviceService/CreateDevice" in spans.get("device", set()):
                    return dict(spans)
            return {}

        deadline = time.monotonic() + 15
        trace = create_device_trace()
        while time.monotonic() < deadline and len(trace.get("organization", set())) < 2:
            time.sleep(0.2)
            trace = create_device_trace()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=20)

    assert trace, f"no CreateDevice trace among {len(servicer.spans)} spans"
    device_spans, organization_spans = trace["device"], trace["organization"]
    # The device service's server span, its client call, and its own database write...
    assert "/medmesh.device.v1.DeviceService/CreateDevice" in device_spans
    assert "/medmesh.organization.v1.OrganizationService/GetOrganization" in device_spans
    assert "medmesh_device.insert" in device_spans
    # ...and, in the same trace, the organization service answering it from its own database.
    assert "/medmesh.organization.v1.OrganizationService/GetOrganization" in organization_spans
    assert "medmesh_organization.find" in organization_spans


def test_an_observation_is_one_trace_from_the_mqtt_adapter_to_the_database_write(
    platform: Platform, collector: tuple[Collector, int], tmp_path: Path, rest: httpx.Client
) -> None:
    servicer, collector_port = collector
    observation_port, adapter_port, mqtt_port = free_ports(3)
    common = {
        **platform.service_environment(),
        "MEDMESH_MONGODB_URI": platform.config.mongodb_uri,
        "MEDMESH_OBSERVATION_ADDR": f"127.0.0.1:{observation_port}",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector_port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    adapter_env = {
        **common,
        "MEDMESH_GRPC_PORT": str(adapter_port),
        "MEDMESH_MQTT_PORT": str(mqtt_port),
        "MEDMESH_MQTT_TLS_CERT_FILE": str(platform.config.tls_dir / "server.crt"),
        "MEDMESH_MQTT_TLS_KEY_FILE": str(platform.config.tls_dir / "server.key"),
    }
    observation = ServiceProcess(
        "services.observation",
        {**common, "MEDMESH_GRPC_PORT": str(observation_port)},
        observation_port,
        "",
        tmp_path / "observation.log",
    )
    adapter = ServiceProcess("mqtt_adapter", adapter_env, adapter_port, "", tmp_path / "adapter.log")
    identity = register_device(rest, tmp_path)
    device = MqttDevice(mqtt_port, identity.device_id, tls_context(platform.ca, identity.cert, identity.key))
    try:
        observation.wait_serving()
        adapter.wait_serving()
        assert device.connect() == "Success"
        device.subscribe_own()
        device.publish(
            "observations",
            {"observations": [{"id": "traced-1", "metric": "heart_rate", "time": "2026-11-24T10:00:00Z", "value": 70}]},
        )
        assert device.expect("acks") == {"stored": ["traced-1"]}

        def observation_trace() -> dict[str, set[str]]:
            traces: dict[bytes, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
            for service, trace_id, name in servicer.spans:
                traces[trace_id][service].add(name)
            for spans in traces.values():
                adapter_spans, observation_spans = spans.get("mqtt_adapter", set()), spans.get("observation", set())
                if "mqtt.observations.write" in adapter_spans and "medmesh_observation.insert" in observation_spans:
                    return dict(spans)
            return {}

        trace = eventually(observation_trace, within=15)
    finally:
        device.close()
        adapter.close()
        observation.close()

    assert trace, f"no trace from the adapter to the observation write among {len(servicer.spans)} spans"
    adapter_spans, observation_spans = trace["mqtt_adapter"], trace["observation"]
    # The write of the batch the message went into, and its call to the observation service...
    assert "mqtt.observations.write" in adapter_spans
    assert "/medmesh.observation.v1.ObservationInternalService/BatchWriteObservations" in adapter_spans
    # ...which answered it, writing to its own database, in the same trace.
    assert "/medmesh.observation.v1.ObservationInternalService/BatchWriteObservations" in observation_spans
    assert "medmesh_observation.insert" in observation_spans
