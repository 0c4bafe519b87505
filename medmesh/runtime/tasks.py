"""Background loops that stop when asked, even when a library swallows the cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def stop_requested() -> bool:
    """True once the current task has been cancelled.

    Background loops test this rather than loop forever: PyMongo's async server selection
    catches the CancelledError of a task cancelled while it waits for an unreachable database,
    so a `while True` loop around it would go on after `task.cancel()` and hang shutdown.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class BackgroundTasks:
    """Fire-and-forget tasks kept referenced until done (asyncio holds only weak references),
    and cancelled together on shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
