"""Telling a connected device about a command change right away: the MQTT adapter's job.

The command service calls `CommandNotifier.command_changed` after a command is created (a
session's commands included), canceled or asked to stop. The adapter that holds the device's
connection then calls `CommandInternalService.ListPendingCommands` and publishes what it lists.
Until the adapter provides an implementation, `NoCommandNotifier` does nothing: a device still
gets everything when it (re)connects, because the pending list, not the notification, is the
source of truth. A notification may be lost; it is a hint, never the delivery itself.
"""

from __future__ import annotations

from typing import Protocol

from services.command.domain import Command


class CommandNotifier(Protocol):
    async def command_changed(self, command: Command) -> None:
        """Best effort and quick: the caller does not wait for the device."""


class NoCommandNotifier:
    async def command_changed(self, command: Command) -> None:
        return None
