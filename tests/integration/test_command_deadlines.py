"""Command deadlines against a real FerretDB and real command service processes, without the rest of the platform.

Shows what the unit tests cannot: a deadline that passes while no command service runs is acted on
right after a restart (the process is killed, not stopped, mid-wait), a command nobody delivers
expires after its ttl, and two instances sweeping the same database time each command out once.
This module starts its own FerretDB and command service processes on free 127.0.0.1 ports (the
internal methods take the mesh credential, so no identity service is needed), seeds commands
straight into the database (creating one needs a user token and the device registry) and stops
every process it started.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from pymongo import AsyncMongoClient

from medmesh.command.v1 import command_service_pb2 as pb
from medmesh.command.v1 import command_service_pb2_grpc as pb_grpc
from medmesh.runtime.mongo import Document
from medmesh.runtime.resources import now
from services.command.domain import Command, CommandRequest, CommandState, new_command
from services.command.repository import CommandRepository
from tests.integration.platform import free_ports
from tests.integration.stores import ServiceProcess, ferretdb

INTERNAL_TOKEN = "command-deadlines-test-credential"
INTERNAL = "medmesh.command.v1.CommandInternalService"
ADAPTER = [("x-medmesh-internal", INTERNAL_TOKEN), ("x-medmesh-caller", "mqtt_adapter")]
SWEEP_SECONDS = 0.2


@pytest.fixture(scope="module")
def mongodb_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with ferretdb(tmp_path_factory.mktemp("ferretdb-commands")) as uri:
        yield uri


class CommandProcess(ServiceProcess):
    """`python -m services.command` on a free port; its peers (identity, device, audit) are left unreachable."""

    def __init__(self, mongodb_uri: str, database: str, log_path: Path) -> None:
        port, unreachable = free_ports(2)
        env = {
            **os.environ,
            "MEDMESH_MONGODB_URI": mongodb_uri,
            "MEDMESH_MONGODB_DATABASE": database,
            "MEDMESH_GRPC_PORT": str(port),
            "MEDMESH_INTERNAL_TOKEN": INTERNAL_TOKEN,
            "MEDMESH_COMMAND_SWEEP_SECONDS": str(SWEEP_SECONDS),
            "MEDMESH_HEALTH_INTERVAL_SECONDS": "0.3",
            "MEDMESH_SHUTDOWN_GRACE_SECONDS": "2",
            **{f"MEDMESH_{peer}_ADDR": f"127.0.0.1:{unreachable}" for peer in ("IDENTITY", "DEVICE", "AUDIT")},
        }
        super().__init__("services.command", env, port, INTERNAL, log_path)

    def commands_swept(self) -> int:
        """What this process's sweeper says it changed, from its JSON log."""
        total = 0
        for line in self.log_path.read_text().splitlines():
            try:
                message = json.loads(line).get("message", "")
            except ValueError:
                continue
            if message.startswith("deadline sweep: "):
                total += int(message.split()[2])
        return total


Starter = Callable[[int], list[CommandProcess]]


@pytest.fixture
def database() -> str:
    return f"medmesh_command_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def start_service(mongodb_uri: str, database: str, tmp_path: Path) -> Iterator[Starter]:
    started: list[CommandProcess] = []

    def start(count: int = 1) -> list[CommandProcess]:
        """`count` instances, started side by side, once all are SERVING."""
        processes = [
            CommandProcess(mongodb_uri, database, tmp_path / f"command-{len(started) + i}.log") for i in range(count)
        ]
        started.extend(processes)
        for process in processes:
            process.wait_serving()
        return processes

    try:
        yield start
    finally:
        for process in started:
            process.close()


@pytest.fixture
async def repository(mongodb_uri: str, database: str) -> AsyncIterator[CommandRepository]:
    client: AsyncMongoClient[Document] = AsyncMongoClient(mongodb_uri, tz_aware=True)
    try:
        yield CommandRepository(client[database])
    finally:
        await client.drop_database(database)
        await client.close()


def a_command(**request: object) -> Command:
    return new_command("SN-1", "organizations/a", CommandRequest("reboot", **request), "organizations/a/users/u", now())  # type: ignore[arg-type]


async def stored(repository: CommandRepository, command: Command) -> Command:
    found = await repository.get(command.id)
    assert found is not None
    return found


async def wait_for_state(
    repository: CommandRepository, command: Command, state: CommandState, within: float
) -> tuple[Command, float]:
    started = time.monotonic()
    while True:
        found = await stored(repository, command)
        if found.state is state:
            return found, time.monotonic() - started
        assert time.monotonic() - started < within, f"{command.name} is still {found.state} after {within}s"
        await asyncio.sleep(0.05)


async def outbox_events(repository: CommandRepository, description: str, expected: int) -> list[Document]:
    """The events recorded with `description`, once there are `expected` of them (and a little
    longer, so a duplicate would show). The audit service is unreachable: every event the
    service recorded is still in its outbox. Each change is audited just after it is written."""
    outbox = repository._collection.database["audit_outbox"]
    for _ in range(100):
        if await outbox.count_documents({"description": description}) >= expected:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    return await outbox.find({"description": description}).to_list()


async def call_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_a_deadline_that_passed_while_the_service_was_down_is_applied_right_after_restart(
    start_service: Starter, repository: CommandRepository
) -> None:
    [service] = start_service(1)
    command = a_command(timeout=timedelta(seconds=2))
    await repository.insert(command)
    async with grpc.aio.insecure_channel(service.address) as channel:
        delivered = await pb_grpc.CommandInternalServiceStub(channel).MarkCommandDelivered(
            pb.MarkCommandDeliveredRequest(name=command.name), metadata=ADAPTER
        )
    assert delivered.state == pb.Command.STATE_DELIVERED

    service.kill()  # mid-wait: 2 s to go
    deadline = (await stored(repository, command)).deadline
    assert deadline is not None
    await asyncio.sleep(max(0.0, (deadline - now()).total_seconds()) + 0.5)
    assert (await stored(repository, command)).state is CommandState.DELIVERED  # nobody was there to act

    [restarted] = start_service(1)
    timed_out, after = await wait_for_state(repository, command, CommandState.TIMED_OUT, within=5)

    print(f"timed out {after:.2f}s after the restarted service became SERVING")
    assert timed_out.complete_time == deadline
    async with grpc.aio.insecure_channel(restarted.address) as channel:
        stub = pb_grpc.CommandInternalServiceStub(channel)
        error = await call_error(
            stub.ReportCommandStatus(
                pb.ReportCommandStatusRequest(name=command.name, state=pb.Command.STATE_COMPLETED), metadata=ADAPTER
            )
        )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "TIMED_OUT" in (error.details() or "")
    events = await outbox_events(repository, "command DELIVERED -> TIMED_OUT", 1)
    assert [(e["resource"], e["actor"]["subject"]) for e in events] == [(command.name, "internal:command-sweeper")]


async def test_a_command_nobody_delivers_expires_after_its_ttl(
    start_service: Starter, repository: CommandRepository
) -> None:
    [service] = start_service(1)
    command = a_command(ttl=timedelta(seconds=1))
    await repository.insert(command)
    async with grpc.aio.insecure_channel(service.address) as channel:
        stub = pb_grpc.CommandInternalServiceStub(channel)
        pending = await stub.ListPendingCommands(pb.ListPendingCommandsRequest(device="devices/SN-1"), metadata=ADAPTER)
        assert [c.name for c in pending.commands] == [command.name]

        expired, _ = await wait_for_state(repository, command, CommandState.EXPIRED, within=4)

        pending = await stub.ListPendingCommands(pb.ListPendingCommandsRequest(device="devices/SN-1"), metadata=ADAPTER)
        error = await call_error(
            stub.MarkCommandDelivered(pb.MarkCommandDeliveredRequest(name=command.name), metadata=ADAPTER)
        )
    assert list(pending.commands) == []
    assert expired.complete_time == command.expire_time
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "EXPIRED" in (error.details() or "")


async def test_two_instances_sweeping_one_database_time_each_command_out_once(
    start_service: Starter, repository: CommandRepository
) -> None:
    first, second = start_service(2)
    at = now()
    commands = [
        new_command("SN-2", "organizations/a", CommandRequest("reboot", timeout=timedelta(seconds=1.5)), "u", at)
        for _ in range(30)
    ]
    for command in commands:
        await repository.insert(command.delivered(at))

    for command in commands:
        await wait_for_state(repository, command, CommandState.TIMED_OUT, within=6)

    events = await outbox_events(repository, "command DELIVERED -> TIMED_OUT", len(commands))
    assert sorted(e["resource"] for e in events) == sorted(c.name for c in commands)  # once each
    assert {(await stored(repository, c)).revision for c in commands} == {3}
    swept = (first.commands_swept(), second.commands_swept())
    print(f"timed out by the first instance: {swept[0]}, by the second: {swept[1]}")
    assert sum(swept) == len(commands)
