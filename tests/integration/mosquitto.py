"""The Mosquitto broker and clients put into build/mosquitto/ by tools/install-mosquitto.sh.

The programs are Debian's, extracted rather than installed, so they need the extracted libraries
on LD_LIBRARY_PATH: run `binary(...)` with `environment()`. (The wrappers in build/mosquitto/bin/
do the same for a shell.)
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO_DIR = Path(os.environ.get("MOSQUITTO_DIR", REPO_ROOT / "build" / "mosquitto"))
INSTALLER = REPO_ROOT / "tools" / "install-mosquitto.sh"
_LOCATIONS = {"mosquitto": "usr/sbin", "mosquitto_pub": "usr/bin", "mosquitto_sub": "usr/bin"}


def install() -> None:
    """Installs Mosquitto if it is not there yet (a no-op taking milliseconds when it is)."""
    subprocess.run([str(INSTALLER)], check=True, env={**os.environ, "MOSQUITTO_DIR": str(MOSQUITTO_DIR)})


def binary(name: str) -> Path:
    """The program itself (not the wrapper), so its pid is the broker's: `mosquitto`, `mosquitto_pub`..."""
    return MOSQUITTO_DIR / "root" / _LOCATIONS[name] / name


def environment() -> dict[str, str]:
    """os.environ plus the extracted libraries on LD_LIBRARY_PATH."""
    libraries = sorted({str(path.parent) for path in (MOSQUITTO_DIR / "root").rglob("*.so*")})
    inherited = os.environ.get("LD_LIBRARY_PATH", "")
    return {**os.environ, "LD_LIBRARY_PATH": ":".join([*libraries, *([inherited] if inherited else [])])}
