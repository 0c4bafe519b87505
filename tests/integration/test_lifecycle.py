"""The launcher itself: status, down leaving nothing behind, data surviving a restart."""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from medmesh.launcher.components import SERVICES
from medmesh.launcher.supervisor import pid_alive
from tests.integration.platform import MEDMESH, Platform, new_platform

COMPONENTS = ("ferretdb", "seaweedfs", *(name for name, _ in SERVICES), "mqtt_adapter", "gateway")


def test_up_status_down_up_keeps_data_and_leaves_no_process(tmp_path: Path) -> None:
    platform = new_platform(tmp_path / "state")
    platform.up()
    try:
        status = platform.cli("status")
        assert status.returncode == 0, status.stdout
        for component in COMPONENTS:
            assert f"{component}" in status.stdout
        assert "unhealthy" not in status.stdout

        again = platform.cli("up", "--detach")
        assert again.returncode == 1
        assert "already running" in again.stdout

        context = ssl.create_default_context(cafile=str(platform.ca))
        admin = {"authorization": f"Bearer {platform.admin_token()}"}
        with httpx.Client(base_url=platform.gateway, verify=context, timeout=10, headers=admin) as rest:
            created = rest.post("/v1/organizations", json={"display_name": "Survives restarts"})
            assert created.status_code == 200
            name = created.json()["name"]
    finally:
        leftovers = platform.down()
    assert leftovers == []
    assert platform.cli("status").returncode == 3

    platform.up()
    try:
        # The admin, its password and the signing keys survived too: a new login works.
        admin = {"authorization": f"Bearer {platform.admin_token()}"}
        with httpx.Client(base_url=platform.gateway, verify=context, timeout=10, headers=admin) as rest:
            fetched = rest.get(f"/v1/{name}")
            assert fetched.status_code == 200
            assert fetched.json()["display_name"] == "Survives restarts"
    finally:
        assert platform.down() == []


def test_a_component_that_fails_to_start_is_named_with_its_log(tmp_path: Path) -> None:
    platform = new_platform(tmp_path / "state")
    # An external MongoDB that does not exist: the services never become healthy.
    platform.env["MEDMESH_MONGODB_URI"] = "mongodb://127.0.0.1:9/"
    platform.env["MEDMESH_HEALTH_INTERVAL_SECONDS"] = "0.5"
    # Long enough for every service (eleven Python processes on two cores) to log its failed check.
    platform.env["MEDMESH_START_TIMEOUT_SECONDS"] = "20"
    result = platform.cli("up", "--detach", timeout=180)
    assert result.returncode == 1
    # The services start together; whichever is reported first is named, with its own log's tail.
    failed = re.search(
        rf"medmesh: ({'|'.join(name for name, _ in SERVICES)}|mqtt_adapter) failed to start: not healthy",
        result.stdout,
    )
    assert failed, result.stdout
    assert f"--- last lines of {platform.state_dir / 'logs' / failed.group(1)}.log ---" in result.stdout
    assert "readiness check failed" in result.stdout
    status = json.loads((platform.state_dir / "platform.json").read_text())
    assert status["state"] == "failed"
    for component in status["components"]:
        assert not pid_alive(component["pid"]), component


@pytest.mark.parametrize("port_name", ["gateway"])
def test_a_busy_port_is_reported_before_anything_starts(tmp_path: Path, port_name: str) -> None:
    platform = new_platform(tmp_path / "state")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", platform.config.port(port_name)))
        squatter.listen()
        result = platform.cli("up", "--detach", timeout=60)
    assert result.returncode == 1
    assert f"port {platform.config.port(port_name)}" in result.stdout
    assert "already in use" in result.stdout


def test_external_mongodb_and_s3_replace_the_embedded_ones(
    platform: Platform, tmp_path: Path, admin_token: str
) -> None:
    """A second platform pointed at the first one's stores starts no FerretDB or SeaweedFS of its own."""
    credentials = platform.config.s3_credentials()
    second = new_platform(tmp_path / "state")
    second.env.update(
        MEDMESH_MONGODB_URI=platform.config.mongodb_uri,
        MEDMESH_S3_ENDPOINT=platform.config.s3_endpoint,
        MEDMESH_S3_ACCESS_KEY=credentials.access_key,
        MEDMESH_S3_SECRET_KEY=credentials.secret_key,
    )
    second.up()
    try:
        status = json.loads((second.state_dir / "platform.json").read_text())
        names = [c["name"] for c in status["components"]]
        assert names == [*(name for name, _ in SERVICES), "mqtt_adapter", "gateway"]
        context = ssl.create_default_context(cafile=str(platform.ca))
        # Same identity database, so the same users and signing keys: the first platform's token works.
        admin = {"authorization": f"Bearer {admin_token}"}
        second_context = ssl.create_default_context(cafile=str(second.ca))
        with (
            httpx.Client(base_url=second.gateway, verify=second_context, headers=admin) as other,
            httpx.Client(base_url=platform.gateway, verify=context, headers=admin) as first,
        ):
            created = other.post("/v1/organizations", json={"display_name": "Written through the second platform"})
            assert created.status_code == 200
            # Same database: the first platform's services read what the second one wrote.
            assert first.get(f"/v1/{created.json()['name']}").status_code == 200
    finally:
        assert second.down() == []


def _foreground_up(platform: Platform) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*MEDMESH, "up"], env=platform.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _read_until(process: subprocess.Popen[str], marker: str) -> str:
    assert process.stdout is not None
    seen = ""
    for line in process.stdout:
        seen += line
        if marker in line:
            return seen
    raise AssertionError(f"{marker!r} never appeared:\n{seen}")


@pytest.mark.parametrize("when", ["running", "starting"])
def test_ctrl_c_stops_everything(tmp_path: Path, when: str) -> None:
    platform = new_platform(tmp_path / "state")
    process = _foreground_up(platform)
    try:
        _read_until(process, "medmesh: up in" if when == "running" else "starting organization")
        pids = platform.recorded_pids()[1:]
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == (0 if when == "running" else 130), rest
    assert "stopped  ferretdb" in rest
    assert [pid for pid in pids if pid_alive(pid)] == []
