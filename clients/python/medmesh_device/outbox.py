"""Observations kept until the platform answers for each id (protocol section 5), without I/O.

An id leaves the outbox only when it appears in `acks` (stored or duplicate) or in an `errors`
message's `rejected` list. Everything else is sent again, with the same id: after a reconnect
(`requeue_all`) and when `resend_after` seconds pass without an answer (`requeue_stale`).
Times are passed in (monotonic seconds), so tests need no clock.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from medmesh_device.errors import OutboxFull, Rejection
from medmesh_device.protocol import batch_fits


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # stored by an earlier send of the same id: durable all the same
    REJECTED = "rejected"  # refused for good; `reason` and `description` say why


@dataclass(frozen=True)
class ObservationResult:
    """What became of one observation."""

    id: str
    outcome: Outcome
    reason: str = ""
    description: str = ""

    @property
    def durable(self) -> bool:
        return self.outcome is not Outcome.REJECTED


@dataclass
class _Entry:
    encoded: bytes
    queued_at: float
    sent_at: float | None = None
    sends: int = 0
    waiting: bool = True  # in the send queue


class Outbox:
    """Unanswered observations by id, and the order in which they go out."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._entries: dict[str, _Entry] = {}
        self._queue: deque[str] = deque()
        self._in_flight = 0  # sent and not answered (nor queued again)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, observation_id: object) -> bool:
        return observation_id in self._entries

    @property
    def unsent(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Observations sent and waiting for their answer."""
        return self._in_flight

    def add(self, items: Iterable[tuple[str, bytes]], now: float) -> None:
        """Queues encoded observations; an id already waiting for its answer is kept as it is."""
        new = [(i, e) for i, e in items if i not in self._entries]
        if len(self._entries) + len(new) > self.capacity:
            raise OutboxFull(f"{len(self._entries)} observations wait for acks (capacity {self.capacity})")
        for observation_id, encoded in new:
            self._entries[observation_id] = _Entry(encoded, now)
            self._queue.append(observation_id)

    def take_batch(self, now: float, window: int | None = None) -> list[tuple[str, bytes]]:
        """The next observations to send, as many as fit one message and keep at most `window`
        in flight; marks them sent."""
        batch: list[tuple[str, bytes]] = []
        size = 0
        while self._queue and (window is None or self._in_flight < window):
            observation_id = self._queue[0]
            entry = self._entries.get(observation_id)
            if entry is None or not entry.waiting:  # answered (or requeued twice) meanwhile
                self._queue.popleft()
                continue
            if not batch_fits(len(batch), size, entry.encoded):
                break
            self._queue.popleft()
            entry.waiting = False
            entry.sent_at = now
            entry.sends += 1
            self._in_flight += 1
            batch.append((observation_id, entry.encoded))
            size += len(entry.encoded)
        return batch

    def requeue(self, ids: Iterable[str]) -> int:
        """These ids (if sent and unanswered) go again; how many were queued."""
        count = 0
        for observation_id in ids:
            entry = self._entries.get(observation_id)
            if entry is not None and not entry.waiting:
                entry.waiting = True
                self._queue.append(observation_id)
                self._in_flight -= 1
                count += 1
        return count

    def requeue_all(self) -> int:
        """After a reconnect (or an UNAVAILABLE error): everything sent and unanswered goes again."""
        in_flight = sorted((e.sent_at or 0.0, i) for i, e in self._entries.items() if not e.waiting)
        return self.requeue(i for _, i in in_flight)

    def requeue_stale(self, now: float, resend_after: float) -> int:
        """Observations sent `resend_after` seconds ago or earlier and still unanswered go again."""
        stale = [
            i
            for i, e in self._entries.items()
            if not e.waiting and e.sent_at is not None and now - e.sent_at >= resend_after
        ]
        return self.requeue(stale)

    def _answer(self, observation_id: str) -> bool:
        entry = self._entries.pop(observation_id, None)
        if entry is None:
            return False
        if not entry.waiting:
            self._in_flight -= 1
        return True  # a queued entry leaves its id in the queue; take_batch skips it

    def acknowledge(self, stored: Iterable[str], duplicates: Iterable[str]) -> list[ObservationResult]:
        """Ids in an `acks` message; ids this outbox does not hold (answered already) are skipped."""
        results = [ObservationResult(i, Outcome.STORED) for i in stored if self._answer(i)]
        results += [ObservationResult(i, Outcome.DUPLICATE) for i in duplicates if self._answer(i)]
        return results

    def reject(self, rejections: Iterable[Rejection]) -> list[ObservationResult]:
        """Ids in an `errors` message's `rejected`: refused for good, not resent."""
        return [
            ObservationResult(r.id, Outcome.REJECTED, r.reason, r.description) for r in rejections if self._answer(r.id)
        ]

    def drain(self) -> list[str]:
        """Empties the outbox (the client is closing); the ids that were never answered."""
        ids = list(self._entries)
        self._entries.clear()
        self._queue.clear()
        self._in_flight = 0
        return ids

    def sends(self, observation_id: str) -> int:
        entry = self._entries.get(observation_id)
        return entry.sends if entry else 0
