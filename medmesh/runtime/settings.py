"""Settings from environment variables, with defaults that run the platform on one machine."""

from __future__ import annotations

import os
from dataclasses import dataclass

# Default gRPC port of each component; the launcher and k8s/ use the same numbers.
DEFAULT_GRPC_PORTS: dict[str, int] = {
    "organization": 50051,
    "device": 50052,
    "identity": 50053,
    "patient": 50054,
    "audit": 50055,
    "observation": 50056,
    "command": 50057,
    "file": 50058,
    "alert": 50059,
    "mqtt_adapter": 50060,
}


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def _env_bool(name: str, default: bool) -> bool:
    return _env(name, "true" if default else "false").lower() in {"1", "true", "yes", "on"}


def peer_address(service: str) -> str:
    """Where another service listens: `MEDMESH_<SERVICE>_ADDR`, else its local default."""
    return _env(f"MEDMESH_{service.upper()}_ADDR", f"127.0.0.1:{DEFAULT_GRPC_PORTS[service]}")


@dataclass(frozen=True)
class Settings:
    service: str
    grpc_host: str
    grpc_port: int
    mongodb_uri: str
    mongodb_database: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_secure: bool
    s3_region: str
    log_level: str
    shutdown_grace_seconds: float
    health_interval_seconds: float

    @classmethod
    def from_env(cls, service: str) -> Settings:
        return cls(
            service=service,
            grpc_host=_env("MEDMESH_GRPC_HOST", "127.0.0.1"),
            grpc_port=int(_env("MEDMESH_GRPC_PORT", str(DEFAULT_GRPC_PORTS[service]))),
            mongodb_uri=_env("MEDMESH_MONGODB_URI", "mongodb://127.0.0.1:27017/"),
            # Each service owns its own database: the walled garden.
            mongodb_database=_env("MEDMESH_MONGODB_DATABASE", f"medmesh_{service}"),
            s3_endpoint=_env("MEDMESH_S3_ENDPOINT", "127.0.0.1:8333"),
            s3_access_key=_env("MEDMESH_S3_ACCESS_KEY", "medmesh"),
            s3_secret_key=_env("MEDMESH_S3_SECRET_KEY", "medmesh-local-secret"),
            s3_secure=_env_bool("MEDMESH_S3_SECURE", False),
            s3_region=_env("MEDMESH_S3_REGION", "us-east-1"),
            log_level=_env("MEDMESH_LOG_LEVEL", "INFO").upper(),
            shutdown_grace_seconds=float(_env("MEDMESH_SHUTDOWN_GRACE_SECONDS", "10")),
            health_interval_seconds=float(_env("MEDMESH_HEALTH_INTERVAL_SECONDS", "2")),
        )

    @property
    def grpc_address(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"
