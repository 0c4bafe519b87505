"""The device service's repositories on what every device connect does (CheckCertificate,
VerifyTemporaryCredentials, ReportConnection, GetDeviceConnection, GetPendingConfig, the
status): they touch the database by exact `_id` alone, because FerretDB answers any other
filter by reading and decoding every document of the collection. Here they run on in-memory
collections that refuse any other filter and count the calls, so a query creeping back in
fails a test. Also: connection states under racing writers (the claims), one-time migrations
of the earlier layout, and the configuration copy that may lag behind the versions."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pymongo.errors import DuplicateKeyError

from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import Principal, Role, acting_as, internal_principal
from medmesh.runtime.mongo import Document
from services.device import repository as repository_module
from services.device.__main__ import RepositoryDeviceRegistry
from services.device.certificates import CertificateService, CertificateSettings, DeviceCertificate
from services.device.credential_repository import (
    CertificateRepository,
    RevocationRepository,
    TemporaryCredentialRepository,
)
from services.device.credentials import TemporaryCredentialService
from services.device.internal import DeviceInternal
from services.device.repository import (
    CLAIM_GRACE,
    ConfigRepository,
    DeviceRepository,
    StatusRepository,
)
from services.device.service import DeviceService
from services.device.status import NEVER_CONNECTED, ConnectionState, Session
from services.device.twin import KEPT_VERSIONS, DesiredConfig
from tests.unit.fakes import FakeOrganizationDirectory
from tests.unit.test_device_credentials_fakes import make_authority

HOME = "organizations/home"
ADAPTER = internal_principal("mqtt_adapter")
OPERATOR = Principal(f"{HOME}/users/op", HOME, Role.OPERATOR)
T0 = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)


# --- in-memory collections that answer by `_id` only ----------------------------------------------------


class IdOnlyCollection:
    """The few collection methods the repositories use. Filters must be exactly `{"_id": str}`;
    `find` (a scan) only while the database allows it (one-time migrations)."""

    def __init__(self, database: IdOnlyDatabase, name: str) -> None:
        self.database = database
        self.name = name
        self.documents: dict[str, Document] = {}
        # Runs before the operation of that name (the test's way in between two steps of a writer).
        self.before: dict[str, Callable[[], Awaitable[None]]] = {}

    def _id(self, query: Document) -> str:
        if set(query) != {"_id"} or not isinstance(query["_id"], str):
            raise AssertionError(f"{self.name}: {query!r} is not a filter by _id alone")
        return str(query["_id"])

    async def _call(self, operation: str, query: Document | None = None) -> str:
        self.database.calls.append(f"{self.name}.{operation}")
        hook = self.before.pop(operation, None)
        if hook is not None:
            await hook()
        return "" if query is None else self._id(query)

    async def find_one(self, query: Document, projection: Any = None) -> Document | None:
        key = await self._call("find_one", query)
        found = self.documents.get(key)
        return copy.deepcopy(found)

    async def insert_one(self, document: Document) -> None:
        key = await self._call("insert_one", {"_id": document["_id"]})
        if key in self.documents:
            raise DuplicateKeyError(f"{self.name}: {key} exists")
        self.documents[key] = copy.deepcopy(document)

    async def replace_one(self, query: Document, document: Document, upsert: bool = False) -> SimpleNamespace:
        key = await self._call("replace_one", query)
        matched = key in self.documents
        if matched or upsert:
            self.documents[key] = copy.deepcopy(document)
        return SimpleNamespace(matched_count=int(matched))

    async def update_one(self, query: Document, update: Document, upsert: bool = False) -> SimpleNamespace:
        key = await self._call("update_one", query)
        matched = key in self.documents
        if not matched and not upsert:
            return SimpleNamespace(matched_count=0)
        document = self.documents.setdefault(key, {"_id": key})
        for field, value in update.get("$max", {}).items():
            document[field] = value if field not in document else max(document[field], value)
        document.update(copy.deepcopy(update.get("$set", {})))
        return SimpleNamespace(matched_count=int(matched))

    async def delete_one(self, query: Document) -> SimpleNamespace:
        key = await self._call("delete_one", query)
        return SimpleNamespace(deleted_count=int(self.documents.pop(key, None) is not None))

    async def create_index(self, *args: Any, **kwargs: Any) -> None:
        self.database.calls.append(f"{self.name}.create_index")

    async def drop(self) -> None:
        self.database.calls.append(f"{self.name}.drop")
        self.documents.clear()

    def find(self, query: Document | None = None, projection: Any = None) -> AsyncIterator[Document]:
        self.database.calls.append(f"{self.name}.find")
        if not self.database.scans_allowed:
            raise AssertionError(f"{self.name}: a scan ({query!r})")
        return self._scan(query or {})

    async def _scan(self, query: Document) -> AsyncIterator[Document]:
        for document in list(self.documents.values()):
            if all(_matches(document.get(field), condition) for field, condition in query.items()):
                yield copy.deepcopy(document)


def _matches(value: Any, condition: Any) -> bool:
    """Equality, or the `$gt` the migration of sessions asks."""
    if isinstance(condition, dict) and set(condition) == {"$gt"}:
        return value is not None and bool(value > condition["$gt"])
    return bool(value == condition)


class FerretDBClient:
    """For create_query_index: the server is FerretDB, which gets no query indexes."""

    def __init__(self) -> None:
        self.admin = self

    async def command(self, name: str) -> Document:
        return {"ferretdbFeatures": {}}


class IdOnlyDatabase(dict[str, IdOnlyCollection]):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.scans_allowed = False
        self.client = FerretDBClient()

    def __missing__(self, name: str) -> IdOnlyCollection:
        collection = self[name] = IdOnlyCollection(self, name)
        return collection

    def counted(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def database() -> IdOnlyDatabase:
    return IdOnlyDatabase()


def mongo(database: IdOnlyDatabase) -> Any:
    return cast(Any, database)


async def prepared(database: IdOnlyDatabase, *repositories: Any) -> None:
    """What readiness does first: indexes and the one-time migrations (scans allowed)."""
    database.scans_allowed = True
    for repository in repositories:
        await repository.ensure_indexes()
    database.scans_allowed = False
    database.counted()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[datetime]:
    """The repositories' `now()`, moved by the test."""
    at = [T0]
    monkeypatch.setattr(repository_module, "now", lambda: at[0])
    return at


# --- a device's connect, end to end on the real repositories ---------------------------------------------


async def test_a_device_connect_reads_and_writes_by_id_only(database: IdOnlyDatabase, tmp_path: Path) -> None:
    devices = DeviceRepository(mongo(database))
    configs = ConfigRepository(mongo(database))
    statuses = StatusRepository(mongo(database))
    certificate_store = CertificateRepository(mongo(database))
    revocations = RevocationRepository(mongo(database))
    credential_store = TemporaryCredentialRepository(mongo(database))
    await prepared(database, devices, configs, statuses, certificate_store, revocations, credential_store)
    registry = RepositoryDeviceRegistry(devices)
    trail = RecordingAuditTrail("device")
    certificates = CertificateService(
        make_authority(tmp_path),
        certificate_store,
        revocations,
        registry,
        trail,
        CertificateSettings(tmp_path / "ca.crt", tmp_path / "ca.key"),
    )
    credentials = TemporaryCredentialService(registry, credential_store, trail)
    service = DeviceService(devices, FakeOrganizationDirectory({HOME}), trail, configs=configs, statuses=statuses)
    internal = DeviceInternal(devices, configs, statuses)
    with acting_as(OPERATOR):
        device = await service.create("SN-1", HOME, "Pump", "IP-7")
        await service.update_config("devices/SN-1/config", {"rate": 5}, [], "")
        generated = await certificates.generate(device.name)
        issued = await credentials.create(device.name)
    database.counted()
    der = x509.load_pem_x509_certificate(generated.certificate.pem.encode()).public_bytes(serialization.Encoding.DER)

    with acting_as(ADAPTER):
        check = await certificates.check(der=der)
        checked = database.counted()
        by_fingerprint = await certificates.check(fingerprint=generated.certificate.sha256_fingerprint)
        verified = await credentials.verify(issued.username, issued.password)
        database.counted()
        await internal.report_connection(
            device.name, connected=True, adapter_instance="a-1", session_id="s1", remote_address="", at=None
        )
        connect = database.counted()
        connection = await internal.connection(device.name)
        looked_up = database.counted()
        pending = await internal.pending_config(device.name)
        pending_read = database.counted()
        await internal.report_connection(
            device.name, connected=False, adapter_instance="a-1", session_id="s1", remote_address="", at=None
        )
        disconnect = database.counted()
    with acting_as(OPERATOR):
        status = await service.get_status("devices/SN-1/status")

    assert (check.valid, by_fingerprint.valid, verified.valid) == (True, True, True)
    assert connection.connected
    assert pending is not None
    assert pending.values == {"rate": 5}
    assert not status.connected
    assert status.parts.last_seen_time is not None
    # Round trips: the record, its revocation and the device read together.
    assert sorted(checked) == [
        "device_certificate_revocations.find_one",
        "device_certificates.find_one",
        "devices.find_one",
    ]
    # The device; the state, its next revision claimed and copied; last seen.
    assert sorted(connect) == [
        "device_connection_claims.insert_one",
        "device_connections.find_one",
        "device_connections.replace_one",
        "device_status.update_one",
        "devices.find_one",
    ]
    assert sorted(looked_up) == [
        "device_connection_claims.find_one",
        "device_connections.find_one",
        "devices.find_one",
    ]
    # The device; the copy of the current version, the next version (none), the report.
    assert sorted(pending_read) == [
        "device_config_current.find_one",
        "device_config_desired.find_one",
        "device_config_reported.find_one",
        "devices.find_one",
    ]
    assert sorted(disconnect) == [
        "device_connection_claims.insert_one",
        "device_connections.find_one",
        "device_connections.replace_one",
        "devices.find_one",
    ]


async def test_the_cost_of_a_connect_does_not_depend_on_other_devices(database: IdOnlyDatabase) -> None:
    statuses = StatusRepository(mongo(database))
    await prepared(database, statuses)

    async def cycle(key: str) -> list[str]:
        session = Session(key, "s", "a-1", "", T0)
        await statuses.change_connections(key, lambda state: state.after_connect(session))
        await statuses.connections(key)
        await statuses.change_connections(key, lambda state: state.after_disconnect("s", T0 + timedelta(seconds=1)))
        return database.counted()

    first = await cycle("uid-0")
    for number in range(1, 50):
        await cycle(f"uid-{number}")

    assert await cycle("uid-last") == first


# --- connection states: claims under racing writers ----------------------------------------------------


def connect_change(session_id: str, seconds: float) -> Callable[[ConnectionState], ConnectionState | None]:
    session = Session("k", session_id, "a-1", "", T0 + timedelta(seconds=seconds))
    return lambda state: state.after_connect(session)


def disconnect_change(session_id: str, seconds: float) -> Callable[[ConnectionState], ConnectionState | None]:
    return lambda state: state.after_disconnect(session_id, T0 + timedelta(seconds=seconds))


def newest_of(state: ConnectionState) -> tuple[str, bool] | None:
    return None if state.newest is None else (state.newest.session_id, state.newest.open)


async def test_a_change_that_loses_the_claim_is_applied_to_the_winners_state(
    database: IdOnlyDatabase, clock: list[datetime]
) -> None:
    statuses = StatusRepository(mongo(database))
    await statuses.change_connections("k", connect_change("s1", 0))
    claims = database["device_connection_claims"]

    async def new_connect_wins() -> None:
        await statuses.change_connections("k", connect_change("s2", 30))

    # The late disconnect of s1 read s1 as the newest; s2's connect claims the next revision first.
    claims.before["insert_one"] = new_connect_wins
    stored = await statuses.change_connections("k", disconnect_change("s1", 40))

    assert newest_of(stored) == ("s2", True)
    assert newest_of(await statuses.connections("k")) == ("s2", True)
    assert sorted(claims.documents) == ["k@1", "k@2", "k@3"]


async def test_a_writer_that_stopped_after_its_claim_is_rolled_forward(
    database: IdOnlyDatabase, clock: list[datetime]
) -> None:
    statuses = StatusRepository(mongo(database))
    await statuses.change_connections("k", connect_change("s1", 0))
    current = database["device_connections"]

    async def stop() -> None:
        raise ConnectionError("the writer's process ended")

    current.before["replace_one"] = stop
    with pytest.raises(ConnectionError):
        await statuses.change_connections("k", disconnect_change("s1", 10))

    assert current.documents["k"]["revision"] == 1  # the copy is behind the claim
    assert newest_of(await statuses.connections("k")) == ("s1", False)
    await statuses.change_connections("k", connect_change("s2", 20))
    assert current.documents["k"]["revision"] == 3
    assert newest_of(await statuses.connections("k")) == ("s2", True)


async def test_a_copy_overtaken_by_an_older_one_misleads_no_reader(
    database: IdOnlyDatabase, clock: list[datetime]
) -> None:
    statuses = StatusRepository(mongo(database))
    await statuses.change_connections("k", connect_change("s1", 0))
    older = copy.deepcopy(database["device_connections"].documents["k"])
    await statuses.change_connections("k", connect_change("s2", 30))
    await statuses.change_connections("k", disconnect_change("s1", 40))
    database["device_connections"].documents["k"] = older  # a slow writer's copy landed last

    assert newest_of(await statuses.connections("k")) == ("s2", True)
    stored = await statuses.change_connections("k", disconnect_change("s2", 50))
    assert newest_of(stored) == ("s2", False)
    assert database["device_connections"].documents["k"]["revision"] == 4


async def test_claims_go_once_superseded_for_the_grace_period(database: IdOnlyDatabase, clock: list[datetime]) -> None:
    statuses = StatusRepository(mongo(database))
    claims = database["device_connection_claims"]
    for number in range(6):
        clock[0] = T0 + number * CLAIM_GRACE / 4
        await statuses.change_connections("k", connect_change(f"s{number}", number))

    # Only claim 1 was superseded (by claim 2) at least the grace period before the last change.
    assert sorted(claims.documents) == ["k@2", "k@3", "k@4", "k@5", "k@6"]
    listed = [claim["revision"] for claim in database["device_connections"].documents["k"]["claims"]]
    assert listed == [2, 3, 4, 5, 6]

    clock[0] += 10 * CLAIM_GRACE
    await statuses.change_connections("k", disconnect_change("s5", 99))
    assert sorted(claims.documents) == ["k@6", "k@7"]

    await statuses.delete_all("k")
    assert (claims.documents, database["device_connections"].documents) == ({}, {})
    assert newest_of(await statuses.connections("k")) is None


# --- the desired configuration: a copy of the highest version ------------------------------------------


def desired(version: int) -> DesiredConfig:
    return DesiredConfig("k", version, {"v": version}, T0)


async def test_the_current_configuration_is_found_past_a_lagging_copy(database: IdOnlyDatabase) -> None:
    configs = ConfigRepository(mongo(database))
    assert await configs.current_desired("k") is None
    await configs.insert_desired(desired(1))
    lagging = copy.deepcopy(database["device_config_current"].documents["k"])
    await configs.insert_desired(desired(2))
    database["device_config_current"].documents["k"] = lagging

    current = await configs.current_desired("k")

    assert current is not None
    assert current.version == 2
    del database["device_config_current"].documents["k"]  # a writer stopped before its first copy
    assert (await configs.current_desired("k")) == current


async def test_each_version_deletes_the_one_that_falls_out(database: IdOnlyDatabase) -> None:
    configs = ConfigRepository(mongo(database))
    for version in range(1, KEPT_VERSIONS + 5):
        await configs.insert_desired(desired(version))

    kept = sorted(int(key.split("/")[1]) for key in database["device_config_desired"].documents)
    assert kept == list(range(4, KEPT_VERSIONS + 5))

    await configs.delete_all("k")
    assert (database["device_config_desired"].documents, database["device_config_current"].documents) == ({}, {})


# --- data of the layout before, adopted once -----------------------------------------------------------


def legacy_session(key: str, session_id: str, seconds: float, closed: float | None = None) -> Document:
    return {
        "_id": f"{key}/{session_id}",
        "device_key": key,
        "session_id": session_id,
        "adapter_instance": "a-1",
        "remote_address": "198.51.100.7",
        "connect_time": T0 + timedelta(seconds=seconds),
        "disconnect_time": None if closed is None else T0 + timedelta(seconds=closed),
    }


async def test_sessions_of_the_layout_before_become_connection_states(database: IdOnlyDatabase) -> None:
    for document in (
        legacy_session("k1", "s1", 0, closed=5),
        legacy_session("k1", "s2", 10),
        legacy_session("k2", "s3", 0, closed=8),
        {**legacy_session("k2", "s4", 0), "connect_time": NEVER_CONNECTED, "disconnect_time": T0},
    ):
        database["device_sessions"].documents[document["_id"]] = document
    statuses = StatusRepository(mongo(database))

    await prepared(database, statuses)
    await prepared(database, StatusRepository(mongo(database)))  # done once: nothing to scan the second time

    assert newest_of(await statuses.connections("k1")) == ("s2", True)
    assert newest_of(await statuses.connections("k2")) == ("s3", False)
    assert database["device_sessions"].documents == {}
    assert list(database["device_migrations"].documents) == ["device-connections"]


async def test_configurations_and_certificates_of_the_layout_before_are_adopted(
    database: IdOnlyDatabase, tmp_path: Path
) -> None:
    versions = database["device_config_desired"]
    for version in (11, 12):
        versions.documents[f"k/{version}"] = {
            "_id": f"k/{version}",
            "device_key": "k",
            "version": version,
            "values": f'{{"v":{version}}}',
            "update_time": T0,
        }
    database["device_certificates"].documents["abc"] = {"_id": "abc", "sha256_fingerprint": "f" * 64}
    configs = ConfigRepository(mongo(database))
    certificates = CertificateRepository(mongo(database))

    await prepared(database, configs, certificates)

    current = await configs.current_desired("k")
    assert current is not None
    assert (current.version, current.values) == (12, {"v": 12})
    assert database["device_certificate_fingerprints"].documents == {"f" * 64: {"_id": "f" * 64, "serial": "abc"}}


async def test_a_failing_migration_does_not_keep_the_service_from_starting(
    database: IdOnlyDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    database["device_sessions"].documents["bad"] = {"_id": "bad", "connect_time": T0}  # no device key
    statuses = StatusRepository(mongo(database))

    await prepared(database, statuses)

    assert "migration device-connections of the device service's data failed" in caplog.text
    assert database["device_migrations"].documents == {}  # tried again at the next start


async def test_a_fingerprint_finds_only_its_own_certificate(database: IdOnlyDatabase) -> None:
    certificates = CertificateRepository(mongo(database))
    certificate = DeviceCertificate("abc", "SN-1", "uid", "PEM", "f" * 64, "CN=SN-1", "EC P-256", T0, T0, T0, "x")
    await certificates.insert(certificate)
    # Another certificate's serial (one that collided and was issued again under another serial).
    database["device_certificate_fingerprints"].documents["e" * 64] = {"_id": "e" * 64, "serial": "abc"}

    assert await certificates.find_by_fingerprint("f" * 64) == certificate
    assert await certificates.find_by_fingerprint("e" * 64) is None
    assert await certificates.find_by_fingerprint("0" * 64) is None
