"""The MQTT adapter over the real platform: devices connect with mTLS or temporary credentials,
stay inside their own topics, get told about bad messages without harm, and get configuration
and commands pushed live and on reconnect (docs/device-protocol.md)."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.devices import DeviceIdentity, MqttDevice, observation, register_device, tls_context
from tests.integration.people import eventually, ok
from tests.integration.platform import Platform

pytestmark = pytest.mark.integration

Connect = Callable[..., MqttDevice]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("device-certs")


@pytest.fixture
def identity(rest: httpx.Client, certs: Path) -> DeviceIdentity:
    return register_device(rest, certs)


@pytest.fixture
def connect(platform: Platform) -> Iterator[Connect]:
    """Connects devices for one test and closes them all afterwards."""
    opened: list[MqttDevice] = []

    def open_device(
        identity: DeviceIdentity | None = None,
        *,
        client_id: str | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        username: str | None = None,
        password: str | None = None,
        port: int | None = None,
        expect: str | None = "Success",
    ) -> MqttDevice:
        if identity is not None and username is None:
            cert, key = cert or identity.cert, key or identity.key
        device = MqttDevice(
            port or platform.config.port("mqtt"),
            client_id or (identity.device_id if identity else "nobody"),
            tls_context(platform.ca, cert, key),
            username=username,
            password=password,
        )
        opened.append(device)
        verdict = device.connect()
        if expect is not None:
            assert verdict == expect, verdict
        return device

    yield open_device
    for device in opened:
        device.close()


def connection_of(rest: httpx.Client, device: str) -> dict[str, object]:
    return dict(ok(rest.get(f"/v1/{device}/status")).get("connection", {}))


# --- who may connect ------------------------------------------------------------------------------


def test_a_device_connects_with_its_certificate_and_is_shown_connected(
    rest: httpx.Client, identity: DeviceIdentity, connect: Connect
) -> None:
    device = connect(identity)

    status = eventually(lambda: (c := connection_of(rest, identity.name)).get("connected") and c)
    assert status["adapter_instance"] == "mqtt-adapter-0"
    device.close()
    assert eventually(lambda: not connection_of(rest, identity.name).get("connected"))


def other_ca_certificate(directory: Path, common_name: str) -> tuple[Path, Path]:
    """A certificate for the right device id, signed by a CA the platform never heard of."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"rogue-{common_name}.crt", directory / f"rogue-{common_name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_clients_without_valid_credentials_are_refused(
    rest: httpx.Client, platform: Platform, certs: Path, connect: Connect
) -> None:
    open_device = connect
    victim = register_device(rest, certs)
    revoked = register_device(rest, certs)
    listed = ok(rest.get(f"/v1/{revoked.name}/certificates"))["certificates"]
    ok(rest.post(f"/v1/{listed[0]['name']}:revoke", json={}))
    rogue_cert, rogue_key = other_ca_certificate(certs, victim.device_id)

    # No certificate and no credentials.
    assert open_device(client_id=victim.device_id, expect=None).connack == "Not authorized"
    # A certificate the platform's device CA did not sign: the TLS handshake fails.
    rogue = open_device(client_id=victim.device_id, cert=rogue_cert, key=rogue_key, expect=None)
    assert rogue.connack is None
    # A revoked certificate.
    assert open_device(revoked, expect=None).connack == "Not authorized"
    # A valid certificate, but the client id of another device.
    impostor = open_device(client_id=victim.device_id, cert=revoked.cert, key=revoked.key, expect=None)
    assert impostor.connack == "Not authorized"
    # A client id that is no device id at all.
    assert open_device(victim, client_id="../../etc", expect=None).connack == "Not authorized"
    # Nothing of that made the victim look connected.
    assert not connection_of(rest, victim.name).get("connected")


def test_a_gateway_connects_with_temporary_credentials(
    rest: httpx.Client, identity: DeviceIdentity, certs: Path, connect: Connect
) -> None:
    open_device = connect
    other = register_device(rest, certs)
    issued = ok(rest.post(f"/v1/{identity.name}:createTemporaryCredentials", json={}))
    username, password = issued["username"], issued["password"]

    wrong = open_device(client_id=identity.device_id, username=username, password=password + "x", expect=None)
    assert wrong.connack == "Not authorized"
    elsewhere = open_device(client_id=other.device_id, username=username, password=password, expect=None)
    assert elsewhere.connack == "Not authorized"
    device = open_device(client_id=identity.device_id, username=username, password=password)
    device.subscribe_own()
    device.publish("observations", {"observations": [observation("gw-1")]})
    assert device.expect("acks") == {"stored": ["gw-1"]}


def test_tls_below_1_3_is_refused(platform: Platform, identity: DeviceIdentity) -> None:
    import ssl

    context = ssl.create_default_context(cafile=str(platform.ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(identity.cert, identity.key)
    device = MqttDevice(platform.config.port("mqtt"), identity.device_id, context)
    try:
        assert str(device.connect(within=3)).startswith("error: ")
    finally:
        device.close()


# --- topics ---------------------------------------------------------------------------------------


def test_a_device_is_denied_other_devices_topics(
    rest: httpx.Client, identity: DeviceIdentity, certs: Path, connect: Connect
) -> None:
    neighbour_identity = register_device(rest, certs)
    device = connect(identity)
    neighbour = connect(neighbour_identity)
    neighbour.subscribe_own()
    device.subscribe_own()

    for foreign in (f"devices/{neighbour_identity.device_id}/#", "devices/+/commands", "#", "$SYS/#", "devices/#"):
        assert device.subscribe(foreign) == 0x80, foreign
    device.publish(f"devices/{neighbour_identity.device_id}/observations", {"observations": [observation("x-1")]})
    device.publish(f"devices/{neighbour_identity.device_id}/commands", {"action": "run", "id": "c-1"})

    errors = [device.expect("errors")["reason"] for _ in range(2)]
    assert errors == ["TOPIC_NOT_ALLOWED", "TOPIC_NOT_ALLOWED"]
    # A device may not publish on its own cloud -> device topics either (it would impersonate the cloud).
    device.publish("acks", {"stored": ["forged"]})
    assert device.expect("errors")["reason"] == "TOPIC_NOT_ALLOWED"
    time.sleep(0.5)
    assert neighbour.drain() == []
    observations = ok(rest.get(f"/v1/{neighbour_identity.name}/observations"))
    assert observations.get("observations", []) == []


# --- bad messages ---------------------------------------------------------------------------------


def test_bad_messages_are_answered_on_errors_and_harm_nothing(
    rest: httpx.Client, identity: DeviceIdentity, certs: Path, connect: Connect
) -> None:
    bystander_identity = register_device(rest, certs)
    device = connect(identity)
    bystander = connect(bystander_identity)
    device.subscribe_own()
    bystander.subscribe_own()

    device.publish("observations", b"{not json")
    assert device.expect("errors")["reason"] == "MALFORMED_PAYLOAD"
    device.publish("observations", b"[1, 2, 3]")
    assert device.expect("errors")["reason"] == "MALFORMED_PAYLOAD"
    device.publish("observations", b'{"observations": [' + b"0," * 150_000 + b"0]}")
    assert device.expect("errors")["reason"] == "PAYLOAD_TOO_LARGE"
    device.publish("status", {"state": "ON FIRE"})
    assert device.expect("errors")["reason"] == "INVALID_MESSAGE"
    mixed = [
        observation("ok-1"),
        {"id": "no-time", "metric": "heart_rate", "value": 1},
        observation("bad-value", value={"nested": True}),
        observation("bad-metric", metric="Heart Rate"),
    ]
    device.publish("observations", {"observations": mixed})
    error = device.expect("errors", where=lambda e: e["reason"] == "OBSERVATIONS_REJECTED")
    assert {item["id"]: item["reason"] for item in error["rejected"]} == {
        "no-time": "INVALID_OBSERVATION",
        "bad-value": "INVALID_OBSERVATION",
        "bad-metric": "INVALID_FIELD",
    }
    assert device.expect("acks") == {"stored": ["ok-1"]}

    # The same connection still works, and so does everybody else.
    device.publish("observations", observation("ok-2"))
    bystander.publish("observations", {"observations": [observation("b-1"), observation("b-2")]})
    assert device.expect("acks") == {"stored": ["ok-2"]}
    assert bystander.expect("acks") == {"stored": ["b-1", "b-2"]}
    assert bystander.drain() == []  # no errors of someone else's


def test_a_resent_observation_is_acknowledged_as_a_duplicate(identity: DeviceIdentity, connect: Connect) -> None:
    device = connect(identity)
    device.subscribe_own()

    device.publish("observations", {"observations": [observation("r-1"), observation("r-2")]})
    assert device.expect("acks") == {"stored": ["r-1", "r-2"]}
    device.publish("observations", {"observations": [observation("r-2"), observation("r-3")]})
    assert device.expect("acks") == {"stored": ["r-3"], "duplicates": ["r-2"]}


def test_status_reaches_the_registry(rest: httpx.Client, identity: DeviceIdentity, connect: Connect) -> None:
    device = connect(identity)

    device.publish(
        "status", {"state": "MINOR", "message": "lead off", "battery_percent": 41, "firmware_version": "2.4.1"}
    )

    # Each part of a status (battery, firmware, operational state) is kept on its own: wait for all.
    status = eventually(
        lambda: (
            (s := ok(rest.get(f"/v1/{identity.name}/status"))).get("battery_percent") == 41
            and s.get("firmware_version") == "2.4.1"
            and s.get("operational", {}).get("message") == "lead off"
            and s
        )
    )
    assert status["operational"]["state"] == "STATE_MINOR"
    assert (status["operational"]["message"], status["firmware_version"]) == ("lead off", "2.4.1")


# --- configuration and commands -------------------------------------------------------------------


def set_desired(rest: httpx.Client, device: str, desired: dict[str, object]) -> int:
    reply = ok(rest.patch(f"/v1/{device}/config", params={"update_mask": "desired"}, json={"desired": desired}))
    return int(reply["desired_version"])


def test_configuration_is_pushed_live_and_on_reconnect(
    rest: httpx.Client, identity: DeviceIdentity, connect: Connect
) -> None:
    device = connect(identity)
    device.subscribe_own()

    started = time.monotonic()
    version = set_desired(rest, identity.name, {"sample_interval_s": 5})
    pushed = device.expect("config/desired", within=5)
    live_seconds = time.monotonic() - started
    assert pushed == {"version": version, "config": {"sample_interval_s": 5}}
    assert live_seconds < 1.0, f"pushed after {live_seconds:.3f}s"  # REST + notify + publish; ~100 ms expected
    device.publish("config/reported", {"version": version, "config": {"sample_interval_s": 5}})
    assert eventually(lambda: ok(rest.get(f"/v1/{identity.name}/config")).get("in_sync"))

    # Changed while the device is away: it gets the latest when it subscribes again.
    device.close()
    set_desired(rest, identity.name, {"sample_interval_s": 1})
    latest = set_desired(rest, identity.name, {"sample_interval_s": 2})
    again = connect(identity)
    again.subscribe_own()
    assert again.expect("config/desired") == {"version": latest, "config": {"sample_interval_s": 2}}

    # A version never issued is refused.
    again.publish("config/reported", {"version": latest + 5, "config": {}})
    assert again.expect("errors")["reason"] == "REPORTED_VERSION_AHEAD"


def create_command(rest: httpx.Client, device: str, name: str = "measure.blood_pressure") -> dict[str, object]:
    return ok(rest.post(f"/v1/{device}/commands", json={"command_name": name, "parameters": {"cuff": "adult"}}))


def test_commands_are_pushed_live_and_completed(rest: httpx.Client, identity: DeviceIdentity, connect: Connect) -> None:
    device = connect(identity)
    device.subscribe_own()

    started = time.monotonic()
    command = create_command(rest, identity.name)
    received = device.expect("commands", within=5)
    live_seconds = time.monotonic() - started
    command_id = str(command["name"]).rsplit("/", 1)[-1]
    assert (received["action"], received["id"]) == ("run", command_id)
    assert (received["command"], received["parameters"]) == ("measure.blood_pressure", {"cuff": "adult"})
    assert live_seconds < 1.0, f"pushed after {live_seconds:.3f}s"
    assert eventually(lambda: ok(rest.get(f"/v1/{command['name']}"))["state"] == "STATE_DELIVERED")

    device.publish(f"commands/{command_id}/status", {"state": "IN_PROGRESS"})
    device.publish(f"commands/{command_id}/status", {"state": "COMPLETED", "result": {"systolic": 121}})
    done = eventually(lambda: (c := ok(rest.get(f"/v1/{command['name']}")))["state"] == "STATE_COMPLETED" and c)
    assert done["result"] == {"systolic": 121}

    # A report about a command that is over is answered on errors.
    device.publish(f"commands/{command_id}/status", {"state": "FAILED", "error_message": "late"})
    assert device.expect("errors")["reason"] == "COMMAND_ALREADY_FINISHED"


def test_a_portal_waits_for_a_command_over_rest(rest: httpx.Client, identity: DeviceIdentity, connect: Connect) -> None:
    device = connect(identity)
    device.subscribe_own()
    command = create_command(rest, identity.name)
    name = command["name"]
    device.expect("commands", within=5)
    # Delivered already, or answered as soon as it is.
    delivered = ok(rest.get(f"/v1/{name}:wait", params={"state": "STATE_PENDING", "timeout": "5s"}))
    assert delivered["state"] == "STATE_DELIVERED"

    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lambda: ok(rest.get(f"/v1/{name}:wait", params={"timeout": "10s"})))
        time.sleep(0.3)
        assert not waiting.done()
        command_id = str(name).rsplit("/", 1)[-1]
        device.publish(f"commands/{command_id}/status", {"state": "COMPLETED", "result": {"systolic": 118}})
        done = waiting.result(5)
    assert (done["state"], done["result"]) == ("STATE_COMPLETED", {"systolic": 118})

    # Final already: answered at once; a wait longer than the gateway allows is refused.
    assert ok(rest.get(f"/v1/{name}:wait"))["state"] == "STATE_COMPLETED"
    assert rest.get(f"/v1/{name}:wait", params={"timeout": "60s"}).status_code == 400


def test_commands_wait_for_an_offline_device(rest: httpx.Client, identity: DeviceIdentity, connect: Connect) -> None:
    first, second = create_command(rest, identity.name, "first"), create_command(rest, identity.name, "second")

    device = connect(identity)
    assert device.drain() == []  # nothing is sent before the device subscribes
    device.subscribe_own()

    received = [device.expect("commands")["name"] for _ in range(2)]
    assert received == [first["name"], second["name"]]
