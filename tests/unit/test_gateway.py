"""gateway/envoy.yaml and its renderer, checked by the real Envoy binary."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from medmesh.launcher.gateway import envoy_binary, envoy_command, render_envoy_config
from medmesh.launcher.tls import LocalPki, ensure_local_pki

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "gateway" / "envoy.yaml"
DESCRIPTOR = ROOT / "build" / "proto" / "medmesh.binpb"
ENVOY_TIMEOUT = 60.0

needs_descriptor = pytest.mark.skipif(
    not DESCRIPTOR.is_file(),
    reason=f"{DESCRIPTOR.relative_to(ROOT)} missing: run `python tools/protogen.py` first",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _validate(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(config), "--log-level", "warn"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=ENVOY_TIMEOUT,
        check=False,
    )


def _listener(config: dict[str, Any], name: str = "https") -> dict[str, Any]:
    (listener,) = [item for item in config["static_resources"]["listeners"] if item["name"] == name]
    assert isinstance(listener, dict)
    return listener


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    (chain,) = _listener(config)["filter_chains"]
    (hcm,) = chain["filters"]
    typed_config: dict[str, Any] = hcm["typed_config"]
    return typed_config


def _tls_params(config: dict[str, Any]) -> dict[str, Any]:
    (chain,) = _listener(config)["filter_chains"]
    params: dict[str, Any] = chain["transport_socket"]["typed_config"]["common_tls_context"]["tls_params"]
    return params


def _endpoint(config: dict[str, Any], cluster_name: str) -> dict[str, Any]:
    (cluster,) = (c for c in config["static_resources"]["clusters"] if c["name"] == cluster_name)
    (group,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = group["lb_endpoints"]
    socket_address: dict[str, Any] = endpoint["endpoint"]["address"]["socket_address"]
    return socket_address


@pytest.fixture
def pki(tmp_path: Path) -> LocalPki:
    return ensure_local_pki(tmp_path / "tls")


@pytest.fixture
def ports() -> dict[str, int]:
    return {name: _free_port() for name in ("listen", "admin", "organization", "device")}


@pytest.fixture
def rendered(tmp_path: Path, pki: LocalPki, ports: dict[str, int]) -> Path:
    return render_envoy_config(
        SOURCE,
        tmp_path / "gateway" / "envoy.yaml",
        listen_host="127.0.0.1",
        listen_port=ports["listen"],
        admin_port=ports["admin"],
        upstreams={
            "organization": ("127.0.0.1", ports["organization"]),
            "device": ("127.0.0.1", ports["device"]),
        },
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        descriptor=DESCRIPTOR,
        ca_cert=pki.ca_cert,
    )


@needs_descriptor
def test_checked_in_config_validates_from_repository_layout(tmp_path: Path) -> None:
    # Envoy resolves the relative paths in gateway/envoy.yaml against its working directory:
    # give it a scratch "repository root" so the developer's .medmesh/ is not touched.
    ensure_local_pki(tmp_path / ".medmesh" / "tls")
    (tmp_path / "build" / "proto").mkdir(parents=True)
    (tmp_path / "build" / "proto" / DESCRIPTOR.name).symlink_to(DESCRIPTOR)

    result = _validate(SOURCE, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


@needs_descriptor
def test_rendered_config_validates(rendered: Path, tmp_path: Path) -> None:
    # A working directory without .medmesh/ or build/ proves every path was made absolute.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    result = _validate(rendered, cwd=elsewhere)

    assert result.returncode == 0, result.stderr


def test_rendered_config_has_requested_addresses_and_absolute_paths(
    rendered: Path, pki: LocalPki, ports: dict[str, int]
) -> None:
    config = yaml.safe_load(rendered.read_text())

    assert config["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": ports["admin"],
    }
    assert _listener(config)["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": ports["listen"],
    }
    assert _endpoint(config, "organization") == {
        "address": "127.0.0.1",
        "port_value": ports["organization"],
    }
    assert _endpoint(config, "device") == {"address": "127.0.0.1", "port_value": ports["device"]}
    (chain,) = _listener(config)["filter_chains"]
    (certificate,) = chain["transport_socket"]["typed_config"]["common_tls_context"]["tls_certificates"]
    assert certificate["certificate_chain"]["filename"] == str(pki.server_cert.resolve())
    assert certificate["private_key"]["filename"] == str(pki.server_key.resolve())
    (transcoder,) = (f for f in _hcm(config)["http_filters"] if f["name"].endswith("grpc_json_transcoder"))
    assert transcoder["typed_config"]["proto_descriptor"] == str(DESCRIPTOR.resolve())


def test_rendering_keeps_tls_13_and_everything_not_patched(rendered: Path) -> None:
    source = yaml.safe_load(SOURCE.read_text())
    config = yaml.safe_load(rendered.read_text())

    assert _tls_params(config) == {
        "tls_minimum_protocol_version": "TLSv1_3",
        "tls_maximum_protocol_version": "TLSv1_3",
    }
    assert _hcm(config)["route_config"] == _hcm(source)["route_config"]
    assert _hcm(config)["local_reply_config"] == _hcm(source)["local_reply_config"]
    assert [f["name"] for f in _hcm(config)["http_filters"]] == [
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]
    (jwt_filter,) = (f for f in _hcm(config)["http_filters"] if f["name"].endswith("jwt_authn"))
    (source_jwt,) = (f for f in _hcm(source)["http_filters"] if f["name"].endswith("jwt_authn"))
    assert jwt_filter["typed_config"]["rules"] == source_jwt["typed_config"]["rules"]
    originals = {c["name"]: c for c in source["static_resources"]["clusters"]}
    for cluster in config["static_resources"]["clusters"]:
        original = originals[cluster["name"]]
        assert cluster.get("health_checks") == original.get("health_checks")
        assert cluster.get("typed_extension_protocol_options") == original.get("typed_extension_protocol_options")


def test_rendered_jwks_fetch_goes_through_the_rendered_listener(
    rendered: Path, ports: dict[str, int], pki: LocalPki
) -> None:
    config = yaml.safe_load(rendered.read_text())
    (jwt_filter,) = (f for f in _hcm(config)["http_filters"] if f["name"].endswith("jwt_authn"))
    remote = jwt_filter["typed_config"]["providers"]["medmesh"]["remote_jwks"]
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    (group,) = clusters["jwks"]["load_assignment"]["endpoints"]
    (endpoint,) = group["lb_endpoints"]
    tls = clusters["jwks"]["transport_socket"]["typed_config"]["common_tls_context"]

    assert remote["http_uri"]["uri"] == f"https://localhost:{ports['listen']}/.well-known/jwks.json"
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": ports["listen"]}
    assert tls["validation_context"]["trusted_ca"] == {"filename": str(pki.ca_cert.resolve())}


def test_source_routes_each_grpc_service_to_its_cluster() -> None:
    source = yaml.safe_load(SOURCE.read_text())
    (transcoder,) = (f for f in _hcm(source)["http_filters"] if f["name"].endswith("grpc_json_transcoder"))
    services = transcoder["typed_config"]["services"]
    (vhost,) = _hcm(source)["route_config"]["virtual_hosts"]
    routed = {r["match"]["prefix"]: r["route"]["cluster"] for r in vhost["routes"] if "route" in r}
    clusters = {c["name"]: c for c in source["static_resources"]["clusters"]}

    assert routed == {
        "/medmesh.organization.v1.OrganizationService/": "organization",
        "/medmesh.device.v1.DeviceService/": "device",
        "/medmesh.identity.v1.AuthenticationService/": "identity",
        "/medmesh.identity.v1.IdentityService/": "identity",
        "/medmesh.patient.v1.PatientService/": "patient",
        "/medmesh.audit.v1.AuditService/": "audit",
        "/medmesh.device.v1.DeviceCredentialService/": "device",
        "/medmesh.observation.v1.ObservationService/": "observation",
        "/medmesh.command.v1.CommandService/": "command",
        "/medmesh.file.v1.FileService/": "file",
        "/medmesh.alert.v1.AlertService/": "alert",
    }
    # Internal services (the mesh credential's) are never routed.
    assert not [prefix for prefix in routed if "Internal" in prefix or "Ingest" in prefix]
    assert sorted(f"/{service}/" for service in services) == sorted(routed)
    for prefix, cluster_name in routed.items():
        (health_check,) = clusters[cluster_name]["health_checks"]
        checked = health_check["grpc_health_check"]["service_name"]
        assert routed.get(f"/{checked}/") == cluster_name, prefix
    assert vhost["routes"][-1]["match"] == {"prefix": "/"}
    assert vhost["routes"][-1]["direct_response"]["status"] == 404


def test_hostname_upstream_switches_cluster_to_dns(tmp_path: Path, pki: LocalPki) -> None:
    dest = render_envoy_config(
        SOURCE,
        tmp_path / "envoy.yaml",
        listen_host="127.0.0.1",
        listen_port=_free_port(),
        admin_port=_free_port(),
        upstreams={"device": ("localhost", 50999)},
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        descriptor=DESCRIPTOR,
        ca_cert=pki.ca_cert,
    )
    config = yaml.safe_load(dest.read_text())
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}

    assert clusters["device"]["type"] == "STRICT_DNS"
    assert _endpoint(config, "device") == {"address": "localhost", "port_value": 50999}
    assert clusters["organization"]["type"] == "STATIC"
    assert _endpoint(config, "organization") == {"address": "127.0.0.1", "port_value": 50051}


def test_unknown_upstream_name_raises_key_error(tmp_path: Path, pki: LocalPki) -> None:
    with pytest.raises(KeyError, match="billing"):
        render_envoy_config(
            SOURCE,
            tmp_path / "envoy.yaml",
            listen_host="127.0.0.1",
            listen_port=18443,
            admin_port=19901,
            upstreams={"organization": ("127.0.0.1", 50051), "billing": ("127.0.0.1", 50099)},
            tls_cert=pki.server_cert,
            tls_key=pki.server_key,
            descriptor=DESCRIPTOR,
            ca_cert=pki.ca_cert,
        )
    assert not (tmp_path / "envoy.yaml").exists()


def test_envoy_command_is_distinct_per_admin_port(rendered: Path, tmp_path: Path, ports: dict[str, int]) -> None:
    argv = envoy_command(rendered, admin_port=ports["admin"], log_path=tmp_path / "envoy.log")

    assert Path(argv[0]) == envoy_binary()
    assert os.access(argv[0], os.X_OK)
    assert argv[1:5] == ["--mode", "serve", "-c", str(rendered)]
    assert "--disable-hot-restart" in argv
    assert argv[argv.index("--log-level") + 1] == "warn"
    assert argv[argv.index("--log-path") + 1] == str(tmp_path / "envoy.log")
    assert "--log-path" not in envoy_command(rendered, admin_port=ports["admin"])

    base_id = argv[argv.index("--base-id") + 1]
    other_argv = envoy_command(rendered, admin_port=ports["admin"] + 1)
    assert other_argv[other_argv.index("--base-id") + 1] != base_id


# --- a gateway actually serving ------------------------------------------------------------


@pytest.fixture
def running_gateway(rendered: Path, tmp_path: Path, ports: dict[str, int]) -> Iterator[int]:
    """Serve the rendered config (upstreams down) and yield the HTTPS port once Envoy is live."""
    log = tmp_path / "envoy.log"
    process = subprocess.Popen(
        envoy_command(rendered, admin_port=ports["admin"], log_path=log),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + ENVOY_TIMEOUT
        ready_url = f"http://127.0.0.1:{ports['admin']}/ready"
        while True:
            if process.poll() is not None:
                pytest.fail(f"envoy exited with {process.returncode}: {log.read_text()}")
            try:
                with urllib.request.urlopen(ready_url, timeout=1) as response:
                    if response.read().strip() == b"LIVE":
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"envoy not ready after {ENVOY_TIMEOUT}s: {log.read_text()}")
            time.sleep(0.1)
        yield ports["listen"]
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


def _https_get(port: int, ca_cert: Path, path: str) -> tuple[str, int, dict[str, str], bytes]:
    """A raw HTTP/1.1 GET over TLS; returns (TLS version, status, headers, body)."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    context.set_alpn_protocols(["http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        version = str(conn.version())
        request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        conn.sendall(request.encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return version, int(status_line.split()[1]), headers, body


@needs_descriptor
def test_gateway_serves_tls_13_only(running_gateway: int, pki: LocalPki) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", running_gateway), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        assert conn.version() == "TLSv1.3"
        assert conn.selected_alpn_protocol() == "h2"

    old = ssl.create_default_context(cafile=str(pki.ca_cert))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", running_gateway), timeout=10) as raw,
        pytest.raises(ssl.SSLError),
    ):
        old.wrap_socket(raw, server_hostname="localhost")


@needs_descriptor
def test_gateway_answers_rest_errors_as_json(running_gateway: int, pki: LocalPki) -> None:
    # Without a token, everything but login, refresh, logout, JWKS and health is refused first.
    _, status, headers, body = _https_get(running_gateway, pki.ca_cert, "/no/such/path")
    assert status == 401
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"code": 16, "message": "Jwt is missing"}  # UNAUTHENTICATED

    # The identity service is not running, so its only host is unhealthy: Envoy must refuse
    # (no panic routing) with UNAVAILABLE rather than try it.
    _, status, headers, body = _https_get(running_gateway, pki.ca_cert, "/.well-known/jwks.json")
    assert status == 503
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"code": 14, "message": "no healthy upstream"}


def test_s3_listener_is_rendered_for_the_local_platform_and_dropped_otherwise(
    rendered: Path, tmp_path: Path, pki: LocalPki
) -> None:
    without = yaml.safe_load(rendered.read_text())
    assert [item["name"] for item in without["static_resources"]["listeners"]] == ["https"]
    assert "s3" not in {c["name"] for c in without["static_resources"]["clusters"]}

    dest = render_envoy_config(
        SOURCE,
        tmp_path / "with-s3.yaml",
        listen_host="127.0.0.1",
        listen_port=18443,
        admin_port=19901,
        upstreams={"s3": ("127.0.0.1", 18333)},
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        descriptor=DESCRIPTOR,
        ca_cert=pki.ca_cert,
        s3_listen_port=19443,
    )
    config = yaml.safe_load(dest.read_text())
    s3 = _listener(config, "s3")
    (chain,) = s3["filter_chains"]
    tls = chain["transport_socket"]["typed_config"]["common_tls_context"]
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    (group,) = clusters["s3"]["load_assignment"]["endpoints"]

    assert s3["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19443}
    assert tls["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_3"
    assert tls["tls_certificates"] == [
        {
            "certificate_chain": {"filename": str(pki.server_cert.resolve())},
            "private_key": {"filename": str(pki.server_key.resolve())},
        }
    ]
    assert group["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] == 18333
