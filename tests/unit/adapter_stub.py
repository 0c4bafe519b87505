"""The MQTT adapter's internal API (`AdapterInternalService`) as the services that push to devices
meet it: a real grpc.aio server on 127.0.0.1 behind the shared request interceptor with the mesh
credential (a call without it is refused, as the adapter refuses it), recording what it is told.
It is the counterpart of the code under test, not a mock of it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from medmesh.mqttadapter.v1 import adapter_internal_service_pb2 as adapter_pb
from medmesh.mqttadapter.v1 import adapter_internal_service_pb2_grpc as adapter_pb_grpc
from medmesh.runtime.auth import Authenticator, TokenVerifier
from medmesh.runtime.interceptors import RequestInterceptor

SERVICE = adapter_pb.DESCRIPTOR.services_by_name["AdapterInternalService"]
INTERNAL_METHODS = frozenset(f"/{SERVICE.full_name}/{method.name}" for method in SERVICE.methods)


class NoKeys:
    """No user token is valid here: the adapter's internal API takes the mesh credential only."""

    async def public_key(self, kid: str) -> Any | None:
        return None


@dataclass(frozen=True)
class Notification:
    device: str
    pending: tuple[int, ...]
    caller: str  # x-medmesh-caller
    received: float  # time.monotonic()
    commands: tuple[str, ...] = ()  # names of the commands pushed with it


class StubAdapter(adapter_pb_grpc.AdapterInternalServiceServicer):  # type: ignore[misc]
    """Answers `connected`; with `hold` cleared, each call waits until it is set."""

    def __init__(self) -> None:
        self.notifications: list[Notification] = []
        self.arrivals: asyncio.Queue[Notification] = asyncio.Queue()
        self.connected = True
        self.hold = asyncio.Event()
        self.hold.set()

    async def NotifyDevice(
        self, request: adapter_pb.NotifyDeviceRequest, context: grpc.aio.ServicerContext
    ) -> adapter_pb.NotifyDeviceResponse:
        metadata = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        notification = Notification(
            request.device,
            tuple(request.pending),
            metadata.get("x-medmesh-caller", ""),
            time.monotonic(),
            tuple(command.name for command in request.commands),
        )
        self.notifications.append(notification)
        self.arrivals.put_nowait(notification)
        await self.hold.wait()
        return adapter_pb.NotifyDeviceResponse(connected=self.connected)

    async def next(self, within: float = 2.0) -> Notification:
        return await asyncio.wait_for(self.arrivals.get(), within)


@asynccontextmanager
async def serving_stub_adapter(internal_token: str) -> AsyncIterator[tuple[StubAdapter, str]]:
    """The stub and its `host:port`; stopped afterwards."""
    authenticator = Authenticator(
        TokenVerifier(NoKeys()), internal_methods=INTERNAL_METHODS, internal_token=internal_token
    )
    server = grpc.aio.server(interceptors=[RequestInterceptor("mqttadapter.medmesh", authenticator)])
    adapter = StubAdapter()
    adapter_pb_grpc.add_AdapterInternalServiceServicer_to_server(adapter, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield adapter, f"127.0.0.1:{port}"
    finally:
        adapter.hold.set()
        await server.stop(grace=None)
