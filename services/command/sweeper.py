"""The deadline sweeper every command service instance runs in the background.

Deadlines are absolute times in the database, so nothing is lost while no instance runs: the
first sweep after a start times out what passed meanwhile. Instances sweep independently, at a
jittered interval so they do not fall into step; two of them acting on the same command apply
the same change, and only one of them records it (see CommandService.sweep).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable

from medmesh.runtime.tasks import stop_requested
from services.command.service import CommandService

log = logging.getLogger(__name__)

SWEEP_SECONDS_ENV = "MEDMESH_COMMAND_SWEEP_SECONDS"
DEFAULT_SWEEP_SECONDS = 1.0
JITTER = 0.25  # each wait is the interval +-25%
# Sessions are repaired (a rare need: a stop between two writes) less often than deadlines are swept.
REPAIR_SECONDS = 10.0


def sweep_seconds_from_env() -> float:
    written = os.environ.get(SWEEP_SECONDS_ENV, "").strip()
    if not written:
        return DEFAULT_SWEEP_SECONDS
    try:
        seconds = float(written)
    except ValueError:
        raise SystemExit(f"{SWEEP_SECONDS_ENV} must be a number of seconds, got {written!r}") from None
    if not 0.05 <= seconds <= 3600:
        raise SystemExit(f"{SWEEP_SECONDS_ENV} must be between 0.05 and 3600 seconds, got {seconds}")
    return seconds


class DeadlineSweeper:
    def __init__(
        self,
        service: CommandService,
        interval: float = DEFAULT_SWEEP_SECONDS,
        *,
        repair_interval: float = REPAIR_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._service = service
        self._interval = interval
        self._repair_interval = repair_interval
        self._clock = clock
        self._sleep = sleep
        self._last_repair = float("-inf")
        self._failing = False

    async def sweep_once(self) -> None:
        """One sweep; failures (the database is down) are logged once per outage, never raised."""
        repair = self._clock() - self._last_repair >= self._repair_interval
        try:
            result = await self._service.sweep(repair_sessions=repair)
        except Exception as error:  # the loop must live on: the next sweep retries
            if not self._failing:
                log.warning("deadline sweep failed, retrying every %.1fs: %r", self._interval, error)
            self._failing = True
            return
        if self._failing:
            log.info("deadline sweeps work again")
            self._failing = False
        if repair:
            self._last_repair = self._clock()
        if result.commands_changed or result.sessions_changed:
            log.info(
                "deadline sweep: %d commands timed out or expired, %d sessions settled",
                result.commands_changed,
                result.sessions_changed,
            )

    async def run(self) -> None:
        """Sweeps at once, then every interval (jittered) until cancelled."""
        while not stop_requested():
            await self.sweep_once()
            await self._sleep(self._interval * random.uniform(1 - JITTER, 1 + JITTER))

    def start(self) -> asyncio.Task[None]:
        # A fresh context: the loop must never run as, or trace into, the request that started it.
        return asyncio.create_task(self.run(), name="command-deadline-sweeper", context=contextvars.Context())


async def stop_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
