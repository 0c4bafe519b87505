"""Background loops that stop when asked, even when a library swallows the cancellation."""

from __future__ import annotations

import asyncio


def stop_requested() -> bool:
    """True once the current task has been cancelled.

    Background loops test this rather than loop forever: PyMongo's async server selection
    catches the CancelledError of a task cancelled while it waits for an unreachable database,
    so a `while True` loop around it would go on after `task.cancel()` and hang shutdown.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
