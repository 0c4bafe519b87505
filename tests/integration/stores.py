"""Processes a test module starts itself, without the rest of the platform: a FerretDB of its own
and service processes (`python -m services.<name>`), each on free 127.0.0.1 ports and always
stopped afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pymongo import MongoClient

from medmesh.launcher.config import PlatformConfig
from medmesh.runtime.mongo import Document
from tests.integration.platform import free_ports

SERVING = health_pb2.HealthCheckResponse.SERVING


def stop(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, *, timeout: float = 15, group: bool = False
) -> None:
    """Sends `sig` (to the process group with `group`: the process was started in a new session),
    waits up to `timeout` seconds, then kills."""
    if process.poll() is not None:
        return

    def send(signal_number: int) -> None:
        if group:
            os.killpg(process.pid, signal_number)
        else:
            process.send_signal(signal_number)

    send(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait()


def _pings(uri: str) -> bool:
    client: MongoClient[Document] = MongoClient(uri, serverSelectionTimeoutMS=300)
    try:
        client.admin.command("ping")
        return True
    except Exception:  # not up yet
        return False
    finally:
        client.close()


@contextmanager
def ferretdb(data: Path, within: float = 20) -> Iterator[str]:
    """A FerretDB (SQLite handler, files in `data`) on free ports; yields its URI once it answers a ping."""
    binary = PlatformConfig.from_env().ferretdb_binary
    if not os.access(binary, os.X_OK):
        pytest.fail(f"FerretDB is not installed at {binary}: run `make setup`")
    port, debug_port = free_ports(2)
    log_path = data / "ferretdb.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(binary),
                "--handler=sqlite",
                f"--sqlite-url=file:{data}/",
                f"--state-dir={data}",
                f"--listen-addr=127.0.0.1:{port}",
                f"--debug-addr=127.0.0.1:{debug_port}",
                "--telemetry=disable",
                "--log-level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        uri = f"mongodb://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + within
            while not _pings(uri):
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "FerretDB did not come up"
                time.sleep(0.1)
            yield uri
        finally:
            stop(process)


class ServiceProcess:
    """`python -m <module>` with `env`, serving gRPC on 127.0.0.1:`port`, its output appended to `log_path`."""

    def __init__(self, module: str, env: Mapping[str, str], port: int, health_service: str, log_path: Path) -> None:
        self.module = module
        self.health_service = health_service
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module], env=dict(env), stdout=self._log, stderr=subprocess.STDOUT
        )
        self.address = f"127.0.0.1:{port}"

    def wait_serving(self, within: float = 30) -> None:
        """Until the gRPC health check of `health_service` answers SERVING."""
        deadline = time.monotonic() + within
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=self.health_service)
            while time.monotonic() < deadline:
                assert self.process.poll() is None, self.log_path.read_text()
                try:
                    if stub.Check(request, timeout=1).status == SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise AssertionError(f"{self.module} never became SERVING:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        """A crash: no graceful shutdown, nothing flushed."""
        stop(self.process, signal.SIGKILL)

    def close(self) -> None:
        stop(self.process)
        self._log.close()
