"""What the alert service's use cases need of the world: its stores (the device service's port,
`DeviceDirectory`, is shared: `medmesh.runtime.directories`).

The repositories implement the stores over MongoDB; the unit tests provide in-memory fakes of each.
"""

from __future__ import annotations

from typing import Protocol

from medmesh.runtime.resources import ResourceStore
from services.alert.domain import Alert, RuleState


class AlertStore(ResourceStore[Alert], Protocol):
    """Alerts; `insert` raises AlreadyExists when the alert's `active_key` is taken (one active alert
    per rule and device), and `list` is newest first."""

    async def find_active(self, active_key: str) -> Alert | None: ...


class RuleStateStore(Protocol):
    """Where each (rule, device) stands; writes are last-writer-wins, which the design tolerates."""

    async def get(self, state_id: str) -> RuleState | None: ...
    async def save(self, state: RuleState) -> None: ...
    async def delete_for_rule(self, rule: str) -> None: ...
