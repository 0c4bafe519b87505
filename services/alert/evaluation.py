"""Evaluation of threshold rules on ingest: the I/O around the pure `domain.step`.

The observation service calls this with every batch it stores, so it must stay cheap: the
enabled rules of an organization are cached for a couple of seconds (a rule change takes effect
within that time), and each (rule, device) costs one state read and at most one state write per
batch, plus the alert writes when something is raised or cleared.

Concurrency: batches for the same device are serialized within a process by a striped lock.
Across processes the rule state is last-writer-wins (FerretDB has no atomic conditional update),
which at worst re-evaluates a few samples; it never yields a second active alert, because the
alert insert itself is guarded by the unique `active_key` (measured: 30 concurrent calls over two
instances, 10 rounds, never more than one). What it can cost, when one device's violating and
recovering batches are evaluated at the same moment by two instances, is a missed automatic clear:
the alert then stays active until a person clears it or the rule's next episode ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from medmesh.runtime.audit import AuditTrail, audit
from medmesh.runtime.auth import current_principal
from medmesh.runtime.errors import AlreadyExists, PermissionDenied
from medmesh.runtime.filtering import Condition
from medmesh.runtime.resources import ResourceStore
from services.alert.domain import (
    Action,
    Alert,
    AlertRule,
    AlertState,
    RuleState,
    Sample,
    automatic_clear_note,
    cleared_by_rule,
    episode_closed,
    raised_alert,
    require_sample,
    rule_key,
    samples_by_device,
    step,
)
from services.alert.ports import AlertStore, RuleStateStore

# Evaluation reads at most this many enabled rules per organization (creation stops there too).
MAX_RULES_PER_ORGANIZATION = 200
RULE_CACHE_SECONDS = 2.0
_LOCK_STRIPES = 64


class RuleCache:
    """The enabled rules of each organization, read at most once per `max_age` seconds."""

    def __init__(
        self,
        store: ResourceStore[AlertRule],
        max_age: float = RULE_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._max_age = max_age
        self._clock = clock
        self._entries: dict[str, tuple[float, tuple[AlertRule, ...]]] = {}

    async def enabled_rules(self, organization: str) -> tuple[AlertRule, ...]:
        entry = self._entries.get(organization)
        if entry is not None and self._clock() - entry[0] < self._max_age:
            return entry[1]
        read_at = self._clock()
        conditions = [Condition("organization", True, organization), Condition("enabled", True, True)]
        rules = tuple(await self._store.list(conditions, None, MAX_RULES_PER_ORGANIZATION))
        self._entries[organization] = (read_at, rules)
        return rules

    def forget(self, organization: str) -> None:
        """Called on a rule change in this process, so it applies here at once (elsewhere within max_age)."""
        self._entries.pop(organization, None)


@dataclass
class Evaluation:
    raised: list[Alert] = field(default_factory=list)
    cleared: list[Alert] = field(default_factory=list)


class RuleEvaluator:
    def __init__(self, rules: RuleCache, alerts: AlertStore, states: RuleStateStore, trail: AuditTrail) -> None:
        self._rules = rules
        self._alerts = alerts
        self._states = states
        self._trail = trail
        self._locks = [asyncio.Lock() for _ in range(_LOCK_STRIPES)]

    async def evaluate(self, samples: Sequence[Sample]) -> Evaluation:
        principal = current_principal()
        if not principal.is_internal:
            # The authenticator admits this method only with the mesh credential; checked again here.
            raise PermissionDenied(
                "only services inside the mesh may submit observations for evaluation", reason="INTERNAL_ONLY"
            )
        checked = [require_sample(sample, f"samples[{index}]") for index, sample in enumerate(samples)]
        result = Evaluation()
        for (organization, device), group in samples_by_device(checked):
            for rule in await self._rules.enabled_rules(organization):
                relevant = [s for s in group if s.metric == rule.metric]
                if relevant and rule.watches(device):
                    key = rule_key(rule.name, device)
                    async with self._locks[hash(key) % _LOCK_STRIPES]:
                        await self._evaluate(rule, device, relevant, result)
        return result

    async def _evaluate(self, rule: AlertRule, device: str, samples: list[Sample], result: Evaluation) -> None:
        stored = await self._states.get(rule_key(rule.name, device))
        state = stored or RuleState(rule=rule.name, device=device, organization=rule.organization)
        if state.active_alert:
            active = await self._alerts.get(state.active_alert)
            if active is None or active.state is AlertState.CLEARED:
                state = episode_closed(state)
        for sample in samples:
            state, action = step(rule, state, sample)
            if action is Action.RAISE:
                state = await self._raise(rule, state, sample, result)
            elif action is Action.CLEAR:
                state = await self._clear(rule, state, sample, result)
        if state != stored:
            await self._states.save(state)

    async def _raise(self, rule: AlertRule, state: RuleState, sample: Sample, result: Evaluation) -> RuleState:
        alert = raised_alert(rule, sample)
        try:
            await self._alerts.insert(alert)
        except AlreadyExists:
            # Another evaluation raised it first (the unique active_key): adopt that alert.
            existing = await self._alerts.find_active(alert.active_key)
            return replace(state, active_alert=existing.id if existing else "")
        await audit(self._trail, alert.organization, alert.name, description=f"alert raised by rule {rule.name}")
        result.raised.append(alert)
        return replace(state, active_alert=alert.id)

    async def _clear(self, rule: AlertRule, state: RuleState, sample: Sample, result: Evaluation) -> RuleState:
        alert = await self._alerts.get(state.active_alert)
        state = replace(state, active_alert="")
        if alert is None or alert.state is AlertState.CLEARED:
            return state
        cleared = alert.cleared(cleared_by_rule(rule), automatic_clear_note(rule, sample), sample.time)
        # Losing this race means someone cleared it in between: nothing left to do.
        if await self._alerts.replace(cleared, alert.revision):
            await audit(self._trail, alert.organization, alert.name, description=f"alert cleared by rule {rule.name}")
            result.cleared.append(cleared)
        return state
