"""The device topic tree (docs/device-protocol.md, section 2): who may use which topic.

Pure functions, no I/O. Every topic a device uses is under `devices/{device}/`; the client id
is the device id, or `{device}:{tag}` for an auxiliary connection of the same device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

DEVICE_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_CLIENT_ID = re.compile(rf"^(?P<device>{DEVICE_ID})(?::(?P<tag>[A-Za-z0-9_-]{{1,23}}))?$")
_COMMAND_ID = re.compile(r"^[a-z0-9-]{1,63}$")


class Uplink(StrEnum):
    """What a device publishes (device -> cloud)."""

    OBSERVATIONS = "observations"
    STATUS = "status"
    CONFIG_REPORTED = "config/reported"
    COMMAND_STATUS = "commands/status"
    FILE_REQUESTS = "files/requests"


class Downlink(StrEnum):
    """What the cloud publishes to a device (cloud -> device)."""

    ACKS = "acks"
    ERRORS = "errors"
    CONFIG_DESIRED = "config/desired"
    COMMANDS = "commands"
    FILE_RESPONSES = "files/responses"


@dataclass(frozen=True)
class ClientId:
    device_id: str
    tag: str  # empty for the device's own (primary) connection

    @property
    def device(self) -> str:
        """The resource name, `devices/{device}`."""
        return f"devices/{self.device_id}"

    @property
    def primary(self) -> bool:
        return not self.tag


def parse_client_id(client_id: str | None) -> ClientId | None:
    match = _CLIENT_ID.match(client_id or "")
    if match is None:
        return None
    return ClientId(match["device"], match["tag"] or "")


@dataclass(frozen=True)
class UplinkTopic:
    kind: Uplink
    command_id: str = ""  # for COMMAND_STATUS


def prefix(device_id: str) -> str:
    return f"devices/{device_id}/"


def parse_uplink(device_id: str, topic: str) -> UplinkTopic | None:
    """The uplink a publish is, or None when the device may not publish there."""
    own = prefix(device_id)
    if not topic.startswith(own):
        return None
    rest = topic[len(own) :]
    for kind in (Uplink.OBSERVATIONS, Uplink.STATUS, Uplink.CONFIG_REPORTED, Uplink.FILE_REQUESTS):
        if rest == kind.value:
            return UplinkTopic(kind)
    parts = rest.split("/")
    if len(parts) == 3 and parts[0] == "commands" and parts[2] == "status" and _COMMAND_ID.match(parts[1]):
        return UplinkTopic(Uplink.COMMAND_STATUS, parts[1])
    return None


def downlink_topic(device_id: str, kind: Downlink) -> str:
    return prefix(device_id) + kind.value


def may_subscribe(device_id: str, topic_filter: str) -> bool:
    """A device subscribes only under its own prefix, with wildcards only below it."""
    own = prefix(device_id)
    if topic_filter == f"devices/{device_id}/#":
        return True
    if not topic_filter.startswith(own):
        return False
    levels = topic_filter[len(own) :].split("/")
    for index, level in enumerate(levels):
        if level == "#":
            return index == len(levels) - 1
        if ("#" in level or "+" in level) and level != "+":
            return False
    return all(levels)


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 topic matching (section 4.7), for one device's few subscriptions."""
    if topic_filter == topic:
        return True
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels) or (level != "+" and level != topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)
