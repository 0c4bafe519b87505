"""Resident memory per idle device connection, measured in one process.

    .venv/bin/python -m mqtt_adapter.memory_probe --connections 5000 [--trace]

(from the repository root: the devices are tools/mqtt_bench's). Starts `DeviceBroker` as
`__main__` wires it (the real router, deliveries and connections), on a free port with a
throwaway PKI, with the mesh answered in memory: the device registry admits a certificate for
the device named in its common name, and nothing is pending for anybody. Then child processes
(so their memory is not counted) connect the idle fleet exactly as `make bench-mqtt` does
(tools/mqtt_bench/idle.py: TLS 1.3 with a client certificate, CONNECT, SUBSCRIBE
devices/{d}/#, PINGREQ within the keep-alive). It prints the adapter's RSS growth per
connection, and where the Python side of it is (tasks, objects by type; with --trace, the
allocating lines by tracemalloc, which costs memory itself: read RSS from a run without it).

RSS is read as `make bench-mqtt` reads it (and again after a garbage collection and
malloc_trim). Here the adapter is fresh; the benchmark measures after its other phases grew the
heap, so it reads less: with amqtt's own connection handling, 67.6 KiB per connection there and
75.8 KiB here (5,000 connections). A minute here, twenty minutes there.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import socket
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from medmesh.command.v1 import command_service_pb2 as command_pb
from medmesh.device.v1 import device_internal_service_pb2 as device_pb
from medmesh.launcher.tls import LocalPki, ensure_local_pki, issue_client_certificate
from mqtt_adapter.broker import DeviceBroker, device_tls_context
from mqtt_adapter.connections import Connections
from mqtt_adapter.downlink import Deliveries
from mqtt_adapter.mesh import Admission, CommandQueue, DeviceRegistry, FileDesk, Mesh, ObservationSink
from mqtt_adapter.router import UplinkRouter
from mqtt_adapter.uplink import ObservationPipeline


class InMemoryRegistry(DeviceRegistry):
    """Admits a certificate for the device in its common name; records what devices report."""

    def __init__(self) -> None:  # no channel: nothing here goes over the network
        self.connected: Counter[str] = Counter()

    async def check_certificate(self, der: bytes) -> Admission:
        names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return Admission(f"devices/{names[0].value!s}") if names else Admission("", "NO_COMMON_NAME")

    async def verify_credentials(self, username: str, password: str) -> Admission:
        return Admission("", "UNKNOWN_CREDENTIALS")

    async def report_connection(self, device: str, *, connected: bool, **_: Any) -> None:
        self.connected[device] += 1 if connected else -1

    async def pending_config(self, device: str) -> device_pb.PendingConfig:
        return device_pb.PendingConfig()

    async def touch(self, device: str) -> None:
        return None


class NothingPending(CommandQueue):
    def __init__(self) -> None:
        pass

    async def pending(self, device: str) -> command_pb.ListPendingCommandsResponse:
        return command_pb.ListPendingCommandsResponse()


@dataclass
class Adapter:
    broker: DeviceBroker
    connections: Connections
    registry: InMemoryRegistry
    pki: LocalPki
    port: int
    workdir: Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@asynccontextmanager
async def running_adapter(workdir: Path, registry: InMemoryRegistry | None = None) -> Any:
    """The adapter's broker as `python -m mqtt_adapter` builds it, the mesh in memory."""
    pki = ensure_local_pki(workdir / "tls", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    registry = InMemoryRegistry() if registry is None else registry
    mesh = Mesh(registry, ObservationSink.__new__(ObservationSink), NothingPending(), FileDesk.__new__(FileDesk))
    connections = Connections()
    deliveries = Deliveries(mesh, connections)
    pipeline = ObservationPipeline(mesh.observations, connections)
    router = UplinkRouter(mesh, connections, pipeline, deliveries)
    port = free_port()
    broker = DeviceBroker(
        host="127.0.0.1",
        port=port,
        tls=device_tls_context(str(pki.server_cert), str(pki.server_key), str(pki.ca_cert)),
        registry=registry,
        connections=connections,
        router=lambda: router,
        instance="memory-probe",
        address="",
    )
    await broker.start()
    try:
        yield Adapter(broker, connections, registry, pki, port, workdir)
    finally:
        if broker.transitions.state == "started":
            await broker.shutdown()
        await broker.close()
        await asyncio.gather(router.close(), deliveries.close(), pipeline.close(), connections.close())


def device_credentials(adapter: Adapter, prefix: str, count: int) -> list[Any]:
    from tools.mqtt_bench.devices import DeviceCredentials  # the benchmark's own device model

    devices = []
    for index in range(count):
        device_id = f"{prefix}-{index:05d}"
        cert, key = issue_client_certificate(adapter.pki, device_id, adapter.workdir / "certs")
        devices.append(DeviceCredentials(device_id, str(cert), str(key)))
    return devices


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def settle() -> int:
    """RSS once garbage is collected and glibc has returned what it can."""
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    return rss_kib()


def object_counts() -> Counter[str]:
    return Counter(type(o).__qualname__ for o in gc.get_objects())


class Fleet:
    """Idle devices in child processes (tools/mqtt_bench/idle.py), connected and held."""

    def __init__(self, adapter: Adapter, devices: list[Any], *, workers: int, concurrency: int) -> None:
        from tools.mqtt_bench.devices import Endpoint
        from tools.mqtt_bench.idle import FleetPlan, idle_worker
        from tools.mqtt_bench.procs import Worker

        endpoint = Endpoint("localhost", adapter.port, str(adapter.pki.ca_cert))
        plan = FleetPlan(keepalive=60, concurrency=max(1, concurrency // workers), budget=300)
        self.workers = [Worker(f"idle-{k}", idle_worker, endpoint, devices[k::workers], plan) for k in range(workers)]

    async def connected(self) -> int:
        loop = asyncio.get_running_loop()
        reports = [await loop.run_in_executor(None, worker.receive, 600) for worker in self.workers]
        refused = {why: n for report in reports for why, n in report.failures.items()}
        if refused:
            print(f"  failed attempts: {refused}", file=sys.stderr)
        return sum(report.connected for report in reports)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, worker.stop) for worker in self.workers))


def _by_caller(snapshot: tracemalloc.Snapshot, before: tracemalloc.Snapshot) -> Counter[str]:
    """Heap growth by the innermost frame in amqtt or mqtt_adapter (else the innermost frame)."""
    sizes: Counter[str] = Counter()
    for stat in snapshot.compare_to(before, "traceback"):
        frames = list(reversed(stat.traceback))  # innermost first
        mine = [f for f in frames if "amqtt" in f.filename or "mqtt_adapter" in f.filename]
        frame = mine[0] if mine else frames[0]
        inner = frames[0]
        where = f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}"
        sizes[f"{where} <- {Path(inner.filename).name}:{inner.lineno}"] += stat.size_diff
    return sizes


def _top(counter: Counter[str], per: int, limit: int) -> Iterator[str]:
    for name, count in counter.most_common(limit):
        if count / per >= 0.5:
            yield f"    {count / per:6.1f}  {name}"


async def measure(connections: int, warmup: int, workers: int, concurrency: int, trace: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="medmesh-memory-") as tmp:
        async with running_adapter(Path(tmp)) as adapter:
            print(f"issuing {warmup + connections} device certificates", file=sys.stderr)
            warm = device_credentials(adapter, "warm", warmup)
            idle = device_credentials(adapter, "idle", connections)
            # First connections pay for one-time things (imports, caches, arenas): not per device.
            warm_fleet = Fleet(adapter, warm, workers=1, concurrency=concurrency)
            await warm_fleet.connected()
            await asyncio.sleep(2)
            if trace:
                tracemalloc.start(30)
            before_raw = rss_kib()
            before_rss, before_tasks, before_objects = settle(), len(asyncio.all_tasks()), object_counts()
            before_snapshot = tracemalloc.take_snapshot() if trace else None
            started = time.monotonic()
            fleet = Fleet(adapter, idle, workers=workers, concurrency=concurrency)
            try:
                held = await fleet.connected()
                seconds = time.monotonic() - started
                await asyncio.sleep(5)  # as the benchmark: registry calls and buffers settle
                after_raw = rss_kib()
                after_rss, after_tasks = settle(), len(asyncio.all_tasks())
                snapshot = tracemalloc.take_snapshot() if before_snapshot is not None else None
                objects = object_counts()
                objects.subtract(before_objects)
                per = max(1, held)
                figures = {
                    "connections": held,
                    "connect_seconds": round(seconds, 1),
                    "kib_per_connection": round((after_raw - before_raw) / per, 1),  # as make bench-mqtt reads it
                    "kib_per_connection_after_gc": round((after_rss - before_rss) / per, 1),
                    "tasks_per_connection": round((after_tasks - before_tasks) / per, 2),
                    "objects_per_connection": round(sum(objects.values()) / per, 1),
                }
                print(f"{held} idle TLS connections held; adapter RSS {before_raw} -> {after_raw} KiB")
                for name, value in figures.items():
                    print(f"  {name}: {value}")
                print("  objects per connection, by type:")
                print("\n".join(_top(objects, per, 25)))
                if snapshot is not None and before_snapshot is not None:
                    stats = snapshot.compare_to(before_snapshot, "lineno")
                    python_kib = sum(stat.size_diff for stat in stats) / 1024 / per
                    print(f"  Python heap (tracemalloc): {python_kib:.1f} KiB per connection; by line:")
                    for stat in stats[:25]:
                        frame = stat.traceback[0]
                        print(f"    {stat.size_diff / 1024 / per:6.2f} KiB  {frame.filename}:{frame.lineno}")
                    print("  Python heap by the first amqtt or adapter frame that asked for it:")
                    for where, size in _by_caller(snapshot, before_snapshot).most_common(25):
                        print(f"    {size / 1024 / per:6.2f} KiB  {where}")
                    figures["python_kib_per_connection"] = round(python_kib, 1)
                return figures
            finally:
                await fleet.close()
                await warm_fleet.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=2000, help="idle connections measured (2000)")
    parser.add_argument("--warmup", type=int, default=100, help="connections opened before measuring (100)")
    parser.add_argument("--workers", type=int, default=2, help="client processes (2)")
    parser.add_argument("--concurrency", type=int, default=40, help="connection attempts at once (40)")
    parser.add_argument("--trace", action="store_true", help="attribute the Python heap with tracemalloc")
    args = parser.parse_args()
    asyncio.run(measure(args.connections, args.warmup, args.workers, args.concurrency, args.trace))


if __name__ == "__main__":
    main()
