"""The MQTT adapter process: `python -m mqtt_adapter`.

Devices connect over MQTT/TLS 1.3 (docs/device-protocol.md); the services reach this instance
over gRPC (`AdapterInternalService`) to push to the devices it holds. Health is SERVING once
the broker listens and the device registry answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medmesh.mqttadapter.v1 import adapter_internal_service_pb2 as adapter_pb
from medmesh.mqttadapter.v1 import adapter_internal_service_pb2_grpc as adapter_grpc
from medmesh.runtime.auth import Authenticator, JwksCache, TokenSettings, TokenVerifier, internal_token_from_env
from medmesh.runtime.clients import peer_channel
from medmesh.runtime.server import ServiceBinding, configure_process, serve
from medmesh.runtime.settings import Settings
from mqtt_adapter.broker import DeviceBroker, device_tls_context
from mqtt_adapter.connections import Connections
from mqtt_adapter.downlink import KIND_OF_PENDING, Deliveries, Kind
from mqtt_adapter.mesh import CommandQueue, DeviceRegistry, FileDesk, Mesh, ObservationSink
from mqtt_adapter.router import UplinkRouter
from mqtt_adapter.uplink import ObservationPipeline

log = logging.getLogger("mqtt_adapter")

NOTIFY_DEVICE = "/medmesh.mqttadapter.v1.AdapterInternalService/NotifyDevice"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


class AdapterInternalServicer(adapter_grpc.AdapterInternalServiceServicer):  # type: ignore[misc]
    def __init__(self, connections: Connections, deliveries: Deliveries) -> None:
        self._connections = connections
        self._deliveries = deliveries

    async def NotifyDevice(
        self, request: adapter_pb.NotifyDeviceRequest, context: grpc.aio.ServicerContext
    ) -> adapter_pb.NotifyDeviceResponse:
        if not self._connections.holds(request.device):
            return adapter_pb.NotifyDeviceResponse(connected=False)
        if request.commands:
            self._deliveries.push_commands(request.device, list(request.commands))
        for pending in request.pending:
            kind = KIND_OF_PENDING[pending]
            if not (kind is Kind.COMMANDS and request.commands):  # what came along needs no listing
                self._deliveries.request(request.device, kind)
        return adapter_pb.NotifyDeviceResponse(connected=True)


async def _no_keys() -> list[dict[str, str]]:
    return []  # no public methods: a bearer token is never enough here


async def main() -> None:
    settings = Settings.from_env("mqtt_adapter")
    configure_process(settings)
    # amqtt logs every connection, and its state machine library every transition, at INFO:
    # with thousands of devices that is most of the log. Refusals are logged here.
    for noisy in ("transitions", "amqtt"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    instance = _env("MEDMESH_ADAPTER_INSTANCE", f"{socket.gethostname()}-{os.getpid()}")
    channels = {
        name: peer_channel(name, caller="mqtt_adapter") for name in ("device", "observation", "command", "file")
    }
    mesh = Mesh(
        DeviceRegistry(channels["device"]),
        ObservationSink(channels["observation"]),
        CommandQueue(channels["command"]),
        FileDesk(channels["file"]),
    )
    connections = Connections()
    deliveries = Deliveries(mesh, connections)
    pipeline = ObservationPipeline(
        mesh.observations,
        connections,
        linger=float(_env("MEDMESH_MQTT_BATCH_LINGER_MS", "10")) / 1000,
        max_observations=int(_env("MEDMESH_MQTT_BATCH_MAX_OBSERVATIONS", "2000")),
    )
    router = UplinkRouter(mesh, connections, pipeline, deliveries)
    broker = DeviceBroker(
        host=_env("MEDMESH_MQTT_HOST", "127.0.0.1"),
        port=int(_env("MEDMESH_MQTT_PORT", "8883")),
        tls=device_tls_context(
            os.environ["MEDMESH_MQTT_TLS_CERT_FILE"],
            os.environ["MEDMESH_MQTT_TLS_KEY_FILE"],
            os.environ["MEDMESH_DEVICE_CA_CERT_FILE"],
        ),
        registry=mesh.registry,
        connections=connections,
        router=lambda: router,
        instance=instance,
        address=_env("MEDMESH_ADAPTER_ADDRESS", settings.grpc_address),
    )
    health = health_pb2_grpc.HealthStub(channels["device"])
    background: list[asyncio.Task[None]] = []

    async def ready() -> None:
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError("device registry is not SERVING")
        if broker.transitions.state != "started":
            raise RuntimeError("the MQTT listener is not started")

    async def start() -> None:
        await broker.start()
        background.append(asyncio.create_task(pipeline.run()))
        log.info("instance %s: MQTT over TLS on %s", instance, broker.listeners_config["default"]["bind"])

    async def stop() -> None:
        # Devices reconnect elsewhere; anything not yet acknowledged to them is resent by them.
        await broker.shutdown()
        await broker.close()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await asyncio.gather(router.close(), deliveries.close(), pipeline.close(), connections.close())
        await asyncio.gather(*(channel.close() for channel in channels.values()))

    authenticator = Authenticator(
        TokenVerifier(JwksCache(_no_keys), TokenSettings.from_env()),
        internal_methods=frozenset({NOTIFY_DEVICE}),
        internal_token=internal_token_from_env(),
    )
    binding = ServiceBinding(
        "medmesh.mqttadapter.v1.AdapterInternalService",
        AdapterInternalServicer(connections, deliveries),
        adapter_grpc.add_AdapterInternalServiceServicer_to_server,
    )
    await serve(settings, [binding], ready, on_start=start, on_stop=stop, authenticator=authenticator)


if __name__ == "__main__":
    asyncio.run(main())
