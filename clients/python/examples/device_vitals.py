"""A vital-signs monitor on the device SDK: connects with its certificate, streams heart rate,
SpO2 and respiration rate, runs commands and applies configuration pushed by the platform.

    .venv/bin/python clients/python/examples/device_vitals.py SN-0042 --cert SN-0042.crt --key SN-0042.key

Get the certificate with device_certificate.py. The MQTT port is 8883 locally (`medmesh status`
shows it); flags default to MEDMESH_MQTT_HOST, MEDMESH_MQTT_PORT and MEDMESH_CA. Try, while it runs:

    curl --cacert .medmesh/tls/ca.crt -H "Authorization: Bearer $(.venv/bin/medmesh token)" \\
      -X POST https://localhost:8443/v1/devices/SN-0042/commands -d '{"command_name": "measure.blood_pressure"}'
    curl ... -X PATCH 'https://localhost:8443/v1/devices/SN-0042/config?update_mask=desired' \\
      -d '{"desired": {"sample_interval_s": 0.5}}'

Ctrl-C waits up to 5 s for the last acks, then disconnects.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
from pathlib import Path
from typing import Any

from medmesh_device import Command, DeviceClient, DeviceError, Observation, Outcome

ROOT = Path(__file__).resolve().parents[3]


class Monitor:
    """The device's state: what it measures and how often."""

    def __init__(self) -> None:
        self.interval = 1.0
        self.rng = random.Random()

    async def apply_config(self, version: int, config: dict[str, Any]) -> dict[str, Any]:
        interval = config.get("sample_interval_s", self.interval)
        self.interval = min(max(float(interval), 0.1), 3600.0)  # clamp what the device cannot do
        print(f"config v{version}: {config} -> sampling every {self.interval} s")
        return {**config, "sample_interval_s": self.interval}

    async def run_command(self, command: Command) -> dict[str, Any]:
        print(f"command {command.id}: {command.command} {command.parameters}")
        if command.command == "measure.blood_pressure":
            await asyncio.sleep(2)  # inflating the cuff
            return {"systolic": self.rng.randint(110, 135), "diastolic": self.rng.randint(70, 85)}
        if command.command == "reboot":
            return {"rebooted": False, "why": "an example does not reboot"}
        raise ValueError(f"unknown command {command.command!r}")

    async def on_error(self, error: DeviceError) -> None:
        print(f"! {type(error).__name__}: {error}")

    def vitals(self) -> list[Observation]:
        return [
            Observation("heart_rate", round(self.rng.gauss(72, 4)), unit="/min"),
            Observation("spo2", round(self.rng.uniform(95, 99.5), 1), unit="%"),
            Observation("respiratory_rate", round(self.rng.gauss(15, 2)), unit="/min"),
        ]


async def main(args: argparse.Namespace) -> None:
    monitor = Monitor()
    device = DeviceClient.with_certificate(
        args.device,
        args.host,
        args.port,
        ca_file=args.ca,
        cert_file=args.cert,
        key_file=args.key,
        on_config=monitor.apply_config,
        on_command=monitor.run_command,
        on_error=monitor.on_error,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with device:
        print(f"connecting to {args.host}:{args.port} as {args.device}")
        await device.wait_connected(timeout=30)
        print("connected")
        await device.report_status("OK", battery_percent=87, firmware_version="1.0.0")
        sent = 0
        while not stop.is_set() and (args.count == 0 or sent < args.count):
            results = device.enqueue_observations(monitor.vitals())
            sent += 1
            for future in results:
                future.add_done_callback(_print_result)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), monitor.interval)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await device.flush()
        counters = device.counters
        print(f"sent {counters.observations_sent}, stored {counters.stored}, duplicates {counters.duplicates}, "
              f"rejected {counters.rejected}, commands {counters.commands_completed} completed / "
              f"{counters.commands_failed} failed, configs {counters.configs_applied}")  # fmt: skip


def _print_result(future: asyncio.Future[Any]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    result = future.result()
    mark = "ok" if result.outcome is not Outcome.REJECTED else f"REJECTED {result.reason}: {result.description}"
    print(f"  {result.id[:8]} {mark}")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("device", help="the device id (client id and certificate CN)")
    parser.add_argument("--host", default=os.environ.get("MEDMESH_MQTT_HOST", "localhost"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("MEDMESH_MQTT_PORT", "8883")))
    parser.add_argument("--ca", type=Path, default=Path(os.environ.get("MEDMESH_CA", ROOT / ".medmesh/tls/ca.crt")))
    parser.add_argument("--cert", type=Path, help="the device certificate (default <device>.crt)")
    parser.add_argument("--key", type=Path, help="its private key (default <device>.key)")
    parser.add_argument("--count", type=int, default=0, help="stop after this many samples (0: run until Ctrl-C)")
    args = parser.parse_args()
    args.cert = args.cert or Path(f"{args.device}.crt")
    args.key = args.key or Path(f"{args.device}.key")
    return args


if __name__ == "__main__":
    asyncio.run(main(arguments()))
