"""Reconnect back-off of protocol section 6, without I/O (times are passed in)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """1 s doubling up to 60 s, each wait ±30 % at random (so a fleet does not reconnect in
    lockstep), reset once a connection has lasted a minute. After a CONNACK 5 the wait is at
    least a minute: the credentials will not get better by themselves."""

    initial: float = 1.0
    maximum: float = 60.0
    jitter: float = 0.3
    reset_after: float = 60.0
    not_authorized_wait: float = 60.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0
    _connected_at: float | None = None

    def connected(self, now: float) -> None:
        self._connected_at = now

    def disconnected(self, now: float) -> None:
        if self._connected_at is not None and now - self._connected_at >= self.reset_after:
            self.attempt = 0
        self._connected_at = None

    def next_delay(self, not_authorized: bool = False) -> float:
        """The wait before the next attempt; each call counts one failed attempt."""
        base = min(self.initial * 2.0 ** min(self.attempt, 30), self.maximum)  # capped: no float overflow
        self.attempt += 1
        if not_authorized:
            # Jitter upwards only, so the wait never drops under the minute.
            return max(base, self.not_authorized_wait) * self.rng.uniform(1.0, 1.0 + self.jitter)
        return base * self.rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)
