"""Worker processes the harness talks to over a pipe, and CPU and memory read from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

_TICKS = os.sysconf("SC_CLK_TCK")
OTHER_WORK = "everything else (kernel, other processes)"


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy (all cores, every process and the kernel)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / _TICKS


def wait_until_quiet(pids: list[int], max_cores: float = 0.25, within: float = 60.0) -> float:
    """Waits until `pids` together use less than `max_cores` over a second (a backlog from the
    previous phase must not be measured in the next); returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        before = sum(cpu_seconds(pid) or 0.0 for pid in pids)
        time.sleep(1.0)
        if sum(cpu_seconds(pid) or 0.0 for pid in pids) - before < max_cores:
            break
    return round(time.monotonic() - started, 1)


class CpuMeter:
    """CPU seconds used by named groups of processes between `start` and `stop`, and by the
    rest of the machine (other work on a shared machine shows up there)."""

    def __init__(self, groups: Mapping[str, list[int]]) -> None:
        self._groups = {name: list(pids) for name, pids in groups.items()}
        self._started: dict[int, float] = {}
        self._machine = 0.0

    def start(self) -> None:
        pids = {pid for pids in self._groups.values() for pid in pids}
        self._started = {pid: seconds for pid in pids if (seconds := cpu_seconds(pid)) is not None}
        self._machine = machine_busy_seconds()

    def stop(self) -> dict[str, float]:
        machine = machine_busy_seconds() - self._machine
        used: dict[str, float] = {}
        for name, pids in self._groups.items():
            total = 0.0
            for pid in pids:
                now = cpu_seconds(pid)
                if now is not None and pid in self._started:
                    total += now - self._started[pid]
            used[name] = round(total, 2)
        used[OTHER_WORK] = round(max(0.0, machine - sum(used.values())), 2)
        return used


@dataclass(frozen=True)
class Failed:
    """What a worker sends instead of an answer when it fails."""

    where: str
    traceback: str


class Stop:
    """Asks a worker to disconnect everything and exit."""


Handler = Callable[[Any], Awaitable[Any]]


def serve(
    conn: Connection, name: str, setup: Callable[[], Awaitable[tuple[Any, Handler, Callable[[], Awaitable[None]]]]]
) -> None:
    """The child side: `setup()` connects and returns (ready message, request handler, teardown);
    then every request read from the pipe is answered with the handler's result until Stop."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ready, handle, teardown = await setup()
        conn.send(ready)
        try:
            while True:
                try:
                    request = await loop.run_in_executor(None, conn.recv)
                except EOFError:  # the harness went away
                    break
                if isinstance(request, Stop):
                    break
                conn.send(await handle(request))
        finally:
            await teardown()

    try:
        asyncio.run(main())
    except Exception:
        with contextlib.suppress(OSError):
            conn.send(Failed(name, traceback.format_exc()))
    finally:
        conn.close()


class Worker:
    """A spawned child process running `target(conn, *args)` (usually via `serve`)."""

    def __init__(self, name: str, target: Callable[..., None], *args: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.name = name
        self.process = context.Process(target=target, args=(child, *args), name=name, daemon=True)
        self.process.start()
        child.close()

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def send(self, request: Any) -> None:
        self._conn.send(request)

    def receive(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"worker {self.name} did not answer within {timeout:.0f} s")
        try:
            answer = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"worker {self.name} exited (code {self.process.exitcode})") from None
        if isinstance(answer, Failed):
            raise RuntimeError(f"worker {answer.where} failed:\n{answer.traceback}")
        return answer

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(Stop())
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self._conn.close()
