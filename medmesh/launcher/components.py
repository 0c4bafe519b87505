"""The processes of a local platform, in start order, each with its readiness check."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pymongo import AsyncMongoClient

from medmesh.launcher.config import BASE_PORTS, PlatformConfig
from medmesh.launcher.gateway import envoy_command, render_envoy_config
from medmesh.launcher.tls import ensure_device_ca
from medmesh.runtime.settings import DEFAULT_GRPC_PORTS

HealthCheck = Callable[[], Awaitable[bool]]

# The Python components: (name, module, what it serves).
SERVICES: list[tuple[str, str]] = [
    ("identity", "services.identity"),
    ("organization", "services.organization"),
    ("patient", "services.patient"),
    ("device", "services.device"),
    ("audit", "services.audit"),
    ("observation", "services.observation"),
    ("command", "services.command"),
    ("file", "services.file"),
    ("alert", "services.alert"),
]


@dataclass(frozen=True)
class Component:
    name: str
    argv: list[str]
    health: HealthCheck
    endpoint: str
    ports: list[int]
    env: dict[str, str] = field(default_factory=dict)
    # Writes what the process needs (data directory, rendered config) just before it starts,
    # so building the list (as `medmesh status` does) has no side effects.
    prepare: Callable[[], None] | None = None
    # Components of one stage start together; a stage starts once the one before is healthy.
    stage: int = 0
    start_timeout: float = field(default_factory=lambda: float(os.environ.get("MEDMESH_START_TIMEOUT_SECONDS") or 60))


async def mongodb_ready(uri: str) -> bool:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(uri, serverSelectionTimeoutMS=500)
    try:
        await client.admin.command("ping")
        return True
    except Exception:  # not up yet
        return False
    finally:
        await client.close()


async def http_ok(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=1.0) as client:
            return (await client.get(url)).status_code == 200
    except httpx.HTTPError:
        return False


async def grpc_serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.aio.AioRpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def service_environment(config: PlatformConfig) -> dict[str, str]:
    """What every Python component is told: where the stores and its peers are."""
    credentials = config.s3_credentials()
    env = {
        "MEDMESH_GRPC_HOST": "127.0.0.1",
        "MEDMESH_MONGODB_URI": config.mongodb_uri,
        "MEDMESH_S3_ENDPOINT": config.s3_endpoint,
        "MEDMESH_S3_ACCESS_KEY": credentials.access_key,
        "MEDMESH_S3_SECRET_KEY": credentials.secret_key,
        "MEDMESH_INTERNAL_TOKEN": config.internal_token(),
        # Where pre-signed URLs point: the gateway's HTTPS front of the embedded S3, or the external S3.
        "MEDMESH_S3_PUBLIC_ENDPOINT": os.environ.get("MEDMESH_S3_PUBLIC_ENDPOINT", "").strip()
        or (
            f"{'https' if os.environ.get('MEDMESH_S3_SECURE', '').lower() in {'1', 'true', 'yes'} else 'http'}"
            f"://{config.external_s3_endpoint}"
            if config.external_s3_endpoint
            else f"https://localhost:{config.port('gateway_s3')}"
        ),
        "PYTHONUNBUFFERED": "1",
    }
    for peer in DEFAULT_GRPC_PORTS:
        env[f"MEDMESH_{peer.upper()}_ADDR"] = f"127.0.0.1:{config.port(peer)}"
    return env


def _seaweedfs(config: PlatformConfig) -> Component:
    data = config.data_dir / "seaweedfs"
    identities = config.state_dir / "seaweedfs-s3.json"

    def prepare() -> None:
        data.mkdir(parents=True, exist_ok=True)
        credentials = config.s3_credentials()
        identity = {
            "name": "medmesh",
            "credentials": [{"accessKey": credentials.access_key, "secretKey": credentials.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        identities.write_text(json.dumps({"identities": [identity]}))
        identities.chmod(0o600)

    p = config.port
    # Its defaults bind every interface and report telemetry: override both.
    argv = [
        str(Path(sys.executable).with_name("weed")),
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        f"-admin.port={p('seaweedfs_admin')}",
        f"-admin.port.grpc={p('seaweedfs_admin_grpc')}",
        f"-master.port={p('seaweedfs_master')}",
        f"-master.port.grpc={p('seaweedfs_master_grpc')}",
        f"-volume.port={p('seaweedfs_volume')}",
        f"-volume.port.grpc={p('seaweedfs_volume_grpc')}",
        f"-filer.port={p('seaweedfs_filer')}",
        f"-filer.port.grpc={p('seaweedfs_filer_grpc')}",
        f"-s3.port={p('s3')}",
        f"-s3.port.grpc={p('s3_grpc')}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        f"-s3.config={identities}",
    ]
    return Component(
        "seaweedfs",
        argv,
        lambda: http_ok(f"http://{config.s3_endpoint}/healthz"),
        f"http://{config.s3_endpoint} (S3)",
        [p(name) for name in BASE_PORTS if name.startswith(("s3", "seaweedfs"))],
        prepare=prepare,
    )


def _ferretdb(config: PlatformConfig) -> Component:
    data = config.data_dir / "ferretdb"
    argv = [
        str(config.ferretdb_binary),
        "--handler=sqlite",
        f"--sqlite-url=file:{data}/",
        f"--state-dir={data}",
        f"--listen-addr=127.0.0.1:{config.port('ferretdb')}",
        f"--debug-addr=127.0.0.1:{config.port('ferretdb_debug')}",
        "--telemetry=disable",
        "--log-level=warn",
    ]
    uri = config.mongodb_uri
    return Component(
        "ferretdb",
        argv,
        lambda: mongodb_ready(uri),
        uri,
        [config.port("ferretdb"), config.port("ferretdb_debug")],
        prepare=lambda: data.mkdir(parents=True, exist_ok=True),
    )


def _python_component(config: PlatformConfig, name: str, module: str) -> Component:
    port = config.port(name)
    address = f"127.0.0.1:{port}"
    env = {**service_environment(config), "MEDMESH_GRPC_PORT": str(port)}
    prepare = None
    if name == "identity":
        # The first platform admin: identity creates the user from this file on its first start.
        env["MEDMESH_BOOTSTRAP_ADMIN_FILE"] = str(config.admin_credentials_file)

        def prepare() -> None:
            config.admin_credentials()

    elif name == "device":
        # The platform device CA that signs device certificates: made once, kept in the state directory.
        env["MEDMESH_DEVICE_CA_CERT_FILE"] = str(config.device_ca_cert)
        env["MEDMESH_DEVICE_CA_KEY_FILE"] = str(config.device_ca_key)

        def prepare() -> None:
            ensure_device_ca(config.tls_dir)

    elif name == "mqtt_adapter":
        # Devices connect here with certificates the device CA signed (or temporary credentials).
        env["MEDMESH_MQTT_PORT"] = str(config.port("mqtt"))
        env["MEDMESH_MQTT_TLS_CERT_FILE"] = str(config.tls_dir / "server.crt")
        env["MEDMESH_MQTT_TLS_KEY_FILE"] = str(config.tls_dir / "server.key")
        env["MEDMESH_DEVICE_CA_CERT_FILE"] = str(config.device_ca_cert)
        env["MEDMESH_ADAPTER_INSTANCE"] = "mqtt-adapter-0"

        def prepare() -> None:
            ensure_device_ca(config.tls_dir)

    return Component(
        name,
        [sys.executable, "-m", module],
        lambda: grpc_serving(address),
        f"mqtts://localhost:{config.port('mqtt')} (devices), grpc {address}"
        if name == "mqtt_adapter"
        else f"grpc {address}",
        [port, config.port("mqtt")] if name == "mqtt_adapter" else [port],
        env,
        prepare=prepare,
    )


def _envoy(config: PlatformConfig) -> Component:
    rendered = config.state_dir / "envoy.yaml"

    def prepare() -> None:
        render_envoy_config(
            config.root / "gateway" / "envoy.yaml",
            rendered,
            listen_host="127.0.0.1",
            listen_port=config.port("gateway"),
            admin_port=config.port("gateway_admin"),
            upstreams={
                **{name: ("127.0.0.1", config.port(name)) for name, _ in SERVICES},
                **({} if config.external_s3_endpoint else {"s3": ("127.0.0.1", config.port("s3"))}),
            },
            s3_listen_port=None if config.external_s3_endpoint else config.port("gateway_s3"),
            tls_cert=config.tls_dir / "server.crt",
            tls_key=config.tls_dir / "server.key",
            descriptor=config.descriptor_set,
            ca_cert=config.tls_dir / "ca.crt",
            jwks_cache_seconds=int(cache) if (cache := os.environ.get("MEDMESH_GATEWAY_JWKS_CACHE_SECONDS")) else None,
        )

    admin = config.port("gateway_admin")
    return Component(
        "gateway",
        envoy_command(rendered, admin_port=admin),
        lambda: http_ok(f"http://127.0.0.1:{admin}/ready"),
        f"https://localhost:{config.port('gateway')} (REST/JSON and gRPC, TLS 1.3)",
        [config.port("gateway"), admin, *([] if config.external_s3_endpoint else [config.port("gateway_s3")])],
        prepare=prepare,
    )


def platform_components(config: PlatformConfig) -> list[Component]:
    """In stages: the stores; then the services and the MQTT adapter; then the gateway in front."""
    stores: list[Component] = []
    if not config.external_mongodb_uri:
        stores.append(_ferretdb(config))
    if not config.external_s3_endpoint:
        stores.append(_seaweedfs(config))
    services = [_python_component(config, name, module) for name, module in SERVICES]
    services.append(_python_component(config, "mqtt_adapter", "mqtt_adapter"))
    return [
        *(replace(c, stage=0) for c in stores),
        *(replace(c, stage=1) for c in services),
        replace(_envoy(config), stage=2),
    ]


def prerequisites(config: PlatformConfig) -> list[str]:
    """What `make setup` should have produced and is missing."""
    missing = []
    if not config.external_mongodb_uri and not os.access(config.ferretdb_binary, os.X_OK):
        missing.append(f"FerretDB binary {config.ferretdb_binary}")
    if not config.descriptor_set.exists():
        missing.append(f"descriptor set {config.descriptor_set} (tools/protogen.py)")
    if not (config.tls_dir / "server.crt").exists():
        missing.append(f"local TLS certificates in {config.tls_dir}")
    return missing


async def wait_until(check: HealthCheck, within: float, interval: float = 0.25) -> bool:
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        if await check():
            return True
        await asyncio.sleep(interval)
    return False
