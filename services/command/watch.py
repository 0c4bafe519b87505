"""Callers waiting for a command to change (WaitCommand), within one instance of the service.

Every change this instance makes is announced to the callers watching that command, with the
command as it now is, so a waiter answers without reading it again. A change made by another
instance is not announced here (FerretDB has no change streams): the waiter reads the command
again now and then (see CommandService.wait_command).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from medmesh.runtime.errors import ResourceExhausted
from services.command.domain import Command

# Callers waiting at once in one instance; each holds a request open.
MAX_WATCHERS = 10_000


class CommandWatch:
    def __init__(self, max_watchers: int = MAX_WATCHERS) -> None:
        self._watchers: dict[str, set[asyncio.Queue[Command]]] = {}
        self._count = 0
        self._max = max_watchers

    @contextmanager
    def watching(self, command_id: str) -> Iterator[asyncio.Queue[Command]]:
        """The changes of a command made by this instance from now on, until the block ends."""
        if self._count >= self._max:
            raise ResourceExhausted(
                f"{self._count} callers are waiting for commands already; read the command instead",
                reason="TOO_MANY_WAITERS",
                metadata={"limit": str(self._max)},
                retry_after_seconds=1,
            )
        queue: asyncio.Queue[Command] = asyncio.Queue()
        self._watchers.setdefault(command_id, set()).add(queue)
        self._count += 1
        try:
            yield queue
        finally:
            self._count -= 1
            watchers = self._watchers[command_id]
            watchers.discard(queue)
            if not watchers:
                del self._watchers[command_id]

    def changed(self, command: Command) -> None:
        for queue in self._watchers.get(command.id, ()):
            queue.put_nowait(command)
