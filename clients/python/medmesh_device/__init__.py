"""medmesh device SDK (asyncio): a device's MQTT connection to medmesh, per docs/device-protocol.md.

    from medmesh_device import DeviceClient, Observation

    async with DeviceClient.with_certificate("SN-1", "localhost", 8883, ca_file="ca.crt",
                                             cert_file="SN-1.crt", key_file="SN-1.key") as device:
        await device.wait_connected(timeout=30)
        results = await device.send_observations([Observation("heart_rate", 72, unit="/min")])

See `DeviceClient` for commands, configuration, status and file uploads.
"""

from medmesh_device.backoff import Backoff
from medmesh_device.client import CommandHandler, ConfigHandler, Counters, DeviceClient, ErrorHandler
from medmesh_device.errors import (
    ClientClosed,
    CloudError,
    ConnectionLost,
    ConnectionRefused,
    DeviceError,
    HandlerError,
    InvalidMessage,
    MalformedCloudMessage,
    NotAuthorized,
    OutboxFull,
    Rejection,
    ServerUnavailable,
    SubscriptionRefused,
    UploadError,
)
from medmesh_device.outbox import ObservationResult, Outcome
from medmesh_device.protocol import Command, Observation, Waveform

__all__ = [
    "Backoff",
    "ClientClosed",
    "CloudError",
    "Command",
    "CommandHandler",
    "ConfigHandler",
    "ConnectionLost",
    "ConnectionRefused",
    "Counters",
    "DeviceClient",
    "DeviceError",
    "ErrorHandler",
    "HandlerError",
    "InvalidMessage",
    "MalformedCloudMessage",
    "NotAuthorized",
    "Observation",
    "ObservationResult",
    "OutboxFull",
    "Outcome",
    "Rejection",
    "ServerUnavailable",
    "SubscriptionRefused",
    "UploadError",
    "Waveform",
]
