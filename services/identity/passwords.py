"""Password hashing with argon2id, off the event loop."""

from __future__ import annotations

import asyncio
import os
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError


class Passwords:
    """Hashes and verifies in worker threads, so a login never blocks the other calls being served.

    Each argon2 hash holds its memory cost (64 MiB by default) while it runs; the semaphore
    bounds how many run at once, so a burst of logins cannot exhaust the pod's memory.
    """

    def __init__(self, hasher: PasswordHasher | None = None, *, concurrency: int | None = None) -> None:
        self._hasher = hasher or PasswordHasher()
        self._slots = asyncio.Semaphore(concurrency or os.cpu_count() or 2)
        self._dummy_hash = ""

    async def hash(self, password: str) -> str:
        async with self._slots:
            return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, password_hash: str, password: str) -> bool:
        async with self._slots:
            return await asyncio.to_thread(self._verify, password_hash, password)

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        """True when the hash was made with other parameters than the current ones."""
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True

    async def prepare(self) -> None:
        """Makes the dummy hash up front, so the first unknown username costs no extra time."""
        if not self._dummy_hash:
            self._dummy_hash = await self.hash(secrets.token_urlsafe(24))

    async def verify_nobody(self, password: str) -> None:
        """Spends the time of one verification, for usernames that do not exist."""
        await self.prepare()
        await self.verify(self._dummy_hash, password)
