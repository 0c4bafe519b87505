"""The embedded amqtt broker, narrowed to medmesh's device protocol.

amqtt (0.12) does the MQTT work: packets, keep-alive, QoS flows. What a generic broker does
that a device adapter must not, is overridden here (amqtt's own findings in DESIGN.md):
- who connects: the device's certificate (mutual TLS) or temporary credentials, checked with
  the device service; amqtt's TLS context would accept clients without a certificate;
- what a device publishes never goes through amqtt's broadcast (matched linearly against
  every subscription of every client): it is routed straight to the services;
- subscriptions are kept per connection, limited to the device's own topics, and only the
  adapter publishes to devices.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import grpc
from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import ListenerConfig
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import CONNECTION_ACCEPTED, NOT_AUTHORIZED, SERVER_UNAVAILABLE, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from google.protobuf import timestamp_pb2

from mqtt_adapter.connections import Connection, Connections
from mqtt_adapter.mesh import Admission, DeviceRegistry
from mqtt_adapter.router import UplinkRouter
from mqtt_adapter.topics import ClientId, may_subscribe, parse_client_id

log = logging.getLogger(__name__)

# asyncio gives every TLS connection a zero-filled 256 KiB receive buffer (SSLProtocol.max_size),
# resident for the life of the connection: 256 KiB per idle device (measured: 340 KiB RSS per
# idle connection in all, 93 KiB with 4 KiB). Device messages are small; a large one takes
# more reads of 4 KiB, nothing else changes.
asyncio.sslproto.SSLProtocol.max_size = 4 * 1024

SUBSCRIPTION_REFUSED = 0x80
_CLIENT = "medmesh.client"
_CONNECTION = "medmesh.connection"
_UNAVAILABLE = "medmesh.unavailable"


class SessionStates:
    """What amqtt asks of a session's state machine: new -> connected <-> disconnected.

    amqtt builds a `transitions.Machine` per session, about 16 KiB resident per connection
    (tracemalloc, 1,000 idle connections); this is the same three states in a few bytes.
    """

    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.state = "new"

    def connect(self) -> None:
        if self.state == "connected":
            raise ValueError("already connected")  # amqtt's take-over path expects the Machine's refusal
        self.state = "connected"
        self._session._on_enter_connected()

    def disconnect(self) -> None:
        self.state = "disconnected"
        self._session._on_enter_disconnected()

    def is_connected(self) -> bool:
        return self.state == "connected"


class DeviceProtocolHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's handler, with two protocol rules it leaves out."""

    _closing: set[asyncio.Task[None]] = set()  # noqa: RUF012 - references to running tasks, shared

    def handle_read_timeout(self) -> None:
        # MQTT 3.1.1, 3.1.2.10: nothing heard for 1.5 x keep-alive means the client is gone. amqtt
        # ignores it, so a device that lost power would stay "connected" forever.
        task = asyncio.ensure_future(self.handle_connection_closed())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def mqtt_connack_authorize(self, authorize: bool) -> None:
        # "Server unavailable" (3) when the registry could not be asked, so the device backs off
        # and retries instead of taking it as a verdict on its credentials (5).
        unavailable = self.session is not None and self.session.attributes.get(_UNAVAILABLE)
        code = CONNECTION_ACCEPTED if authorize else SERVER_UNAVAILABLE if unavailable else NOT_AUTHORIZED
        await self._send_packet(ConnackPacket.build(0, code))


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


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp


class DeviceBroker(Broker):  # type: ignore[misc]
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
        self._reports: set[asyncio.Task[None]] = set()

    # --- who connects -------------------------------------------------------------------------

    def _create_ssl_context(self, listener: ListenerConfig) -> ssl.SSLContext:
        return self._tls

    async def _authenticate(self, session: Session, listener: ListenerConfig) -> bool:
        client = parse_client_id(session.client_id)
        if client is None:
            log.info("refused %s: client id %r is not a device id", session.remote_address, session.client_id)
            return False
        try:
            admission = await self._admit(session)
        except grpc.aio.AioRpcError as error:
            log.warning("refused %s: the device registry did not answer (%s)", client.device_id, error.code())
            session.attributes[_UNAVAILABLE] = True
            return False
        if not admission.admitted:
            log.info("refused %s from %s: %s", client.device_id, session.remote_address, admission.refusal)
            return False
        if admission.device != client.device:
            log.info("refused client id %s: its credentials are for %s", client.device_id, admission.device)
            return False
        session.attributes[_CLIENT] = client
        return True

    async def _admit(self, session: Session) -> Admission:
        der = session.ssl_object.getpeercert(binary_form=True) if session.ssl_object is not None else None
        if der:
            return await self._registry.check_certificate(der)
        if session.username and session.password:
            return await self._registry.verify_credentials(session.username, session.password)
        return Admission("", "NO_CREDENTIALS")

    # --- the connection's life ------------------------------------------------------------------

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[DeviceProtocolHandler, Session]:
        """Reads CONNECT into a new session, always: nothing of an earlier connection is reused.

        amqtt would hand a `clean session = 0` client the cached session of the connected device
        with that client id before authenticating it, and then take that device's connection over
        even when the newcomer is refused. State lives in the services, so sessions here are clean.
        """
        try:
            handler, session = await DeviceProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except (AMQTTError, NoDataError) as error:
            raise AMQTTError(error) from error
        except MQTTError as error:
            await writer.close()
            raise MQTTError(error) from error
        session.transitions = SessionStates(session)
        session.parent = 0
        if session.keep_alive > 0:
            session.keep_alive += session.keep_alive // 2
        return handler, session

    async def _handle_client_session(self, *args: Any, **kwargs: Any) -> None:
        client_session: Session = kwargs.get("client_session") or args[2]
        try:
            await super()._handle_client_session(*args, **kwargs)
        finally:
            # Refused or gone: amqtt would keep the session until the client id connects again.
            current = self._sessions.get(client_session.client_id)
            if current is not None and current[0] is client_session:
                del self._sessions[client_session.client_id]

    async def _client_message_loop(self, client_session: Session, handler: Any) -> None:
        client: ClientId = client_session.attributes[_CLIENT]
        connection = Connection(client, handler, client_session.remote_address or "")
        client_session.attributes[_CONNECTION] = connection
        for earlier in self._connections.of(client.device):
            if earlier.client == client:
                # The same client id connected again: the new connection wins.
                log.info("%s connected again; closing its earlier connection", session_name(client))
                await earlier.handler.handle_connection_closed()
        self._connections.add(connection)
        if client.primary:
            await self._report(connection, connected=True)
        try:
            await super()._client_message_loop(client_session, handler)
        finally:
            self._connections.remove(connection)
            if client.primary:
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

    # --- subscriptions: per connection, own topics only -------------------------------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        topic_filter, qos = subscription
        connection: Connection | None = session.attributes.get(_CONNECTION)
        if connection is None or not may_subscribe(connection.client.device_id, topic_filter):
            log.info("%s may not subscribe to %r", session.client_id, topic_filter)
            return SUBSCRIPTION_REFUSED
        granted = min(qos, 1)  # QoS 2 costs two more round trips and buys nothing here
        connection.subscriptions[topic_filter] = granted
        return granted

    async def _handle_subscription(self, client_session: Session, handler: Any, subscribe_waiter: Any) -> None:
        await super()._handle_subscription(client_session, handler, subscribe_waiter)
        connection: Connection | None = client_session.attributes.get(_CONNECTION)
        if connection is not None:
            granted = [topic for topic, _ in subscribe_waiter.result().topics if topic in connection.subscriptions]
            self._router().subscribed(connection, granted)

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        connection: Connection | None = session.attributes.get(_CONNECTION)
        if connection is not None and connection.subscriptions.pop(a_filter, None) is not None:
            return 1
        return 0

    # --- what devices publish -------------------------------------------------------------------

    async def _handle_message_delivery(self, client_session: Session, handler: Any, wait_deliver: Any) -> bool:
        message = wait_deliver.result()
        if message is None:
            return True
        connection: Connection | None = client_session.attributes.get(_CONNECTION)
        if connection is None:
            return False
        await self._router().handle(connection, message.topic, message.data)
        return True

    async def close(self) -> None:
        """After shutdown(): lets the last disconnect reports finish."""
        for connection in list(self._connections):
            await connection.handler.handle_connection_closed()
        await asyncio.sleep(0)
        await asyncio.gather(*self._reports, return_exceptions=True)


def session_name(client: ClientId) -> str:
    return f"{client.device_id}:{client.tag}" if client.tag else client.device_id
