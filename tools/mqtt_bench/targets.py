"""What the load generator drives: Mosquitto with an emulated cloud, or the medmesh platform.

Both give devices with their own client certificates (mutual TLS 1.3 on 127.0.0.1), a way to
count what the cloud side stored for the bench devices, a command round trip, and the pids
whose CPU and memory the report shows.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import json
import os
import pwd
import resource
import signal
import socket
import ssl
import subprocess
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import httpx
from pymongo import MongoClient

from medmesh.launcher.tls import LocalPki, ensure_local_pki, issue_client_certificate
from tests.integration import mosquitto
from tests.integration.devices import register_device
from tests.integration.people import (
    client,
    create_member,
    create_organization,
    create_patient,
    ok,
)
from tests.integration.platform import free_ports, new_platform
from tools.mqtt_bench.cloud import CloudCounts, ack_worker, send_commands
from tools.mqtt_bench.devices import DeviceCredentials, Endpoint
from tools.mqtt_bench.procs import Worker

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Stored:
    """What the cloud side holds for the bench devices: observations, and distinct ids among them."""

    observations: int
    distinct: int


@dataclass(frozen=True)
class CommandFigures:
    """Per command answered: its id, when it was due and when the cloud saw it COMPLETED
    (time.monotonic()); and the ids never seen COMPLETED."""

    completed: list[tuple[str, float, float]]
    unanswered: list[str]
    create_failures: dict[str, int] = field(default_factory=dict)  # medmesh: POSTs that failed
    # medmesh, per command answered, ms: due -> its create_time, create_time -> complete_time
    # (the command service's clock: the platform's own part), complete_time -> seen over REST.
    split_ms: list[tuple[float, float, float]] = field(default_factory=list)


class Target(ABC):
    name: str

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.endpoint = Endpoint("localhost", 0, "")
        self.active: list[DeviceCredentials] = []
        self.idle: list[DeviceCredentials] = []

    @abstractmethod
    def start(self, active: int, idle: int) -> None:
        """Starts the target and makes `active` + `idle` devices able to connect."""

    @abstractmethod
    def stored(self) -> Stored: ...

    @abstractmethod
    def commands(self, rate: float, duration: float) -> CommandFigures:
        """Commands at `rate`/s to the active devices: ms from when each was due to COMPLETED."""

    @abstractmethod
    def broker_pid(self) -> int:
        """The process holding the device connections (its RSS is the memory figure)."""

    @abstractmethod
    def processes(self) -> dict[str, list[int]]:
        """The target's processes by name, for the CPU table."""

    @abstractmethod
    def stop(self) -> None: ...


def _wait_for_port(port: int, within: float, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}:\n{log.read_text()}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {within:.0f} s")


_STORED_TIMES = ("create_time", "complete_time")
_FINAL_STATES = {"STATE_FAILED", "STATE_TIMED_OUT", "STATE_CANCELED", "STATE_EXPIRED"}


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the harness dies, however it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _device_ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{index:05d}" for index in range(count)]


class MosquittoTarget(Target):
    """Debian's Mosquitto, TLS 1.3 with client certificates required, no persistence; the cloud
    side (acks, commands) is played by MQTT clients of the harness."""

    name = "mosquitto"

    def __init__(self, workdir: Path, cloud_workers: int) -> None:
        super().__init__(workdir)
        self._cloud_workers = cloud_workers
        self._cloud: list[Worker] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._pki: LocalPki | None = None

    def _identity(self, common_name: str) -> DeviceCredentials:
        assert self._pki is not None
        cert, key = issue_client_certificate(self._pki, common_name, self.workdir / "certs")
        return DeviceCredentials(common_name, str(cert), str(key))

    def start(self, active: int, idle: int) -> None:
        mosquitto.install()
        self._pki = ensure_local_pki(self.workdir / "tls", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
        self.active = [self._identity(d) for d in _device_ids("bench-active", active)]
        self.idle = [self._identity(d) for d in _device_ids("bench-idle", idle)]
        clouds = [self._identity(f"cloud-{k}") for k in range(self._cloud_workers)]
        commander = self._identity("cloud-commands")
        (port,) = free_ports(1)
        acl = self.workdir / "acl"
        # A device only under its own prefix, like the adapter; the cloud clients everywhere.
        acl.write_text(
            "".join(f"user {c.device_id}\ntopic readwrite devices/#\n\n" for c in [*clouds, commander])
            + "pattern readwrite devices/%u/#\n"
        )
        config = self.workdir / "mosquitto.conf"
        config.write_text(
            "\n".join(
                [
                    # Run as root, Mosquitto drops to user `mosquitto` (or nobody), who could not
                    # read the certificates in this private directory: stay who we are.
                    f"user {pwd.getpwuid(os.getuid()).pw_name}",
                    "persistence false",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                    # No per-client cap on QoS 1 in flight or queued: amqtt has none either, and
                    # Mosquitto's defaults (20 in flight, 1000 queued) would throttle the cloud client.
                    "max_inflight_messages 0",
                    "max_queued_messages 0",
                    # asyncio (amqtt) disables Nagle on every TCP socket; Mosquitto only when told.
                    # Without it each small packet may wait 40 ms for a delayed TCP ACK.
                    "set_tcp_nodelay true",
                    f"acl_file {acl}",
                    f"listener {port} 127.0.0.1",
                    f"cafile {self._pki.ca_cert}",
                    f"certfile {self._pki.server_cert}",
                    f"keyfile {self._pki.server_key}",
                    "tls_version tlsv1.3",
                    "require_certificate true",
                    "use_identity_as_username true",
                    "",
                ]
            )
        )
        log = self.workdir / "mosquitto.log"
        self._log = log.open("wb")
        self._process = subprocess.Popen(
            [str(mosquitto.binary("mosquitto")), "-c", str(config)],
            env=mosquitto.environment(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        _wait_for_port(port, 10, self._process, log)
        self.endpoint = Endpoint("localhost", port, str(self._pki.ca_cert))
        self._commander = commander
        shards = [[d.device_id for d in self.active[k :: len(clouds)]] for k in range(len(clouds))]
        self._cloud = [
            Worker(f"cloud-{k}", ack_worker, self.endpoint, identity, shard)
            for k, (identity, shard) in enumerate(zip(clouds, shards, strict=True))
        ]
        for worker in self._cloud:
            worker.receive(60)

    def stored(self) -> Stored:
        counts: list[CloudCounts] = []
        for worker in self._cloud:
            worker.send(CloudCounts())
            counts.append(worker.receive(60))
        return Stored(sum(c.observations for c in counts), sum(c.distinct for c in counts))

    def commands(self, rate: float, duration: float) -> CommandFigures:
        devices = [d.device_id for d in self.active]
        completed, unanswered = asyncio.run(
            send_commands(self.endpoint, self._commander, devices, rate, duration, answer_timeout=10)
        )
        return CommandFigures(completed, unanswered)

    def broker_pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def processes(self) -> dict[str, list[int]]:
        return {"mosquitto": [self.broker_pid()], "cloud ack clients": [w.pid for w in self._cloud]}

    def stop(self) -> None:
        for worker in self._cloud:
            worker.stop()
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._log is not None:
            self._log.close()


class MedmeshTarget(Target):
    """A platform of its own (tests/integration/platform.py), devices registered over REST with
    certificates from the development route `:generateCertificate`."""

    name = "medmesh"
    _registration_threads = 16

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.platform = new_platform(workdir / "state")
        self._operator_token = ""
        self._operator_login: tuple[str, str] = ("", "")
        self._started = False
        self.command_waits = 0

    def _register(self, admin: httpx.Client, organization: str, count: int) -> list[DeviceCredentials]:
        certs = self.workdir / "certs"
        certs.mkdir(parents=True, exist_ok=True)

        def one(_: int) -> DeviceCredentials:
            device = register_device(admin, certs, organization)
            return DeviceCredentials(device.device_id, str(device.cert), str(device.key))

        # Registration is two REST calls per device; in parallel, 5,000 take about a minute.
        with ThreadPoolExecutor(self._registration_threads) as pool:
            return list(pool.map(one, range(count)))

    def start(self, active: int, idle: int) -> None:
        self.platform.up()
        self._started = True
        started = time.monotonic()
        with client(self.platform, self.platform.admin_token()) as admin:
            organization = create_organization(admin, "MQTT bench clinic")
            org_admin = create_member(self.platform, admin, organization, "ROLE_ORGANIZATION_ADMIN")
            operator = create_member(self.platform, org_admin.http, organization, "ROLE_OPERATOR")
            clinician = create_member(self.platform, org_admin.http, organization, "ROLE_CLINICIAN")
            patient = create_patient(clinician.http, organization)["name"]
            self._operator_login = (operator.username, operator.password)
            self.active = self._register(org_admin.http, organization, active)
            # Active devices measure a patient, as in use: ingest links observations to them.
            for device in self.active:
                ok(org_admin.http.post(f"/v1/devices/{device.device_id}:assign", json={"patient": patient}))
            self.idle = self._register(org_admin.http, organization, idle)
            for member in (org_admin, operator, clinician):
                member.http.close()
        self.registration_seconds = round(time.monotonic() - started, 1)
        self.endpoint = Endpoint("localhost", self.platform.config.port("mqtt"), str(self.platform.ca))

    def stored(self) -> Stored:
        """Counted in the observation service's database. One pass over the collection, counted
        here: FerretDB (v1, SQLite) pushes no device filter down and took minutes to $group."""
        devices = {f"devices/{d.device_id}" for d in self.active}
        observations = 0
        distinct: set[tuple[str, str]] = set()
        mongo: MongoClient[dict[str, Any]] = MongoClient(self.platform.config.mongodb_uri)
        try:
            collection = mongo["medmesh_observation"]["observations"]
            for document in collection.find({}, {"_id": 0, "device": 1, "message_id": 1}, batch_size=10_000):
                if document["device"] in devices:
                    observations += 1
                    distinct.add((document["device"], document["message_id"]))
        finally:
            mongo.close()
        return Stored(observations, len(distinct))

    def commands(self, rate: float, duration: float) -> CommandFigures:
        token = self.platform.login(*self._operator_login)["access_token"]
        return asyncio.run(self._commands(token, rate, duration, answer_timeout=10))

    async def _commands(self, token: str, rate: float, duration: float, answer_timeout: float) -> CommandFigures:
        context = ssl.create_default_context(cafile=str(self.platform.ca))
        completed: list[tuple[str, float, float]] = []
        unanswered: list[str] = []
        create_failures: dict[str, int] = {}
        split_ms: list[tuple[float, float, float]] = []
        wall_offset = time.time() - time.monotonic()
        async with httpx.AsyncClient(
            base_url=self.platform.gateway,
            verify=context,
            headers={"authorization": f"Bearer {token}"},
            timeout=answer_timeout,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        ) as http:

            async def one(device: str, due: float) -> None:
                if (delay := due - time.monotonic()) > 0:
                    await asyncio.sleep(delay)
                try:
                    created = await http.post(f"/v1/devices/{device}/commands", json={"command_name": "bench.ping"})
                except httpx.HTTPError as error:  # an overloaded platform: counted, not fatal
                    create_failures[type(error).__name__] = create_failures.get(type(error).__name__, 0) + 1
                    return
                if created.status_code != 200:
                    create_failures[str(created.status_code)] = create_failures.get(str(created.status_code), 0) + 1
                    return
                name = created.json()["name"]
                command_id = name.rpartition("/")[2]
                # Followed as a portal would, with WaitCommand (long polling): it answers when
                # the command is final, so no GET loads the path measured and none comes late.
                while (left := due + answer_timeout - 0.5 - time.monotonic()) > 0:
                    try:
                        reply = await http.get(f"/v1/{name}:wait", params={"timeout": f"{min(left, 20):.3f}s"})
                    except httpx.HTTPError:
                        break
                    self.command_waits += 1
                    if reply.status_code == 200 and (seen := reply.json()).get("state") == "STATE_COMPLETED":
                        done = time.monotonic()
                        completed.append((command_id, due, done))
                        create, complete = (datetime.fromisoformat(seen[k]).timestamp() for k in _STORED_TIMES)
                        walls = (due + wall_offset, create, complete, done + wall_offset)
                        rest_in, platform, rest_out = ((b - a) * 1000 for a, b in itertools.pairwise(walls))
                        split_ms.append((rest_in, platform, rest_out))
                        return
                    if reply.status_code != 200 or seen.get("state") in _FINAL_STATES:
                        break
                unanswered.append(command_id)

            # A few round trips first open the gateway's connections before timing starts.
            for device in self.active[:3]:
                await one(device.device_id, time.monotonic())
            completed.clear()
            create_failures.clear()
            split_ms.clear()
            self.command_waits = 0
            start = time.monotonic() + 0.2
            total = int(rate * duration)
            await asyncio.gather(
                *(one(self.active[i % len(self.active)].device_id, start + i / rate) for i in range(total))
            )
        return CommandFigures(completed, unanswered, create_failures, split_ms)

    def _components(self) -> dict[str, int]:
        status = json.loads(self.platform.config.status_file.read_text())
        return {c["name"]: int(c["pid"]) for c in status["components"]}

    def broker_pid(self) -> int:
        return self._components()["mqtt_adapter"]

    def processes(self) -> dict[str, list[int]]:
        components = self._components()
        named = {"mqtt_adapter": "adapter", "observation": "observation", "ferretdb": "ferretdb", "gateway": "envoy"}
        groups = {label: [components[name]] for name, label in named.items() if name in components}
        others = [pid for name, pid in components.items() if name not in named]
        groups["other services"] = others
        return groups

    def stop(self) -> None:
        if self._started:
            leftovers = self.platform.down()
            if leftovers:
                print(f"medmesh: processes left after down: {leftovers}", flush=True)


def open_files_limit() -> None:
    """5,000 connections need more descriptors than a default soft limit of 1024 (children inherit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
