"""The MQTT adapter process: `python -m mqtt_adapter`.

Placeholder until the adapter issue lands: it runs the shared gRPC bootstrap with
health only, and reports SERVING when the service it will feed (the device
registry) is SERVING, so the launcher's ordering and health gating already hold.
"""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2, health_pb2_grpc

from medmesh.runtime.clients import peer_channel
from medmesh.runtime.server import configure_process, serve
from medmesh.runtime.settings import Settings


async def main() -> None:
    settings = Settings.from_env("mqtt_adapter")
    configure_process(settings)
    device_channel = peer_channel("device")
    health = health_pb2_grpc.HealthStub(device_channel)

    async def device_registry_serving() -> None:
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError("device service is not SERVING")

    async def close() -> None:
        await device_channel.close()

    await serve(settings, [], device_registry_serving, on_stop=close)


if __name__ == "__main__":
    asyncio.run(main())
