"""Start and stop a real platform (`medmesh up --detach` / `medmesh down`) for tests."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from medmesh.launcher.config import BASE_PORTS, PlatformConfig
from medmesh.launcher.supervisor import pid_alive, port_in_use

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


def free_port_offset() -> int:
    """An offset that moves every platform port onto free ones (beside a developer's `make up`)."""
    candidates = list(range(1000, 15000, 100))
    random.shuffle(candidates)
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

    def down(self) -> list[int]:
        """Stops the platform; returns the pids that are still alive afterwards (should be none)."""
        pids = self.recorded_pids()
        result = self.cli("down", timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return [pid for pid in pids if pid_alive(pid)]


def new_platform(state_dir: Path) -> Platform:
    offset = free_port_offset()
    env = {**os.environ, "MEDMESH_STATE_DIR": str(state_dir), "MEDMESH_PORT_OFFSET": str(offset)}
    return Platform(state_dir=state_dir, offset=offset, env=env)
