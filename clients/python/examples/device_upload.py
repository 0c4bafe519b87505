"""Upload a file from a device: the SDK asks for pre-signed URLs over MQTT, PUTs the bytes over
HTTPS straight to object storage (in parts for large files), then completes the upload; the
platform checks size and SHA-256 before the file becomes AVAILABLE.

    .venv/bin/python clients/python/examples/device_upload.py SN-0042 recording.bin \\
        --cert SN-0042.crt --key SN-0042.key

The local object store's HTTPS endpoint uses the platform CA too (`.medmesh/tls/ca.crt`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

from medmesh_device import DeviceClient, UploadError

ROOT = Path(__file__).resolve().parents[3]


async def main(args: argparse.Namespace) -> int:
    device = DeviceClient.with_certificate(
        args.device, args.host, args.port, ca_file=args.ca, cert_file=args.cert, key_file=args.key
    )
    async with device:
        await device.wait_connected(timeout=30)
        size = args.file.stat().st_size
        print(f"connected; uploading {args.file} ({size} bytes)")
        began = time.monotonic()
        try:
            async with asyncio.timeout(args.timeout):
                name = await device.upload_file(args.file, content_type=args.content_type, session=args.session)
        except UploadError as error:
            print(f"upload refused: {error.reason}: {error.description}")
            return 1
        seconds = time.monotonic() - began
        print(f"{name} is AVAILABLE ({seconds:.1f} s, {size / max(seconds, 1e-9) / 1e6:.1f} MB/s)")
        return 0


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("device", help="the device id (client id and certificate CN)")
    parser.add_argument("file", type=Path)
    parser.add_argument("--content-type", default="application/octet-stream")
    parser.add_argument("--session", help="the usage session the file belongs to")
    parser.add_argument("--host", default=os.environ.get("MEDMESH_MQTT_HOST", "localhost"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("MEDMESH_MQTT_PORT", "8883")))
    parser.add_argument("--ca", type=Path, default=Path(os.environ.get("MEDMESH_CA", ROOT / ".medmesh/tls/ca.crt")))
    parser.add_argument("--cert", type=Path, help="the device certificate (default <device>.crt)")
    parser.add_argument("--key", type=Path, help="its private key (default <device>.key)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole upload")
    args = parser.parse_args()
    args.cert = args.cert or Path(f"{args.device}.crt")
    args.key = args.key or Path(f"{args.device}.key")
    return args


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(arguments())))
