"""Telling a connected device about a command change right away, through the MQTT adapter.

The command service calls `CommandNotifier.command_changed` after a command is created (a
session's commands included), canceled or asked to stop. `AdapterCommandNotifier` tells the
adapter instance that holds the device's connection (`medmesh.runtime.adapters`), which then
calls `CommandInternalService.ListPendingCommands` and publishes what it lists. A device still
gets everything when it (re)connects, because the pending list, not the notification, is the
source of truth: a notification may be lost; it is a hint, never the delivery itself.
`NoCommandNotifier` does nothing (a service wired without adapters, and unit tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from medmesh.runtime.adapters import PENDING_COMMANDS, AdapterNotifier
from services.command.domain import Command, CommandState


class CommandNotifier(Protocol):
    async def command_changed(self, command: Command) -> None:
        """Best effort and quick: the caller does not wait for the device."""


class NoCommandNotifier:
    async def command_changed(self, command: Command) -> None:
        return None


class AdapterCommandNotifier:
    """Notifies in the background, so creating a command over REST is not held up by the lookup
    of the device's connection and the call to its adapter. Several changes to one device's
    commands while a notification is in flight make one more notification, not one each."""

    def __init__(self, notifier: AdapterNotifier, to_pb: Callable[[Command], Any]) -> None:
        self._notifier = notifier
        self._to_pb = to_pb  # the servicer's translation (medmesh.command.v1.Command)

    async def command_changed(self, command: Command) -> None:
        if command.state is CommandState.PENDING and command.revision == 1:
            # Just created: the adapter publishes it as it is, without listing what is pending.
            self._notifier.notify_soon(command.device, PENDING_COMMANDS, commands=[self._to_pb(command)])
        else:
            self._notifier.notify_soon(command.device, PENDING_COMMANDS)
