"""Two inserts into one FerretDB database, one after the other and at once: latency of the pair.

Why the command service writes one after the other (services/command/service.py): FerretDB's
SQLite backend takes one writer at a time per database, and writers that collide wait.
Run: `.venv/bin/python -m tools.ferretdb.write_concurrency` (a scratch FerretDB, about 10 s).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from tests.integration.stores import ferretdb

PAIRS = 300


async def _measure(uri: str) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    try:
        database = client["write_concurrency"]
        await database.a.insert_one({"_id": "warm"})
        await database.b.insert_one({"_id": "warm"})
        for mode in ("one after the other", "at once") * 2:
            took = []
            for i in range(PAIRS):
                document = {"_id": f"{mode}-{i}-{time.perf_counter()}", "pad": "x" * 300}
                started = time.perf_counter()
                if mode == "at once":
                    await asyncio.gather(database.a.insert_one(dict(document)), database.b.insert_one(dict(document)))
                else:
                    await database.a.insert_one(dict(document))
                    await database.b.insert_one(dict(document))
                took.append((time.perf_counter() - started) * 1000)
            took.sort()
            print(f"{mode:20} p50 {took[PAIRS // 2]:.2f} ms  p90 {took[PAIRS * 9 // 10]:.2f} ms")
    finally:
        await client.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as data, ferretdb(Path(data)) as uri:
        asyncio.run(_measure(uri))


if __name__ == "__main__":
    main()
