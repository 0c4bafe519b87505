"""Starts components in order, each gated on its health, watches them, stops them all.

Children run in their own sessions (Ctrl-C reaches only the supervisor, which stops
them in reverse order) and get SIGTERM from the kernel if the supervisor dies, so no
process outlives the platform.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from medmesh.launcher.components import Component, wait_until
from medmesh.launcher.config import PlatformConfig

_PR_SET_PDEATHSIG = 1
STOP_TIMEOUT = 15.0


class StartupError(Exception):
    def __init__(self, component: str, reason: str, log_tail: str) -> None:
        super().__init__(f"{component}: {reason}")
        self.component = component
        self.reason = reason
        self.log_tail = log_tail


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def log_tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


@dataclass
class Running:
    component: Component
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]


class Supervisor:
    def __init__(self, config: PlatformConfig, components: list[Component], say: Callable[[str], None]) -> None:
        self._config = config
        self._components = components
        self._say = say
        self._running: list[Running] = []
        self.state = "starting"

    def write_status(self) -> None:
        status: dict[str, Any] = {
            "state": self.state,
            "supervisor_pid": os.getpid(),
            "port_offset": self._config.port_offset,
            "components": [
                {
                    "name": r.component.name,
                    "pid": r.process.pid,
                    "endpoint": r.component.endpoint,
                    "log": str(r.log_path),
                }
                for r in self._running
            ],
        }
        path = self._config.status_file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status, indent=2))
        tmp.replace(path)

    async def start_all(self) -> None:
        self._config.logs_dir.mkdir(parents=True, exist_ok=True)
        for component in self._components:
            busy = [port for port in component.ports if port_in_use(port)]
            if busy:
                raise StartupError(
                    component.name,
                    f"port {', '.join(map(str, busy))} already in use (another medmesh? try `medmesh status`)",
                    "",
                )
        for stage in sorted({c.stage for c in self._components}):
            await self._start_stage([c for c in self._components if c.stage == stage])
        self.state = "running"
        self.write_status()

    async def _start_stage(self, components: list[Component]) -> None:
        """Starts one stage's components together and waits until every one is healthy."""
        began = time.monotonic()
        running = [self._spawn(component) for component in components]
        waiting = {r.component.name for r in running}
        ticker = asyncio.create_task(self._tick(waiting, began)) if sys.stdout.isatty() else None
        try:
            async with asyncio.TaskGroup() as group:
                for item in running:
                    group.create_task(self._await_ready(item, began, waiting))
        except ExceptionGroup as failures:
            raise failures.exceptions[0] from None
        finally:
            if ticker is not None:
                ticker.cancel()
                sys.stdout.write("\r\033[K")

    def _spawn(self, component: Component) -> Running:
        if component.prepare is not None:
            component.prepare()
        log_path = self._config.logs_dir / f"{component.name}.log"
        log_file = log_path.open("ab")
        log_file.write(f"\n--- start {time.strftime('%Y-%m-%dT%H:%M:%S')} ---\n".encode())
        log_file.flush()
        process = subprocess.Popen(
            component.argv,
            cwd=self._config.root,
            env={**os.environ, **component.env},
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        running = Running(component, process, log_path, log_file)
        self._running.append(running)
        self.write_status()
        self._say(f"  starting {component.name:<13} pid {process.pid}")
        return running

    async def _await_ready(self, running: Running, began: float, waiting: set[str]) -> None:
        component, process = running.component, running.process

        async def healthy_or_exited() -> bool:
            if process.poll() is not None:
                return True
            return await component.health()

        ready = await wait_until(healthy_or_exited, component.start_timeout)
        if process.poll() is not None:
            raise StartupError(component.name, f"exited with code {process.returncode}", log_tail(running.log_path))
        if not ready:
            raise StartupError(
                component.name, f"not healthy after {component.start_timeout:.0f}s", log_tail(running.log_path)
            )
        waiting.discard(component.name)
        if sys.stdout.isatty():
            sys.stdout.write("\r\033[K")
        self._say(f"  ready    {component.name:<13} {time.monotonic() - began:5.1f}s  {component.endpoint}")

    @staticmethod
    async def _tick(waiting: set[str], began: float) -> None:
        """On a terminal, a live 'waiting' line, so a slow start never looks like a hang."""
        while True:
            sys.stdout.write(f"\r\033[K  waiting  {', '.join(sorted(waiting))}  {time.monotonic() - began:5.1f}s")
            sys.stdout.flush()
            await asyncio.sleep(0.2)

    async def watch(self, stop: asyncio.Event) -> str | None:
        """Waits for `stop`; returns the name of a component that died meanwhile, if one did."""
        while not stop.is_set():
            for running in self._running:
                if running.process.poll() is not None:
                    self._say(
                        f"  {running.component.name} exited with code {running.process.returncode}; last log lines:\n"
                        + log_tail(running.log_path)
                    )
                    return running.component.name
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
        return None

    async def stop_all(self, final_state: str = "stopped") -> None:
        self.state = "stopping"
        self.write_status()
        for running in reversed(self._running):
            process = running.process
            if process.poll() is None:
                process.terminate()
                try:
                    await asyncio.to_thread(process.wait, STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self._say(f"  {running.component.name} ignored SIGTERM for {STOP_TIMEOUT:.0f}s; killing it")
                    process.kill()
                    await asyncio.to_thread(process.wait)
            running.log_file.close()
            self._say(f"  stopped  {running.component.name}")
        self._running.clear()
        self.state = final_state
        self.write_status()


def stop_recorded(config: PlatformConfig, say: Callable[[str], None], timeout: float = 60.0) -> bool:
    """`medmesh down`: SIGTERM the supervisor (which stops the rest), then kill any leftover."""
    try:
        status = json.loads(config.status_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    supervisor = int(status.get("supervisor_pid", 0))
    pids = [int(c["pid"]) for c in status.get("components", [])]
    if supervisor and pid_alive(supervisor):
        os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(supervisor) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(supervisor):
            say(f"supervisor {supervisor} did not stop in {timeout:.0f}s; killing it")
            os.kill(supervisor, signal.SIGKILL)
    for pid in pids:
        if pid_alive(pid):
            say(f"killing leftover process {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return True


def tty_say(stream: IO[str] = sys.stdout) -> Callable[[str], None]:
    def say(line: str) -> None:
        stream.write(line + "\n")
        stream.flush()

    return say
