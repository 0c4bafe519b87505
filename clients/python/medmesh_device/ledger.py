"""Which commands this device has acted on, so each id is acted on once (protocol 4.4).

A command may arrive more than once (after a reconnect, or from two adapters). The ledger
remembers the last `capacity` ids and how each ended; a repeat of a finished command gets its
final report again (repeating a report is harmless and heals a lost one), never a second run.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


class CommandPhase(enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"  # reported COMPLETED or FAILED
    DROPPED = "dropped"  # canceled, or over on the platform's side: nothing more to report


@dataclass
class CommandRecord:
    phase: CommandPhase
    final_report: dict[str, Any] | None = None


class CommandLedger:
    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._records: OrderedDict[str, CommandRecord] = OrderedDict()

    def __contains__(self, command_id: object) -> bool:
        return command_id in self._records

    def get(self, command_id: str) -> CommandRecord | None:
        return self._records.get(command_id)

    def start(self, command_id: str) -> bool:
        """Records a run; False when the id was acted on before (do not run it again)."""
        if command_id in self._records:
            return False
        self._set(command_id, CommandRecord(CommandPhase.RUNNING))
        return True

    def finish(self, command_id: str, report: dict[str, Any]) -> None:
        record = self._records.get(command_id)
        if record is None or record.phase is CommandPhase.RUNNING:
            self._set(command_id, CommandRecord(CommandPhase.FINISHED, report))

    def drop(self, command_id: str) -> None:
        """Canceled or over: never run it, and stop reporting it."""
        self._set(command_id, CommandRecord(CommandPhase.DROPPED))

    def _set(self, command_id: str, record: CommandRecord) -> None:
        self._records[command_id] = record
        self._records.move_to_end(command_id)
        while len(self._records) > self.capacity:
            # The oldest that is over; a running command is never forgotten.
            victim = next((i for i, r in self._records.items() if r.phase is not CommandPhase.RUNNING), None)
            if victim is None:
                break
            del self._records[victim]
