"""`medmesh`: run the whole platform on one machine.

medmesh up            start everything in the foreground; Ctrl-C stops it all
medmesh up --detach   the same in the background; returns once everything is healthy
medmesh status        what runs, where, and whether it is healthy
medmesh down          stop a detached platform; no process is left behind
medmesh login         log in (as the first platform admin unless --username is given)
medmesh token         print a valid access token: curl -H "Authorization: Bearer $(medmesh token)"
medmesh logout        revoke the saved session
medmesh simulate      simulated devices stream into the running platform: --devices N --rate R
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from medmesh.launcher import session
from medmesh.launcher.components import Component, platform_components, prerequisites
from medmesh.launcher.config import PlatformConfig
from medmesh.launcher.supervisor import StartupError, Supervisor, log_tail, pid_alive, stop_recorded, tty_say
from medmesh.launcher.tls import ensure_local_pki

say = tty_say()


def _endpoint_table(config: PlatformConfig, rows: list[tuple[str, str, str]]) -> str:
    width = max(len(name) for name, _, _ in rows)
    lines = [f"  {name:<{width}}  {state:<9} {endpoint}" for name, state, endpoint in rows]
    ca = config.tls_dir / "ca.crt"
    lines.append("")
    lines.append(f"  admin: {config.admin_credentials_file} (first platform admin)")
    lines.append(
        f'  try: curl --cacert {ca} -H "Authorization: Bearer $(medmesh token)" '
        f"https://localhost:{config.port('gateway')}/v1/organizations"
    )
    return "\n".join(lines)


def _running_platform(config: PlatformConfig) -> dict[str, object] | None:
    try:
        status: dict[str, object] = json.loads(config.status_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    pid = status.get("supervisor_pid")
    if status.get("state") in {"stopped", None} or not isinstance(pid, int) or not pid_alive(pid):
        return None
    return status


def cmd_init(config: PlatformConfig) -> int:
    """The state directory: local CA and server certificate, object-store credentials."""
    pki = ensure_local_pki(config.tls_dir)
    config.s3_credentials()
    say(f"medmesh: state in {config.state_dir}; local CA {pki.ca_cert}")
    return 0


def _prepare(config: PlatformConfig) -> list[Component]:
    ensure_local_pki(config.tls_dir)
    missing = prerequisites(config)
    if missing:
        say("medmesh is not set up; run `make setup`. Missing:\n  " + "\n  ".join(missing))
        raise SystemExit(2)
    return platform_components(config)


async def _supervise(config: PlatformConfig) -> int:
    supervisor = Supervisor(config, _prepare(config), say)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    began = time.monotonic()
    say(f"medmesh: starting the platform (state in {config.state_dir})")
    try:
        start = asyncio.create_task(supervisor.start_all())
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if start not in done:
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError, StartupError):
                await start
            say("medmesh: interrupted while starting; stopping what started")
            await supervisor.stop_all()
            return 130
        stopper.cancel()
        start.result()
    except StartupError as error:
        say(f"medmesh: {error.component} failed to start: {error.reason}")
        if error.log_tail:
            say(f"--- last lines of {config.logs_dir / (error.component + '.log')} ---\n{error.log_tail}\n---")
        await supervisor.stop_all(final_state="failed")
        return 1
    except BaseException:
        await supervisor.stop_all()
        raise
    say(f"medmesh: up in {time.monotonic() - began:.1f}s\n")
    status = json.loads(config.status_file.read_text())
    say(_endpoint_table(config, [(c["name"], "running", c["endpoint"]) for c in status["components"]]))
    say("\nmedmesh: press Ctrl-C to stop" if sys.stdout.isatty() else "")
    died = await supervisor.watch(stop)
    say("medmesh: stopping")
    await supervisor.stop_all()
    return 1 if died else 0


def cmd_up(config: PlatformConfig, detach: bool) -> int:
    if _running_platform(config) is not None:
        say("medmesh is already running; `medmesh status` shows it, `medmesh down` stops it")
        return 1
    if not detach:
        return asyncio.run(_supervise(config))
    _prepare(config)
    config.logs_dir.mkdir(parents=True, exist_ok=True)
    log_path = config.logs_dir / "supervisor.log"
    config.status_file.unlink(missing_ok=True)
    with log_path.open("w") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "medmesh.cli", "_supervise"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    shown = 0
    while True:
        lines = log_path.read_text(errors="replace").splitlines()
        for line in lines[shown:]:
            say(line)
        shown = len(lines)
        if supervisor.poll() is not None:
            for line in log_path.read_text(errors="replace").splitlines()[shown:]:
                say(line)
            say(f"medmesh: the platform did not start (exit {supervisor.returncode}); log: {log_path}")
            return 1
        try:
            state = json.loads(config.status_file.read_text()).get("state")
        except (FileNotFoundError, json.JSONDecodeError):
            state = None
        if state == "running":
            time.sleep(0.2)
            for line in log_path.read_text(errors="replace").splitlines()[shown:]:
                say(line.replace("press Ctrl-C to stop", "stop it with `medmesh down`"))
            say(f"medmesh: running in the background (supervisor pid {supervisor.pid}); `medmesh down` stops it")
            return 0
        time.sleep(0.2)


def cmd_status(config: PlatformConfig) -> int:
    status = _running_platform(config)
    if status is None:
        say("medmesh is not running")
        return 3
    components = status.get("components")
    assert isinstance(components, list)
    checks = {c.name: c for c in platform_components(config)}

    async def probe() -> list[tuple[str, str, str]]:
        rows = []
        for entry in components:
            name, pid = entry["name"], int(entry["pid"])
            if not pid_alive(pid):
                state = "exited"
            elif name in checks and await checks[name].health():
                state = "healthy"
            else:
                state = "unhealthy"
            rows.append((name, state, entry["endpoint"]))
        return rows

    rows = asyncio.run(probe())
    say(f"medmesh is {status.get('state')} (supervisor pid {status.get('supervisor_pid')})")
    say(_endpoint_table(config, rows))
    return 0 if all(state == "healthy" for _, state, _ in rows) else 1


def cmd_down(config: PlatformConfig) -> int:
    if not stop_recorded(config, say):
        say("medmesh is not running")
        return 0
    say("medmesh: stopped")
    return 0


def cmd_logs(config: PlatformConfig, component: str, lines: int) -> int:
    path = config.logs_dir / f"{component}.log"
    say(log_tail(Path(path), lines))
    return 0


def cmd_login(config: PlatformConfig, username: str | None, password_stdin: bool) -> int:
    password = None
    if username is not None:
        prompt = f"password for {username}: "
        password = sys.stdin.readline().rstrip("\n") if password_stdin else getpass.getpass(prompt)
    try:
        current = session.login(config, username, password)
    except session.SessionError as error:
        print(f"medmesh: login failed: {error}", file=sys.stderr)
        return 1
    say(f"logged in as {current.username}; `medmesh token` prints the access token")
    return 0


def cmd_token(config: PlatformConfig) -> int:
    try:
        print(session.token(config))
    except session.SessionError as error:
        print(f"medmesh: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_logout(config: PlatformConfig) -> int:
    try:
        session.logout(config)
    except session.SessionError as error:
        print(f"medmesh: logout failed: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="medmesh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the platform")
    up.add_argument("--detach", "-d", action="store_true", help="run in the background")
    commands.add_parser("init", help="create the state directory, local CA and certificates")
    commands.add_parser("status", help="show what runs and whether it is healthy")
    commands.add_parser("down", help="stop a detached platform")
    logs = commands.add_parser("logs", help="show the end of a component's log")
    logs.add_argument("component")
    logs.add_argument("-n", type=int, default=40)
    login = commands.add_parser("login", help="log in; as the first platform admin by default")
    login.add_argument("--username", "-u", help="log in as this user (asks for the password)")
    login.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    commands.add_parser("token", help="print a valid access token (logs in as the admin if needed)")
    commands.add_parser("logout", help="revoke the saved session")
    simulate = commands.add_parser("simulate", help="simulated devices streaming into the running platform")
    simulate.add_argument("--devices", "-n", type=int, default=10, help="how many devices (default 10)")
    simulate.add_argument(
        "--rate", "-r", type=float, default=1.0, help="messages per second per device, 3 observations each (default 1)"
    )
    simulate.add_argument("--duration", "-t", type=float, help="stop after this many seconds (default: Ctrl-C)")
    simulate.add_argument("--prefix", default="SIM", help="device ids are PREFIX-0001, PREFIX-0002, ... (default SIM)")
    commands.add_parser("_supervise", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = PlatformConfig.from_env()
    if args.command == "up":
        return cmd_up(config, args.detach)
    if args.command == "_supervise":
        return asyncio.run(_supervise(config))
    if args.command == "init":
        return cmd_init(config)
    if args.command == "status":
        return cmd_status(config)
    if args.command == "down":
        return cmd_down(config)
    if args.command == "login":
        return cmd_login(config, args.username, args.password_stdin)
    if args.command == "token":
        return cmd_token(config)
    if args.command == "logout":
        return cmd_logout(config)
    if args.command == "simulate":
        from medmesh.launcher import simulate as simulator  # the device SDK loads only for this command

        return simulator.run(config, args.devices, args.rate, args.duration, args.prefix, say)
    return cmd_logs(config, args.component, args.n)


if __name__ == "__main__":
    sys.exit(main())
