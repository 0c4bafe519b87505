"""`make bench-mqtt`: the device data plane under load, medmesh beside Mosquitto.

One load generator (tools/mqtt_bench/, several processes) drives, in turn, the medmesh platform
(started here on free ports with its MQTT adapter) and Debian's Mosquitto (TLS 1.3, client
certificates, the cloud side emulated by MQTT clients), on the same machine, and measures:
  - ingest: messages of 3 observations per second, QoS 1 with cloud acks, closed loop;
    nothing lost or stored twice (medmesh: counted in its observation database);
  - ack latency at a fixed offered rate (open loop);
  - the ingest rate again with thousands of idle devices connected, as a ratio to the first
    ingest run and to a run with the active devices alone just before the fleet connects (the
    database is as big then);
  - command round trips (medmesh: REST create -> device -> COMPLETED visible over REST, followed
    with `:wait`, and split by the platform's clock into REST in, the platform, REST out);
  - broker RSS per idle TLS connection;
  - CPU seconds per process during the ingest runs (who used the cores).
Prints a table (figure, goal, medmesh, mosquitto, ratio) and writes build/bench/mqtt.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.mqtt_bench.runner import PHASES, Settings, render, run_target, settings_dict, table  # noqa: E402
from tools.mqtt_bench.targets import MedmeshTarget, MosquittoTarget, Target, open_files_limit  # noqa: E402

QUICK = Settings(
    ingest_duration=10,
    latency_duration=10,
    fleet_devices=200,
    fleet_duration=10,
    command_duration=5,
    warmup=2,
    drain=10,
)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=["medmesh", "mosquitto", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (10 s phases, 200 idle devices)")
    parser.add_argument("--duration", type=float, help="ingest run, seconds (60)")
    parser.add_argument("--window", type=int, help="closed loop: messages awaiting their ack per device (50)")
    parser.add_argument("--devices", type=int, help="active devices sending observations (10)")
    parser.add_argument("--latency-rate", type=float, help="open-loop rate for the latency figure, msg/s (1000)")
    parser.add_argument("--latency-duration", type=float, help="seconds (30)")
    parser.add_argument("--fleet", type=int, help="idle devices connected for the fleet and memory figures (5000)")
    parser.add_argument("--fleet-duration", type=float, help="ingest run with the fleet connected, seconds (30)")
    parser.add_argument("--command-rate", type=float, help="commands per second (20)")
    parser.add_argument("--command-duration", type=float, help="seconds (30)")
    parser.add_argument("--load-workers", type=int, help="processes for the active devices (2)")
    parser.add_argument("--idle-workers", type=int, help="processes for the idle connections (2)")
    parser.add_argument("--connect-concurrency", type=int, help="idle devices connecting at once (20)")
    parser.add_argument("--connect-budget", type=float, help="seconds to connect the idle fleet, with retries (1800)")
    parser.add_argument("--cloud-workers", type=int, help="Mosquitto only: processes acking observations (2)")
    parser.add_argument(
        "--phases",
        type=lambda text: tuple(p for p in text.split(",") if p),
        help=f"comma-separated phases to run (default all: {','.join(PHASES)})",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "build" / "bench" / "mqtt.json")
    return parser.parse_args()


def settings_from(args: argparse.Namespace) -> Settings:
    settings = QUICK if args.quick else Settings()
    overrides = {
        "ingest_duration": args.duration,
        "window": args.window,
        "active_devices": args.devices,
        "latency_rate": args.latency_rate,
        "latency_duration": args.latency_duration,
        "fleet_devices": args.fleet,
        "fleet_duration": args.fleet_duration,
        "command_rate": args.command_rate,
        "command_duration": args.command_duration,
        "load_workers": args.load_workers,
        "idle_workers": args.idle_workers,
        "cloud_workers": args.cloud_workers,
        "connect_concurrency": args.connect_concurrency,
        "connect_budget": args.connect_budget,
        "phases": args.phases,
    }
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # An exception, so every `finally` runs: the platform goes down, workers and brokers stop.
    raise SystemExit(f"stopped by signal {signum}")


def main() -> int:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    args = arguments()
    settings = settings_from(args)
    if unknown := set(settings.phases) - set(PHASES):
        raise SystemExit(f"unknown phases {sorted(unknown)}: choose from {','.join(PHASES)}")
    open_files_limit()
    names = ["medmesh", "mosquitto"] if args.target == "both" else [args.target]
    results: dict[str, dict[str, Any]] = {}

    def write() -> None:
        report = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
            "settings": settings_dict(settings),
            "targets": results,
            "table": table(settings, results),
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))

    def checkpoint(name: str) -> Callable[[dict[str, Any]], None]:
        def save(figures: dict[str, Any]) -> None:
            results[name] = figures
            write()

        return save

    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"medmesh-bench-mqtt-{name}-") as workdir:
            target: Target = (
                MedmeshTarget(Path(workdir))
                if name == "medmesh"
                else MosquittoTarget(Path(workdir), settings.cloud_workers)
            )
            results[name] = run_target(target, settings, say, checkpoint(name))
            write()
    print()
    print(render(settings, results))
    print(f"\nwritten to {args.output}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
