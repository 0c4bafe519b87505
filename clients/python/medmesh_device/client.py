"""`DeviceClient`: one device's MQTT connection to medmesh, kept open and reconnected.

Transport only: topics and payloads come from `protocol`, ack bookkeeping from `outbox`,
command dedupe from `ledger`, the reconnect schedule from `backoff`. Everything runs on the
caller's event loop; there are no threads besides the one aiomqtt uses to open a socket.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
from aiomqtt.exceptions import MqttConnectError

from medmesh_device import protocol, upload
from medmesh_device.backoff import Backoff
from medmesh_device.errors import (
    ClientClosed,
    CloudError,
    ConnectionLost,
    ConnectionRefused,
    DeviceError,
    HandlerError,
    InvalidMessage,
    MalformedCloudMessage,
    NotAuthorized,
    ServerUnavailable,
    SubscriptionRefused,
    UploadError,
)
from medmesh_device.ledger import CommandLedger, CommandPhase
from medmesh_device.outbox import ObservationResult, Outbox, Outcome
from medmesh_device.protocol import Command, DesiredConfig, FileResponse, Observation, Topics

log = logging.getLogger("medmesh_device")

ConfigHandler = Callable[[int, dict[str, Any]], Awaitable[Mapping[str, Any] | None]]
"""`await on_config(version, config)`: apply it; return the configuration now in force (reported
with `version`), or None to report `config` as given. Raising reports nothing."""

CommandHandler = Callable[[Command], Awaitable[Mapping[str, Any] | None]]
"""`await on_command(command)`: run it; the returned object is the COMPLETED result, an exception
makes it FAILED with its message. Cancelled when the platform stops or cancels the command."""

ErrorHandler = Callable[[DeviceError], Awaitable[None]]
"""`await on_error(error)`: every refusal, lost connection and `errors` message, as it happens."""

# paho reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes; back to the codes the protocol names.
_CONNACK_V311 = {0x84: 1, 0x85: 2, 0x88: 3, 0x86: 4, 0x87: 5}
_NOT_AUTHORIZED = {4, 5}
_SERVER_UNAVAILABLE = {3}
_MQTT_PUBLISH_TIMEOUT = 10.0


@dataclass
class Counters:
    """What the client did since it was made (read `DeviceClient.counters`)."""

    connects: int = 0
    disconnects: int = 0
    observations_queued: int = 0
    observations_sent: int = 0  # first sends
    observations_resent: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    commands_received: int = 0
    commands_completed: int = 0
    commands_failed: int = 0
    configs_applied: int = 0
    cloud_errors: int = 0

    @property
    def acked(self) -> int:
        return self.stored + self.duplicates


@dataclass
class _Pending:
    """An idempotent message (status, reported configuration, command status) until its PUBACK."""

    topic: str
    data: dict[str, Any]
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    sent_at: float | None = None


def _tls_context(
    ca_file: str | Path | None, cert_file: str | Path | None, key_file: str | Path | None
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert_file is not None and key_file is not None:
        context.load_cert_chain(str(cert_file), str(key_file))
    return context


class DeviceClient:
    """A device connected to medmesh over MQTT 3.1.1 and TLS 1.3 (docs/device-protocol.md).

    Make one with `with_certificate` (mutual TLS, the normal way) or `with_credentials`
    (temporary username and password, for a phone or gateway relaying the device), then use it
    as an async context manager (or `start()` / `close()`)::

        async with DeviceClient.with_certificate("SN-1", "localhost", 8883, ca_file=..., cert_file=...,
                                                 key_file=..., on_command=run) as device:
            await device.wait_connected(timeout=30)
            results = await device.send_observations([Observation("heart_rate", 72, unit="/min")])

    The client connects in the background and keeps reconnecting with back-off; subscribes to the
    device's cloud -> device topics after every connect; keeps every observation until the
    platform acks or rejects its id, resending unanswered ones with the same id after a reconnect
    and after `resend_after` seconds; runs commands and applies configuration through the
    callbacks; reports each refusal, lost connection and `errors` message to `on_error` (or
    logs it when there is none).
    """

    def __init__(
        self,
        device_id: str,
        host: str,
        port: int = 8883,
        *,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        username: str | None = None,
        password: str | None = None,
        tag: str | None = None,
        keepalive: int = 60,
        on_config: ConfigHandler | None = None,
        on_command: CommandHandler | None = None,
        on_error: ErrorHandler | None = None,
        report_in_progress: bool = True,
        resend_after: float = 10.0,
        outbox_capacity: int = 100_000,
        window: int = 2000,
        max_inflight_messages: int = 8,
        connect_timeout: float = 10.0,
        backoff: Backoff | None = None,
    ) -> None:
        """Prefer `with_certificate` or `with_credentials`, which say which arguments belong together.

        Without `on_command` the client does not subscribe to commands (an auxiliary connection
        should leave them to the device's own); likewise without `on_config` for configuration.
        At most `window` observations are sent and unanswered at a time: a platform that is
        behind slows the device down instead of being sent what it has not answered yet
        (which the 10 s resend rule would then send again). `outbox_capacity` bounds what waits.
        """
        self.client_id = protocol.client_id(device_id, tag)
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file go together")
        if (username is None) != (password is None):
            raise ValueError("username and password go together")
        if (cert_file is None) == (username is None):
            raise ValueError("connect with a certificate (cert_file, key_file) or credentials (username, password)")
        if not 30 <= keepalive <= 300:
            raise ValueError("keepalive must be within 30-300 s")
        self.device_id = device_id
        self.topics = Topics(device_id)
        self.host, self.port = host, port
        self.ca_file = ca_file
        self._tls = _tls_context(ca_file, cert_file, key_file)
        self._username, self._password = username, password
        self._keepalive = keepalive
        self._on_config, self._on_command, self._on_error = on_config, on_command, on_error
        self._report_in_progress = report_in_progress
        self._resend_after = resend_after
        self._connect_timeout = connect_timeout
        self._backoff = backoff or Backoff()
        self._max_inflight = max_inflight_messages
        self._window = window
        self.counters = Counters()

        self._outbox = Outbox(outbox_capacity)
        self._result_waiters: dict[str, list[asyncio.Future[ObservationResult]]] = {}
        self._pending: dict[str, _Pending] = {}
        # What went out on each idempotent topic lately: resent when the platform says UNAVAILABLE.
        self._recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._ledger = CommandLedger()
        self._command_tasks: dict[str, asyncio.Task[None]] = {}
        self._commands_ending: dict[str, str] = {}  # command id -> "stop" or "cancel"
        self._config_queue: asyncio.Queue[DesiredConfig] = asyncio.Queue()
        self._applied: tuple[int, dict[str, Any]] | None = None
        self._file_waiters: dict[str, asyncio.Future[FileResponse]] = {}

        self._mqtt: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._attempted = asyncio.Event()  # set after every connection attempt, then replaced
        self._last_error: DeviceError | None = None
        self._wake_sender = asyncio.Event()
        self._pause_until = 0.0
        self._connection_tasks: set[asyncio.Task[Any]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def with_certificate(
        cls,
        device_id: str,
        host: str,
        port: int = 8883,
        *,
        ca_file: str | Path | None,
        cert_file: str | Path,
        key_file: str | Path,
        **options: Any,
    ) -> DeviceClient:
        """Mutual TLS with the device's certificate (subject CN = device id) and private key.

        `ca_file` is the CA the server certificate is checked against (`.medmesh/tls/ca.crt` for
        a local platform; None for the system's roots). `options` are the constructor's."""
        return cls(device_id, host, port, ca_file=ca_file, cert_file=cert_file, key_file=key_file, **options)

    @classmethod
    def with_credentials(
        cls,
        device_id: str,
        host: str,
        port: int = 8883,
        *,
        ca_file: str | Path | None,
        username: str,
        password: str,
        **options: Any,
    ) -> DeviceClient:
        """TLS without a client certificate, with temporary credentials from
        `POST /v1/devices/{device}:createTemporaryCredentials`."""
        return cls(device_id, host, port, ca_file=ca_file, username=username, password=password, **options)

    # --- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> DeviceClient:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Starts connecting in the background; `wait_connected` waits for the connection."""
        if self._closed:
            raise ClientClosed("a closed client cannot start again; make a new one")
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name=f"medmesh-device-{self.client_id}")
            self._spawn(self._config_worker())

    async def close(self) -> None:
        """Disconnects and stops everything. Unanswered observations and reports are dropped:
        call `flush()` first to wait for their answers. Awaiting callers get `ClientClosed`."""
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._runner, *self._tasks, *self._command_tasks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        closed = ClientClosed(f"device client {self.client_id} closed")
        for observation_id in self._outbox.drain():
            for waiter in self._result_waiters.pop(observation_id, []):
                _fail(waiter, closed)
        for pending in self._pending.values():
            for done in pending.waiters:
                _fail(done, closed)
        self._pending.clear()
        for answer in self._file_waiters.values():
            _fail(answer, closed)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def pending_observations(self) -> int:
        """Observations queued or sent and not yet answered."""
        return len(self._outbox)

    @property
    def last_error(self) -> DeviceError | None:
        """The latest connection problem (None once connected)."""
        return self._last_error

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (raises the cause)
        """Returns once connected and subscribed. Raises `NotAuthorized` as soon as the adapter
        refuses the device (CONNACK 5), and on timeout the last connection error (or TimeoutError)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._connected.is_set():
            if self._closed:
                raise ClientClosed(f"device client {self.client_id} closed")
            if isinstance(self._last_error, NotAuthorized):
                raise self._last_error
            attempted = self._attempted
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise self._last_error or TimeoutError(f"not connected within {timeout} s")
            waiters = {asyncio.ensure_future(self._connected.wait()), asyncio.ensure_future(attempted.wait())}
            try:
                await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    async def flush(self) -> None:
        """Waits until every observation queued so far is answered and every report PUBACKed
        (bound it with `asyncio.timeout`)."""
        while True:
            futures: list[asyncio.Future[Any]] = [w for ws in self._result_waiters.values() for w in ws]
            futures = [w for w in futures + [w for p in self._pending.values() for w in p.waiters] if not w.done()]
            if not futures and not self._outbox and not self._pending:
                return
            if not futures:  # left only with what its callers stopped waiting for: poll
                await asyncio.sleep(0.05)
                continue
            await asyncio.wait(futures, return_when=asyncio.ALL_COMPLETED)

    # --- observations --------------------------------------------------------------------------

    def enqueue_observations(self, observations: Iterable[Observation]) -> list[asyncio.Future[ObservationResult]]:
        """Queues observations and returns at once: one future per observation, resolved with its
        `ObservationResult` when the platform answers (or failing with `ClientClosed`).

        Raises `InvalidMessage` (nothing queued) for an observation the platform would refuse,
        and `OutboxFull` when too many wait for their acks."""
        now = datetime.now(UTC)
        items = []
        for observation in observations:
            observation_id = observation.id or uuid.uuid4().hex
            items.append((observation_id, protocol.encode_observation(observation, observation_id, now)))
        if len({i for i, _ in items}) != len(items):
            raise InvalidMessage("the same observation id twice in one call")
        self._outbox.add(items, time.monotonic())
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[ObservationResult]] = []
        for observation_id, _ in items:
            future: asyncio.Future[ObservationResult] = loop.create_future()
            future.add_done_callback(_retrieve)
            self._result_waiters.setdefault(observation_id, []).append(future)
            futures.append(future)
        self.counters.observations_queued += len(items)
        self._wake_sender.set()
        return futures

    async def send_observations(self, observations: Iterable[Observation]) -> dict[str, ObservationResult]:
        """Sends observations and waits for the platform's answer for each: {id: result}.

        A result is STORED or DUPLICATE (both durable) or REJECTED (with the reason; never
        resent). Under `asyncio.timeout`, observations whose wait times out stay queued and are
        still sent."""
        futures = self.enqueue_observations(observations)
        results = await asyncio.gather(*(asyncio.shield(f) for f in futures))
        return {r.id: r for r in results}

    # --- status, configuration, command reports -------------------------------------------------

    async def report_status(
        self,
        state: str | None = None,
        message: str | None = None,
        battery_percent: int | None = None,
        firmware_version: str | None = None,
        time: datetime | None = None,
    ) -> None:
        """Sends a partial status (only what is given; `state` is OK, MINOR, MAJOR or CRITICAL)
        and waits for its PUBACK, through reconnects."""
        status = protocol.encode_status(time or datetime.now(UTC), state, message, battery_percent, firmware_version)
        waiting = self._pending.get("status")
        if waiting is not None:  # not out yet: send both changes as one
            status = protocol.merge_status(waiting.data, status)
        await self._queue_pending("status", self.topics.status, status)

    async def report_config(self, config: Mapping[str, Any], version: int | None = None) -> None:
        """Reports the configuration the device runs (after a local change); `version` defaults
        to the desired version last applied, 0 when the platform never set one."""
        if version is None:
            version = self._applied[0] if self._applied else 0
        self._applied = (version, dict(config))
        reported = protocol.encode_reported_config(version, config)
        await self._queue_pending("config", self.topics.config_reported, reported)

    def _queue_pending(self, key: str, topic: str, data: dict[str, Any]) -> asyncio.Future[None]:
        """Keeps an idempotent message until its PUBACK (a newer one under the same key replaces it)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.add_done_callback(_retrieve)
        older = self._pending.get(key)
        pending = _Pending(topic, data, [*(older.waiters if older else []), done])
        self._pending[key] = pending
        if self._mqtt is not None:
            self._spawn_connection_task(self._send_pending(self._mqtt, key, pending))
        return done

    async def _send_pending(self, client: aiomqtt.Client, key: str, pending: _Pending) -> None:
        pending.sent_at = time.monotonic()
        if await self._publish(client, pending.topic, protocol.dumps(pending.data)):
            self._remember(pending.topic, pending.data)
            if self._pending.get(key) is pending:
                del self._pending[key]
                for done in pending.waiters:
                    if not done.done():
                        done.set_result(None)

    def _remember(self, topic: str, data: dict[str, Any]) -> None:
        self._recent[topic] = data
        self._recent.move_to_end(topic)
        while len(self._recent) > 256:
            self._recent.popitem(last=False)

    # --- files ---------------------------------------------------------------------------------

    async def upload_file(
        self,
        source: upload.FileSource,
        *,
        content_type: str = "application/octet-stream",
        display_name: str | None = None,
        session: str | None = None,
        https_ca_file: str | Path | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> str:
        """Uploads bytes or a file over HTTPS through pre-signed URLs; returns the file's name
        (`files/...`) once the platform has checked size and SHA-256 and made it AVAILABLE.

        `https_ca_file` is the CA of the object store's HTTPS endpoint (the platform CA locally);
        it defaults to the MQTT `ca_file`. `http` is an httpx client to PUT with instead of a
        new one (a proxy, custom transport or timeouts). Raises `UploadError` with the platform's reason.
        Requests are resent until answered: bound the whole upload with `asyncio.timeout`."""
        size, sha256 = await upload.size_and_sha256(source)
        if isinstance(source, str | Path) and display_name is None:
            display_name = Path(source).name
        created = await self._file_request(
            protocol.encode_file_create(_request_id(), content_type, size, sha256, display_name, session)
        )
        if http is not None:
            etags = await upload.put_bytes(http, created, source, size, content_type)
        else:
            verify = upload.https_context(https_ca_file if https_ca_file is not None else self.ca_file)
            async with httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(60.0)) as own:
                etags = await upload.put_bytes(own, created, source, size, content_type)
        completed = await self._file_request(protocol.encode_file_complete(_request_id(), created.file, etags))
        if completed.state not in {"AVAILABLE", "STATE_AVAILABLE"}:
            raise UploadError("NOT_AVAILABLE", f"the file is {completed.state or 'in an unknown state'}", created.file)
        return completed.file or created.file

    async def _file_request(self, request: dict[str, Any]) -> FileResponse:
        """Sends a file request until it is answered (the request id makes resending harmless)."""
        request_id = str(request["request_id"])
        answer: asyncio.Future[FileResponse] = asyncio.get_running_loop().create_future()
        answer.add_done_callback(_retrieve)
        self._file_waiters[request_id] = answer
        try:
            while not answer.done():
                await self.wait_connected()
                client = self._mqtt
                if client is not None:
                    await self._publish(client, self.topics.file_requests, protocol.dumps(request))
                await asyncio.wait({answer}, timeout=self._resend_after)
            response = answer.result()
        finally:
            self._file_waiters.pop(request_id, None)
        if response.error_reason:
            raise UploadError(response.error_reason, response.error_description, response.file)
        return response

    # --- the connection ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            problem: DeviceError
            not_authorized = False
            try:
                await self._connect_and_serve()
                problem = ConnectionLost("the connection closed")
            except ConnectionRefused as refused:
                problem, not_authorized = refused, isinstance(refused, NotAuthorized)
            except DeviceError as error:
                problem = error
            except Exception as error:  # a bug here must not end the device's connection for good
                log.exception("%s: unexpected error in the connection loop", self.client_id)
                problem = DeviceError(f"unexpected error: {error!r}")
            self._last_error = problem
            self._attempted.set()
            self._attempted = asyncio.Event()
            delay = self._backoff.next_delay(not_authorized)
            log.info("%s: %s; reconnecting in %.1f s", self.client_id, problem, delay)
            self._report(problem)
            await asyncio.sleep(delay)

    def _subscriptions(self) -> list[str]:
        topics = [self.topics.acks, self.topics.errors, self.topics.file_responses]
        if self._on_config is not None:
            topics.append(self.topics.config_desired)
        if self._on_command is not None:
            topics.append(self.topics.commands)
        return topics

    async def _connect_and_serve(self) -> None:
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            username=self._username,
            password=self._password,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=True,
            keepalive=self._keepalive,
            tls_context=self._tls,
            timeout=self._connect_timeout,
            max_inflight_messages=max(self._max_inflight * 2, 20),
        )
        client.pending_calls_threshold = 10_000  # many QoS 1 publishes in flight is normal here
        try:
            async with client:
                granted = await client.subscribe([(t, 1) for t in self._subscriptions()])
                refused = [t for t, code in zip(self._subscriptions(), granted, strict=False) if _code(code) >= 0x80]
                if refused:
                    raise SubscriptionRefused(f"subscriptions refused: {', '.join(refused)}")
                await self._serve(client)
        except MqttConnectError as error:
            code = _CONNACK_V311.get(_code(error.rc), _code(error.rc))
            reason = str(error.rc) if error.rc is not None else str(error)
            if code in _NOT_AUTHORIZED:
                raise NotAuthorized(code, reason) from error
            if code in _SERVER_UNAVAILABLE:
                raise ServerUnavailable(code, reason) from error
            raise ConnectionRefused(code, reason) from error
        except aiomqtt.MqttError as error:
            raise ConnectionLost(f"connection to {self.host}:{self.port} failed or lost: {error}") from error

    async def _serve(self, client: aiomqtt.Client) -> None:
        self._mqtt = client
        self._last_error = None
        self._connected.set()
        self._attempted.set()
        self._attempted = asyncio.Event()
        self._backoff.connected(time.monotonic())
        self.counters.connects += 1
        log.info("%s connected to %s:%s", self.client_id, self.host, self.port)
        self._outbox.requeue_all()  # unanswered ones go again, same ids
        for key, pending in list(self._pending.items()):
            self._spawn_connection_task(self._send_pending(client, key, pending))
        self._wake_sender.set()
        loops = [
            asyncio.create_task(self._receive(client)),
            asyncio.create_task(self._send_observations(client)),
            asyncio.create_task(self._resend_timer(client)),
        ]
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # the receive loop ends with MqttError when the connection drops
        finally:
            self._mqtt = None
            self._connected.clear()
            self._backoff.disconnected(time.monotonic())
            self.counters.disconnects += 1
            for task in [*loops, *self._connection_tasks]:
                task.cancel()
            await asyncio.gather(*loops, *self._connection_tasks, return_exceptions=True)
            self._connection_tasks.clear()

    async def _publish(self, client: aiomqtt.Client, topic: str, payload: bytes) -> bool:
        """QoS 1; True once PUBACKed. A failure only leaves the message to the resend rules."""
        try:
            await client.publish(topic, payload, qos=1, timeout=_MQTT_PUBLISH_TIMEOUT)
        except aiomqtt.MqttError as error:
            log.debug("%s: publish to %s failed: %s", self.client_id, topic, error)
            return False
        return True

    async def _send_observations(self, client: aiomqtt.Client) -> None:
        inflight = asyncio.Semaphore(self._max_inflight)
        while True:
            await self._wake_sender.wait()
            self._wake_sender.clear()
            pause = self._pause_until - time.monotonic()
            if pause > 0:  # the platform said UNAVAILABLE: hold everything until it may be back
                await asyncio.sleep(pause)
            while batch := self._outbox.take_batch(time.monotonic(), self._window):
                for observation_id, _ in batch:
                    if self._outbox.sends(observation_id) == 1:
                        self.counters.observations_sent += 1
                    else:
                        self.counters.observations_resent += 1
                await inflight.acquire()
                payload = protocol.batch_payload([encoded for _, encoded in batch])
                task = self._spawn_connection_task(self._publish(client, self.topics.observations, payload))
                task.add_done_callback(lambda _: inflight.release())

    async def _resend_timer(self, client: aiomqtt.Client) -> None:
        tick = min(1.0, self._resend_after / 4)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now < self._pause_until:
                continue
            if self._outbox.requeue_stale(now, self._resend_after):
                self._wake_sender.set()
            for key, pending in list(self._pending.items()):
                if pending.sent_at is not None and now - pending.sent_at >= self._resend_after:
                    self._spawn_connection_task(self._send_pending(client, key, pending))

    # --- cloud -> device -----------------------------------------------------------------------

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = message.topic.value
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            try:
                self._dispatch(topic, payload)
            except MalformedCloudMessage as error:
                self._report(error)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.acks:
            acks = protocol.parse_acks(topic, payload)
            results = self._outbox.acknowledge(acks.stored, acks.duplicates)
            self._resolve(results)
        elif topic == self.topics.errors:
            self._on_cloud_error(protocol.parse_error(topic, payload))
        elif topic == self.topics.config_desired and self._on_config is not None:
            self._config_queue.put_nowait(protocol.parse_desired_config(topic, payload))
        elif topic == self.topics.commands and self._on_command is not None:
            self._on_command_message(protocol.parse_command(topic, payload))
        elif topic == self.topics.file_responses:
            response = protocol.parse_file_response(topic, payload)
            answer = self._file_waiters.get(response.request_id)
            if answer is not None and not answer.done():
                answer.set_result(response)
        else:
            log.debug("%s: ignoring a message on %s", self.client_id, topic)

    def _resolve(self, results: list[ObservationResult]) -> None:
        for result in results:
            if result.outcome is Outcome.STORED:
                self.counters.stored += 1
            elif result.outcome is Outcome.DUPLICATE:
                self.counters.duplicates += 1
            else:
                self.counters.rejected += 1
            for waiter in self._result_waiters.pop(result.id, []):
                if not waiter.done():
                    waiter.set_result(result)
        if results and self._outbox.unsent:
            self._wake_sender.set()  # the window has room again

    def _on_cloud_error(self, error: CloudError) -> None:
        self.counters.cloud_errors += 1
        if error.topic == self.topics.observations:
            known = self._outbox.reject(error.rejected)
            self._resolve(known)
            if error.reason == "UNAVAILABLE":
                wait = error.retry_after_seconds if error.retry_after_seconds is not None else self._resend_after
                self._pause_until = time.monotonic() + wait
                # The ids of the message that was not stored, when the platform says; else all in flight.
                if error.message_ids is not None:
                    self._outbox.requeue(error.message_ids)
                else:
                    self._outbox.requeue_all()
                self._wake_sender.set()
            elif error.reason == "OBSERVATIONS_REJECTED" and len(known) == len(error.rejected):
                return  # fully told through the results
        elif error.reason == "UNAVAILABLE" and error.topic in self._recent:
            wait = error.retry_after_seconds if error.retry_after_seconds is not None else self._resend_after
            self._spawn(self._resend_later(error.topic, self._recent[error.topic], wait))
        command_id = self.topics.command_of_status_topic(error.topic)
        if command_id is not None and error.reason in protocol.COMMAND_OVER_REASONS:
            self._drop_command(command_id)
        self._report(error)

    async def _resend_later(self, topic: str, data: dict[str, Any], wait: float) -> None:
        await asyncio.sleep(wait)
        key = next((k for k, p in self._pending.items() if p.topic == topic), f"resend:{topic}")
        if key not in self._pending:
            self._queue_pending(key, topic, data)

    # --- configuration -------------------------------------------------------------------------

    async def _config_worker(self) -> None:
        """Applies desired configurations one at a time, in the order they arrive."""
        while True:
            desired = await self._config_queue.get()
            if self._applied is not None and self._applied[0] == desired.version:
                # The same version again (after a reconnect): already applied, report it again.
                again = protocol.encode_reported_config(*self._applied)
                self._queue_pending("config", self.topics.config_reported, again)
                continue
            assert self._on_config is not None  # queued only with a handler
            try:
                in_force = await self._on_config(desired.version, dict(desired.config))
            except Exception as error:  # the application's; reported, the device keeps running
                failure = HandlerError("configuration", error)
                failure.__cause__ = error
                self._report(failure)
                continue
            config = dict(in_force) if in_force is not None else desired.config
            self._applied = (desired.version, config)
            self.counters.configs_applied += 1
            self._queue_pending("config", self.topics.config_reported, protocol.encode_reported_config(*self._applied))

    # --- commands ------------------------------------------------------------------------------

    def _on_command_message(self, command: Command) -> None:
        self.counters.commands_received += 1
        record = self._ledger.get(command.id)
        if command.action == "run":
            if record is None:
                self._ledger.start(command.id)
                self._command_tasks[command.id] = self._spawn_command(command)
            elif record.phase is CommandPhase.FINISHED and record.final_report is not None:
                self._report_command(command.id, record.final_report)  # our report may have been lost
            return
        running = self._command_tasks.get(command.id)
        if command.action == "cancel":
            self._drop_command(command.id)
            return
        # stop
        if running is not None:
            self._commands_ending[command.id] = "stop"
            running.cancel()
        elif record is None:
            report = protocol.encode_command_status("FAILED", error_message="stopped before it ran")
            self._ledger.start(command.id)
            self._ledger.finish(command.id, report)
            self._report_command(command.id, report)
        elif record.phase is CommandPhase.FINISHED and record.final_report is not None:
            self._report_command(command.id, record.final_report)

    def _drop_command(self, command_id: str) -> None:
        """Canceled, or over on the platform's side: stop running it and stop reporting it."""
        self._ledger.drop(command_id)
        self._pending.pop(f"command:{command_id}", None)
        running = self._command_tasks.get(command_id)
        if running is not None:
            self._commands_ending[command_id] = "cancel"
            running.cancel()

    def _spawn_command(self, command: Command) -> asyncio.Task[None]:
        task = asyncio.create_task(self._run_command(command), name=f"command-{command.id}")
        task.add_done_callback(lambda _: self._command_tasks.pop(command.id, None))
        return task

    def _report_command(self, command_id: str, report: dict[str, Any]) -> None:
        self._queue_pending(f"command:{command_id}", self.topics.command_status(command_id), report)

    async def _run_command(self, command: Command) -> None:
        assert self._on_command is not None  # dispatched only with a handler
        if self._report_in_progress:
            self._report_command(command.id, protocol.encode_command_status("IN_PROGRESS"))
        report: dict[str, Any]
        try:
            async with asyncio.timeout(command.timeout_seconds):
                result = await self._on_command(command)
            result = {} if result is None else result
            if not isinstance(result, Mapping):
                raise TypeError(f"the command handler returned {type(result).__name__}, not a dict")
            protocol.dumps(result)  # a result that is not JSON fails the command, not the client
            report = protocol.encode_command_status("COMPLETED", result=result)
        except TimeoutError:
            report = protocol.encode_command_status(
                "FAILED", error_message=f"did not finish within {command.timeout_seconds} s"
            )
        except asyncio.CancelledError:
            ending = self._commands_ending.pop(command.id, None)
            if ending is None:  # the client is closing: nothing to report
                raise
            if ending == "cancel":
                return
            report = protocol.encode_command_status("FAILED", error_message="stopped")
        except Exception as error:  # the application's: the command FAILED with its message
            report = protocol.encode_command_status("FAILED", error_message=str(error) or type(error).__name__)
        else:
            if self._commands_ending.pop(command.id, None) == "cancel":
                return
        record = self._ledger.get(command.id)
        if record is not None and record.phase is CommandPhase.DROPPED:
            return
        self._ledger.finish(command.id, report)
        if report["state"] == "COMPLETED":
            self.counters.commands_completed += 1
        else:
            self.counters.commands_failed += 1
        self._report_command(command.id, report)

    # --- helpers -------------------------------------------------------------------------------

    def _report(self, error: DeviceError) -> None:
        if self._on_error is None:
            log.warning("%s: %s", self.client_id, error)
            return
        self._spawn(self._call_error_handler(error))

    async def _call_error_handler(self, error: DeviceError) -> None:
        assert self._on_error is not None
        try:
            await self._on_error(error)
        except Exception:
            log.exception("%s: the error handler failed on %s", self.client_id, error)

    def _spawn(self, coroutine: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _spawn_connection_task(self, coroutine: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._connection_tasks.add(task)
        task.add_done_callback(self._connection_tasks.discard)
        return task


def _code(code: Any) -> int:
    value = getattr(code, "value", code)
    return int(value) if isinstance(value, int) else -1


def _request_id() -> str:
    return "r" + uuid.uuid4().hex[:24]


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Marks a future's exception as seen: nobody has to await a result they do not want."""
    if not future.cancelled():
        future.exception()


__all__ = ["Counters", "DeviceClient"]
