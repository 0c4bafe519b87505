"""Where the local platform listens and keeps its state.

Every port has a default and moves together with MEDMESH_PORT_OFFSET, so a second
platform (the test suite's) can run beside a developer's. MEDMESH_MONGODB_URI and
MEDMESH_S3_ENDPOINT point the services at external stores instead of the embedded ones.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from medmesh.launcher.tls import DEVICE_CA_CERT_FILE, DEVICE_CA_KEY_FILE
from medmesh.runtime.settings import DEFAULT_GRPC_PORTS

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
FERRETDB_VERSION = "v1.24.2"
# FerretDB as tools/install-ferretdb.sh builds it: the release plus the patches in tools/ferretdb/.
FERRETDB_BUILD = f"{FERRETDB_VERSION}-medmesh.1"

# Embedded defaults; the gRPC services' ports come from DEFAULT_GRPC_PORTS.
BASE_PORTS: dict[str, int] = {
    "gateway": 8443,
    "gateway_admin": 9901,
    # HTTPS in front of the embedded S3, for pre-signed upload and download URLs.
    "gateway_s3": 9443,
    # Devices: MQTT over TLS 1.3, served by the MQTT adapter.
    "mqtt": 8883,
    "ferretdb": 27017,
    "ferretdb_debug": 28088,
    "s3": 8333,
    "seaweedfs_master": 9333,
    "seaweedfs_volume": 9340,
    "seaweedfs_filer": 8888,
    "seaweedfs_admin": 13646,
    # SeaweedFS's gRPC ports, set explicitly so every port it opens is known and checked.
    "s3_grpc": 18333,
    "seaweedfs_master_grpc": 19333,
    "seaweedfs_volume_grpc": 19340,
    "seaweedfs_filer_grpc": 18888,
    "seaweedfs_admin_grpc": 23646,
    **DEFAULT_GRPC_PORTS,
}


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _secret_file(path: Path, make: dict[str, str]) -> dict[str, str]:
    """Reads a JSON secret kept in the state directory, writing `make` (mode 0600) the first time."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(json.dumps(make))
    data: dict[str, str] = json.loads(path.read_text())
    return data


@dataclass(frozen=True)
class AdminCredentials:
    username: str
    password: str


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str


@dataclass(frozen=True)
class PlatformConfig:
    root: Path
    state_dir: Path
    port_offset: int
    external_mongodb_uri: str
    external_s3_endpoint: str

    @classmethod
    def from_env(cls) -> PlatformConfig:
        state = Path(_env("MEDMESH_STATE_DIR") or REPO_ROOT / ".medmesh").resolve()
        return cls(
            root=REPO_ROOT,
            state_dir=state,
            port_offset=int(_env("MEDMESH_PORT_OFFSET") or 0),
            external_mongodb_uri=_env("MEDMESH_MONGODB_URI"),
            external_s3_endpoint=_env("MEDMESH_S3_ENDPOINT"),
        )

    def port(self, name: str) -> int:
        return BASE_PORTS[name] + self.port_offset

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def tls_dir(self) -> Path:
        return self.state_dir / "tls"

    @property
    def device_ca_cert(self) -> Path:
        return self.tls_dir / DEVICE_CA_CERT_FILE

    @property
    def device_ca_key(self) -> Path:
        return self.tls_dir / DEVICE_CA_KEY_FILE

    @property
    def status_file(self) -> Path:
        return self.state_dir / "platform.json"

    @property
    def ferretdb_binary(self) -> Path:
        cache = Path(_env("MEDMESH_CACHE_DIR") or Path.home() / ".cache" / "medmesh")
        return cache / f"ferretdb-{FERRETDB_BUILD}" / "ferretdb"

    @property
    def descriptor_set(self) -> Path:
        return self.root / "build" / "proto" / "medmesh.binpb"

    @property
    def mongodb_uri(self) -> str:
        return self.external_mongodb_uri or f"mongodb://127.0.0.1:{self.port('ferretdb')}/"

    @property
    def s3_endpoint(self) -> str:
        return self.external_s3_endpoint or f"127.0.0.1:{self.port('s3')}"

    def s3_credentials(self) -> S3Credentials:
        """External S3: from the environment. Embedded: made once, kept in the state directory."""
        if self.external_s3_endpoint:
            return S3Credentials(_env("MEDMESH_S3_ACCESS_KEY"), _env("MEDMESH_S3_SECRET_KEY"))
        data = _secret_file(
            self.state_dir / "s3-credentials.json", {"access_key": "medmesh", "secret_key": secrets.token_urlsafe(24)}
        )
        return S3Credentials(data["access_key"], data["secret_key"])

    @property
    def admin_credentials_file(self) -> Path:
        return self.state_dir / "admin-credentials.json"

    def admin_credentials(self) -> AdminCredentials:
        """The first platform admin, made once: the identity service creates the user on first start."""
        data = _secret_file(
            self.admin_credentials_file, {"username": "admin@medmesh.local", "password": secrets.token_urlsafe(18)}
        )
        return AdminCredentials(data["username"], data["password"])

    def internal_token(self) -> str:
        """The mesh credential that internal-only methods (audit ingest) require of callers."""
        return _secret_file(self.state_dir / "internal-token.json", {"token": secrets.token_urlsafe(32)})["token"]
