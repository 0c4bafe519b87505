"""Structural invariants of the Kubernetes manifests under k8s/.

Plain YAML only (no cluster, no kustomize binary): every file parses, every kustomization points
at files that exist, and each base Deployment keeps what lets the platform survive the loss of a
pod, a node or a zone: zone spread, probes, resources, a locked-down security context, a PDB, an
HPA and a Service that actually selects it. NetworkPolicies are checked by evaluating them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from medmesh.runtime.settings import DEFAULT_GRPC_PORTS

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
BASE = K8S / "base"
OVERLAYS = K8S / "overlays"

YAML_FILES = sorted(p for p in K8S.rglob("*.y*ml") if p.suffix in {".yaml", ".yml"})
KUSTOMIZATIONS = sorted(K8S.rglob("kustomization.yaml"))
ZONE = "topology.kubernetes.io/zone"
HOSTNAME = "kubernetes.io/hostname"
# Python components: the module each Deployment runs -> its name in DEFAULT_GRPC_PORTS.
PYTHON_MODULES = {
    "services.organization": "organization",
    "services.device": "device",
    "services.identity": "identity",
    "services.patient": "patient",
    "services.audit": "audit",
    "services.observation": "observation",
    "services.command": "command",
    "services.file": "file",
    "services.alert": "alert",
    "mqtt_adapter": "mqtt_adapter",
}
GRPC_SERVICES = ("organization", "device", "identity", "patient", "audit", "observation", "command", "file", "alert")
MONGO_SECRETS = {name: f"{name}-mongodb" for name in GRPC_SERVICES}
EDGES = ("gateway", "mqtt-adapter")
# Who calls whom inside the mesh (the gateway and the internet aside): every service verifies
# tokens with identity's keys and delivers audit events to audit. The adapter's calls to
# observation, command and file come with the adapter issue; the policies admit them already.
# command and device push to connected devices through the adapter instance holding the
# connection (NotifyDevice).
CALLS: dict[str, set[str]] = {
    "organization": {"identity", "audit"},
    "device": {"organization", "patient", "identity", "audit", "mqtt-adapter"},
    "patient": {"organization", "identity", "audit"},
    "identity": {"organization", "patient", "audit"},
    "audit": {"identity"},
    "observation": {"device", "alert", "identity", "audit"},
    "command": {"device", "identity", "audit", "mqtt-adapter"},
    "file": {"device", "identity", "audit"},
    "alert": {"device", "identity", "audit"},
    "mqtt-adapter": {"device", "observation", "command", "file"},
}
# Dialled at the address of the instance that holds a device's connection (from the device
# service), not at one configured address.
DIALLED_PER_CONNECTION = {"mqtt-adapter"}
MESH_CREDENTIAL = {"secretKeyRef": {"name": "medmesh-internal", "key": "token"}}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@cache  # read-only use: the tests never modify what they load
def load_all(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def kustomization(directory: Path) -> dict[str, Any]:
    docs = load_all(directory / "kustomization.yaml")
    assert len(docs) == 1
    return docs[0]


def base_objects() -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for resource in kustomization(BASE)["resources"]:
        objects.extend(load_all(BASE / resource))
    return objects


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [obj for obj in base_objects() if obj["kind"] == kind]


def by_name(kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in of_kind(kind)}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A matchLabels-only selector (all these manifests use) against a pod's labels."""
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is understood here: {selector}"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod_spec(deployment)["containers"])


def container_ports(deployment: dict[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for c in containers(deployment) for port in c.get("ports", [])}


def python_module(deployment: dict[str, Any]) -> str | None:
    command = containers(deployment)[0].get("command", [])
    if command[:2] == ["python", "-m"]:
        return str(command[2])
    return None


def effective_env(deployment: dict[str, Any]) -> dict[str, Any]:
    """What the first container sees: medmesh-config's literals, overridden by its own env."""
    container = containers(deployment)[0]
    env: dict[str, Any] = {}
    if {"configMapRef": {"name": "medmesh-config"}} in container.get("envFrom", []):
        env.update(base_config())
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return env


def mounted_file(deployment: dict[str, Any], path: str) -> tuple[dict[str, Any], str | None]:
    """The volume that puts `path` into the first container, and the key it comes from (None:
    any key of that name, the volume lists none)."""
    file = PurePosixPath(path)
    mounts = {m["mountPath"]: m for m in containers(deployment)[0].get("volumeMounts", [])}
    mount = mounts.get(str(file.parent))
    assert mount is not None, f"{deployment['metadata']['name']}: nothing is mounted at {file.parent}"
    assert mount.get("readOnly") is True
    [volume] = [v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"]]
    source = volume.get("secret") or volume.get("configMap") or {}
    if "items" not in source:
        return volume, None
    keys = {item["path"]: item["key"] for item in source["items"]}
    assert file.name in keys, f"{volume['name']} does not provide {file.name}"
    return volume, keys[file.name]


def env_value(container: dict[str, Any], name: str) -> Any:
    for entry in container.get("env", []):
        if entry["name"] == name:
            return entry.get("value", entry.get("valueFrom"))
    return None


def base_config() -> dict[str, str]:
    """The medmesh-config ConfigMap's literals, as the base generates them."""
    for generator in kustomization(BASE).get("configMapGenerator", []):
        if generator["name"] == "medmesh-config":
            return dict(literal.split("=", 1) for literal in generator["literals"])
    raise AssertionError("base has no medmesh-config generator")


def overlay_config(overlay: str) -> dict[str, str]:
    """medmesh-config as an overlay generates it: the base's literals, merged with its own."""
    config = base_config()
    for generator in kustomization(OVERLAYS / overlay).get("configMapGenerator", []):
        if generator["name"] == "medmesh-config":
            assert generator.get("behavior") == "merge", f"{overlay} would replace the base's settings"
            for literal in generator.get("literals", []):
                key, value = literal.split("=", 1)
                config[key] = value
    return config


def referenced_secrets(deployment: dict[str, Any]) -> set[str]:
    """Every Secret a Deployment's pods are given: volumes (plain or projected) and environment."""
    spec = pod_spec(deployment)
    names: set[str] = set()
    for volume in spec.get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        for entry in container.get("env", []):
            if ref := entry.get("valueFrom", {}).get("secretKeyRef"):
                names.add(ref["name"])
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                names.add(source["secretRef"]["name"])
    return names


DEPLOYMENTS = sorted(by_name("Deployment"))


def deployment(name: str) -> dict[str, Any]:
    return by_name("Deployment")[name]


# --- files -------------------------------------------------------------------------------------


def test_there_is_a_base_and_both_overlays() -> None:
    assert {p.parent for p in KUSTOMIZATIONS} >= {BASE, OVERLAYS / "two-zones", OVERLAYS / "dev"}
    assert set(DEPLOYMENTS) == {*GRPC_SERVICES, *EDGES}


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_parses_into_mappings(path: Path) -> None:
    docs = load_all(path)
    assert docs, f"{rel(path)} is empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{rel(path)}: a document is not a mapping"
        if "kind" in doc and doc["kind"] != "Kustomization" and path.name != "envoy.yaml":
            assert doc.get("apiVersion"), f"{rel(path)}: {doc['kind']} without apiVersion"
            assert doc.get("metadata", {}).get("name"), f"{rel(path)}: {doc['kind']} without a name"


def referenced_files(directory: Path, spec: dict[str, Any]) -> Iterator[tuple[str, Path]]:
    for resource in spec.get("resources", []):
        yield "resources", directory / resource
    for component in spec.get("components", []):
        yield "components", directory / component
    for patch in spec.get("patches", []):
        if "path" in patch:
            yield "patches", directory / patch["path"]
    for field in ("configMapGenerator", "secretGenerator"):
        for generator in spec.get(field, []):
            for entry in generator.get("files", []):
                yield field, directory / entry.split("=", 1)[-1]  # "key=path" or "path"
            for entry in generator.get("envs", []):
                yield field, directory / entry


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=rel)
def test_kustomization_lists_only_files_that_exist(path: Path) -> None:
    spec = kustomization(path.parent)
    assert spec.get("kind", "Kustomization") == "Kustomization"
    missing: list[Path] = []
    for field, target in referenced_files(path.parent, spec):
        target = target.resolve()
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), f"{rel(path)} {field}: {target} has no kustomization"
        elif not target.is_file():
            missing.append(target)
    assert not missing, f"{rel(path)} lists missing files: {missing}"


def test_every_yaml_file_under_k8s_is_used() -> None:
    used = {p.resolve() for p in KUSTOMIZATIONS}
    for path in KUSTOMIZATIONS:
        used |= {target.resolve() for _, target in referenced_files(path.parent, kustomization(path.parent))}
    orphans = [rel(p) for p in YAML_FILES if p.resolve() not in used]
    assert not orphans, f"YAML files no kustomization includes: {orphans}"


# Never committed: each is made by hand in the namespace (k8s/README.md).
SECRET_SETTINGS = {"MEDMESH_MONGODB_URI", "MEDMESH_INTERNAL_TOKEN", "MEDMESH_S3_ACCESS_KEY", "MEDMESH_S3_SECRET_KEY"}


def test_no_secret_values_are_committed() -> None:
    for path in YAML_FILES:
        assert all(doc.get("kind") != "Secret" for doc in load_all(path)), f"{rel(path)} holds a Secret"
    for path in KUSTOMIZATIONS:
        assert "secretGenerator" not in kustomization(path.parent), f"{rel(path)} generates a Secret"
    for overlay in ("two-zones", "dev"):
        assert not SECRET_SETTINGS & set(overlay_config(overlay)), f"{overlay}: a secret in medmesh-config"
    for name in DEPLOYMENTS:
        for container in containers(deployment(name)):
            for entry in container.get("env", []):
                assert entry["name"] not in SECRET_SETTINGS or "value" not in entry, f"{name}: {entry['name']} inline"


def test_base_is_namespaced() -> None:
    assert kustomization(BASE)["namespace"] == "medmesh"
    namespaces = by_name("Namespace")
    assert set(namespaces) == {"medmesh"}
    assert namespaces["medmesh"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# --- every Deployment --------------------------------------------------------------------------


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_survives_a_zone_loss(name: str) -> None:
    d = deployment(name)
    assert d["spec"]["replicas"] >= 2
    assert selects(d["spec"]["selector"], pod_labels(d))
    constraints = {c["topologyKey"]: c for c in pod_spec(d).get("topologySpreadConstraints", [])}
    zone = constraints.get(ZONE)
    assert zone is not None, f"{name}: no spread over {ZONE}"
    assert zone["maxSkew"] == 1
    assert zone["whenUnsatisfiable"] == "DoNotSchedule"
    # Otherwise the dead zone's tainted nodes still count, and replacements stay Pending.
    assert zone.get("nodeTaintsPolicy") == "Honor"
    assert selects(zone["labelSelector"], pod_labels(d))
    host = constraints.get(HOSTNAME)
    assert host is not None, f"{name}: no spread over {HOSTNAME}"
    assert host["whenUnsatisfiable"] == "ScheduleAnyway"
    assert selects(host["labelSelector"], pod_labels(d))


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_has_probes_on_its_own_ports(name: str) -> None:
    d = deployment(name)
    ports = set(container_ports(d).values())
    for container in containers(d):
        for probe_name in ("readinessProbe", "livenessProbe"):
            probe = container.get(probe_name)
            assert probe, f"{name}/{container['name']}: no {probe_name}"
            handler = probe.get("grpc") or probe.get("tcpSocket")
            assert handler, f"{name}: {probe_name} is neither gRPC nor TCP"
            assert handler["port"] in ports, f"{name}: {probe_name} probes port {handler['port']}, not exposed"
        if python_module(d) is not None:
            # The gRPC health service, not just an open socket.
            assert "grpc" in container["readinessProbe"]
            assert "grpc" in container["livenessProbe"]


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_has_requests_and_limits(name: str) -> None:
    for container in containers(deployment(name)):
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{name}: {bound} incomplete"


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_runs_locked_down(name: str) -> None:
    d = deployment(name)
    pod_security = pod_spec(d).get("securityContext", {})
    assert pod_security.get("runAsNonRoot") is True
    assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert pod_spec(d).get("automountServiceAccountToken") is False
    for container in containers(d):
        security = container.get("securityContext", {})
        assert security.get("runAsNonRoot", pod_security["runAsNonRoot"]) is True
        assert security.get("readOnlyRootFilesystem") is True
        assert security.get("allowPrivilegeEscalation") is False
        assert security.get("capabilities", {}).get("drop") == ["ALL"]
        assert not security.get("capabilities", {}).get("add")


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_has_a_matching_pdb(name: str) -> None:
    d = deployment(name)
    pdbs = [p for p in of_kind("PodDisruptionBudget") if selects(p["spec"]["selector"], pod_labels(d))]
    assert len(pdbs) == 1, f"{name}: {len(pdbs)} PodDisruptionBudgets select it"
    assert pdbs[0]["spec"].get("minAvailable") == 1
    assert pdbs[0]["spec"]["minAvailable"] < d["spec"]["replicas"], "a PDB as large as the Deployment blocks drains"


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_has_a_matching_hpa(name: str) -> None:
    hpas = [h for h in of_kind("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == name]
    assert len(hpas) == 1
    spec = hpas[0]["spec"]
    assert spec["scaleTargetRef"]["kind"] == "Deployment"
    assert spec["minReplicas"] >= 2
    assert spec["maxReplicas"] == 10
    cpu = [m["resource"] for m in spec["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu == [{"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}]


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_has_a_service_that_reaches_it(name: str) -> None:
    d = deployment(name)
    services = [s for s in of_kind("Service") if selects({"matchLabels": s["spec"]["selector"]}, pod_labels(d))]
    assert len(services) == 1, f"{name}: {len(services)} Services select it"
    ports = container_ports(d)
    for port in services[0]["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        assert target in ports or target in ports.values(), f"{name}: Service targets {target}, not a container port"


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_termination_grace_outlasts_the_drain(name: str) -> None:
    d = deployment(name)
    grace = pod_spec(d)["terminationGracePeriodSeconds"]
    app_grace = float(base_config()["MEDMESH_SHUTDOWN_GRACE_SECONDS"]) if python_module(d) else 0.0
    for container in containers(d):
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert grace > pre_stop + app_grace, f"{name}: {grace}s grace < {pre_stop}s preStop + {app_grace}s drain"


# --- Python components -------------------------------------------------------------------------

PYTHON_DEPLOYMENTS = [name for name in DEPLOYMENTS if python_module(deployment(name))]


def test_every_python_component_is_deployed() -> None:
    assert {python_module(deployment(name)) for name in PYTHON_DEPLOYMENTS} == set(PYTHON_MODULES)


@pytest.mark.parametrize("name", PYTHON_DEPLOYMENTS)
def test_python_component_listens_where_it_is_probed(name: str) -> None:
    d = deployment(name)
    container = containers(d)[0]
    component = PYTHON_MODULES[str(python_module(d))]
    port = int(env_value(container, "MEDMESH_GRPC_PORT"))
    assert port == DEFAULT_GRPC_PORTS[component], "k8s and the launcher use the same port numbers"
    assert container["readinessProbe"]["grpc"]["port"] == port
    assert container["livenessProbe"]["grpc"]["port"] == port
    assert port in container_ports(d).values()
    assert {"configMapRef": {"name": "medmesh-config"}} in container["envFrom"]
    assert env_value(container, "OTEL_SERVICE_NAME") == name
    assert base_config()["MEDMESH_GRPC_HOST"] == "0.0.0.0"  # loopback, the code's default, is unreachable


@pytest.mark.parametrize("name", PYTHON_DEPLOYMENTS)
def test_each_service_has_its_own_database_secret(name: str) -> None:
    uri = env_value(containers(deployment(name))[0], "MEDMESH_MONGODB_URI")
    if name not in MONGO_SECRETS:
        assert uri is None, f"{name} owns no database"
        return
    assert uri == {"secretKeyRef": {"name": MONGO_SECRETS[name], "key": "uri"}}


def test_adapter_knows_its_instance_name() -> None:
    instance = env_value(containers(deployment("mqtt-adapter"))[0], "MEDMESH_ADAPTER_INSTANCE")
    assert instance == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_adapter_reports_its_own_pod_address_for_the_internal_api() -> None:
    [container] = containers(deployment("mqtt-adapter"))
    names = [e["name"] for e in container["env"]]
    assert env_value(container, "POD_IP") == {"fieldRef": {"fieldPath": "status.podIP"}}
    # $(POD_IP) is expanded only from variables defined before it.
    assert names.index("POD_IP") < names.index("MEDMESH_ADAPTER_ADDRESS")
    port = int(env_value(container, "MEDMESH_GRPC_PORT"))
    assert env_value(container, "MEDMESH_ADAPTER_ADDRESS") == f"$(POD_IP):{port}"
    assert container_ports(deployment("mqtt-adapter"))["grpc"] == port


def test_peer_addresses_match_the_services() -> None:
    config = base_config()
    services = by_name("Service")
    for component in GRPC_SERVICES:
        host, port = config[f"MEDMESH_{component.upper()}_ADDR"].split(":")
        assert host == component
        assert services[host]["spec"].get("clusterIP") == "None", "headless: clients balance per request"
        assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
        assert int(port) == DEFAULT_GRPC_PORTS[component]


@pytest.mark.parametrize("name", PYTHON_DEPLOYMENTS)
def test_each_component_is_told_where_the_peers_it_calls_are(name: str) -> None:
    env = effective_env(deployment(name))
    for peer in CALLS[name] - DIALLED_PER_CONNECTION:
        # Unset, the code falls back to 127.0.0.1, which in a pod is nobody.
        assert env.get(f"MEDMESH_{peer.upper()}_ADDR") == f"{peer}:{DEFAULT_GRPC_PORTS[peer]}"


PEER_CHANNEL = re.compile(r"""peer_channel\(\s*["']([a-z_]+)["']""")


def test_the_code_calls_no_peer_the_manifests_do_not_admit() -> None:
    found: dict[str, set[str]] = {}
    for name in PYTHON_DEPLOYMENTS:
        package = ROOT.joinpath(*str(python_module(deployment(name))).split("."))
        found[name] = {
            # peer_channel takes the DEFAULT_GRPC_PORTS name (mqtt_adapter); CALLS the Deployment's.
            m.replace("_", "-")
            for f in package.rglob("*.py")
            for m in PEER_CHANNEL.findall(f.read_text(encoding="utf-8"))
        }
        assert found[name] <= CALLS[name], (
            f"{name} dials {found[name] - CALLS[name]}: add them to CALLS and the policies"
        )
    assert found["device"] >= {"organization", "audit"}, "the scan finds nothing: has peer_channel been renamed?"
    # Adapters are dialled through a factory the service passes to the shared AdapterNotifier: the
    # scan sees those calls only because the services, not the runtime, name the peer.
    assert "mqtt-adapter" in found["command"]
    assert "mqtt-adapter" in found["device"]


@pytest.mark.parametrize("name", PYTHON_DEPLOYMENTS)
def test_every_python_component_has_the_mesh_credential(name: str) -> None:
    # Without it internal-only methods (audit ingest) refuse this component's calls. Not optional:
    # a missing Secret stops the pod instead of starting one whose audit events never arrive.
    assert env_value(containers(deployment(name))[0], "MEDMESH_INTERNAL_TOKEN") == MESH_CREDENTIAL


def test_only_python_components_hold_the_mesh_credential() -> None:
    for name in set(DEPLOYMENTS) - set(PYTHON_DEPLOYMENTS):
        assert "medmesh-internal" not in str(deployment(name)["spec"]), f"{name} needs no mesh credential"


def test_identity_reads_its_first_admin_from_an_optional_secret() -> None:
    identity = deployment("identity")
    path = env_value(containers(identity)[0], "MEDMESH_BOOTSTRAP_ADMIN_FILE")
    assert path == "/etc/medmesh/bootstrap/admin.json"
    volume, key = mounted_file(identity, path)
    # Optional: identity must start without it once the Secret has been deleted.
    assert volume["secret"] == {
        "secretName": "identity-bootstrap-admin",
        "optional": True,
        "defaultMode": 0o440,
        "items": [{"key": "admin.json", "path": "admin.json"}],
    }
    assert key == "admin.json"
    for name in set(DEPLOYMENTS) - {"identity"}:
        assert "identity-bootstrap-admin" not in str(deployment(name)["spec"])


DEVICE_CA_SECRET = "device-ca"


def test_device_signs_with_the_device_ca_from_its_secret() -> None:
    device = deployment("device")
    container = containers(device)[0]
    for variable, key in (("MEDMESH_DEVICE_CA_CERT_FILE", "tls.crt"), ("MEDMESH_DEVICE_CA_KEY_FILE", "tls.key")):
        path = env_value(container, variable)
        assert isinstance(path, str), f"{variable} unset: the device service refuses to start"
        volume, mounted_key = mounted_file(device, path)
        # Not optional and the keys listed: a Secret without the CA, or half of it, fails at
        # volume setup instead of starting a service that cannot sign.
        assert volume["secret"]["secretName"] == DEVICE_CA_SECRET
        assert volume["secret"].get("optional", False) is False
        assert volume["secret"]["defaultMode"] == 0o440
        assert mounted_key == key
    # Server-side key generation (the code's default) stays a development convenience: the
    # production overlay turns it off (test_two_zones_generates_no_device_keys_on_the_server).
    assert env_value(container, "MEDMESH_DEVICE_CERTIFICATE_GENERATE") is None


def test_the_device_ca_key_reaches_device_pods_only() -> None:
    for name in set(DEPLOYMENTS) - {"device"}:
        d = deployment(name)
        assert DEVICE_CA_SECRET not in referenced_secrets(d), f"{name} is given the device CA's Secret, key and all"
        for container in containers(d):
            assert env_value(container, "MEDMESH_DEVICE_CA_KEY_FILE") is None, f"{name} looks for the CA key"


def test_the_adapter_trusts_the_device_ca_certificate_alone() -> None:
    adapter = deployment("mqtt-adapter")
    path = env_value(containers(adapter)[0], "MEDMESH_DEVICE_CA_CERT_FILE")
    assert path == env_value(containers(deployment("device"))[0], "MEDMESH_DEVICE_CA_CERT_FILE")
    volume, key = mounted_file(adapter, path)
    # A ConfigMap of the certificate, not the Secret with only tls.crt listed: the kubelet would
    # still fetch the whole Secret, key included, onto the (internet-facing) adapter's nodes.
    assert volume["configMap"]["name"] == "device-ca-cert"
    assert volume["configMap"]["items"] == [{"key": "tls.crt", "path": "tls.crt"}]
    assert key == "tls.crt"
    # Its own Secret carries its server certificate and key; device trust comes from the device CA only.
    [tls] = [v for v in pod_spec(adapter)["volumes"] if v.get("secret", {}).get("secretName") == "mqtt-adapter-tls"]
    assert [item["key"] for item in tls["secret"]["items"]] == ["tls.crt", "tls.key"]


def test_the_adapter_serves_mqtt_where_the_load_balancer_sends_devices() -> None:
    adapter = deployment("mqtt-adapter")
    [container] = containers(adapter)
    assert env_value(container, "MEDMESH_MQTT_HOST") == "0.0.0.0"  # the code's default is loopback
    assert int(env_value(container, "MEDMESH_MQTT_PORT")) == container_ports(adapter)["mqtts"]
    for variable, key in (("MEDMESH_MQTT_TLS_CERT_FILE", "tls.crt"), ("MEDMESH_MQTT_TLS_KEY_FILE", "tls.key")):
        volume, mounted_key = mounted_file(adapter, env_value(container, variable))
        assert (volume["secret"]["secretName"], mounted_key) == ("mqtt-adapter-tls", key)


S3_CREDENTIALS = {
    "MEDMESH_S3_ACCESS_KEY": {"secretKeyRef": {"name": "file-s3", "key": "access-key"}},
    "MEDMESH_S3_SECRET_KEY": {"secretKeyRef": {"name": "file-s3", "key": "secret-key"}},
}


def check_object_storage_settings(where: str, config: dict[str, Any]) -> None:
    endpoint = config["MEDMESH_S3_ENDPOINT"]
    assert urlsplit(f"//{endpoint}").netloc == endpoint, f"{where}: MEDMESH_S3_ENDPOINT is host[:port], no scheme"
    assert config["MEDMESH_S3_SECURE"] in {"true", "false"}
    assert config["MEDMESH_S3_REGION"], f"{where}: URLs are signed for a region"
    # What services/file/storage.py accepts; anything else stops the service at start-up.
    public = urlsplit(config["MEDMESH_S3_PUBLIC_ENDPOINT"])
    assert public.scheme in {"http", "https"}
    assert public.netloc
    assert public.path in {"", "/"}
    assert not public.query
    assert not public.fragment


def test_the_file_service_reaches_its_object_storage() -> None:
    env = effective_env(deployment("file"))
    for variable, source in S3_CREDENTIALS.items():
        # Unset, the code falls back to the local platform's development keys.
        assert env.get(variable) == source
    assert env.get("MEDMESH_FILE_BUCKET")
    check_object_storage_settings("base", env)


@pytest.mark.parametrize("overlay", ["two-zones", "dev"])
def test_each_overlay_says_where_object_storage_is(overlay: str) -> None:
    config = overlay_config(overlay)
    check_object_storage_settings(overlay, config)
    if overlay == "two-zones":
        assert config["MEDMESH_S3_SECURE"] == "true"
        assert urlsplit(config["MEDMESH_S3_PUBLIC_ENDPOINT"]).scheme == "https", "devices and browsers use HTTPS"


def test_only_the_file_service_holds_object_storage_credentials() -> None:
    assert not set(S3_CREDENTIALS) & set(base_config()), "never in the shared ConfigMap"
    for name in set(DEPLOYMENTS) - {"file"}:
        assert "file-s3" not in referenced_secrets(deployment(name)), f"{name} needs no object storage"
        for container in containers(deployment(name)):
            assert all(env_value(container, variable) is None for variable in S3_CREDENTIALS)


def envoy_files(node: Any) -> Iterator[str]:
    """Every file path the Envoy bootstrap reads (certificates, keys, CAs, descriptor set)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in {"filename", "proto_descriptor"} and isinstance(value, str):
                yield value
            else:
                yield from envoy_files(value)
    elif isinstance(node, list):
        for item in node:
            yield from envoy_files(item)


def test_gateway_mounts_every_file_its_envoy_config_reads() -> None:
    gateway = deployment("gateway")
    [envoy] = load_all(BASE / "envoy.yaml")
    files = set(envoy_files(envoy))
    # The JWKS fetch goes through the gateway's own listener and trusts only this CA.
    assert {"/etc/medmesh/tls/tls.crt", "/etc/medmesh/tls/tls.key", "/etc/medmesh/tls/ca.crt"} <= files
    for path in files:
        volume, key = mounted_file(gateway, path)
        if path.startswith("/etc/medmesh/tls/"):
            assert volume["secret"]["secretName"] == "gateway-tls"
            assert key == PurePosixPath(path).name, "listed, so a Secret without it fails at mount"
    [jwks] = [c for c in envoy["static_resources"]["clusters"] if c["name"] == "jwks"]
    [endpoint] = [e["endpoint"] for g in jwks["load_assignment"]["endpoints"] for e in g["lb_endpoints"]]
    assert endpoint["address"]["socket_address"]["port_value"] == container_ports(gateway)["https"]


# --- Services ----------------------------------------------------------------------------------


def test_grpc_services_are_internal_and_edges_are_load_balanced() -> None:
    services = by_name("Service")
    for name in GRPC_SERVICES:
        assert services[name]["spec"].get("type", "ClusterIP") == "ClusterIP"
    adapter = services["mqtt-adapter"]["spec"]
    assert adapter["type"] == "LoadBalancer"
    assert adapter["externalTrafficPolicy"] == "Local"
    assert [(p["port"], p["targetPort"]) for p in adapter["ports"]] == [(8883, "mqtts")]
    assert container_ports(deployment("mqtt-adapter"))["mqtts"] == 8883
    gateway = services["gateway"]["spec"]
    assert gateway["type"] == "LoadBalancer"
    assert [(p["port"], p["targetPort"]) for p in gateway["ports"]] == [(443, "https")]
    assert container_ports(deployment("gateway"))["https"] == 8443


# --- NetworkPolicies, evaluated ----------------------------------------------------------------

EXTERNAL: dict[str, str] = {}  # a peer outside the namespace: no pod labels match it


def ingress_allowed(source: dict[str, str] | None, target: str, port: int) -> bool:
    """Whether the base's NetworkPolicies admit `source` pod labels (None: outside) to a port."""
    d = deployment(target)
    labels, named_ports = pod_labels(d), container_ports(d)
    policies = [
        p
        for p in of_kind("NetworkPolicy")
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"]) and selects(p["spec"]["podSelector"], labels)
    ]
    assert policies, f"{target} is selected by no policy, so all ingress to it is open"
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            rule_ports = [named_ports.get(p["port"], p["port"]) for p in rule.get("ports", [])]
            if rule_ports and port not in rule_ports:
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                assert set(peer) == {"podSelector"}, f"unexpected peer {peer}"
                if source is not None and selects(peer["podSelector"], source):
                    return True
    return False


def labels_of(name: str) -> dict[str, str]:
    return pod_labels(deployment(name))


def test_ingress_is_denied_by_default() -> None:
    deny = [
        p
        for p in of_kind("NetworkPolicy")
        if p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"] and not p["spec"].get("ingress")
    ]
    assert deny, "no default-deny ingress policy"


def gateway_upstreams() -> set[str]:
    """The Services the gateway's Envoy routes to (clusters addressed by a Service name)."""
    [envoy] = load_all(BASE / "envoy.yaml")
    services = by_name("Service")
    hosts = {
        e["endpoint"]["address"]["socket_address"]["address"]
        for c in envoy["static_resources"]["clusters"]
        for g in c["load_assignment"]["endpoints"]
        for e in g["lb_endpoints"]
    }
    return hosts & set(services)


def grpc_port(name: str) -> int:
    return DEFAULT_GRPC_PORTS[name.replace("-", "_")]


# The two edges' public ports: open to anyone, so to the pods in the namespace as well.
PUBLIC_PORTS = {("gateway", 8443), ("mqtt-adapter", 8883)}
SOURCES: list[str | None] = [None, *DEPLOYMENTS]  # None: outside the namespace


def allowed_flows() -> set[tuple[str | None, str, int]]:
    """Every (source, target, port) ingress the platform needs, and nothing else."""
    flows = {(source, target, port) for source in SOURCES for target, port in PUBLIC_PORTS}
    flows |= {("gateway", name, grpc_port(name)) for name in gateway_upstreams()}
    flows |= {(caller, callee, grpc_port(callee)) for caller, callees in CALLS.items() for callee in callees}
    return flows


def test_the_gateway_routes_to_every_grpc_service() -> None:
    assert gateway_upstreams() == set(GRPC_SERVICES)


@pytest.mark.parametrize(
    ("source", "target", "port"),
    [
        (None, "gateway", 8443),
        (None, "mqtt-adapter", 8883),
        ("gateway", "organization", 50051),
        ("gateway", "device", 50052),
        ("gateway", "identity", 50053),
        ("gateway", "patient", 50054),
        ("gateway", "audit", 50055),
        ("gateway", "observation", 50056),
        ("gateway", "command", 50057),
        ("gateway", "file", 50058),
        ("gateway", "alert", 50059),
        ("device", "organization", 50051),
        ("patient", "organization", 50051),
        ("identity", "organization", 50051),
        ("identity", "patient", 50054),
        ("device", "patient", 50054),
        ("observation", "alert", 50059),
        ("mqtt-adapter", "device", 50052),
        ("mqtt-adapter", "observation", 50056),
        ("mqtt-adapter", "command", 50057),
        ("mqtt-adapter", "file", 50058),
        ("command", "mqtt-adapter", 50060),
        ("device", "mqtt-adapter", 50060),
        *[(caller, "device", 50052) for caller in ("observation", "command", "file", "alert")],
        *[
            (caller, "identity", 50053)
            for caller in ("organization", "device", "patient", "audit", "observation", "command", "file", "alert")
        ],
        *[
            (caller, "audit", 50055)
            for caller in ("organization", "device", "patient", "identity", "observation", "command", "file", "alert")
        ],
    ],
)
def test_intended_flows_are_allowed(source: str | None, target: str, port: int) -> None:
    assert (source, target, port) in allowed_flows()
    assert ingress_allowed(labels_of(source) if source else EXTERNAL, target, port)


@pytest.mark.parametrize(
    ("source", "target", "port"),
    [
        (None, "organization", 50051),
        (None, "device", 50052),
        (None, "identity", 50053),
        (None, "patient", 50054),
        (None, "audit", 50055),
        (None, "observation", 50056),
        (None, "command", 50057),
        (None, "file", 50058),
        (None, "alert", 50059),
        (None, "mqtt-adapter", 50060),
        (None, "gateway", 9901),
        ("mqtt-adapter", "organization", 50051),
        ("mqtt-adapter", "identity", 50053),
        ("mqtt-adapter", "patient", 50054),
        ("mqtt-adapter", "audit", 50055),
        ("mqtt-adapter", "alert", 50059),
        ("organization", "device", 50052),
        ("organization", "patient", 50054),
        ("patient", "device", 50052),
        ("audit", "device", 50052),
        ("audit", "patient", 50054),
        # PHI stays with patient: none of the new services reads it.
        *[(caller, "patient", 50054) for caller in ("observation", "command", "file", "alert")],
        # Only observation submits to alert; nobody but the gateway and the adapter calls these three.
        ("command", "alert", 50059),
        ("file", "alert", 50059),
        ("device", "alert", 50059),
        ("alert", "observation", 50056),
        ("device", "observation", 50056),
        ("observation", "command", 50057),
        ("device", "command", 50057),
        ("command", "file", 50058),
        ("device", "file", 50058),
        ("audit", "organization", 50051),
        ("identity", "device", 50052),
        ("gateway", "mqtt-adapter", 50060),
        # Only command and device push to devices; nobody else reaches the adapter's internal API.
        *[
            (caller, "mqtt-adapter", 50060)
            for caller in ("organization", "identity", "patient", "audit", "observation", "file", "alert")
        ],
        ("mqtt-adapter", "mqtt-adapter", 50060),
    ],
)
def test_other_flows_are_denied(source: str | None, target: str, port: int) -> None:
    assert ingress_allowed(labels_of(source) if source else EXTERNAL, target, port) is False


def test_exactly_the_intended_flows_are_allowed() -> None:
    admitted = {
        (source, target, port)
        for source in SOURCES
        for target in DEPLOYMENTS
        for port in set(container_ports(deployment(target)).values()) | {9901}
        if ingress_allowed(labels_of(source) if source else EXTERNAL, target, port)
    }
    intended = allowed_flows()
    assert admitted - intended == set(), "admitted but not intended"
    assert intended - admitted == set(), "intended but not admitted"


def egress_allowed(source: str, target: dict[str, str] | None, port: int, protocol: str = "TCP") -> bool:
    """Whether the base's NetworkPolicies let `source`'s pods connect to pods with `target` labels
    (None: an address that is no pod of the namespace) on a port; open unless a policy isolates it."""
    labels = labels_of(source)
    policies = [
        p
        for p in of_kind("NetworkPolicy")
        if "Egress" in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], labels)
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            rule_ports = [(p.get("protocol", "TCP"), p["port"]) for p in rule.get("ports", [])]
            assert all(isinstance(number, int) for _, number in rule_ports), "named ports are not understood here"
            if rule_ports and (protocol, port) not in rule_ports:
                continue
            peers = rule.get("to")
            if peers is None:
                return True
            for peer in peers:
                assert set(peer) == {"podSelector"}, f"unexpected peer {peer}"
                if target is not None and selects(peer["podSelector"], target):
                    return True
    return False


def s3_port(config: dict[str, str]) -> int:
    port = urlsplit(f"//{config['MEDMESH_S3_ENDPOINT']}").port
    return port or (443 if config["MEDMESH_S3_SECURE"] == "true" else 80)


def test_file_egress_admits_exactly_what_the_file_service_needs() -> None:
    config = base_config()
    otlp = urlsplit(config["OTEL_EXPORTER_OTLP_ENDPOINT"]).port
    assert otlp is not None
    # Outside the mesh: S3, MongoDB (27017 by assumption: its URI is in a Secret), the collector, DNS.
    for port in (s3_port(config), 27017, otlp):
        assert egress_allowed("file", None, port), f"file cannot reach port {port}"
    assert egress_allowed("file", None, 53, "UDP")
    assert egress_allowed("file", None, 53, "TCP")
    assert not egress_allowed("file", None, 22)
    assert not egress_allowed("file", None, 80)
    # Inside: exactly the peers it calls.
    for target in DEPLOYMENTS:
        for port in set(container_ports(deployment(target)).values()):
            expected = target in CALLS["file"] and port == grpc_port(target)
            assert egress_allowed("file", labels_of(target), port) is expected, (target, port)


def overlay_egress_ports(overlay: str, policy: str) -> set[int]:
    """TCP ports an overlay's JSON patches open, to any destination, in a NetworkPolicy's egress."""
    ports: set[int] = set()
    for patch in overlay_patches(overlay):
        if patch.get("target") != {"kind": "NetworkPolicy", "name": policy}:
            continue
        for op in patch["patch"]:
            if op["op"] == "add" and op["path"] == "/spec/egress/-" and "to" not in op["value"]:
                ports |= {p["port"] for p in op["value"]["ports"] if p.get("protocol", "TCP") == "TCP"}
    return ports


@pytest.mark.parametrize("overlay", ["two-zones", "dev"])
def test_file_egress_admits_each_overlays_object_storage(overlay: str) -> None:
    port = s3_port(overlay_config(overlay))
    assert egress_allowed("file", None, port) or port in overlay_egress_ports(overlay, "file-egress")


def test_only_the_file_service_has_its_egress_restricted() -> None:
    # The others reach MongoDB, the collector and DNS at addresses the installation decides.
    for name in set(DEPLOYMENTS) - {"file"}:
        assert egress_allowed(name, None, 27017), f"{name}'s egress is restricted: list what it needs"


# --- overlays ----------------------------------------------------------------------------------


def overlay_patches(overlay: str) -> list[dict[str, Any]]:
    directory = OVERLAYS / overlay
    patches: list[dict[str, Any]] = []
    for patch in kustomization(directory).get("patches", []):
        if "path" in patch:
            patches.extend(load_all(directory / patch["path"]))
        else:
            loaded = yaml.safe_load(patch["patch"])
            patches.append({"target": patch.get("target", {}), "patch": loaded})
    return patches


def test_two_zones_runs_three_edges_one_per_node() -> None:
    patches = overlay_patches("two-zones")
    for name in ("gateway", "mqtt-adapter"):
        [dep] = [p for p in patches if p.get("kind") == "Deployment" and p["metadata"]["name"] == name]
        assert dep["spec"]["replicas"] == 3
        terms = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        assert [t["topologyKey"] for t in terms] == [HOSTNAME]
        assert selects(terms[0]["labelSelector"], labels_of(name))
        [hpa] = [p for p in patches if p.get("kind") == "HorizontalPodAutoscaler" and p["metadata"]["name"] == name]
        assert hpa["spec"]["minReplicas"] == 3


def test_two_zones_prefers_distinct_nodes_for_every_service() -> None:
    patches = overlay_patches("two-zones")
    for name in set(DEPLOYMENTS) - set(EDGES):
        [dep] = [p for p in patches if p.get("kind") == "Deployment" and p["metadata"]["name"] == name]
        terms = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"
        ]
        assert [t["podAffinityTerm"]["topologyKey"] for t in terms] == [HOSTNAME]
        assert selects(terms[0]["podAffinityTerm"]["labelSelector"], labels_of(name))


def test_two_zones_generates_no_device_keys_on_the_server() -> None:
    [dep] = [
        p for p in overlay_patches("two-zones") if p.get("kind") == "Deployment" and p["metadata"]["name"] == "device"
    ]
    # Merged by container name, so it must be the base's container.
    [container] = dep["spec"]["template"]["spec"]["containers"]
    assert container["name"] == containers(deployment("device"))[0]["name"]
    assert env_value(container, "MEDMESH_DEVICE_CERTIFICATE_GENERATE") == "false"


def test_dev_has_one_replica_and_no_autoscaling() -> None:
    patches = [p for p in overlay_patches("dev") if "target" in p]
    kinds_deleted = {
        p["target"]["kind"]
        for p in patches
        if isinstance(p["patch"], dict) and p["patch"].get("$patch") == "delete" and "name" not in p["target"]
    }
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds_deleted
    [deployments] = [p["patch"] for p in patches if p["target"] == {"kind": "Deployment"}]
    assert {"op": "replace", "path": "/spec/replicas", "value": 1} in deployments
    # kind/minikube nodes carry no zone label: a DoNotSchedule zone spread would leave pods Pending.
    assert {"op": "remove", "path": "/spec/template/spec/topologySpreadConstraints"} in deployments


def test_committed_kubernetes_gateway_config_matches_gateway_envoy_yaml(tmp_path: Path) -> None:
    from tools.render_k8s_gateway import TARGET, render

    fresh = render(tmp_path / "envoy.yaml")
    assert TARGET.read_text() == fresh.read_text(), "k8s/base/envoy.yaml is stale: run `make k8s-gateway`"
