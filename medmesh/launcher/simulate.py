"""`medmesh simulate --devices N --rate R`: a fleet of simulated devices on the running platform.

Each device is registered over REST (as the first platform admin) in one simulator organization,
gets a certificate from the development route (`:generateCertificate`), cached with its key under
`<state dir>/simulator/` and reused while the device's registration is unchanged, then connects
with the device SDK (clients/python/medmesh_device) over MQTT with mutual TLS.

R is the number of observation messages per second per device, and each message carries three
observations (heart rate, SpO2, respiratory rate): the fleet sends N x R messages and 3 x N x R
observations per second. Devices complete the commands they get and apply configuration. A line
of counters is printed every second; Ctrl-C (or --duration) prints a summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import ssl
import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from medmesh.launcher import session
from medmesh.launcher.config import PlatformConfig
from medmesh_device import (
    Command,
    Counters,
    DeviceClient,
    DeviceError,
    NotAuthorized,
    Observation,
    ObservationResult,
    OutboxFull,
    Outcome,
)

ORGANIZATION_NAME = "medmesh simulator"
OBSERVATIONS_PER_MESSAGE = 3
REST_CONCURRENCY = 16
FLUSH_SECONDS = 10.0


class SimulationError(Exception):
    """The fleet could not be set up; the message says why."""


@dataclass(frozen=True)
class Identity:
    device_id: str
    cert: Path
    key: Path


@dataclass
class Fleet:
    """What the simulated devices did, beyond each client's own counters."""

    devices: list[DeviceClient] = field(default_factory=list)
    # Seconds from queueing to the ack: the latest ones for percentiles, all of them for the mean.
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=200_000))
    latency_sum: float = 0.0
    latency_count: int = 0
    messages: int = 0
    dropped: int = 0  # outbox full: the platform is behind
    late: int = 0  # sends skipped because the event loop could not keep the rate
    errors: dict[str, int] = field(default_factory=dict)

    def total(self) -> Counters:
        total = Counters()
        for device in self.devices:
            for name, value in vars(device.counters).items():
                setattr(total, name, getattr(total, name) + value)
        return total

    @property
    def connected(self) -> int:
        return sum(device.connected for device in self.devices)


def _state_dir(config: PlatformConfig) -> Path:
    return config.state_dir / "simulator"


class Registrar:
    """Registers the simulator's organization and devices over REST, and caches certificates."""

    def __init__(self, config: PlatformConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self.http = http
        self.directory = _state_dir(config)
        self.state_file = self.directory / "state.json"

    def _load(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            state = {}
        state.setdefault("devices", {})
        return state

    def _save(self, state: dict[str, Any]) -> None:
        self.state_file.write_text(json.dumps(state, indent=2, sort_keys=True))

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise SimulationError(f"{method} {path}: {error} (is the platform up?)") from error

    @staticmethod
    def _ok(reply: httpx.Response) -> dict[str, Any]:
        if reply.status_code != 200:
            raise SimulationError(
                f"{reply.request.method} {reply.request.url.path}: HTTP {reply.status_code}: {reply.text}"
            )
        data: dict[str, Any] = reply.json()
        return data

    async def organization(self, state: dict[str, Any]) -> str:
        known = state.get("organization")
        if known and (await self._call("GET", f"/v1/{known}")).status_code == 200:
            return str(known)
        created = self._ok(await self._call("POST", "/v1/organizations", json={"display_name": ORGANIZATION_NAME}))
        state["organization"] = created["name"]
        state["devices"] = {}  # certificates of another organization's devices are no use
        return str(created["name"])

    async def device(self, organization: str, device_id: str, known: dict[str, Any] | None) -> tuple[Identity, str]:
        """The device registered in `organization` with a usable certificate; (identity, uid)."""
        cert, key = self.directory / f"{device_id}.crt", self.directory / f"{device_id}.key"
        reply = await self._call("GET", f"/v1/devices/{device_id}")
        if reply.status_code == 404:
            body = {"organization": organization, "model": "Simulator", "device_type": "simulator",
                    "display_name": f"Simulated monitor {device_id}"}  # fmt: skip
            reply = await self._call("POST", "/v1/devices", params={"device_id": device_id}, json=body)
        registered = self._ok(reply)
        if registered.get("organization") != organization:
            raise SimulationError(f"{device_id} belongs to {registered.get('organization')}; use another --prefix")
        uid = str(registered.get("uid", ""))
        fresh = known is not None and known.get("uid") == uid and cert.exists() and key.exists()
        if not fresh:
            issued = self._ok(await self._call("POST", f"/v1/devices/{device_id}:generateCertificate", json={}))
            key.touch(mode=0o600)
            key.write_text(issued["private_key_pem"])
            cert.write_text(issued["certificate"]["pem"])
        return Identity(device_id, cert, key), uid

    async def register(self, device_ids: list[str], progress: Callable[[str], None]) -> list[Identity]:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        state = self._load()
        organization = await self.organization(state)
        limit = asyncio.Semaphore(REST_CONCURRENCY)
        done = 0

        async def one(device_id: str) -> Identity:
            nonlocal done
            async with limit:
                identity, uid = await self.device(organization, device_id, state["devices"].get(device_id))
            state["devices"][device_id] = {"uid": uid}
            done += 1
            if done % 100 == 0:
                progress(f"medmesh simulate: {done}/{len(device_ids)} devices registered")
            return identity

        try:
            return list(await asyncio.gather(*(one(d) for d in device_ids)))
        finally:
            self._save(state)


class SimulatedDevice:
    """Callbacks of one device: it completes every command and applies every configuration."""

    def __init__(self, fleet: Fleet, rng: random.Random) -> None:
        self.fleet = fleet
        self.rng = rng
        self.config: dict[str, Any] = {}

    async def on_command(self, command: Command) -> dict[str, Any]:
        if command.command == "measure.blood_pressure":
            return {"systolic": self.rng.randint(105, 140), "diastolic": self.rng.randint(65, 90)}
        return {"simulated": True, "command": command.command}

    async def on_config(self, version: int, config: dict[str, Any]) -> None:
        self.config = config

    async def on_error(self, error: DeviceError) -> None:
        key = getattr(error, "reason", None) or type(error).__name__
        self.fleet.errors[key] = self.fleet.errors.get(key, 0) + 1

    def vitals(self) -> list[Observation]:
        return [
            Observation("heart_rate", round(self.rng.gauss(72, 5)), unit="/min"),
            Observation("spo2", round(self.rng.uniform(94, 99.5), 1), unit="%"),
            Observation("respiratory_rate", round(self.rng.gauss(15, 2)), unit="/min"),
        ]


async def _stream(
    device: DeviceClient, simulated: SimulatedDevice, fleet: Fleet, rate: float, stop: asyncio.Event
) -> None:
    """Sends one message of three observations every 1/rate s, on a schedule that does not drift."""
    period = 1.0 / rate
    loop = asyncio.get_running_loop()
    due = loop.time() + random.uniform(0, period)  # spread the fleet over the period

    def record(queued: float) -> Callable[[asyncio.Future[ObservationResult]], None]:
        def done(future: asyncio.Future[ObservationResult]) -> None:
            if future.cancelled() or future.exception() is not None or future.result().outcome is Outcome.REJECTED:
                return
            latency = loop.time() - queued
            fleet.latencies.append(latency)
            fleet.latency_sum += latency
            fleet.latency_count += 1

        return done

    await asyncio.sleep(max(0.0, due - loop.time()))
    while not stop.is_set():
        if device.connected:
            try:
                queued = loop.time()
                for future in device.enqueue_observations(simulated.vitals()):
                    future.add_done_callback(record(queued))
                fleet.messages += 1
            except OutboxFull:
                fleet.dropped += 1
        due += period
        behind = loop.time() - due
        if behind > period:  # skip what cannot be sent in time rather than burst
            skipped = int(behind // period)
            fleet.late += skipped
            due += skipped * period
        await asyncio.sleep(max(0.0, due - loop.time()))  # cancelled when the simulation stops


def _percentile(values: Iterable[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _line(fleet: Fleet, began: float, now: float) -> str:
    total = fleet.total()
    elapsed = max(now - began, 1e-9)
    recent = list(fleet.latencies)[-5000:]
    pending = sum(d.pending_observations for d in fleet.devices)
    latency = f"ack p50 {_percentile(recent, 0.5) * 1000:.0f} ms" if recent else "ack p50 -"
    return (
        f"{elapsed:6.0f}s connected {fleet.connected}/{len(fleet.devices)} | "
        f"sent {total.observations_sent} ({total.observations_sent / elapsed:.0f}/s) | "
        f"acked {total.acked} | rejected {total.rejected} | pending {pending} | "
        f"commands {total.commands_completed + total.commands_failed} | config {total.configs_applied} | {latency}"
    )


def _summary(fleet: Fleet, seconds: float, rate: float) -> str:
    total = fleet.total()
    latencies = fleet.latencies
    target = len(fleet.devices) * rate * OBSERVATIONS_PER_MESSAGE
    lines = [
        f"medmesh simulate: {len(fleet.devices)} devices for {seconds:.1f} s at {rate:g} messages/s each",
        f"  observations sent  {total.observations_sent} ({total.observations_sent / max(seconds, 1e-9):.1f}/s; "
        f"target {target:g}/s), resent {total.observations_resent}",
        f"  acked              {total.acked} (stored {total.stored}, duplicates {total.duplicates}); "
        f"rejected {total.rejected}; unacked at the end {sum(d.pending_observations for d in fleet.devices)}",
        f"  messages           {fleet.messages} queued, {fleet.dropped} dropped (outbox full), {fleet.late} late",
        f"  connections        {total.connects} made, {total.disconnects} lost or closed",
        f"  commands           {total.commands_completed} completed, {total.commands_failed} failed; "
        f"configurations applied {total.configs_applied}",
    ]
    if latencies:
        lines.append(
            f"  ack latency        p50 {_percentile(latencies, 0.5) * 1000:.1f} ms, "
            f"p95 {_percentile(latencies, 0.95) * 1000:.1f} ms, p99 {_percentile(latencies, 0.99) * 1000:.1f} ms, "
            f"max {max(latencies) * 1000:.1f} ms, mean {fleet.latency_sum / fleet.latency_count * 1000:.1f} ms"
            + (f" (percentiles of the last {len(latencies)})" if fleet.latency_count > len(latencies) else "")
        )
    if fleet.errors:
        lines.append("  errors             " + ", ".join(f"{k} x{v}" for k, v in sorted(fleet.errors.items())))
    return "\n".join(lines)


async def simulate(
    config: PlatformConfig, devices: int, rate: float, duration: float | None, prefix: str, say: Callable[[str], None]
) -> int:
    token = await asyncio.to_thread(session.token, config)
    verify = ssl.create_default_context(cafile=str(config.tls_dir / "ca.crt"))
    async with httpx.AsyncClient(
        base_url=f"https://localhost:{config.port('gateway')}",
        verify=verify,
        headers={"authorization": f"Bearer {token}"},
        timeout=30.0,
    ) as http:
        say(f"medmesh simulate: registering {devices} devices")
        identities = await Registrar(config, http).register([f"{prefix}-{i:04d}" for i in range(1, devices + 1)], say)

    fleet = Fleet()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    simulated = []
    for index, identity in enumerate(identities):
        behaviour = SimulatedDevice(fleet, random.Random(index))
        simulated.append(behaviour)
        fleet.devices.append(
            DeviceClient.with_certificate(
                identity.device_id,
                "localhost",
                config.port("mqtt"),
                ca_file=config.tls_dir / "ca.crt",
                cert_file=identity.cert,
                key_file=identity.key,
                on_command=behaviour.on_command,
                on_config=behaviour.on_config,
                on_error=behaviour.on_error,
                outbox_capacity=10_000,
            )
        )
    say(f"medmesh simulate: connecting {devices} devices to mqtts://localhost:{config.port('mqtt')}")
    tasks: list[asyncio.Task[None]] = []
    began = loop.time()
    try:
        for device in fleet.devices:
            await device.start()
        connecting = asyncio.gather(*(d.wait_connected(timeout=60) for d in fleet.devices), return_exceptions=True)
        interrupted = asyncio.ensure_future(stop.wait())
        either: set[asyncio.Future[Any]] = {connecting, interrupted}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        interrupted.cancel()
        if stop.is_set():
            connecting.cancel()
            say("medmesh simulate: interrupted while connecting")
            return 130
        failures = [r for r in connecting.result() if isinstance(r, BaseException)]
        if failures:
            kinds = {type(f).__name__ for f in failures}
            say(f"medmesh simulate: {len(failures)} did not connect ({', '.join(sorted(kinds))}): {failures[0]}")
            if all(isinstance(f, NotAuthorized) for f in failures) and len(failures) == devices:
                return 1
        began = loop.time()
        tasks = [
            asyncio.create_task(_stream(d, s, fleet, rate, stop)) for d, s in zip(fleet.devices, simulated, strict=True)
        ]
        live = sys.stdout.isatty()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            now = loop.time()
            if duration is not None and now - began >= duration:
                stop.set()
            line = _line(fleet, began, now)
            if live:
                sys.stdout.write("\r\x1b[2K" + line)
                sys.stdout.flush()
            else:
                say(line)
        if live:
            sys.stdout.write("\n")
        seconds = loop.time() - began
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        say(f"medmesh simulate: stopping; waiting up to {FLUSH_SECONDS:.0f} s for the last acks")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FLUSH_SECONDS):
                await asyncio.gather(*(d.flush() for d in fleet.devices))
        say(_summary(fleet, seconds, rate))
        return 0
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(d.close() for d in fleet.devices), return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run(
    config: PlatformConfig, devices: int, rate: float, duration: float | None, prefix: str, say: Callable[[str], None]
) -> int:
    """The `medmesh simulate` command; its exit status."""
    if devices < 1 or rate <= 0:
        say("medmesh simulate: --devices must be at least 1 and --rate above 0")
        return 2
    try:
        return asyncio.run(simulate(config, devices, rate, duration, prefix, say))
    except (SimulationError, session.SessionError) as error:
        say(f"medmesh simulate: {error}")
        return 1
