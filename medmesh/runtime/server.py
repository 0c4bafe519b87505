"""The gRPC server bootstrap shared by every service.

Health is driven by a real readiness check (for Mongo-backed services, a ping), polled
in the background; SIGTERM flips health to NOT_SERVING first, so load balancers and
Envoy stop sending new calls, then lets in-flight calls finish within the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

from medmesh.runtime.auth import Authenticator
from medmesh.runtime.interceptors import RequestInterceptor
from medmesh.runtime.settings import Settings
from medmesh.runtime.tasks import stop_requested
from medmesh.runtime.telemetry import configure_logging, configure_tracing

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Awaitable[None]]

# Health service name that only says the process is alive (for liveness probes): a database
# outage makes a service NOT_SERVING for readiness, but restarting it would not help.
LIVENESS = "liveness"


@dataclass(frozen=True)
class ServiceBinding:
    """A servicer and the generated function that adds it to a server."""

    full_name: str  # e.g. "medmesh.device.v1.DeviceService"
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]


class HealthReporter:
    """Keeps the standard health service in step with a readiness check."""

    def __init__(self, service_names: Sequence[str], check: ReadinessCheck, interval: float) -> None:
        self.servicer = health.aio.HealthServicer()
        self._names = ["", *service_names]  # "" is the whole server
        self._check = check
        self._interval = interval
        self._serving: bool | None = None

    async def not_serving_yet(self) -> None:
        """The health servicer starts out SERVING; nothing is until the first check passes."""
        for name in self._names:
            await self.servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)

    async def probe(self) -> bool:
        try:
            await asyncio.wait_for(self._check(), timeout=max(self._interval, 1.0))
            serving = True
        except Exception as error:  # any failure of a dependency means not ready
            if self._serving is not False:
                log.warning("readiness check failed: %r", error)
            serving = False
        if serving != self._serving:
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in self._names:
                await self.servicer.set(name, status)
            log.info("health is now %s", "SERVING" if serving else "NOT_SERVING")
            self._serving = serving
        return serving

    async def run(self) -> None:
        while not stop_requested():
            await self.probe()
            await asyncio.sleep(self._interval)

    async def shutting_down(self) -> None:
        await self.servicer.enter_graceful_shutdown()


def configure_process(settings: Settings) -> None:
    """JSON logs and tracing; call before creating clients, so their calls are traced too."""
    configure_logging(settings.service, settings.log_level)
    configure_tracing(settings.service)


async def serve(
    settings: Settings,
    bindings: Sequence[ServiceBinding],
    readiness: ReadinessCheck,
    *,
    on_start: Callable[[], Awaitable[None]] | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    authenticator: Authenticator | None = None,
) -> None:
    """Runs a gRPC service until SIGTERM or SIGINT, then shuts down gracefully.

    Every medmesh service passes an `authenticator`; only tests of the runtime itself run without.
    """
    configure_process(settings)
    server = grpc.aio.server(
        interceptors=[
            # Health probes are not traced: noise, and OpenTelemetry's aio interceptor breaks
            # streaming handlers that write with context.write(), as Health.Watch does.
            aio_server_interceptor(filter_=filters.negate(filters.health_check())),
            RequestInterceptor(f"{settings.service}.medmesh", authenticator),
        ],
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            # Clients reconnect now and then, so they spread over instances added by scaling out.
            ("grpc.max_connection_age_ms", 5 * 60 * 1000),
            ("grpc.max_connection_age_grace_ms", 30 * 1000),
        ],
    )
    for binding in bindings:
        binding.add_to_server(binding.servicer, server)
    names = [binding.full_name for binding in bindings]
    reporter = HealthReporter(names, readiness, settings.health_interval_seconds)
    health_pb2_grpc.add_HealthServicer_to_server(reporter.servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if server.add_insecure_port(settings.grpc_address) == 0:
        raise SystemExit(f"cannot listen on {settings.grpc_address}")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    if on_start is not None:
        await on_start()
    await reporter.not_serving_yet()
    await server.start()
    await reporter.probe()
    health_task = asyncio.create_task(reporter.run())
    log.info("%s listening on %s", settings.service, settings.grpc_address)
    try:
        await stop.wait()
    finally:
        log.info("shutting down: NOT_SERVING, draining for up to %.0fs", settings.shutdown_grace_seconds)
        health_task.cancel()
        await reporter.shutting_down()
        await server.stop(settings.shutdown_grace_seconds)
        if on_stop is not None:
            await on_stop()
        log.info("%s stopped", settings.service)
