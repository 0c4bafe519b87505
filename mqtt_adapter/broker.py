"""The embedded amqtt broker, narrowed to medmesh's device protocol.

amqtt (0.12) does the MQTT work: packets and the QoS flows. What a generic broker does that a
device adapter must not, is overridden here (amqtt's own findings in DESIGN.md):
- who connects: the device's certificate (mutual TLS) or temporary credentials, checked with
  the device service; amqtt's TLS context would accept clients without a certificate;
- what a device publishes never goes through amqtt's broadcast (matched linearly against
  every subscription of every client): it is routed straight to the services;
- subscriptions are kept per connection, limited to the device's own topics, and only the
  adapter publishes to devices;
- an idle connection costs no task, queue or timer of its own (README: memory per device).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import math
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import grpc
from amqtt.adapters import BufferReader
from amqtt.broker import Broker
from amqtt.contexts import ListenerConfig
from amqtt.errors import AMQTTError, MQTTError, NoDataError, ProtocolHandlerError
from amqtt.events import MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    CONNECTION_ACCEPTED,
    IDENTIFIER_REJECTED,
    NOT_AUTHORIZED,
    SERVER_UNAVAILABLE,
    UNACCEPTABLE_PROTOCOL_VERSION,
    ConnackPacket,
)
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.packet import (
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler, Subscription, UnSubscription
from amqtt.session import ApplicationMessage
from google.protobuf import timestamp_pb2

from mqtt_adapter.connections import Connection, Connections
from mqtt_adapter.mesh import Admission, DeviceRegistry
from mqtt_adapter.router import UplinkRouter
from mqtt_adapter.topics import ClientId, may_subscribe, parse_client_id

log = logging.getLogger(__name__)

SUBSCRIPTION_REFUSED = 0x80
CONNECT_TIMEOUT = 60.0  # seconds from TLS up to a complete CONNECT (asyncio allows as long for the handshake)
# Larger packets close the connection before they are read. A payload over 256 KiB is still
# answered with PAYLOAD_TOO_LARGE up to this size; files go over HTTPS, never MQTT.
MAX_PACKET_BYTES = 1024 * 1024
_MQTT_3_1_1 = 4


# --- TLS ------------------------------------------------------------------------------------------

# asyncio reads every TLS socket into a zero-filled buffer of its own, 256 KiB by default: resident
# for the life of the connection. The event loop copies what it read into the connection's
# OpenSSL BIO before it reads another socket, so one buffer serves them all. 4 KiB per read keeps
# the BIOs small (an OpenSSL memory BIO keeps the most it ever held); device messages are small.
_RECEIVED = bytearray(4 * 1024)
_RECEIVED_VIEW = memoryview(_RECEIVED)


class DeviceTls(asyncio.sslproto.SSLProtocol):
    """asyncio's TLS layer (Python 3.11) for one device connection, keeping less per connection.

    Besides the shared receive buffer: no decoded copy of the peer certificate (about 1.5 KiB
    of dicts and tuples; the certificate is read as DER from the SSL object when the device
    connects), and a list for the write backlog, empty when idle (an empty deque is 0.6 KiB):
    together 6.8 KiB less per idle connection; the slots below, 1.5 KiB more (memory_probe).
    """

    # SSLProtocol sets 37 attributes on itself: past 30, CPython 3.11 gives an instance a dict
    # of its own (1.5 KiB) instead of a share of its class's keys. Slots hold all but the three
    # that are also class attributes there (a slot would hide their class default).
    __slots__ = (
        "_app_protocol",
        "_app_protocol_buffer_updated",
        "_app_protocol_get_buffer",
        "_app_protocol_is_buffer",
        "_app_reading_paused",
        "_app_state",
        "_app_transport",
        "_app_transport_created",
        "_app_writing_paused",
        "_conn_lost",
        "_eof_received",
        "_extra",
        "_incoming",
        "_incoming_high_water",
        "_incoming_low_water",
        "_loop",
        "_outgoing",
        "_outgoing_high_water",
        "_outgoing_low_water",
        "_server_hostname",
        "_server_side",
        "_ssl_buffer",
        "_ssl_buffer_view",
        "_ssl_handshake_timeout",
        "_ssl_reading_paused",
        "_ssl_shutdown_timeout",
        "_ssl_writing_paused",
        "_sslcontext",
        "_sslobj",
        "_state",
        "_transport",
        "_waiter",
        "_write_backlog",
        "_write_buffer_size",
    )

    max_size = len(_RECEIVED)  # also the most plaintext taken from OpenSSL per read

    def __init__(self, loop: asyncio.AbstractEventLoop, app: asyncio.Protocol, context: ssl.SSLContext) -> None:
        super().__init__(loop, app, context, None, server_side=True)  # type: ignore[arg-type]  # nobody waits
        self._ssl_buffer = _RECEIVED
        self._ssl_buffer_view = _RECEIVED_VIEW
        self._write_backlog = []  # type: ignore[assignment]  # append, [0], del [0], clear(): as a deque

    def get_buffer(self, n: int) -> memoryview:
        return _RECEIVED_VIEW

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        super()._on_handshake_complete(handshake_exc)
        self._extra.pop("peercert", None)


def device_tls_context(cert_file: str, key_file: str, device_ca_file: str) -> ssl.SSLContext:
    """TLS 1.3 only; a client certificate, if presented, must chain to the platform device CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert_file, key_file)
    context.load_verify_locations(device_ca_file)
    # Optional: gateways and phones connect with temporary credentials instead. A client with
    # neither is refused at CONNECT, with CONNACK "not authorized".
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


# --- one connection -------------------------------------------------------------------------------


class DeviceSession:
    """What amqtt's protocol handler asks of a session, and who the client is.

    amqtt's `Session` brings a `transitions.Machine` (16 KiB), two asyncio queues (3 KiB each)
    and two OrderedDicts per connection; sessions here are always new and end with the
    connection (README), so none of that is needed.
    """

    __slots__ = (
        "_packet_id",
        "client",
        "client_id",
        "delivered_message_queue",
        "inflight_in",
        "inflight_out",
        "keep_alive",
        "password",
        "remote_address",
        "remote_port",
        "unavailable",
        "username",
    )

    def __init__(self, connect: ConnectPacket, remote: tuple[str, int], inbox: Inbox) -> None:
        self.client_id: str = connect.client_id
        self.keep_alive: int = max(connect.keep_alive, 0)
        self.username: str | None = connect.username
        self.password: str | None = connect.password
        self.remote_address, self.remote_port = remote
        self.client: ClientId | None = None  # once authenticated
        self.unavailable = False  # the registry could not be asked
        self.inflight_in: dict[int, Any] = {}
        self.inflight_out: dict[int, Any] = {}
        self._packet_id = 0
        self.delivered_message_queue = inbox  # amqtt's QoS flows put what the device published here

    @property
    def next_packet_id(self) -> int:
        """As amqtt's: the next packet id not in flight either way."""
        for _ in range(65535):
            self._packet_id = (self._packet_id % 65535) + 1
            if self._packet_id not in self.inflight_in and self._packet_id not in self.inflight_out:
                return self._packet_id
        raise AMQTTError("More than 65535 messages pending. No free packet ID")

    def __repr__(self) -> str:
        return f"DeviceSession(clientId={self.client_id})"


class Inbox:
    """What a connection received for the broker to act on, in the order received: messages the
    device published, subscriptions and unsubscriptions.

    amqtt keeps an asyncio.Queue and a waiting task for each of those (and a fourth task waiting
    for the disconnect) per connection; here a queue and a task exist only while there is
    something to do. Nothing is acted on until the connection is registered (`open`).
    """

    __slots__ = ("_act", "_items", "_state", "_worker")

    _WAITING, _OPEN, _CLOSED = range(3)

    def __init__(self, act: Callable[[object], Awaitable[None]]) -> None:
        self._act = act
        self._items: deque[object] | None = None
        self._state = Inbox._WAITING
        self._worker: asyncio.Task[None] | None = None

    async def put(self, item: object) -> None:
        self.put_nowait(item)

    def put_nowait(self, item: object) -> None:
        if self._state == Inbox._CLOSED:
            return
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        self._wake()

    def qsize(self) -> int:
        return len(self._items) if self._items is not None else 0

    def open(self) -> None:
        if self._state == Inbox._WAITING:
            self._state = Inbox._OPEN
            self._wake()

    def close(self) -> None:
        """Drops what is waiting (amqtt's did too); what is being acted on finishes."""
        self._state = Inbox._CLOSED
        self._items = None

    def _wake(self) -> None:
        if self._state == Inbox._OPEN and self._items and self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._state == Inbox._OPEN and self._items:
                item = self._items.popleft()
                try:
                    await self._act(item)
                except Exception:  # one bad item must not stop the connection's others
                    log.exception("could not act on a %s", type(item).__name__)
        finally:
            self._worker = None
            if not self._items:
                self._items = None


class KeepAlive:
    """Closes connections not heard from in time, with one timer for all of them.

    amqtt reads every packet under `asyncio.wait_for`: a task and a timer per connection, made
    again for each packet. Here a packet only stamps `heard` on its handler. Each handler sits
    in the slot of the second its deadline falls in; when that second comes, a handler heard
    from since moves to its new deadline, the others are closed.
    """

    def __init__(self) -> None:
        self._slots: dict[int, set[DeviceProtocolHandler]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._due = math.inf

    def watch(self, handler: DeviceProtocolHandler, timeout: float) -> None:
        """Closes `handler` once nothing was heard from it for `timeout` seconds (0: never)."""
        self.forget(handler)
        handler.keepalive_timeout = timeout or None
        if timeout > 0:
            self._place(handler)

    def forget(self, handler: DeviceProtocolHandler) -> None:
        slot = handler.keepalive_slot
        if slot is not None:
            handler.keepalive_slot = None
            handlers = self._slots.get(slot)
            if handlers is not None:
                handlers.discard(handler)
                if not handlers:
                    del self._slots[slot]

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._due = None, math.inf
        self._slots.clear()

    def _place(self, handler: DeviceProtocolHandler) -> None:
        assert handler.keepalive_timeout is not None
        slot = math.ceil(handler.heard + handler.keepalive_timeout)
        self._slots.setdefault(slot, set()).add(handler)
        handler.keepalive_slot = slot
        if slot < self._due:
            self._arm(slot)

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._due = asyncio.get_running_loop().call_at(slot, self._tick), slot

    def _tick(self) -> None:
        self._timer, self._due = None, -math.inf  # while ticking, _place leaves the timer alone
        now = asyncio.get_running_loop().time()
        for slot in [slot for slot in self._slots if slot <= now]:
            for handler in self._slots.pop(slot):
                handler.keepalive_slot = None
                timeout = handler.keepalive_timeout
                if timeout is None:
                    continue
                if handler.heard + timeout <= now:
                    handler.handle_read_timeout()
                else:
                    self._place(handler)
        self._due = math.inf
        if self._slots:
            self._arm(min(self._slots))


def _packet_end(data: bytearray, start: int) -> int | None:
    """Where the MQTT packet that starts at `start` ends, or None while it is incomplete."""
    length, multiplier, index = 0, 1, start + 1
    while True:
        if index >= len(data):
            return None
        byte = data[index]
        index += 1
        length += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            break
        multiplier *= 128
        if multiplier > 128**3:
            raise MQTTError("malformed remaining length")
    if length > MAX_PACKET_BYTES:
        raise MQTTError(f"a packet of {length} bytes (at most {MAX_PACKET_BYTES})")
    end = index + length
    return end if end <= len(data) else None


_AWAITING_CONNECT, _CONNECTING, _CONNECTED, _CLOSED = range(4)

_HANDLE = {
    PUBLISH: "handle_publish",
    PUBACK: "handle_puback",
    PUBREC: "handle_pubrec",
    PUBREL: "handle_pubrel",
    PUBCOMP: "handle_pubcomp",
    SUBSCRIBE: "handle_subscribe",
    UNSUBSCRIBE: "handle_unsubscribe",
    PINGREQ: "handle_pingreq",
    DISCONNECT: "handle_disconnect",
    CONNECT: "handle_connect",
}  # a client sending CONNACK, SUBACK, UNSUBACK or PINGRESP is ignored, as amqtt does


class DeviceProtocolHandler(BrokerProtocolHandler, asyncio.Protocol):  # type: ignore[misc]
    """One device connection: the asyncio protocol under TLS, and amqtt's protocol handler.

    amqtt reads a connection with a task that waits on an asyncio StreamReader, and runs a
    second task per connection plus four waiting on its queues. Here the event loop hands the
    bytes over (`data_received`); each complete packet is decoded and handled by a task of its
    own, as amqtt handles them, so an idle connection has no task at all. amqtt's handler does
    the QoS flows and writes the packets (this object is its writer too).
    """

    def __init__(self, broker: DeviceBroker) -> None:
        # BrokerProtocolHandler.__init__ is not called: it makes two queues and an event per
        # connection that nothing here uses. These are the attributes its methods use.
        self.logger = log
        self.plugins_manager = broker.plugins_manager
        self._loop = asyncio.get_running_loop()
        self.session: DeviceSession | None = None
        self.reader = None
        self.writer = self
        self.keepalive_timeout: float | None = None
        self._keepalive_task = None  # amqtt's write timer: a broker does nothing when it fires
        self._puback_waiters: dict[int, asyncio.Future[Any]] = {}
        self._pubrec_waiters: dict[int, asyncio.Future[Any]] = {}
        self._pubrel_waiters: dict[int, asyncio.Future[Any]] = {}
        self._pubcomp_waiters: dict[int, asyncio.Future[Any]] = {}
        self._write_lock = asyncio.Lock()
        self._broker = broker
        self._transport: asyncio.Transport | None = None
        self._state = _AWAITING_CONNECT
        self._unread: bytearray | None = None  # received, not yet a complete packet
        self._tasks: set[asyncio.Task[None]] | None = None  # packets being handled
        self._resumed: asyncio.Future[None] | None = None  # while writing is paused
        self.connection: Connection | None = None  # once registered
        self.heard = self._loop.time()
        self.keepalive_slot: int | None = None

    # --- asyncio protocol: the TLS connection ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.heard = self._loop.time()
        self._broker.keepalive.watch(self, CONNECT_TIMEOUT)

    def data_received(self, data: bytes) -> None:
        self.heard = self._loop.time()
        if self._state == _CLOSED:
            return
        if self._unread is None:
            self._unread = bytearray(data)
        else:
            self._unread += data
        if self._state != _CONNECTING:
            self._read_packets()

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.disconnect()
        self._transport = None  # the TLS objects go with it

    def pause_writing(self) -> None:
        if self._resumed is None:
            self._resumed = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._resumed is not None:
            if not self._resumed.done():
                self._resumed.set_result(None)
            self._resumed = None

    def _read_packets(self) -> None:
        unread = self._unread
        if unread is None:
            return
        start = 0
        try:
            while (end := _packet_end(unread, start)) is not None:
                packet, start = bytes(unread[start:end]), end
                if self._state == _AWAITING_CONNECT:
                    self._state = _CONNECTING  # what follows waits until the device is admitted
                    self._broker.spawn_connect(self, packet)
                    break
                self._spawn(self._handle_packet(packet))
        except MQTTError as error:
            log.info("closing %s: %s", self._peer(), error)
            self.disconnect()
            return
        del unread[:start]
        if not unread:
            self._unread = None

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = self._loop.create_task(coroutine)
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self._tasks is not None:
            self._tasks.discard(task)
            if not self._tasks:
                self._tasks = None
        # amqtt turns a cancelled write into ProtocolHandlerError: that is a closed connection.
        error = None if task.cancelled() else task.exception()
        if error is not None and not isinstance(error, ProtocolHandlerError):
            log.warning("%s: handling a packet failed: %r", self._peer(), error)

    async def _handle_packet(self, data: bytes) -> None:
        """Decodes and handles one packet, as amqtt's reader loop does (undecodable: discarded)."""
        reader = BufferReader(data)
        try:
            header = await MQTTFixedHeader.from_stream(reader)
            if header is None or header.packet_type not in range(1, 15):
                log.warning("%s sent a reserved packet type: closing the connection", self._peer())
                self.disconnect()
                return
            packet = await packet_class(header).from_stream(reader, fixed_header=header)
        except (MQTTError, NoDataError) as error:
            log.debug("%s: packet discarded: %r", self._peer(), error)
            return
        except Exception as error:  # amqtt's reader closes the connection on anything else
            log.warning("%s: undecodable packet, closing: %r", self._peer(), error)
            self.disconnect()
            return
        await self.plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=packet, session=self.session)
        handle = _HANDLE.get(header.packet_type)
        if handle is not None:
            await getattr(self, handle)(packet)

    # --- the connection's life ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Admitted, registered and not closed since."""
        return self._state == _CONNECTED

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED

    def admitted(self) -> None:
        """CONNACK accepted and the connection registered: read on, and act on what was read."""
        if self._state != _CONNECTING:
            return
        self._state = _CONNECTED
        assert self.session is not None
        self._broker.keepalive.watch(self, 1.5 * self.session.keep_alive)  # MQTT 3.1.1, 3.1.2.10
        self.session.delivered_message_queue.open()
        self._read_packets()

    def disconnect(self) -> None:
        """Closes the connection (once): what is in flight is cancelled, the broker forgets it."""
        if self._state == _CLOSED:
            return
        was_connected = self._state == _CONNECTED
        self._state = _CLOSED
        self._unread = None
        self._broker.keepalive.forget(self)
        if self.session is not None:
            self.session.delivered_message_queue.close()
        self._stop_waiters()
        for task in list(self._tasks or ()):
            if task is not asyncio.current_task():
                task.cancel()
        self.resume_writing()  # what waits to write returns; writes after a close go nowhere, as amqtt's
        if self._transport is not None:
            self._transport.close()
        if was_connected:
            self._broker.forget(self)

    def handle_read_timeout(self) -> None:
        # MQTT 3.1.1, 3.1.2.10: nothing heard for 1.5 x keep-alive means the client is gone. amqtt
        # ignores it, so a device that lost power would stay "connected" forever.
        log.info("%s: nothing heard within its keep-alive, closing", self._peer())
        self.disconnect()

    async def handle_connection_closed(self) -> None:
        self.disconnect()

    async def stop(self) -> None:
        self.disconnect()

    async def handle_disconnect(self, disconnect: Any) -> None:
        self.disconnect()

    async def handle_connect(self, connect: ConnectPacket) -> None:
        log.warning("%s [MQTT-3.1.0-2]: a second CONNECT, closing", self._peer())
        self.disconnect()

    async def handle_subscribe(self, subscribe: Any) -> None:
        assert self.session is not None
        self.session.delivered_message_queue.put_nowait(
            Subscription(subscribe.variable_header.packet_id, subscribe.payload.topics)
        )

    async def handle_unsubscribe(self, unsubscribe: Any) -> None:
        assert self.session is not None
        self.session.delivered_message_queue.put_nowait(
            UnSubscription(unsubscribe.variable_header.packet_id, unsubscribe.payload.topics)
        )

    async def mqtt_connack_authorize(self, authorize: bool) -> None:
        # "Server unavailable" (3) when the registry could not be asked, so the device backs off
        # and retries instead of taking it as a verdict on its credentials (5).
        unavailable = self.session is not None and self.session.unavailable
        code = CONNECTION_ACCEPTED if authorize else SERVER_UNAVAILABLE if unavailable else NOT_AUTHORIZED
        await self._send_packet(ConnackPacket.build(0, code))

    async def act(self, item: object) -> None:
        """What this connection received, once registered, in order (its `Inbox`)."""
        await self._broker.act(self, item)

    # --- amqtt's writer adapter -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._state != _CLOSED and self._transport is not None:
            self._transport.write(data)

    async def drain(self) -> None:
        if self._resumed is not None:
            await self._resumed

    def get_peer_info(self) -> tuple[str, int] | None:
        peer = self._transport.get_extra_info("peername") if self._transport is not None else None
        return (peer[0], peer[1]) if peer else None

    def get_ssl_info(self) -> ssl.SSLObject | None:
        return self._transport.get_extra_info("ssl_object") if self._transport is not None else None

    async def close(self) -> None:
        self.disconnect()

    def _peer(self) -> str:
        if self.session is not None:
            return f"{self.session.client_id} ({self.session.remote_address})"
        peer = self.get_peer_info()
        return f"{peer[0]}:{peer[1]}" if peer else "a client"


def _connect_refusal(connect: ConnectPacket) -> int | None:
    """amqtt's checks of a CONNECT (`BrokerProtocolHandler.init_from_connect`): the CONNACK code
    refusing it, None when it may go on; MQTTError when it gets no CONNACK at all."""
    if connect.variable_header is None or connect.payload is None or connect.payload.client_id is None:
        raise MQTTError("[MQTT-3.1.3-3] incomplete CONNECT")
    payload = connect.payload
    if connect.variable_header.will_flag and (payload.will_topic is None or payload.will_message is None):
        raise MQTTError("will flag set, but will topic/message not present in payload")
    if connect.variable_header.reserved_flag:
        raise MQTTError("[MQTT-3.1.2-3] CONNECT reserved flag must be set to 0")
    if connect.proto_name != "MQTT":
        raise MQTTError(f"[MQTT-3.1.2-1] incorrect protocol name {connect.proto_name!r}")
    if connect.proto_level != _MQTT_3_1_1:
        return int(UNACCEPTABLE_PROTOCOL_VERSION)  # [MQTT-3.2.2-4]
    if not connect.username_flag and connect.password_flag:
        return int(BAD_USERNAME_PASSWORD)  # [MQTT-3.1.2-22]
    if (connect.username_flag and connect.username is None) or (connect.password_flag and connect.password is None):
        return int(BAD_USERNAME_PASSWORD)
    if connect.clean_session_flag is False and connect.payload.client_id_is_random:
        return int(IDENTIFIER_REJECTED)  # [MQTT-3.1.3-8]
    return None


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp


class DeviceBroker(Broker):  # type: ignore[misc]
    """amqtt's broker with medmesh's listener, admission, subscriptions and routing."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        registry: DeviceRegistry,
        connections: Connections,
        router: Callable[[], UplinkRouter],
        instance: str,
        address: str,
    ) -> None:
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "ssl": True}},
            "plugins": {},  # no anonymous access, no $SYS, no packet logging
        }
        super().__init__(config)
        self._tls = tls
        self._registry = registry
        self._connections = connections
        self._router = router
        self._instance = instance
        self._address = address
        self.keepalive = KeepAlive()
        self._connecting: set[asyncio.Task[None]] = set()
        self._reports: set[asyncio.Task[None]] = set()

    # --- who connects -------------------------------------------------------------------------

    def _create_ssl_context(self, listener: ListenerConfig) -> ssl.SSLContext:
        return self._tls

    async def _create_server_instance(
        self, listener_name: str, listener_type: Any, address: str | None, port: int, ssl_context: Any
    ) -> asyncio.Server:
        """Device connections are `DeviceProtocolHandler`s under `DeviceTls`, not amqtt's streams."""
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: DeviceTls(loop, DeviceProtocolHandler(self), self._tls), address, port, reuse_address=True
        )

    def spawn_connect(self, handler: DeviceProtocolHandler, packet: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._connect(handler, packet))
        self._connecting.add(task)
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[None]) -> None:
        self._connecting.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("admitting a device failed", exc_info=error)

    async def _connect(self, handler: DeviceProtocolHandler, packet: bytes) -> None:
        """CONNECT: amqtt's checks, authentication, CONNACK, then the connection is registered.

        Every CONNECT gets a new session: amqtt would hand a `clean session = 0` client the cached
        session of the connected device with that client id before authenticating it, and then
        take that device's connection over even when the newcomer is refused. State lives in the
        services, so sessions here are clean, and a device connecting again closes its earlier
        connection only once authenticated.
        """
        connection: Connection | None = None
        try:
            try:
                connect = await ConnectPacket.from_stream(BufferReader(packet))
                await self.plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=connect)
                if connect.fixed_header is None or connect.fixed_header.packet_type != CONNECT:
                    raise MQTTError("[MQTT-3.1.0-1] the first packet is not CONNECT")
                refusal = _connect_refusal(connect)
            except Exception as error:  # whatever those bytes were, they were not a CONNECT to answer
                log.warning("refused %s: %r", handler.get_peer_info(), error)
                return
            remote = handler.get_peer_info() or ("", 0)
            session = DeviceSession(connect, remote, Inbox(handler.act))
            handler.session = session
            if refusal is not None:
                await handler._send_packet(ConnackPacket.build(0, refusal))
                return
            authenticated = await self._authenticate(session, handler.get_ssl_info())
            await handler.mqtt_connack_authorize(authenticated)
            if not authenticated or session.client is None or handler.closed:
                return  # gone while being authenticated: its earlier connection, if any, stays
            connection = Connection(session.client, handler, session.remote_address)
            handler.connection = connection
            for earlier in self._connections.of(connection.device):
                if earlier.client == connection.client:
                    # The same client id connected again: the new connection wins.
                    log.info("%s connected again; closing its earlier connection", session_name(connection.client))
                    earlier.handler.disconnect()
            self._connections.add(connection)
            if connection.client.primary:
                await self._report(connection, connected=True)
            handler.admitted()
        finally:
            if not handler.connected:  # refused, or gone (or shut down) while being admitted
                handler.disconnect()
                self.forget(handler)  # after its connection was reported, if it was

    async def _authenticate(self, session: DeviceSession, tls: ssl.SSLObject | None) -> bool:
        client = parse_client_id(session.client_id)
        if client is None:
            log.info("refused %s: client id %r is not a device id", session.remote_address, session.client_id)
            return False
        try:
            admission = await self._admit(session, tls)
        except grpc.aio.AioRpcError as error:
            log.warning("refused %s: the device registry did not answer (%s)", client.device_id, error.code())
            session.unavailable = True
            return False
        if not admission.admitted:
            log.info("refused %s from %s: %s", client.device_id, session.remote_address, admission.refusal)
            return False
        if admission.device != client.device:
            log.info("refused client id %s: its credentials are for %s", client.device_id, admission.device)
            return False
        session.client = client
        return True

    async def _admit(self, session: DeviceSession, tls: ssl.SSLObject | None) -> Admission:
        der = tls.getpeercert(binary_form=True) if tls is not None else None
        if der:
            return await self._registry.check_certificate(der)
        if session.username and session.password:
            return await self._registry.verify_credentials(session.username, session.password)
        return Admission("", "NO_CREDENTIALS")

    # --- the connection's life ------------------------------------------------------------------

    def forget(self, handler: DeviceProtocolHandler) -> None:
        """A registered connection ended: it is no longer this instance's, and that is reported."""
        connection, handler.connection = handler.connection, None
        if connection is None:
            return
        self._connections.remove(connection)
        if connection.client.primary:
            self._spawn_report(connection, connected=False)

    async def _report(self, connection: Connection, *, connected: bool) -> None:
        try:
            await self._registry.report_connection(
                connection.device,
                connected=connected,
                instance=self._instance,
                address=self._address,
                session_id=connection.session_id,
                remote_address=connection.remote_address,
                time=_now(),
            )
        except grpc.aio.AioRpcError as error:
            log.warning("connection of %s not reported: %s", connection.device, error.code())

    def _spawn_report(self, connection: Connection, *, connected: bool) -> None:
        task = asyncio.create_task(self._report(connection, connected=connected))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def act(self, handler: DeviceProtocolHandler, item: object) -> None:
        """What a registered connection received, in order (its `Inbox`)."""
        connection = handler.connection
        if connection is None:
            return
        if isinstance(item, Subscription):
            await self._subscribe(connection, handler, item)
        elif isinstance(item, UnSubscription):
            for topic in item.topics:
                connection.subscriptions.pop(topic, None)
            await handler.mqtt_acknowledge_unsubscription(item.packet_id)
        elif isinstance(item, ApplicationMessage):
            # Device -> cloud is routed by topic, never broadcast through amqtt.
            await self._router().handle(connection, item.topic, item.data)

    # --- subscriptions: per connection, own topics only -------------------------------------------

    def _grant(self, subscription: tuple[str, int], connection: Connection) -> int:
        topic_filter, qos = subscription
        if not may_subscribe(connection.client.device_id, topic_filter):
            log.info("%s may not subscribe to %r", session_name(connection.client), topic_filter)
            return SUBSCRIPTION_REFUSED
        granted = min(qos, 1)  # QoS 2 costs two more round trips and buys nothing here
        connection.subscriptions[topic_filter] = granted
        return granted

    async def _subscribe(self, connection: Connection, handler: DeviceProtocolHandler, request: Subscription) -> None:
        codes = [self._grant(subscription, connection) for subscription in request.topics]
        await handler.mqtt_acknowledge_subscription(request.packet_id, codes)
        granted = [topic for topic, _ in request.topics if topic in connection.subscriptions]
        self._router().subscribed(connection, granted)

    async def close(self) -> None:
        """After shutdown(): closes every connection and lets the last disconnect reports finish."""
        for task in list(self._connecting):
            task.cancel()
        await asyncio.gather(*self._connecting, return_exceptions=True)
        for connection in list(self._connections):
            connection.handler.disconnect()
        self.keepalive.close()
        await asyncio.sleep(0)
        await asyncio.gather(*self._reports, return_exceptions=True)


def session_name(client: ClientId) -> str:
    return f"{client.device_id}:{client.tag}" if client.tag else client.device_id
