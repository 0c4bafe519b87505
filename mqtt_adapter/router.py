"""Device -> cloud: each publish goes to the service that owns it, answered on the device's topics."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from medmesh.file.v1 import file_service_pb2 as file_pb
from medmesh.runtime.tasks import BackgroundTasks
from mqtt_adapter.connections import Connection, Connections
from mqtt_adapter.downlink import Deliveries, Kind
from mqtt_adapter.mesh import Mesh
from mqtt_adapter.payloads import (
    CommandReport,
    ConfigReport,
    FileRequest,
    PayloadError,
    decode_command_status,
    decode_file_request,
    decode_observations,
    decode_reported_config,
    decode_status,
    desired_config_payload,
    encode,
    error_payload,
)
from mqtt_adapter.topics import Downlink, Uplink, matches, parse_uplink
from mqtt_adapter.uplink import ObservationPipeline

log = logging.getLogger(__name__)

TOUCH_INTERVAL = 30.0  # seconds between last-seen updates per connection


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a medmesh error status, else the gRPC code's name."""
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return str(error.code().name)


class UplinkRouter:
    def __init__(
        self, mesh: Mesh, connections: Connections, observations: ObservationPipeline, deliveries: Deliveries
    ) -> None:
        self._mesh = mesh
        self._connections = connections
        self._observations = observations
        self._deliveries = deliveries
        self._tasks = BackgroundTasks()

    async def handle(self, connection: Connection, topic: str, payload: bytes | bytearray) -> None:
        """Never raises: whatever is wrong with a message is told to the device on its errors topic."""
        device = connection.device
        uplink = parse_uplink(connection.client.device_id, topic)
        if uplink is None:
            self._error(device, topic, "TOPIC_NOT_ALLOWED", f"{topic!r} is not a topic this device publishes to")
            return
        try:
            if uplink.kind is Uplink.OBSERVATIONS:
                await self._observations.submit(device, topic, decode_observations(payload))
                self._touch(connection)
            elif uplink.kind is Uplink.STATUS:
                self._spawn(self._mesh.registry.report_status(device, decode_status(payload)), device, topic)
            elif uplink.kind is Uplink.CONFIG_REPORTED:
                self._spawn(self._report_config(device, decode_reported_config(payload)), device, topic)
            elif uplink.kind is Uplink.COMMAND_STATUS:
                name = f"{device}/commands/{uplink.command_id}"
                self._spawn(self._report_command(name, decode_command_status(payload)), device, topic)
            else:
                self._spawn(self._file_request(device, decode_file_request(payload)), device, topic)
        except PayloadError as error:
            self._error(device, topic, error.reason, error.description)

    async def _report_command(self, name: str, status: CommandReport) -> None:
        await self._mesh.commands.report(name, status)
        self._deliveries.reported(name)  # a status report says "delivered" too

    async def _report_config(self, device: str, report: ConfigReport) -> None:
        pending = await self._mesh.registry.report_config(device, report)
        if pending.desired_version:
            # Still behind (it applied an older version): send what it should run.
            self._connections.publish(
                device, Downlink.CONFIG_DESIRED, desired_config_payload(pending.desired_version, pending.desired)
            )

    async def _file_request(self, device: str, request: FileRequest) -> None:
        fields = request.fields
        reply: dict[str, object] = {"request_id": request.request_id}
        try:
            if request.action == "create":
                created = await self._mesh.files.create(
                    file_pb.CreateDeviceFileRequest(
                        device=device,
                        display_name=str(fields.get("display_name", "")),
                        content_type=str(fields.get("content_type", "")),
                        size_bytes=int(fields.get("size_bytes", 0)),
                        sha256=str(fields.get("sha256", "")),
                        session=str(fields.get("session", "")),
                        request_id=request.request_id,
                    )
                )
                reply["file"] = created.file.name
                upload = json_format.MessageToDict(created.upload, preserving_proto_field_name=True)
                if "part_size" in upload:
                    upload["part_size"] = int(upload["part_size"])  # int64 is a string in proto JSON
                reply["upload"] = upload
            else:
                completed = file_pb.CompleteDeviceFileRequest(device=device, name=str(fields.get("file", "")))
                for part in fields.get("parts", []) or []:
                    completed.parts.add(part_number=int(part["part_number"]), etag=str(part["etag"]))
                done = await self._mesh.files.complete(completed)
                reply["file"] = done.name
                reply["state"] = file_pb.File.State.Name(done.state).removeprefix("STATE_")
        except grpc.aio.AioRpcError as error:
            reply["error"] = {"reason": error_reason(error), "description": error.details() or ""}
        except (TypeError, ValueError, KeyError) as error:
            reply["error"] = {"reason": "INVALID_MESSAGE", "description": f"bad field: {error!r}"}
        self._connections.publish(device, Downlink.FILE_RESPONSES, encode(reply))

    def subscribed(self, connection: Connection, granted: list[str]) -> None:
        """A subscription covering config or commands means: send what is pending now."""
        device_id = connection.client.device_id
        for kind in (Kind.CONFIG, Kind.COMMANDS):
            topic = f"devices/{device_id}/{kind.value.value}"
            if connection.subscribed(topic) is not None and any(matches(f, topic) for f in granted):
                self._deliveries.request(connection.device, kind)

    def _touch(self, connection: Connection) -> None:
        now = time.monotonic()
        if now - connection.last_touch >= TOUCH_INTERVAL:
            connection.last_touch = now
            self._spawn(self._mesh.registry.touch(connection.device), connection.device, "")

    def _spawn(self, call: Awaitable[None], device: str, topic: str) -> None:
        async def run() -> None:
            try:
                await call
            except grpc.aio.AioRpcError as error:
                if topic:
                    self._error(device, topic, error_reason(error), error.details() or "")
                else:
                    log.info("call for %s failed: %s", device, error.code())

        self._tasks.spawn(run())

    def _error(self, device: str, topic: str, reason: str, description: str) -> None:
        if reason in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            reason = "UNAVAILABLE"
        self._connections.publish(device, Downlink.ERRORS, error_payload(topic, reason, description))

    async def close(self) -> None:
        await self._tasks.close()
