"""The phases of one benchmark run against one target, the figures, and the comparison table."""

from __future__ import annotations

import math
import os
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from tools.mqtt_bench.devices import (
    OBSERVATIONS_PER_MESSAGE,
    CommandLog,
    LoadJob,
    LoadResult,
    device_worker,
    merge,
    percentile,
)
from tools.mqtt_bench.idle import FleetPlan, IdleReport, IdleStatus, idle_worker
from tools.mqtt_bench.procs import OTHER_WORK, CpuMeter, Worker, rss_kib, wait_until_quiet
from tools.mqtt_bench.targets import MedmeshTarget, Target


@dataclass(frozen=True)
class Settings:
    ingest_duration: float = 60.0
    latency_rate: float = 1000.0
    latency_duration: float = 30.0
    fleet_devices: int = 5000  # idle connections added for the fleet and memory figures
    fleet_duration: float = 30.0
    command_rate: float = 20.0
    command_duration: float = 30.0
    active_devices: int = 10
    window: int = 50
    load_workers: int = 2
    idle_workers: int = 2
    connect_concurrency: int = 20  # idle devices connecting at once, all workers together
    connect_budget: float = 1800.0  # seconds to connect the idle fleet, retries included
    cloud_workers: int = 2
    warmup: float = 5.0
    drain: float = 15.0
    phases: tuple[str, ...] = ()  # run only these (names in PHASES); all when empty


PHASES = ("ingest", "latency", "commands", "baseline", "memory", "fleet", "stored")


def _share(items: list[Any], parts: int) -> list[list[Any]]:
    return [items[k::parts] for k in range(parts) if items[k::parts]]


def _round(value: float, digits: int = 1) -> float | None:
    return None if math.isnan(value) else round(value, digits)


class Run:
    """One target through every phase; `figures` collects what is measured as it goes."""

    def __init__(
        self, target: Target, settings: Settings, say: Callable[[str], None], checkpoint: Callable[[], None]
    ) -> None:
        self.target = target
        self.settings = settings
        self.say = say
        self.checkpoint = checkpoint
        self.run_id = uuid.uuid4().hex[:6]
        self.figures: dict[str, Any] = {}
        self.sent_total = 0
        self._devices: list[Worker] = []
        self._idle: list[Worker] = []

    def _job(self, phase: str, duration: float, window: int = 0, rate: float = 0.0) -> LoadResult:
        job = LoadJob(
            tag=f"{self.run_id}-{phase}",
            start_at=time.monotonic() + 1.0,
            duration=duration,
            window=window,
            rate_per_device=rate / self.settings.active_devices if rate else 0.0,
            drain=self.settings.drain,
        )
        for worker in self._devices:
            worker.send(job)
        result = merge([w.receive(duration + job.drain + 120) for w in self._devices])
        self.sent_total += result.sent
        return result

    def _settle(self, phase: str) -> None:
        """Before a phase: the previous one's backlog drained, the figures so far saved."""
        self.checkpoint()
        pids = [pid for pids in self.target.processes().values() for pid in pids]
        waited = wait_until_quiet(pids)
        self.figures.setdefault("settle_seconds", {})[phase] = waited
        if waited > 2:
            self.say(f"  waited {waited:.0f} s for {self.target.name} to go quiet")

    def _cpu_groups(self) -> dict[str, list[int]]:
        return {
            **self.target.processes(),
            "load generator": [w.pid for w in self._devices],
            "idle connections": [w.pid for w in self._idle],
            "harness": [os.getpid()],
        }

    def _closed_loop(self, phase: str, duration: float) -> dict[str, Any]:
        meter = CpuMeter(self._cpu_groups())
        meter.start()
        result = self._job(phase, duration, window=self.settings.window)
        cpu = meter.stop()
        steady = result.per_second[1 : int(duration)] or [0]
        return {
            "rate_msg_s": round(result.acked_in_time / duration, 1),
            "slowest_second_msg_s": min(steady),
            "fastest_second_msg_s": max(steady),
            "sent": result.sent,
            "acked": result.acked,
            "unacked": result.sent - result.acked,
            "rejected": result.rejected,
            "timed_out": result.timed_out,
            "duplicate_ids_acked": result.duplicate_ids,
            "repeated_acks": result.repeated_acks,
            "errors": result.errors,
            "latency_p50_ms": _round(percentile(result.latencies_ms, 0.5)),
            "latency_p99_ms": _round(percentile(result.latencies_ms, 0.99)),
            "cpu_seconds": cpu,
            "cpu_cores": {name: round(seconds / duration, 2) for name, seconds in cpu.items()},
        }

    def execute(self) -> dict[str, Any]:
        """Setup (fatal if it fails), then each phase; a phase that fails is recorded, the next runs."""
        self._setup()
        phases: list[tuple[str, Callable[[], None]]] = [
            ("ingest", self._ingest),
            ("latency", self._latency),
            ("commands", self._commands),
            ("baseline", self._baseline),
            ("memory", self._memory),
            ("fleet", self._fleet),
            ("stored", self._stored),
        ]
        chosen = self.settings.phases or PHASES
        for name, phase in phases:
            if name not in chosen:
                continue
            self._settle(name)
            try:
                phase()
            except Exception:
                self.figures.setdefault("failures", {})[name] = traceback.format_exc()
                self.say(f"{self.target.name}: {name} FAILED\n{self.figures['failures'][name]}")
        return self.figures

    def _setup(self) -> None:
        s = self.settings
        target = self.target
        started = time.monotonic()
        self.say(f"{target.name}: starting, {s.active_devices} active + {s.fleet_devices} idle devices")
        target.start(s.active_devices, s.fleet_devices)
        if isinstance(target, MedmeshTarget):
            self.figures["registration_seconds"] = target.registration_seconds
        self.figures["setup_seconds"] = round(time.monotonic() - started, 1)
        shards = _share(target.active, s.load_workers)
        self._devices = [
            Worker(f"devices-{k}", device_worker, target.endpoint, shard, k, len(shards))
            for k, shard in enumerate(shards)
        ]
        for worker in self._devices:
            worker.receive(120)
        self.say(f"{target.name}: warm-up {s.warmup:.0f} s")
        self._job("warmup", s.warmup, window=s.window)

    def _ingest(self) -> None:
        s = self.settings
        self.say(f"{self.target.name}: ingest, closed loop, window {s.window}/device, {s.ingest_duration:.0f} s")
        self.figures["ingest"] = self._closed_loop("ingest", s.ingest_duration)
        self.say(f"  {self.figures['ingest']['rate_msg_s']} msg/s")

    def _latency(self) -> None:
        s = self.settings
        self.say(f"{self.target.name}: ack latency, open loop {s.latency_rate:.0f} msg/s, {s.latency_duration:.0f} s")
        latency = self._job("latency", s.latency_duration, rate=s.latency_rate)
        self.figures["latency"] = {
            "rate_msg_s": s.latency_rate,
            "sent": latency.sent,
            "acked": latency.acked,
            "timed_out": latency.timed_out,
            "errors": latency.errors,
            "p50_ms": _round(percentile(latency.latencies_ms, 0.5)),
            "p99_ms": _round(percentile(latency.latencies_ms, 0.99)),
            "max_ms": _round(max(latency.latencies_ms, default=math.nan)),
            "generator_lag_p99_ms": latency.lag_p99_ms,
            "generator_lag_max_ms": latency.lag_max_ms,
        }
        self.say(f"  p50 {self.figures['latency']['p50_ms']} ms, p99 {self.figures['latency']['p99_ms']} ms")

    def _commands(self) -> None:
        s = self.settings
        target = self.target
        self.say(f"{target.name}: commands at {s.command_rate:.0f}/s for {s.command_duration:.0f} s")
        meter = CpuMeter(self._cpu_groups())
        meter.start()
        commands = target.commands(s.command_rate, s.command_duration)
        command_cpu = meter.stop()
        arrived: dict[str, float] = {}
        for worker in self._devices:
            worker.send(CommandLog())
            arrived.update(worker.receive(30))
        total_ms = [(done - due) * 1000 for _, due, done in commands.completed]
        # Split at the device: due -> arrived (create + delivery), arrived -> seen COMPLETED.
        delivery_ms = [(arrived[c] - due) * 1000 for c, due, _ in commands.completed if c in arrived]
        report_ms = [(done - arrived[c]) * 1000 for c, _, done in commands.completed if c in arrived]
        self.figures["commands"] = {
            "rate_per_s": s.command_rate,
            "completed": len(commands.completed),
            "unanswered": len(commands.unanswered) + sum(commands.create_failures.values()),
            "create_failures": commands.create_failures,
            "unanswered_but_delivered": sum(c in arrived for c in commands.unanswered),
            "p50_ms": _round(percentile(total_ms, 0.5)),
            "p99_ms": _round(percentile(total_ms, 0.99)),
            "max_ms": _round(max(total_ms, default=math.nan)),
            "to_device_p50_ms": _round(percentile(delivery_ms, 0.5)),
            "to_device_p99_ms": _round(percentile(delivery_ms, 0.99)),
            "device_to_visible_p50_ms": _round(percentile(report_ms, 0.5)),
            "device_to_visible_p99_ms": _round(percentile(report_ms, 0.99)),
            # Split by the platform's clock: REST in, the platform's own part, REST out.
            **{
                f"{part}_p50_ms": _round(percentile([split[k] for split in commands.split_ms], 0.5))
                for k, part in enumerate(("due_to_created", "created_to_completed", "completed_to_seen"))
            },
            "cpu_seconds": command_cpu,
        }
        if isinstance(target, MedmeshTarget):
            self.figures["commands"]["rest_waits_per_command"] = round(target.command_waits / max(1, len(total_ms)), 1)
        self.say(f"  p50 {self.figures['commands']['p50_ms']} ms, p99 {self.figures['commands']['p99_ms']} ms")

    def _memory(self) -> None:
        s = self.settings
        target = self.target
        self.say(f"{target.name}: connecting {s.fleet_devices} idle devices")
        broker = target.broker_pid()
        rss_before = rss_kib(broker)
        connect_started = time.monotonic()
        shards = _share(target.idle, s.idle_workers)
        plan = FleetPlan(
            keepalive=60, concurrency=max(1, s.connect_concurrency // len(shards)), budget=s.connect_budget
        )
        self._idle = [Worker(f"idle-{k}", idle_worker, target.endpoint, shard, plan) for k, shard in enumerate(shards)]
        reports: list[IdleReport] = [w.receive(s.connect_budget + 180) for w in self._idle]
        connected = sum(r.connected for r in reports)
        connect_seconds = time.monotonic() - connect_started
        time.sleep(5)  # let the broker settle (buffers, registry lookups) before reading its RSS
        rss_after = rss_kib(broker)
        failures: dict[str, int] = {}
        for report in reports:
            for why, count in report.failures.items():
                failures[why] = failures.get(why, 0) + count
        self.figures["memory"] = {
            "idle_connections": connected,
            "failed_attempts": failures,
            "given_up": sum(r.given_up for r in reports),
            "connect_seconds": round(connect_seconds, 1),
            "rss_kib_before": rss_before,
            "rss_kib_after": rss_after,
            "kib_per_connection": round((rss_after - rss_before) / connected, 1) if connected else None,
        }
        self.say(
            f"  {connected} connected in {connect_seconds:.0f} s (failed attempts: {failures or 'none'}), "
            f"{self.figures['memory']['kib_per_connection']} KiB each"
        )

    def _baseline(self) -> None:
        """The active devices alone again, just before the fleet connects: the fleet's rate is
        compared with this too, at the same database size (by then the earlier phases have
        stored about 700,000 observations, and a bigger database alone makes ingest slower)."""
        s = self.settings
        self.say(
            f"{self.target.name}: ingest with {s.active_devices} connected, before the fleet, {s.fleet_duration:.0f} s"
        )
        self.figures["fleet_baseline"] = self._closed_loop("baseline", s.fleet_duration)
        self.say(f"  {self.figures['fleet_baseline']['rate_msg_s']} msg/s")

    def _fleet(self) -> None:
        s = self.settings
        for worker in self._idle:
            worker.send(IdleStatus())
        connected = sum(w.receive(60).open for w in self._idle) + s.active_devices
        self.say(f"{self.target.name}: ingest with {connected} connected, {s.fleet_duration:.0f} s")
        fleet = self._closed_loop("fleet", s.fleet_duration)
        for worker in self._idle:
            worker.send(IdleStatus())
        fleet["connected_at_start"] = connected
        fleet["connected"] = sum(w.receive(60).open for w in self._idle) + s.active_devices
        base = self.figures.get("ingest", {}).get("rate_msg_s")
        fleet["ratio_to_active_only"] = round(fleet["rate_msg_s"] / base, 3) if base else None
        before = self.figures.get("fleet_baseline", {}).get("rate_msg_s")
        fleet["ratio_to_baseline"] = round(fleet["rate_msg_s"] / before, 3) if before else None
        self.figures["fleet"] = fleet
        self.say(
            f"  {fleet['rate_msg_s']} msg/s: {fleet['ratio_to_active_only']} of the first ingest run's rate, "
            f"{fleet['ratio_to_baseline']} of the rate with {s.active_devices} just before the fleet connected"
        )

    def _stored(self) -> None:
        counting = time.monotonic()
        stored = self.target.stored()
        self.figures["count_seconds"] = round(time.monotonic() - counting, 1)
        expected = OBSERVATIONS_PER_MESSAGE * self.sent_total
        self.figures["stored"] = {
            "messages_sent": self.sent_total,
            "observations_expected": expected,
            "observations_stored": stored.observations,
            "distinct_ids": stored.distinct,
            "lost": expected - stored.distinct,
            "duplicated": stored.observations - stored.distinct,
        }
        self.say(f"  stored {stored.observations} of {expected} observations, {stored.distinct} distinct")

    def close(self) -> None:
        for worker in [*self._idle, *self._devices]:
            worker.stop()
        self.target.stop()


def run_target(
    target: Target, settings: Settings, say: Callable[[str], None], checkpoint: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Runs every phase against `target`; `checkpoint` gets the figures so far between phases."""
    run = Run(target, settings, say, lambda: checkpoint(run.figures))
    try:
        run.execute()
    except Exception:
        run.figures["error"] = traceback.format_exc()
        say(f"{target.name}: FAILED\n{run.figures['error']}")
    finally:
        run.close()
    return run.figures


# figure, goal text, path in a target's figures, goal check (None: shown, no goal)
Row = tuple[str, str, tuple[str, ...], Callable[[float], bool] | None]


def rows(settings: Settings) -> list[Row]:
    s = settings
    active = s.active_devices
    return [
        (
            f"ingest msg/s (closed loop, {active} dev, {s.ingest_duration:.0f} s)",
            ">= 2000",
            ("ingest", "rate_msg_s"),
            lambda v: v >= 2000,
        ),
        ("  slowest second msg/s", "", ("ingest", "slowest_second_msg_s"), None),
        ("  messages unacked", "0", ("ingest", "unacked"), lambda v: v == 0),
        ("observations lost (database, all runs)", "0", ("stored", "lost"), lambda v: v == 0),
        ("observations duplicated (database)", "0", ("stored", "duplicated"), lambda v: v == 0),
        (f"ack latency p50 ms @ {s.latency_rate:.0f} msg/s", "", ("latency", "p50_ms"), None),
        (f"ack latency p99 ms @ {s.latency_rate:.0f} msg/s", "<= 250", ("latency", "p99_ms"), lambda v: v <= 250),
        ("ingest msg/s with the idle fleet", "", ("fleet", "rate_msg_s"), None),
        ("  devices connected", "", ("fleet", "connected"), None),
        (
            f"  fleet rate / first ingest run ({active})",
            ">= 0.80",
            ("fleet", "ratio_to_active_only"),
            lambda v: v >= 0.8,
        ),
        (f"  msg/s with {active}, just before the fleet", "", ("fleet_baseline", "rate_msg_s"), None),
        ("  fleet rate / rate just before", ">= 0.80", ("fleet", "ratio_to_baseline"), lambda v: v >= 0.8),
        (f"command round trip p50 ms @ {s.command_rate:.0f}/s", "<= 20", ("commands", "p50_ms"), lambda v: v <= 20),
        (f"command round trip p99 ms @ {s.command_rate:.0f}/s", "<= 100", ("commands", "p99_ms"), lambda v: v <= 100),
        ("  created -> at the device p50 ms", "", ("commands", "to_device_p50_ms"), None),
        ("  created -> at the device p99 ms", "", ("commands", "to_device_p99_ms"), None),
        ("  device -> seen COMPLETED p50 ms", "", ("commands", "device_to_visible_p50_ms"), None),
        ("  device -> seen COMPLETED p99 ms", "", ("commands", "device_to_visible_p99_ms"), None),
        ("  due -> created (REST in) p50 ms", "", ("commands", "due_to_created_p50_ms"), None),
        ("  created -> COMPLETED stored p50 ms", "", ("commands", "created_to_completed_p50_ms"), None),
        ("  stored -> seen (REST out) p50 ms", "", ("commands", "completed_to_seen_p50_ms"), None),
        ("  commands unanswered", "0", ("commands", "unanswered"), lambda v: v == 0),
        ("RSS KiB per idle TLS connection", "<= 40", ("memory", "kib_per_connection"), lambda v: v <= 40),
        ("  idle connections measured", "", ("memory", "idle_connections"), None),
        ("  seconds to connect them (with retries)", "", ("memory", "connect_seconds"), None),
        ("  devices given up", "0", ("memory", "given_up"), lambda v: v == 0),
    ]


def _lookup(figures: dict[str, Any] | None, path: tuple[str, ...]) -> float | None:
    value: Any = figures
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, int | float) else None


def _text(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def table(settings: Settings, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The comparison rows (also written to the JSON file)."""
    out = []
    for figure, goal, path, check in rows(settings):
        medmesh = _lookup(results.get("medmesh"), path)
        other = _lookup(results.get("mosquitto"), path)
        ratio = round(medmesh / other, 2) if medmesh is not None and other else None
        met = None if check is None or medmesh is None else check(medmesh)
        out.append(
            {
                "figure": figure,
                "goal": goal,
                "medmesh": medmesh,
                "mosquitto": other,
                "ratio": ratio,
                "medmesh_meets_goal": met,
            }
        )
    return out


def render(settings: Settings, results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'figure':46} {'goal':>8} {'medmesh':>12} {'mosquitto':>10} {'ratio':>7}"]
    for row in table(settings, results):
        mark = {True: " ok", False: " MISS", None: ""}[row["medmesh_meets_goal"]]
        lines.append(
            f"{row['figure']:46} {row['goal']:>8} {_text(row['medmesh']) + mark:>12} "
            f"{_text(row['mosquitto']):>10} {_text(row['ratio']):>7}"
        )
    for name, figures in results.items():
        ingest = figures.get("ingest")
        if not ingest:
            continue
        lines.append("")
        lines.append(f"where the time goes, {name} ingest run (CPU seconds; cores busy on average):")
        for process, seconds in sorted(ingest["cpu_seconds"].items(), key=lambda item: -item[1]):
            lines.append(f"  {process:42} {seconds:8.1f} s {ingest['cpu_cores'][process]:6.2f} cores")
    for name, figures in results.items():
        for phase in ("ingest", "fleet"):
            other = figures.get(phase, {}).get("cpu_cores", {}).get(OTHER_WORK, 0.0)
            if other > 0.2:
                lines.append(
                    f"\nWARNING: during the {name} {phase} run other work on this machine used {other} cores:"
                    " that run's figures are understated; run again on a quiet machine."
                )
        if "error" in figures:
            lines.append(f"\n{name} FAILED: {figures['error'].strip().splitlines()[-1]}")
        for phase, failure in figures.get("failures", {}).items():
            lines.append(f"\n{name} {phase} FAILED: {failure.strip().splitlines()[-1]}")
    return "\n".join(lines)


def settings_dict(settings: Settings) -> dict[str, Any]:
    return asdict(settings)
