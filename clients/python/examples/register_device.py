"""Register an organization and a device over native gRPC through the gateway.

    MEDMESH_TOKEN=$(.venv/bin/medmesh token) .venv/bin/python clients/python/examples/register_device.py SN-0042

Every call carries a bearer token (here the first platform admin's, from `medmesh token`; an
integration would log in with a service account key: POST /v1/auth:login). Uses the local CA from
`medmesh init`; set MEDMESH_GATEWAY (host:port) and MEDMESH_CA for another platform.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc

from medmesh.device.v1 import device_service_pb2 as device_pb
from medmesh.device.v1 import device_service_pb2_grpc as device_grpc
from medmesh.organization.v1 import organization_service_pb2 as org_pb
from medmesh.organization.v1 import organization_service_pb2_grpc as org_grpc

ROOT = Path(__file__).resolve().parents[3]


def main(serial: str) -> None:
    gateway = os.environ.get("MEDMESH_GATEWAY", "localhost:8443")
    ca = Path(os.environ.get("MEDMESH_CA", ROOT / ".medmesh" / "tls" / "ca.crt"))
    token = os.environ.get("MEDMESH_TOKEN", "")
    if not token:
        sys.exit("set MEDMESH_TOKEN, for example MEDMESH_TOKEN=$(.venv/bin/medmesh token)")
    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=ca.read_bytes()),
        grpc.access_token_call_credentials(token),  # sent as "authorization: Bearer <token>"
    )
    with grpc.secure_channel(gateway, credentials) as channel:
        organization = org_grpc.OrganizationServiceStub(channel).CreateOrganization(
            org_pb.CreateOrganizationRequest(organization=org_pb.Organization(display_name="Example clinic")),
            timeout=10,
        )
        try:
            device = device_grpc.DeviceServiceStub(channel).CreateDevice(
                device_pb.CreateDeviceRequest(
                    device_id=serial,
                    device=device_pb.Device(organization=organization.name, display_name="Pulse oximeter"),
                ),
                timeout=10,
            )
        except grpc.RpcError as error:
            sys.exit(f"{error.code().name}: {error.details()}")
    print(f"{device.name} belongs to {device.organization}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "SN-EXAMPLE-1")
