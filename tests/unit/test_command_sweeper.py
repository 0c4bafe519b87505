"""The deadline sweeper loop and its setting."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import acting_as, internal_principal
from services.command.domain import CommandRequest, CommandState, new_command
from services.command.service import CommandService, SweepResult
from services.command.sweeper import DEFAULT_SWEEP_SECONDS, SWEEP_SECONDS_ENV, DeadlineSweeper, sweep_seconds_from_env
from tests.unit.test_command_fakes import Clock, FakeDeviceDirectory, InMemoryCommandStore, InMemorySessionStore

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class ScriptedService:
    """Stands in for CommandService.sweep: fails while `failing`, records how it was called."""

    def __init__(self) -> None:
        self.calls: list[bool] = []
        self.failing = False

    async def sweep(self, *, repair_sessions: bool = True) -> SweepResult:
        self.calls.append(repair_sessions)
        if self.failing:
            raise ConnectionError("database down")
        return SweepResult(commands_changed=1)


class Ticks:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sweeper(service: ScriptedService, ticks: Ticks, **kwargs: Any) -> DeadlineSweeper:
    return DeadlineSweeper(service, 1.0, repair_interval=10.0, clock=ticks, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("written", "seconds"), [("", DEFAULT_SWEEP_SECONDS), ("0.5", 0.5), (" 2 ", 2.0)])
def test_sweep_interval_from_env(monkeypatch: pytest.MonkeyPatch, written: str, seconds: float) -> None:
    monkeypatch.setenv(SWEEP_SECONDS_ENV, written)

    assert sweep_seconds_from_env() == seconds


@pytest.mark.parametrize("written", ["soon", "0", "-1", "7200"])
def test_bad_sweep_intervals_stop_the_start(monkeypatch: pytest.MonkeyPatch, written: str) -> None:
    monkeypatch.setenv(SWEEP_SECONDS_ENV, written)

    with pytest.raises(SystemExit, match=SWEEP_SECONDS_ENV):
        sweep_seconds_from_env()


async def test_sessions_are_repaired_less_often_than_deadlines_are_swept() -> None:
    service, ticks = ScriptedService(), Ticks()
    loop = sweeper(service, ticks)

    for _ in range(3):
        await loop.sweep_once()
        ticks.now += 4
    await loop.sweep_once()

    assert service.calls == [True, False, False, True]


async def test_failures_are_logged_once_per_outage_and_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    service, ticks = ScriptedService(), Ticks()
    loop = sweeper(service, ticks)
    service.failing = True

    with caplog.at_level(logging.INFO, logger="services.command.sweeper"):
        await loop.sweep_once()
        await loop.sweep_once()
        service.failing = False
        await loop.sweep_once()

    messages = [r.getMessage() for r in caplog.records]
    assert sum("deadline sweep failed" in m for m in messages) == 1
    assert any("work again" in m for m in messages)
    # The failed sweeps did not count as repairs: the first one that worked repaired.
    assert service.calls == [True, True, True]


async def test_the_loop_sweeps_at_once_then_every_jittered_interval() -> None:
    service, ticks = ScriptedService(), Ticks()
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await sweeper(service, ticks, sleep=sleep).run()

    assert len(service.calls) == 3  # the first before any wait
    assert all(0.75 <= w <= 1.25 for w in waits)


async def test_the_started_loop_acts_as_the_sweeper_not_as_the_caller_that_started_it() -> None:
    """A sweeper started while serving a request must not act, or audit, as that request's caller."""
    clock = Clock(AT)
    commands = InMemoryCommandStore()
    trail = RecordingAuditTrail("command")
    service = CommandService(commands, InMemorySessionStore(), FakeDeviceDirectory(), trail, clock=clock)
    with acting_as(internal_principal("mqtt_adapter")):
        command = new_command("SN-1", "organizations/a", CommandRequest("x", ttl=timedelta(seconds=1)), "u", AT)
        await commands.insert(command)
        clock.advance(2)
        task = DeadlineSweeper(service, 60).start()
    for _ in range(50):
        if trail.events:
            break
        await asyncio.sleep(0.01)
    task.cancel()

    assert commands.items[command.id].state is CommandState.EXPIRED
    assert [e.actor.subject for e in trail.events] == ["internal:command-sweeper"]
