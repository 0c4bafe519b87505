"""Native gRPC: straight to each service and through Envoy's pass-through, with rich errors."""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from medmesh.device.v1 import device_service_pb2 as device_pb
from medmesh.device.v1 import device_service_pb2_grpc as device_grpc
from medmesh.organization.v1 import organization_service_pb2 as org_pb
from medmesh.organization.v1 import organization_service_pb2_grpc as org_grpc
from tests.integration.platform import Platform
from tests.rich_status import unpack_details

SERVICES = {
    "organization": "medmesh.organization.v1.OrganizationService",
    "device": "medmesh.device.v1.DeviceService",
    "identity": "medmesh.identity.v1.IdentityService",
    "patient": "medmesh.patient.v1.PatientService",
    "audit": "medmesh.audit.v1.AuditService",
    "mqtt_adapter": "",
}


@pytest.mark.parametrize("component", sorted(SERVICES))
def test_every_service_is_serving(platform: Platform, component: str) -> None:
    with grpc.insecure_channel(platform.grpc_address(component)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in {"", SERVICES[component]}:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(platform: Platform) -> None:
    with grpc.insecure_channel(platform.grpc_address("device")) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert "medmesh.device.v1.DeviceService" in names
    assert "grpc.health.v1.Health" in names


def _rich_error(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    status = rpc_status.from_call(error)
    assert status is not None
    infos, bad_requests = unpack_details(status)
    assert len(infos) == 1
    return infos[0], [v.field for bad in bad_requests for v in bad.field_violations]


def test_standard_methods_over_grpc_through_envoy(gateway_channel: grpc.Channel) -> None:
    organizations = org_grpc.OrganizationServiceStub(gateway_channel)
    devices = device_grpc.DeviceServiceStub(gateway_channel)
    organization = organizations.CreateOrganization(
        org_pb.CreateOrganizationRequest(
            organization=org_pb.Organization(display_name="Via gRPC", kind=org_pb.Organization.KIND_CARE_PROVIDER),
            organization_id=f"clinic-{uuid.uuid4().hex[:8]}",
        ),
        timeout=10,
    )
    assert organization.kind == org_pb.Organization.KIND_CARE_PROVIDER
    serial = f"GRPC-{uuid.uuid4().hex[:8]}"
    device = devices.CreateDevice(
        device_pb.CreateDeviceRequest(
            device_id=serial, device=device_pb.Device(organization=organization.name, model="ECG-12")
        ),
        timeout=10,
    )
    assert device.name == f"devices/{serial}"
    updated = devices.UpdateDevice(
        device_pb.UpdateDeviceRequest(
            device=device_pb.Device(name=device.name, model="ECG-12b", etag=device.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["model"]),
        ),
        timeout=10,
    )
    assert updated.model == "ECG-12b"
    listed = devices.ListDevices(
        device_pb.ListDevicesRequest(filter=f'model = "ECG-12b" AND organization = "{organization.name}"')
    )
    assert [d.name for d in listed.devices] == [device.name]


def test_grpc_errors_carry_error_info_and_field_violations(gateway_channel: grpc.Channel) -> None:
    devices = device_grpc.DeviceServiceStub(gateway_channel)
    with pytest.raises(grpc.RpcError) as invalid:
        devices.CreateDevice(device_pb.CreateDeviceRequest(device_id="no spaces allowed"), timeout=10)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, fields = _rich_error(invalid.value)
    assert info.domain == "device.medmesh"
    assert "device_id" in fields

    with pytest.raises(grpc.RpcError) as missing:
        devices.GetDevice(device_pb.GetDeviceRequest(name="devices/NOT-THERE"), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    info, _ = _rich_error(missing.value)
    assert info.reason == "DEVICE_NOT_FOUND"
    assert info.metadata["device"] == "devices/NOT-THERE"
