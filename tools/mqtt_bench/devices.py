"""Active devices: send observations, wait for the cloud's acks, run commands. One process each.

A worker process holds a few paho clients (through aiomqtt, on one event loop) and runs load
jobs on them:
- closed loop: each device keeps `window` messages awaiting their cloud ack and sends the next
  one when an ack frees a slot: the highest rate the target sustains (like a device that
  buffers observations until they are acknowledged);
- open loop: each device sends at a fixed rate whatever happens, and the latency of a message is
  counted from when it was due, so a stall shows in the figures instead of slowing the sender.
Every device also answers commands (`devices/{d}/commands`, action run) with COMPLETED.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import ssl
import time
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any

import aiomqtt

from tools.mqtt_bench.procs import serve

OBSERVATIONS_PER_MESSAGE = 3
KEEPALIVE_SECONDS = 60
# paho leaves Nagle on: a small publish could then wait for the TCP ACK of the previous one
# (up to 40 ms), which would measure the client's socket, not the broker.
CLOUD_TO_DEVICE_TOPICS = ("acks", "errors", "config/desired", "commands", "files/responses")
NO_DELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    ca_file: str


@dataclass(frozen=True)
class DeviceCredentials:
    device_id: str
    cert_file: str
    key_file: str


def tls_context(endpoint: Endpoint, device: DeviceCredentials) -> ssl.SSLContext:
    """TLS 1.3 only, the target's CA, the device's certificate (mutual TLS)."""
    context = ssl.create_default_context(cafile=endpoint.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(device.cert_file, device.key_file)
    return context


@dataclass(frozen=True)
class LoadJob:
    tag: str  # in every observation id of the job, so ids stay unique per device forever
    start_at: float  # time.monotonic() (one clock for every process on Linux)
    duration: float
    window: int  # closed loop: messages awaiting their ack per device; 0 = open loop
    rate_per_device: float  # open loop: messages per second per device
    drain: float  # how long after the end outstanding acks are waited for
    # The protocol's "resend after 10 s without an answer": here the slot is freed and the
    # message counted as timed out (not resent, so every send is one message in the counts).
    answer_timeout: float = 10.0


@dataclass
class LoadResult:
    devices: int
    sent: int = 0
    acked: int = 0  # every observation of the message acked (stored or duplicate)
    acked_in_time: int = 0  # ... by the end of the job's duration
    per_second: list[int] = field(default_factory=list)  # messages fully acked in each second
    latencies_ms: list[float] = field(default_factory=list)
    duplicate_ids: int = 0  # acked as `duplicates` (stored before)
    repeated_acks: int = 0  # an id acked again after its message was complete
    rejected: int = 0  # messages with an observation refused on `errors`
    timed_out: int = 0  # no complete answer within answer_timeout
    errors: dict[str, int] = field(default_factory=dict)
    lag_p99_ms: float = 0.0  # open loop: how late the generator sent (it must keep up)
    lag_max_ms: float = 0.0


@dataclass
class _Pending:
    ids: set[str]
    due: float
    freed: bool = False


@dataclass
class _Device:
    credentials: DeviceCredentials
    client: aiomqtt.Client
    prefix: str
    window: asyncio.Semaphore | None = None
    sequence: int = 0
    # Messages sent and not fully answered, by message key (an observation id less its `.k`).
    pending: dict[str, _Pending] = field(default_factory=dict)


def observations_payload(ids: list[str]) -> bytes:
    """Three observations (protocol 3.1), measured now."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return json.dumps(
        {
            "observations": [
                {"id": ids[0], "metric": "heart_rate", "time": now, "value": 72, "unit": "/min"},
                {"id": ids[1], "metric": "spo2", "time": now, "value": 97.5, "unit": "%"},
                {"id": ids[2], "metric": "respiratory_rate", "time": now, "value": 16, "unit": "/min"},
            ]
        }
    ).encode()


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


class DeviceFleet:
    """The active devices of one worker process and the bookkeeping of the job in progress."""

    def __init__(self, endpoint: Endpoint, devices: list[DeviceCredentials], max_inflight: int) -> None:
        self._endpoint = endpoint
        self._credentials = devices
        self._max_inflight = max_inflight
        self._devices: list[_Device] = []
        self._result = LoadResult(devices=len(devices))
        self._job: LoadJob | None = None
        self._lags: list[float] = []
        self._sending = False
        self._answered = asyncio.Event()
        self.commands_received: dict[str, float] = {}  # command id -> when it arrived (monotonic)

    async def connect(self, stack: AsyncExitStack) -> None:
        async def one(credentials: DeviceCredentials) -> _Device:
            client = aiomqtt.Client(
                self._endpoint.host,
                self._endpoint.port,
                identifier=credentials.device_id,
                protocol=aiomqtt.ProtocolVersion.V311,
                clean_session=True,
                keepalive=KEEPALIVE_SECONDS,
                tls_context=tls_context(self._endpoint, credentials),
                max_inflight_messages=self._max_inflight,
                socket_options=NO_DELAY,
                timeout=30,
            )
            # aiomqtt hands paho a logger, which then formats a debug line per packet.
            client._client.disable_logger()
            await stack.enter_async_context(client)
            prefix = f"devices/{credentials.device_id}/"
            # The cloud -> device topics, not `#`: a broker may echo a device's own observations
            # to a `#` subscription (Mosquitto does), which would double the traffic measured.
            await client.subscribe([(prefix + topic, 1) for topic in CLOUD_TO_DEVICE_TOPICS])
            return _Device(credentials, client, prefix)

        self._devices = list(await asyncio.gather(*(one(c) for c in self._credentials)))
        for device in self._devices:
            task = asyncio.create_task(self._read(device))
            stack.callback(task.cancel)

    async def _read(self, device: _Device) -> None:
        async for message in device.client.messages:
            topic = message.topic.value
            if not topic.startswith(device.prefix) or not isinstance(message.payload, bytes):
                continue
            suffix = topic[len(device.prefix) :]
            if suffix == "acks":
                self._on_acks(device, json.loads(message.payload))
            elif suffix == "errors":
                self._on_error(device, json.loads(message.payload))
            elif suffix == "commands":
                self._on_command(device, json.loads(message.payload))

    def _on_acks(self, device: _Device, ack: dict[str, Any]) -> None:
        now = time.monotonic()
        duplicates = ack.get("duplicates", [])
        self._result.duplicate_ids += len(duplicates)
        for observation_id in [*ack.get("stored", []), *duplicates]:
            key = observation_id.rpartition(".")[0]
            pending = device.pending.get(key)
            if pending is None or observation_id not in pending.ids:
                self._result.repeated_acks += 1
                continue
            pending.ids.discard(observation_id)
            if not pending.ids:
                del device.pending[key]
                self._complete(device, pending, now)

    def _on_error(self, device: _Device, error: dict[str, Any]) -> None:
        reason = str(error.get("reason"))
        self._result.errors[reason] = self._result.errors.get(reason, 0) + 1
        for rejected in error.get("rejected", []):
            key = str(rejected.get("id", "")).rpartition(".")[0]
            if (pending := device.pending.pop(key, None)) is not None:
                self._result.rejected += 1
                self._free(device, pending)
                self._check_answered()

    def _on_command(self, device: _Device, command: dict[str, Any]) -> None:
        if command.get("action") != "run":
            return
        self.commands_received.setdefault(str(command["id"]), time.monotonic())
        status = json.dumps({"state": "COMPLETED", "result": {"bench": True}}).encode()
        device.client._client.publish(f"{device.prefix}commands/{command['id']}/status", status, qos=1)

    def _complete(self, device: _Device, pending: _Pending, now: float) -> None:
        job = self._job
        assert job is not None
        result = self._result
        result.acked += 1
        result.latencies_ms.append((now - pending.due) * 1000)
        second = int(now - job.start_at)
        if 0 <= second < len(result.per_second):
            result.per_second[second] += 1
        if now <= job.start_at + job.duration:
            result.acked_in_time += 1
        self._free(device, pending)
        self._check_answered()

    def _check_answered(self) -> None:
        if not self._sending and not any(d.pending for d in self._devices):
            self._answered.set()

    def _free(self, device: _Device, pending: _Pending) -> None:
        if not pending.freed:
            pending.freed = True
            if device.window is not None:
                device.window.release()

    def _send(self, device: _Device, tag: str, due: float) -> None:
        device.sequence += 1
        key = f"{tag}.{device.sequence}"
        ids = [f"{key}.{k}" for k in range(OBSERVATIONS_PER_MESSAGE)]
        device.pending[key] = _Pending(set(ids), due)
        # Straight to paho: aiomqtt's publish() would wait for the PUBACK, and this loop must not.
        info = device.client._client.publish(f"{device.prefix}observations", observations_payload(ids), qos=1)
        if info.rc != 0:
            raise RuntimeError(f"paho refused a publish: rc {info.rc}")
        self._result.sent += 1

    async def _closed_loop(self, device: _Device, job: LoadJob, end: float) -> None:
        assert device.window is not None
        while True:
            await device.window.acquire()
            now = time.monotonic()
            if now >= end:
                device.window.release()
                return
            self._send(device, job.tag, now)

    async def _open_loop(self, device: _Device, job: LoadJob, end: float, offset: float) -> None:
        interval = 1.0 / job.rate_per_device
        count = 0
        due = job.start_at + offset
        while due < end:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self._lags.append(time.monotonic() - due)
            self._send(device, job.tag, due)
            count += 1
            due = job.start_at + offset + count * interval

    async def _sweep(self, job: LoadJob) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for device in self._devices:
                for pending in list(device.pending.values()):
                    if not pending.freed and now - pending.due > job.answer_timeout:
                        self._result.timed_out += 1
                        self._free(device, pending)

    async def run(self, job: LoadJob, worker_index: int, workers: int) -> LoadResult:
        self._job = job
        self._lags = []
        self._sending = True
        self._answered = asyncio.Event()
        self._result = LoadResult(devices=len(self._devices), per_second=[0] * math.ceil(job.duration + job.drain))
        for device in self._devices:
            device.pending.clear()
            device.window = asyncio.Semaphore(job.window) if job.window else None
        end = job.start_at + job.duration
        delay = job.start_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sweeper = asyncio.create_task(self._sweep(job))
        if job.window:
            senders = [self._closed_loop(d, job, end) for d in self._devices]
        else:
            # Devices of all workers spread evenly over one interval, so sends do not bunch up.
            interval = 1.0 / job.rate_per_device
            total = len(self._devices) * workers
            senders = [
                self._open_loop(d, job, end, interval * (worker_index + i * workers) / total)
                for i, d in enumerate(self._devices)
            ]
        await asyncio.gather(*senders)
        self._sending = False
        if any(d.pending for d in self._devices):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._answered.wait(), max(0.0, end + job.drain - time.monotonic()))
        sweeper.cancel()
        result = self._result
        if self._lags:
            result.lag_p99_ms = round(percentile(self._lags, 0.99) * 1000, 2)
            result.lag_max_ms = round(max(self._lags) * 1000, 2)
        return result


@dataclass(frozen=True)
class CommandLog:
    """Request: when each command the worker's devices ran arrived (id -> time.monotonic())."""


def device_worker(
    conn: Connection, endpoint: Endpoint, devices: list[DeviceCredentials], index: int, workers: int
) -> None:
    """Process entry: connects `devices`, then runs LoadJobs until told to stop."""

    async def setup() -> tuple[int, Any, Any]:
        stack = AsyncExitStack()
        fleet = DeviceFleet(endpoint, devices, max_inflight=1000)
        await fleet.connect(stack)

        async def handle(request: Any) -> Any:
            if isinstance(request, LoadJob):
                return await fleet.run(request, index, workers)
            if isinstance(request, CommandLog):
                return fleet.commands_received
            raise TypeError(f"unknown request {request!r}")

        return len(devices), handle, stack.aclose

    serve(conn, f"devices-{index}", setup)


def merge(results: list[LoadResult]) -> LoadResult:
    """One result for a job run by several workers."""
    merged = LoadResult(devices=sum(r.devices for r in results))
    errors: Counter[str] = Counter()
    length = max((len(r.per_second) for r in results), default=0)
    merged.per_second = [0] * length
    for r in results:
        merged.sent += r.sent
        merged.acked += r.acked
        merged.acked_in_time += r.acked_in_time
        merged.latencies_ms.extend(r.latencies_ms)
        merged.duplicate_ids += r.duplicate_ids
        merged.repeated_acks += r.repeated_acks
        merged.rejected += r.rejected
        merged.timed_out += r.timed_out
        errors.update(r.errors)
        for second, count in enumerate(r.per_second):
            merged.per_second[second] += count
        merged.lag_p99_ms = max(merged.lag_p99_ms, r.lag_p99_ms)
        merged.lag_max_ms = max(merged.lag_max_ms, r.lag_max_ms)
    merged.errors = dict(errors)
    return merged
