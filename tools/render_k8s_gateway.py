"""Writes k8s/base/envoy.yaml, the Kubernetes variant of gateway/envoy.yaml (`make k8s-gateway`).

The file is committed so `kustomize build` works from a clone; a unit test renders it
again and fails if it has drifted from gateway/envoy.yaml.
"""

from __future__ import annotations

from pathlib import Path

from medmesh.launcher.components import SERVICES
from medmesh.launcher.gateway import render_envoy_config
from medmesh.runtime.settings import DEFAULT_GRPC_PORTS

GATEWAY_UPSTREAMS = [name for name, _ in SERVICES]

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "k8s" / "base" / "envoy.yaml"


def render(dest: Path = TARGET) -> Path:
    return render_envoy_config(
        ROOT / "gateway" / "envoy.yaml",
        dest,
        listen_host="0.0.0.0",
        listen_port=8443,
        admin_port=9901,
        upstreams={name: (name, DEFAULT_GRPC_PORTS[name]) for name in GATEWAY_UPSTREAMS},
        tls_cert=Path("/etc/medmesh/tls/tls.crt"),
        tls_key=Path("/etc/medmesh/tls/tls.key"),
        descriptor=Path("/etc/medmesh/proto/medmesh.binpb"),
        ca_cert=Path("/etc/medmesh/tls/ca.crt"),
    )


if __name__ == "__main__":
    print(f"wrote {render().relative_to(ROOT)}")
