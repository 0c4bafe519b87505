"""The device SDK (clients/python/medmesh_device): its pure parts, then the client over TLS 1.3
against a real in-process amqtt broker, with a small fake cloud answering per
docs/device-protocol.md. The real adapter and platform are in tests/integration/test_device_sdk.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from medmesh.launcher.tls import LocalPki, ensure_local_pki, issue_client_certificate
from medmesh_device import (
    Backoff,
    CloudError,
    Command,
    ConnectionLost,
    DeviceClient,
    DeviceError,
    HandlerError,
    InvalidMessage,
    MalformedCloudMessage,
    NotAuthorized,
    Observation,
    OutboxFull,
    Outcome,
    UploadError,
    Waveform,
    protocol,
)
from medmesh_device.errors import Rejection
from medmesh_device.ledger import CommandLedger, CommandPhase
from medmesh_device.outbox import Outbox

DEVICE = "SN-UNIT-1"
REFUSED = "SN-REVOKED"
T0 = datetime(2026, 11, 24, 9, 30, tzinfo=UTC)


# --- payloads -----------------------------------------------------------------------------------


def decode(encoded: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(encoded)
    return data


def test_observations_encode_each_kind_of_value_and_a_waveform() -> None:
    assert decode(protocol.encode_observation(Observation("heart_rate", 72, unit="/min"), "m-1", T0)) == {
        "id": "m-1",
        "metric": "heart_rate",
        "time": "2026-11-24T09:30:00.000Z",
        "value": 72,
        "unit": "/min",
    }
    assert decode(protocol.encode_observation(Observation("lead_off", True), "m-2", T0))["value"] is True
    assert decode(protocol.encode_observation(Observation("rhythm", "sinus"), "m-3", T0))["value"] == "sinus"
    local = datetime(2026, 11, 24, 10, 30, 0, 250000, tzinfo=timezone(timedelta(hours=1)))
    wave = Observation("ecg.lead_ii", waveform=Waveform(250, [0.12, 0.15]), time=local, unit="mV", session="s-9")
    assert decode(protocol.encode_observation(wave, "m-4", T0)) == {
        "id": "m-4",
        "metric": "ecg.lead_ii",
        "time": "2026-11-24T09:30:00.250Z",
        "waveform": {"sample_rate_hz": 250, "start_time": "2026-11-24T09:30:00.250Z", "samples": [0.12, 0.15]},
        "unit": "mV",
        "session": "s-9",
    }


@pytest.mark.parametrize(
    ("observation", "observation_id", "problem"),
    [
        (Observation("Heart Rate", 1), "m-1", "metric"),
        (Observation("heart_rate", 1), "has space", "observation id"),
        (Observation("heart_rate", 1), "x" * 129, "observation id"),
        (Observation("heart_rate", 1), "", "observation id"),
        (Observation("heart_rate"), "m-1", "exactly one"),
        (Observation("heart_rate", 1, waveform=Waveform(1, [1])), "m-1", "exactly one"),
        (Observation("heart_rate", float("nan")), "m-1", "finite"),
        (Observation("heart_rate", 1, time=datetime(2026, 1, 1)), "m-1", "time zone"),
        (Observation("ecg", waveform=Waveform(0, [1.0])), "m-1", "positive"),
        (Observation("ecg", waveform=Waveform(250, [0.123456] * 30_000)), "m-1", "256 KiB"),
    ],
)
def test_what_the_platform_would_refuse_is_refused_before_sending(
    observation: Observation, observation_id: str, problem: str
) -> None:
    with pytest.raises(InvalidMessage, match=problem):
        protocol.encode_observation(observation, observation_id, T0)


def test_a_batch_holds_at_most_500_observations_and_256_kib() -> None:
    small = b'{"id":"x"}'
    assert protocol.batch_fits(499, 499 * len(small), small)
    assert not protocol.batch_fits(500, 500 * len(small), small)
    big = b"x" * (100 * 1024)
    assert protocol.batch_fits(1, len(big), big)
    assert not protocol.batch_fits(2, 2 * len(big), big)
    payload = protocol.batch_payload([small, small])
    assert json.loads(payload) == {"observations": [{"id": "x"}, {"id": "x"}]}


def test_status_is_partial_and_checked() -> None:
    assert protocol.encode_status(T0, battery_percent=64) == {"time": "2026-11-24T09:30:00.000Z", "battery_percent": 64}
    full = protocol.encode_status(T0, "MINOR", "lead off", 64, "2.4.1")
    assert full["state"] == "MINOR"
    assert full["message"] == "lead off"
    assert full["firmware_version"] == "2.4.1"
    with pytest.raises(InvalidMessage):
        protocol.encode_status(T0, state="FINE")
    with pytest.raises(InvalidMessage):
        protocol.encode_status(T0, message="without a state")
    with pytest.raises(InvalidMessage):
        protocol.encode_status(T0, battery_percent=101)
    with pytest.raises(InvalidMessage):
        protocol.encode_status(T0, battery_percent=50.5)  # type: ignore[arg-type]
    merged = protocol.merge_status({"state": "MINOR", "message": "lead off", "battery_percent": 60}, {"state": "OK"})
    assert merged == {"state": "OK", "battery_percent": 60}


def test_cloud_messages_decode_and_unreadable_ones_say_why() -> None:
    topic = "devices/d-1/x"
    acks = protocol.parse_acks(topic, b'{"stored": ["a", "b"], "duplicates": ["c"], "later": 1}')
    assert acks == protocol.Acks(("a", "b"), ("c",))
    error = protocol.parse_error(
        topic,
        b'{"topic": "devices/d-1/observations", "reason": "OBSERVATIONS_REJECTED", "description": "1 of 2",'
        b' "rejected": [{"id": "m-2", "reason": "INVALID_OBSERVATION", "description": "metric"}]}',
    )
    assert error.reason == "OBSERVATIONS_REJECTED"
    assert error.rejected == (Rejection("m-2", "INVALID_OBSERVATION", "metric"),)
    unavailable = protocol.parse_error(
        topic, b'{"reason": "UNAVAILABLE", "retry_after_seconds": 2, "message_ids": ["a"]}'
    )
    assert unavailable.retry_after_seconds == 2
    assert unavailable.message_ids == ("a",)
    desired = protocol.parse_desired_config(topic, b'{"version": 8, "config": {"sample_interval_s": 1}}')
    assert desired == protocol.DesiredConfig(8, {"sample_interval_s": 1})
    command = protocol.parse_command(
        topic,
        b'{"action": "run", "id": "c-5e1", "name": "devices/d-1/commands/c-5e1", "command": "measure.bp",'
        b' "parameters": {"cuff": "adult"}, "expire_time": "2026-11-24T09:35:00Z", "timeout_seconds": 60}',
    )
    assert command == Command("run", "c-5e1", "devices/d-1/commands/c-5e1", "measure.bp", {"cuff": "adult"},
                              datetime(2026, 11, 24, 9, 35, tzinfo=UTC), 60.0)  # fmt: skip
    multipart = protocol.parse_file_response(
        topic,
        b'{"request_id": "r-42", "file": "files/f1", "upload": {"parts": [{"part_number": 2, "url": "https://b"},'
        b' {"part_number": 1, "url": "https://a"}], "part_size": 5, "expire_time": "2026-11-24T10:00:00Z"}}',
    )
    assert [p.url for p in multipart.parts] == ["https://a", "https://b"]
    assert multipart.part_size == 5
    as_proto_json = protocol.parse_file_response(
        topic, b'{"request_id": "r-42", "file": "files/f1", "upload": {"parts": [], "part_size": "67108864"}}'
    )
    assert as_proto_json.part_size == 64 * 1024 * 1024  # int64 in proto3 JSON is a string
    refused = protocol.parse_file_response(topic, b'{"request_id": "r-44", "error": {"reason": "CHECKSUM_MISMATCH"}}')
    assert refused.error_reason == "CHECKSUM_MISMATCH"
    for bad, parse in [
        (b"not json", protocol.parse_acks),
        (b"[1]", protocol.parse_acks),
        (b'{"stored": "a"}', protocol.parse_acks),
        (b'{"description": "no reason"}', protocol.parse_error),
        (b'{"version": "8"}', protocol.parse_desired_config),
        (b'{"action": "explode", "id": "c"}', protocol.parse_command),
        (b'{"action": "run", "id": "a/b"}', protocol.parse_command),
        (b'{"file": "files/f"}', protocol.parse_file_response),
    ]:
        with pytest.raises(MalformedCloudMessage):
            parse(topic, bad)


def test_topics_and_client_ids() -> None:
    topics = protocol.Topics("d-1")
    assert topics.command_status("c-1") == "devices/d-1/commands/c-1/status"
    assert topics.command_of_status_topic("devices/d-1/commands/c-1/status") == "c-1"
    assert topics.command_of_status_topic("devices/d-2/commands/c-1/status") is None
    assert topics.command_of_status_topic("devices/d-1/observations") is None
    assert protocol.client_id("d-1") == "d-1"
    assert protocol.client_id("d-1", "diag_2") == "d-1:diag_2"
    with pytest.raises(InvalidMessage):
        protocol.client_id("d-1", "x" * 24)
    with pytest.raises(InvalidMessage):
        protocol.client_id("d/1")


# --- outbox, ledger, back-off -------------------------------------------------------------------


def test_the_outbox_keeps_each_observation_until_its_id_is_answered() -> None:
    box = Outbox(capacity=10)
    box.add([("a", b'{"id":"a"}'), ("b", b'{"id":"b"}'), ("c", b'{"id":"c"}')], now=0.0)
    box.add([("a", b"ignored: already waiting")], now=0.0)
    assert len(box) == 3
    assert box.unsent == 3
    assert [i for i, _ in box.take_batch(now=1.0)] == ["a", "b", "c"]
    assert box.take_batch(now=1.0) == []
    assert len(box) == 3

    results = box.acknowledge(stored=["a", "zz"], duplicates=["b"])
    assert [(r.id, r.outcome) for r in results] == [("a", Outcome.STORED), ("b", Outcome.DUPLICATE)]
    assert box.acknowledge(stored=["a"], duplicates=[]) == []  # answered already

    assert box.requeue_stale(now=5.0, resend_after=10.0) == 0
    assert box.requeue_stale(now=11.0, resend_after=10.0) == 1
    assert box.requeue_stale(now=11.0, resend_after=10.0) == 0  # queued once only
    assert [i for i, _ in box.take_batch(now=12.0)] == ["c"]
    assert box.sends("c") == 2
    assert box.requeue_all() == 1
    (rejected,) = box.reject([Rejection("c", "INVALID_OBSERVATION", "metric"), Rejection("zz", "X")])
    assert rejected.outcome is Outcome.REJECTED
    assert not rejected.durable
    assert rejected.reason == "INVALID_OBSERVATION"
    assert len(box) == 0
    assert box.take_batch(now=13.0) == []

    box.add([(str(i), b"{}") for i in range(10)], now=0.0)
    with pytest.raises(OutboxFull):
        box.add([("one-more", b"{}")], now=0.0)


def test_the_outbox_keeps_at_most_a_window_in_flight() -> None:
    box = Outbox()
    box.add([(f"w{i}", b"{}") for i in range(10)], now=0.0)
    assert len(box.take_batch(0.0, window=4)) == 4
    assert box.take_batch(0.0, window=4) == []
    assert box.in_flight == 4
    box.acknowledge(stored=["w0", "w1"], duplicates=[])
    assert [i for i, _ in box.take_batch(0.0, window=4)] == ["w4", "w5"]
    assert box.requeue(["w2", "w9", "nope"]) == 1  # only what is in flight goes again
    assert box.in_flight == 3
    assert [i for i, _ in box.take_batch(0.0)] == ["w6", "w7", "w8", "w9", "w2"]
    box.reject([Rejection("w3", "X")])
    assert box.in_flight == 7
    assert box.requeue_all() == 7
    assert box.in_flight == 0


def test_the_outbox_cuts_batches_at_500_and_at_256_kib() -> None:
    box = Outbox()
    box.add([(f"s{i}", b'{"id":"s"}') for i in range(1200)], now=0.0)
    assert [len(box.take_batch(0.0)) for _ in range(4)] == [500, 500, 200, 0]
    box = Outbox()
    box.add([(f"b{i}", b"x" * (100 * 1024)) for i in range(5)], now=0.0)
    assert [len(box.take_batch(0.0)) for _ in range(4)] == [2, 2, 1, 0]


def test_the_ledger_acts_on_each_command_once_and_forgets_only_what_is_over() -> None:
    ledger = CommandLedger(capacity=3)
    assert ledger.start("c1")
    assert not ledger.start("c1")
    ledger.finish("c1", {"state": "COMPLETED"})
    record = ledger.get("c1")
    assert record is not None
    assert record.phase is CommandPhase.FINISHED
    assert record.final_report == {"state": "COMPLETED"}
    ledger.drop("c2")
    assert not ledger.start("c2")  # canceled before it arrived: never run
    ledger.start("c3")
    ledger.start("c4")
    assert "c1" not in ledger
    assert "c3" in ledger
    assert "c4" in ledger
    ledger.start("c5")
    ledger.start("c6")
    assert {"c3", "c4", "c5", "c6"} <= {c for c in ("c1", "c2", "c3", "c4", "c5", "c6") if c in ledger}


def test_backoff_doubles_to_a_minute_with_jitter_and_resets_after_a_minute_connected() -> None:
    backoff = Backoff(rng=random.Random(1))
    waits = [backoff.next_delay() for _ in range(9)]
    for wait, base in zip(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60], strict=True):
        assert base * 0.7 <= wait <= base * 1.3
    assert len({round(w, 6) for w in waits[6:]}) == 3  # jittered, not in lockstep
    backoff.connected(now=100.0)
    backoff.disconnected(now=130.0)  # half a minute: still backing off
    assert backoff.next_delay() >= 60 * 0.7
    backoff.connected(now=200.0)
    backoff.disconnected(now=260.0)
    assert backoff.next_delay() <= 1.3
    assert all(60 <= Backoff().next_delay(not_authorized=True) <= 78 for _ in range(50))
    many = Backoff()
    many.attempt = 5000
    assert many.next_delay() <= 78


# --- a broker, a fake cloud and a way to cut connections -----------------------------------------


class RefuseRevoked(BaseAuthPlugin):  # type: ignore[misc]
    """Stands in for the adapter's check: a revoked device gets CONNACK 5."""

    async def authenticate(self, *, session: Session) -> bool | None:
        return not str(session.client_id).startswith(REFUSED)


@dataclass
class Tls:
    pki: LocalPki
    device_cert: Path
    device_key: Path
    refused_cert: Path
    refused_key: Path


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    directory = tmp_path_factory.mktemp("device-sdk-tls")
    pki = ensure_local_pki(directory / "tls")
    cert, key = issue_client_certificate(pki, DEVICE, directory / "devices")
    refused_cert, refused_key = issue_client_certificate(pki, REFUSED, directory / "devices")
    return Tls(pki, cert, key, refused_cert, refused_key)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def broker(tls: Tls) -> AsyncIterator[int]:
    port = free_port()
    server = Broker(
        {
            "listeners": {
                "default": {
                    "type": "tcp",
                    "bind": f"127.0.0.1:{port}",
                    "ssl": True,
                    "certfile": str(tls.pki.server_cert),
                    "keyfile": str(tls.pki.server_key),
                    "cafile": str(tls.pki.ca_cert),
                }
            },
            "plugins": {f"{__name__}.RefuseRevoked": {}},
        }
    )
    await server.start()
    yield port
    await server.shutdown()


class Proxy:
    """A TCP relay in front of the broker: `cut()` drops every connection, as a lost network would."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.links: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.links |= {writer, up_writer}

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self.links -= {writer, up_writer}

    def cut(self) -> None:
        for link in list(self.links):
            link.transport.abort()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def proxy(broker: int) -> AsyncIterator[Proxy]:
    relay = Proxy(broker)
    await relay.start()
    yield relay
    await relay.close()


def client_tls(ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


class FakeCloud:
    """The adapter's side of the protocol, as far as a test needs it: acks observations (each id
    stored once), rejects metrics starting with `bad`, records everything a device publishes."""

    def __init__(self, port: int, ca: Path) -> None:
        self.port, self.ca = port, ca
        self.stored: set[str] = set()
        self.received: list[tuple[str, Any]] = []
        self.observation_messages: list[list[str]] = []
        self.ack = True  # False: say nothing, as a platform that lost the message
        self.unavailable = 0  # answer this many observation messages with UNAVAILABLE
        self.file_answers: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._client: aiomqtt.Client | None = None

    async def __aenter__(self) -> FakeCloud:
        self._client = aiomqtt.Client(
            "127.0.0.1", self.port, identifier="fake-cloud", username="cloud", password="-",
            tls_context=client_tls(self.ca),
        )  # fmt: skip
        await self._client.__aenter__()
        for suffix in ("observations", "status", "config/reported", "commands/+/status", "files/requests"):
            await self._client.subscribe(f"devices/+/{suffix}", qos=1)
        self._task = asyncio.create_task(self._serve())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        assert self._client is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._client.__aexit__(None, None, None)

    async def send(self, device: str, suffix: str, payload: dict[str, Any]) -> None:
        assert self._client is not None
        await self._client.publish(f"devices/{device}/{suffix}", json.dumps(payload).encode(), qos=1)

    def of(self, suffix: str) -> list[Any]:
        return [data for topic, data in self.received if topic.endswith(suffix)]

    async def wait_for(self, check: Callable[[], Any], within: float = 5.0) -> Any:
        """Polls, because what is checked changes on either side: the cloud's and the device's."""
        async with asyncio.timeout(within):
            while not (result := check()):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            return result

    async def _serve(self) -> None:
        assert self._client is not None
        async for message in self._client.messages:
            topic = message.topic.value
            data = json.loads(message.payload if isinstance(message.payload, bytes) else b"null")
            device = topic.split("/")[1]
            self.received.append((topic, data))
            if topic.endswith("/observations"):
                await self._observations(device, topic, data)
            elif topic.endswith("/files/requests") and self.file_answers is not None:
                await self.send(device, "files/responses", self.file_answers(data))

    async def _observations(self, device: str, topic: str, data: dict[str, Any]) -> None:
        items = data["observations"]
        self.observation_messages.append([o["id"] for o in items])
        if self.unavailable:
            self.unavailable -= 1
            ids = [o["id"] for o in items]
            unavailable = {"topic": topic, "reason": "UNAVAILABLE", "retry_after_seconds": 0.2, "message_ids": ids}
            await self.send(device, "errors", unavailable)
            return
        if not self.ack:
            return
        bad = [o for o in items if o["metric"].startswith("bad")]
        good = [o["id"] for o in items if not o["metric"].startswith("bad")]
        stored = [i for i in good if i not in self.stored]
        self.stored.update(stored)
        await self.send(device, "acks", {"stored": stored, "duplicates": [i for i in good if i not in stored]})
        if bad:
            rejected = [{"id": o["id"], "reason": "INVALID_OBSERVATION", "description": "bad metric"} for o in bad]
            await self.send(
                device,
                "errors",
                {"topic": topic, "reason": "OBSERVATIONS_REJECTED", "description": "refused", "rejected": rejected},
            )


@pytest.fixture
async def cloud(broker: int, tls: Tls) -> AsyncIterator[FakeCloud]:
    async with FakeCloud(broker, tls.pki.ca_cert) as fake:
        yield fake


FAST = {"resend_after": 0.3, "backoff": Backoff(initial=0.05, maximum=0.2)}


def device_client(tls: Tls, port: int, **options: Any) -> DeviceClient:
    return DeviceClient.with_certificate(
        DEVICE, "127.0.0.1", port, ca_file=tls.pki.ca_cert, cert_file=tls.device_cert, key_file=tls.device_key,
        **{**FAST, **options},
    )  # fmt: skip


class Errors(list[DeviceError]):
    async def __call__(self, error: DeviceError) -> None:
        self.append(error)


# --- the client against the broker ----------------------------------------------------------------


async def test_each_observation_gets_its_outcome_and_a_resend_is_a_duplicate(tls: Tls, proxy: Proxy, cloud: FakeCloud):
    async with device_client(tls, proxy.port) as device:
        await device.wait_connected(timeout=5)
        results = await device.send_observations(
            [
                Observation("heart_rate", 72, unit="/min", id="hr-1"),
                Observation("spo2", 97.5, unit="%"),
                Observation("bad_metric", 1, id="bad-1"),
            ]
        )
        assert len(results) == 3
        assert results["hr-1"].outcome is Outcome.STORED
        assert results["bad-1"].outcome is Outcome.REJECTED
        assert results["bad-1"].reason == "INVALID_OBSERVATION"
        (generated,) = set(results) - {"hr-1", "bad-1"}
        assert results[generated].outcome is Outcome.STORED
        assert len(generated) == 32
        again = await device.send_observations([Observation("heart_rate", 73, id="hr-1")])
        assert again["hr-1"].outcome is Outcome.DUPLICATE
        assert again["hr-1"].durable
        assert cloud.observation_messages[0] == ["hr-1", generated, "bad-1"]  # one message, one batch
        counters = device.counters
        assert (counters.stored, counters.duplicates, counters.rejected, counters.acked) == (2, 1, 1, 3)
        assert device.pending_observations == 0
        with pytest.raises(InvalidMessage):
            device.enqueue_observations([Observation("Not A Metric", 1)])


async def test_unanswered_observations_are_resent_with_the_same_ids_after_a_while_and_after_a_reconnect(
    tls: Tls, proxy: Proxy, cloud: FakeCloud
):
    errors = Errors()
    async with device_client(tls, proxy.port, on_error=errors) as device:
        await device.wait_connected(timeout=5)
        cloud.ack = False
        (waiting,) = device.enqueue_observations([Observation("heart_rate", 70, id="lost-1")])
        await cloud.wait_for(lambda: len(cloud.observation_messages) >= 2)  # resent after resend_after
        assert cloud.observation_messages[:2] == [["lost-1"], ["lost-1"]]
        assert not waiting.done()

        resent = device.counters.observations_resent
        proxy.cut()
        await cloud.wait_for(lambda: device.counters.connects == 2)
        assert any(isinstance(e, ConnectionLost) for e in errors)
        cloud.ack = True
        result = await asyncio.wait_for(waiting, timeout=5)
        assert result.outcome is Outcome.STORED
        assert result.id == "lost-1"
        assert device.counters.observations_resent > resent
        assert device.counters.disconnects == 1
        assert cloud.stored == {"lost-1"}


async def test_an_unavailable_platform_gets_the_same_ids_again_after_retry_after(
    tls: Tls, proxy: Proxy, cloud: FakeCloud
):
    errors = Errors()
    cloud.unavailable = 1
    async with device_client(tls, proxy.port, on_error=errors, resend_after=30) as device:
        await device.wait_connected(timeout=5)
        results = await asyncio.wait_for(device.send_observations([Observation("spo2", 96, id="u-1")]), timeout=5)
    assert results["u-1"].outcome is Outcome.STORED
    assert cloud.observation_messages == [["u-1"], ["u-1"]]  # the same id again, after retry_after
    assert [e.reason for e in errors if isinstance(e, CloudError)] == ["UNAVAILABLE"]


async def test_desired_configuration_is_applied_once_per_version_and_reported(tls: Tls, proxy: Proxy, cloud: FakeCloud):
    applied: list[tuple[int, dict[str, Any]]] = []
    errors = Errors()

    async def on_config(version: int, config: dict[str, Any]) -> dict[str, Any] | None:
        applied.append((version, config))
        if config.get("explode"):
            raise RuntimeError("cannot apply")
        return {**config, "clamped": True} if version == 4 else None

    async with device_client(tls, proxy.port, on_config=on_config, on_error=errors) as device:
        await device.wait_connected(timeout=5)
        await cloud.send(DEVICE, "config/desired", {"version": 3, "config": {"sample_interval_s": 5}})
        await cloud.wait_for(lambda: cloud.of("config/reported"))
        await cloud.send(DEVICE, "config/desired", {"version": 3, "config": {"sample_interval_s": 5}})
        await cloud.wait_for(lambda: len(cloud.of("config/reported")) == 2)
        await cloud.send(DEVICE, "config/desired", {"version": 4, "config": {"sample_interval_s": 1}})
        await cloud.wait_for(lambda: len(cloud.of("config/reported")) == 3)
        await cloud.send(DEVICE, "config/desired", {"version": 5, "config": {"explode": True}})
        await cloud.wait_for(lambda: errors)
        await device.report_config({"sample_interval_s": 2})
        assert device.counters.configs_applied == 2
    assert applied == [(3, {"sample_interval_s": 5}), (4, {"sample_interval_s": 1}), (5, {"explode": True})]
    assert cloud.of("config/reported") == [
        {"version": 3, "config": {"sample_interval_s": 5}},
        {"version": 3, "config": {"sample_interval_s": 5}},  # the same version again: reported again, not applied
        {"version": 4, "config": {"sample_interval_s": 1, "clamped": True}},
        {"version": 4, "config": {"sample_interval_s": 2}},  # a change on the device, on the version applied
    ]
    (failure,) = errors
    assert isinstance(failure, HandlerError)
    assert isinstance(failure.__cause__, RuntimeError)


async def test_commands_run_once_report_their_outcome_and_honour_stop_and_cancel(
    tls: Tls, proxy: Proxy, cloud: FakeCloud
):
    calls: list[str] = []
    release = asyncio.Event()
    cancelled: list[str] = []

    async def on_command(command: Command) -> dict[str, Any]:
        calls.append(command.id)
        if command.command == "fail":
            raise RuntimeError("cuff not attached")
        if command.command == "wait":
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancelled.append(command.id)
                raise
        return {"measured": command.parameters.get("n", 0)}

    def states(command_id: str) -> list[str]:
        return [data["state"] for topic, data in cloud.received if topic.endswith(f"/commands/{command_id}/status")]

    def run(command_id: str, what: str, **extra: Any) -> dict[str, Any]:
        return {"action": "run", "id": command_id, "name": f"devices/{DEVICE}/commands/{command_id}", "command": what,
                **extra}  # fmt: skip

    errors = Errors()
    async with device_client(tls, proxy.port, on_command=on_command, on_error=errors) as device:
        await device.wait_connected(timeout=5)
        await cloud.send(DEVICE, "commands", run("c-1", "measure", parameters={"n": 3}, timeout_seconds=60))
        await cloud.wait_for(lambda: "COMPLETED" in states("c-1"))
        await cloud.send(DEVICE, "commands", run("c-1", "measure", parameters={"n": 3}))  # delivered twice
        await cloud.wait_for(lambda: states("c-1").count("COMPLETED") == 2)  # the final report again, no rerun
        assert states("c-1") == ["IN_PROGRESS", "COMPLETED", "COMPLETED"]
        assert [d for t, d in cloud.received if t.endswith("/c-1/status")][1] == {
            "state": "COMPLETED",
            "result": {"measured": 3},
        }

        await cloud.send(DEVICE, "commands", run("c-2", "fail"))
        await cloud.wait_for(lambda: "FAILED" in states("c-2"))
        assert cloud.of("/c-2/status")[-1] == {"state": "FAILED", "error_message": "cuff not attached"}

        await cloud.send(DEVICE, "commands", run("c-3", "wait"))
        await cloud.wait_for(lambda: "IN_PROGRESS" in states("c-3"))
        await cloud.send(DEVICE, "commands", {"action": "stop", "id": "c-3"})
        await cloud.wait_for(lambda: "FAILED" in states("c-3"))
        assert cloud.of("/c-3/status")[-1] == {"state": "FAILED", "error_message": "stopped"}

        await cloud.send(DEVICE, "commands", run("c-4", "wait"))
        await cloud.wait_for(lambda: "IN_PROGRESS" in states("c-4"))
        await cloud.send(DEVICE, "commands", {"action": "cancel", "id": "c-4"})
        await cloud.wait_for(lambda: "c-4" in cancelled)

        await cloud.send(DEVICE, "commands", {"action": "cancel", "id": "c-5"})  # canceled before it came
        await cloud.send(DEVICE, "commands", run("c-5", "measure"))
        await cloud.send(DEVICE, "commands", run("c-6", "measure", timeout_seconds=0.2))
        await cloud.wait_for(lambda: "COMPLETED" in states("c-6"))

        await cloud.send(DEVICE, "commands", run("c-7", "wait", timeout_seconds=0.2))
        await cloud.wait_for(lambda: "FAILED" in states("c-7"))
        assert "within 0.2 s" in cloud.of("/c-7/status")[-1]["error_message"]

        await cloud.send(DEVICE, "commands", run("c-8", "wait"))
        await cloud.wait_for(lambda: "IN_PROGRESS" in states("c-8"))
        await cloud.send(
            DEVICE,
            "errors",
            {"topic": f"devices/{DEVICE}/commands/c-8/status", "reason": "COMMAND_TIMED_OUT", "description": "late"},
        )
        await cloud.wait_for(lambda: "c-8" in cancelled)
        await asyncio.sleep(0.1)
        counters = device.counters
    assert calls == ["c-1", "c-2", "c-3", "c-4", "c-6", "c-7", "c-8"]  # c-5 never ran
    assert cancelled == ["c-3", "c-4", "c-7", "c-8"]  # stop, cancel, timeout, over on the platform
    assert states("c-4") == ["IN_PROGRESS"]
    assert states("c-5") == []
    assert states("c-8") == ["IN_PROGRESS"]
    assert (counters.commands_completed, counters.commands_failed) == (2, 3)
    assert [e.reason for e in errors if isinstance(e, CloudError)] == ["COMMAND_TIMED_OUT"]


async def test_status_is_reported_and_cloud_errors_reach_the_error_callback(tls: Tls, proxy: Proxy, cloud: FakeCloud):
    errors = Errors()
    async with device_client(tls, proxy.port, on_error=errors) as device:
        await device.wait_connected(timeout=5)
        await asyncio.wait_for(
            device.report_status("MINOR", "lead off", battery_percent=64, firmware_version="2.4.1"), 5
        )
        await cloud.wait_for(lambda: cloud.of("/status"))
        await cloud.send(DEVICE, "errors", {"topic": f"devices/{DEVICE}/x", "reason": "TOPIC_NOT_ALLOWED"})
        await cloud.send(DEVICE, "acks", {"stored": "not a list"})
        await cloud.wait_for(lambda: len(errors) == 2)
    (status,) = cloud.of("/status")
    assert {k: v for k, v in status.items() if k != "time"} == {
        "state": "MINOR",
        "message": "lead off",
        "battery_percent": 64,
        "firmware_version": "2.4.1",
    }
    assert isinstance(errors[0], CloudError)
    assert errors[0].reason == "TOPIC_NOT_ALLOWED"
    assert isinstance(errors[1], MalformedCloudMessage)


async def test_a_refused_device_hears_not_authorized_at_once(tls: Tls, broker: int):
    device = DeviceClient.with_certificate(
        REFUSED, "127.0.0.1", broker, ca_file=tls.pki.ca_cert, cert_file=tls.refused_cert, key_file=tls.refused_key
    )
    async with device:
        with pytest.raises(NotAuthorized) as refused:
            await device.wait_connected(timeout=5)
    assert refused.value.code == 5
    assert str(refused.value) == "connection refused (CONNACK 5): Not authorized"


async def test_temporary_credentials_connect_over_tls_without_a_client_certificate(
    tls: Tls, broker: int, cloud: FakeCloud
):
    device = DeviceClient.with_credentials(
        DEVICE, "127.0.0.1", broker, ca_file=tls.pki.ca_cert, username="tc-0123", password="secret", tag="phone", **FAST
    )
    assert device.client_id == f"{DEVICE}:phone"
    async with device:
        await device.wait_connected(timeout=5)
        results = await device.send_observations([Observation("heart_rate", 61)])
    assert [r.outcome for r in results.values()] == [Outcome.STORED]


def test_the_client_speaks_tls_1_3_only_and_checks_its_arguments(tls: Tls) -> None:
    device = device_client(tls, 1)
    assert device._tls.minimum_version is ssl.TLSVersion.TLSv1_3
    assert device._tls.verify_mode is ssl.CERT_REQUIRED
    assert device._tls.check_hostname
    with pytest.raises(ValueError, match="certificate"):
        DeviceClient(DEVICE, "h", ca_file=tls.pki.ca_cert)
    with pytest.raises(ValueError, match="go together"):
        DeviceClient(DEVICE, "h", ca_file=tls.pki.ca_cert, cert_file=tls.device_cert)
    with pytest.raises(ValueError, match="keepalive"):
        device_client(tls, 1, keepalive=5)


async def test_a_file_goes_up_in_parts_and_the_platform_refusal_is_an_upload_error(
    tls: Tls, proxy: Proxy, cloud: FakeCloud
):
    payload = bytes(range(256)) * 41  # 10496 bytes: three parts of 4096
    puts: list[tuple[str, bytes, str]] = []

    def storage(request: httpx.Request) -> httpx.Response:
        puts.append((str(request.url), request.content, request.headers["content-type"]))
        return httpx.Response(200, headers={"ETag": f'"etag-{len(puts)}"'})

    def answer(request: dict[str, Any]) -> dict[str, Any]:
        if request["action"] == "create":
            if request["sha256"] != hashlib.sha256(payload).hexdigest():
                return {"request_id": request["request_id"], "error": {"reason": "CHECKSUM_MISMATCH"}}
            parts = [{"part_number": n, "url": f"https://s3.test/up?part={n}"} for n in (1, 2, 3)]
            return {
                "request_id": request["request_id"],
                "file": "files/f-1",
                "upload": {"parts": parts, "part_size": 4096},
            }
        return {"request_id": request["request_id"], "file": request["file"], "state": "AVAILABLE"}

    cloud.file_answers = answer
    async with (
        device_client(tls, proxy.port) as device,
        httpx.AsyncClient(transport=httpx.MockTransport(storage)) as http,
    ):
        await device.wait_connected(timeout=5)
        name = await asyncio.wait_for(
            device.upload_file(payload, content_type="application/x-ecg", display_name="ecg.bin", http=http), 5
        )
        assert name == "files/f-1"
        assert b"".join(body for _, body, _ in puts) == payload
        assert [len(body) for _, body, _ in puts] == [4096, 4096, 2304]
        assert {ct for _, _, ct in puts} == {"application/x-ecg"}
        create, complete = cloud.of("files/requests")
        assert create["size_bytes"] == len(payload)
        assert create["display_name"] == "ecg.bin"
        assert complete["parts"] == [{"part_number": n, "etag": f'"etag-{n}"'} for n in (1, 2, 3)]

        cloud.file_answers = lambda r: {"request_id": r["request_id"], "error": {"reason": "CHECKSUM_MISMATCH"}}
        with pytest.raises(UploadError) as refused:
            await asyncio.wait_for(device.upload_file(b"other", http=http), 5)
        assert refused.value.reason == "CHECKSUM_MISMATCH"


async def test_closing_fails_what_still_waits_and_leaves_nothing_running(tls: Tls, proxy: Proxy, cloud: FakeCloud):
    cloud.ack = False
    device = device_client(tls, proxy.port)
    await device.start()
    await device.wait_connected(timeout=5)
    sending = asyncio.ensure_future(device.send_observations([Observation("heart_rate", 1)]))
    await cloud.wait_for(lambda: cloud.observation_messages)
    before = {t for t in asyncio.all_tasks() if not t.done()}
    await device.close()
    with pytest.raises(DeviceError, match="closed"):
        await sending
    await asyncio.sleep(0)
    left = {t for t in asyncio.all_tasks() if not t.done()} & before
    assert all("medmesh-device" not in t.get_name() and "command-" not in t.get_name() for t in left)
    assert not device.connected
