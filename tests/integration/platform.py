"""Start and stop a real platform (`medmesh up --detach` / `medmesh down`) for tests."""

from __future__ import annotations

import json
import os
import random
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from medmesh.launcher.config import BASE_PORTS, PlatformConfig
from medmesh.launcher.supervisor import pid_alive, port_in_use
from medmesh.runtime.settings import DEFAULT_GRPC_PORTS

MEDMESH = [sys.executable, "-m", "medmesh.cli"]


def free_ports(count: int) -> list[int]:
    """Ports the kernel reports free on 127.0.0.1 (held together, so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _ephemeral_ports() -> range:
    """The kernel's range for outgoing connections' local ports (Linux default 32768-60999)."""
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port_offset() -> int:
    """An offset that moves every platform port onto free ones (beside a developer's `make up`).

    Preferred: offsets that put as few platform ports as possible inside the ephemeral range,
    where any outgoing connection on the machine (the platform's own, among others) may take
    a port between the check and the bind.
    """
    ephemeral = _ephemeral_ports()
    candidates = [o for o in range(1000, 15400, 50) if max(BASE_PORTS.values()) + o <= 65535]
    random.shuffle(candidates)
    candidates.sort(key=lambda o: sum(port + o in ephemeral for port in BASE_PORTS.values()))
    for offset in candidates:
        if not any(port_in_use(port + offset) for port in BASE_PORTS.values()):
            return offset
    raise RuntimeError("no free port range for a test platform")


@dataclass
class Platform:
    state_dir: Path
    offset: int
    env: dict[str, str]

    @property
    def config(self) -> PlatformConfig:
        return PlatformConfig(
            root=Path(__file__).resolve().parents[2],
            state_dir=self.state_dir,
            port_offset=self.offset,
            external_mongodb_uri=self.env.get("MEDMESH_MONGODB_URI", ""),
            external_s3_endpoint=self.env.get("MEDMESH_S3_ENDPOINT", ""),
        )

    @property
    def gateway(self) -> str:
        return f"https://localhost:{self.config.port('gateway')}"

    @property
    def ca(self) -> Path:
        return self.state_dir / "tls" / "ca.crt"

    def grpc_address(self, service: str) -> str:
        return f"127.0.0.1:{self.config.port(service)}"

    def cli(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*MEDMESH, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def up(self) -> None:
        result = self.cli("up", "--detach")
        if result.returncode != 0:
            raise RuntimeError(f"medmesh up failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def recorded_pids(self) -> list[int]:
        status = json.loads((self.state_dir / "platform.json").read_text())
        return [status["supervisor_pid"], *(c["pid"] for c in status["components"])]

    def admin_credentials(self) -> tuple[str, str]:
        """The first platform admin, written by `medmesh up` into the state directory."""
        data = json.loads((self.state_dir / "admin-credentials.json").read_text())
        return data["username"], data["password"]

    def login(self, username: str, password: str) -> dict[str, str]:
        """Logs in through the gateway (REST); the token response as JSON."""
        context = ssl.create_default_context(cafile=str(self.ca))
        with httpx.Client(base_url=self.gateway, verify=context, timeout=30.0) as client:
            reply = client.post("/v1/auth:login", json={"password": {"username": username, "password": password}})
        assert reply.status_code == 200, reply.text
        data: dict[str, str] = reply.json()
        return data

    def admin_token(self) -> str:
        return self.login(*self.admin_credentials())["access_token"]

    def service_environment(self) -> dict[str, str]:
        """For a service process a test starts itself: this platform's identity (for token
        keys), audit service, other peers and mesh credential."""
        internal = json.loads((self.state_dir / "internal-token.json").read_text())["token"]
        env = {
            **os.environ,
            "MEDMESH_INTERNAL_TOKEN": internal,
            "MEDMESH_DEVICE_CA_CERT_FILE": str(self.config.device_ca_cert),
            "MEDMESH_DEVICE_CA_KEY_FILE": str(self.config.device_ca_key),
        }
        for peer in DEFAULT_GRPC_PORTS:
            env[f"MEDMESH_{peer.upper()}_ADDR"] = self.grpc_address(peer)
        return env

    def down(self) -> list[int]:
        """Stops the platform; returns the pids that are still alive afterwards (should be none)."""
        pids = self.recorded_pids()
        result = self.cli("down", timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return [pid for pid in pids if pid_alive(pid)]


def new_platform(state_dir: Path) -> Platform:
    offset = free_port_offset()
    env = {
        **os.environ,
        "MEDMESH_STATE_DIR": str(state_dir),
        "MEDMESH_PORT_OFFSET": str(offset),
        # Key rotation in seconds rather than minutes: the gateway keeps the keys 1 s, and a new
        # key is published 3 s before it signs.
        "MEDMESH_GATEWAY_JWKS_CACHE_SECONDS": "1",
        "MEDMESH_JWKS_PUBLISH_LEAD_SECONDS": "3",
    }
    return Platform(state_dir=state_dir, offset=offset, env=env)
