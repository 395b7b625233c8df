"""The Kubernetes manifests (k8s/): they build, validate offline, and hold what the architecture needs.

Nothing is deployed: every test reads `kubectl kustomize` output. Kubernetes kinds are validated with
kubernetes-validate's schemas, Config Connector kinds against their CRDs' schemas (tests/fixtures/crds).
"""

import base64
import copy
import functools
import ipaddress
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helpers.monitoring import (
    COLLECTOR_PREFIX,
    DIRECT_PREFIX,
    MONITORING,
    ROOT,
    VARIANTS,
    arriving_name,
    metric_types,
    render,
    strings,
    types_in,
)
from helpers.telemetry import documented_metrics
from pydantic_settings import BaseSettings

from aiprod.gateway.v1 import gateway_pb2
from aiprod.metrics.v1 import metrics_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod.router.v1 import router_pb2
from aiprod_kit import settings as aiprod_settings
from aiprod_kit.mesh import SERVICES, sandbox_environment
from aiprod_router.backends import parse_renderers
from aiprod_sandbox.settings import SandboxSettings

# A version GKE runs; kubernetes-validate ships the schemas of 1.25 to 1.37.
KUBERNETES_VERSION = "1.32.0"
OVERLAYS = {"gke": ROOT / "k8s" / "overlays" / "gke", "dev": ROOT / "k8s" / "overlays" / "dev"}
CRDS = ROOT / "tests" / "fixtures" / "crds"
CONFIG_CONNECTOR_GROUP = "cnrm.cloud.google.com"
NAMESPACE = {"gke": "aiprod", "dev": "aiprod-dev"}
SPECS = {spec.name: spec for spec in SERVICES}
MESH = [name for name in SPECS if name != "sandbox"]
PROVIDER_RENDERERS = ("renderer-runway", "renderer-veo", "renderer-replicate")
STREAMING_METHODS = ("WatchRenderJob", "WatchRender", "ExecuteRender", "ResumeRender")
# Which settings each service process reads (renderers read CommonSettings too).
SETTINGS: dict[str, tuple[type[BaseSettings], ...]] = {
    "gateway": (aiprod_settings.GatewaySettings,),
    "router": (aiprod_settings.RouterSettings,),
    "metrics": (aiprod_settings.MetricsSettings,),
    "renderer-local": (aiprod_settings.LocalRendererSettings,),
    "renderer-runway": (aiprod_settings.CommonSettings, aiprod_settings.RunwaySettings),
    "renderer-veo": (aiprod_settings.CommonSettings, aiprod_settings.VeoSettings),
    "renderer-replicate": (aiprod_settings.CommonSettings, aiprod_settings.ReplicateSettings),
    "sandbox": (SandboxSettings,),
}


@functools.cache
def _rendered(directory: Path) -> tuple[dict, ...]:
    return tuple(render(directory))


def rendered(directory: Path) -> list[dict]:
    """A fresh copy of the directory's kustomize output (rendered once per session)."""
    return copy.deepcopy(list(_rendered(directory)))


def of_kind(resources: list[dict], kind: str) -> dict[str, dict]:
    return {resource["metadata"]["name"]: resource for resource in resources if resource["kind"] == kind}


def is_cert_manager(resource: dict) -> bool:
    return resource["apiVersion"].split("/")[0] == "cert-manager.io"


def is_config_connector(resource: dict) -> bool:
    return resource["apiVersion"].split("/")[0].endswith(CONFIG_CONNECTOR_GROUP)


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def pod_labels(deployment: dict) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against a set of labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


def environment(resources: list[dict], deployment: dict) -> dict[str, str]:
    """The container's variables as the pod sees them: its ConfigMaps, then its literal values and the
    Secret values it refers to (when the Secret is in the output); references to absent objects and
    the downward API are left out."""
    configmaps, secrets = of_kind(resources, "ConfigMap"), of_kind(resources, "Secret")
    variables: dict[str, str] = {}
    for source in container(deployment).get("envFrom", []):
        variables.update(configmaps[source["configMapRef"]["name"]]["data"])
    for variable in container(deployment).get("env", []):
        if "value" in variable:
            variables[variable["name"]] = variable["value"]
        elif (reference := variable["valueFrom"].get("secretKeyRef")) and reference["name"] in secrets:
            encoded = secrets[reference["name"]]["data"][reference["key"]]
            variables[variable["name"]] = base64.b64decode(encoded).decode()
    return variables


def secret_references(deployment: dict) -> dict[str, dict]:
    return {
        variable["name"]: variable["valueFrom"]["secretKeyRef"]
        for variable in container(deployment).get("env", [])
        if "secretKeyRef" in variable.get("valueFrom", {})
    }


# --- Every overlay builds and validates ---------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_kinds_validate_strictly(overlay: str) -> None:
    for resource in rendered(OVERLAYS[overlay]):
        if is_config_connector(resource):
            continue  # no schema in kubernetes-validate: checked against the CRDs below
        if is_cert_manager(resource):
            continue  # no schema either: what the mesh relies on is checked in the TLS tests below
        # A schema missing for a Kubernetes kind is an error here (the CLI only warns): a misspelled
        # apiVersion would otherwise pass unchecked.
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def _strict(schema: object) -> object:
    """The CRD schema as the API server applies it with strict field validation (kubectl's default):
    unknown fields are errors, except where the schema preserves them."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    """(apiVersion, kind) → a validator of the CRD's openAPIV3Schema."""
    validators = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            api_version = f"{crd['spec']['group']}/{version['name']}"
            schema = _strict(version["schema"]["openAPIV3Schema"])
            validators[api_version, crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(schema)
    return validators


def config_connector_resources() -> Iterator[dict]:
    yield from (resource for resource in rendered(OVERLAYS["gke"]) if is_config_connector(resource))
    yield from (resource for resource in rendered(MONITORING["direct"]) if is_config_connector(resource))


def test_config_connector_resources_match_their_crds() -> None:
    resources = list(config_connector_resources())
    assert {resource["kind"] for resource in resources} == {
        "MonitoringAlertPolicy",
        "MonitoringService",
        "MonitoringServiceLevelObjective",
        "MonitoringDashboard",
    }
    for resource in resources:
        validator = crd_validators().get((resource["apiVersion"], resource["kind"]))
        assert validator is not None, f"no CRD in {CRDS} for {resource['apiVersion']} {resource['kind']}"
        errors = [
            f"{list(error.absolute_path)}: {error.message}" for error in validator.iter_errors(resource)
        ]
        assert not errors, f"{resource['kind']}/{resource['metadata']['name']}: {errors}"


def test_crd_validation_refuses_a_misspelled_field() -> None:
    policy = next(
        resource for resource in config_connector_resources() if resource["kind"] == "MonitoringAlertPolicy"
    )
    policy["spec"]["conditions"][0]["conditionThreshold"]["treshold"] = 1
    validator = crd_validators()["monitoring.cnrm.cloud.google.com/v1beta1", "MonitoringAlertPolicy"]
    assert not validator.is_valid(policy)


# --- Deployments -------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_mesh_service_runs_its_module_on_its_port(overlay: str) -> None:
    resources = rendered(OVERLAYS[overlay])
    deployments = of_kind(resources, "Deployment")
    expected = set(MESH) | ({"sandbox"} if overlay == "dev" else {"otel-collector"})
    assert set(deployments) == expected
    for name in set(deployments) & set(SPECS):
        spec, main = SPECS[name], container(deployments[name])
        assert main["command"] == ["python", "-m", spec.module], name
        assert [port["containerPort"] for port in main["ports"]] == [spec.default_port], name
        assert environment(resources, deployments[name])[spec.port_variable] == str(spec.default_port), name
        assert main["image"].split(":")[0].split("/")[-1] == "aiprod", name


def _grpc_service_names() -> set[str]:
    modules = (gateway_pb2, router_pb2, metrics_pb2, renderer_pb2)
    return {
        service.full_name for module in modules for service in module.DESCRIPTOR.services_by_name.values()
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_the_standard_health_service(overlay: str) -> None:
    for name, deployment in of_kind(rendered(OVERLAYS[overlay]), "Deployment").items():
        main = container(deployment)
        probes = {kind: main.get(f"{kind}Probe") for kind in ("startup", "readiness", "liveness")}
        assert all(probes.values()), f"{name} lacks a probe: {probes}"
        spec = SPECS.get(name)
        if spec is None or spec.health_name is None:  # the collector's and the sandbox's HTTP health
            assert all("httpGet" in probe for probe in probes.values()), name
            continue
        # The service's port, or its plaintext health port when the service's requires TLS.
        port = int(
            environment(rendered(OVERLAYS[overlay]), deployment).get("AIPROD_HEALTH_PORT", spec.default_port)
        )
        # Startup and liveness ask about the process: a renderer without credentials is alive.
        assert probes["startup"]["grpc"] == {"port": port, "service": ""}, name
        assert probes["liveness"]["grpc"] == {"port": port, "service": ""}, name
        assert probes["readiness"]["grpc"] == {"port": port, "service": spec.health_name}, name
        assert spec.health_name in _grpc_service_names(), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_restricted_with_resources(overlay: str) -> None:
    resources = rendered(OVERLAYS[overlay])
    (namespace,) = of_kind(resources, "Namespace").values()
    assert namespace["metadata"]["name"] == NAMESPACE[overlay]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, deployment in of_kind(resources, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["serviceAccountName"] in of_kind(resources, "ServiceAccount"), name
        main = container(deployment)
        assert main["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }, name
        for bound in ("requests", "limits"):
            assert set(main["resources"][bound]) == {"cpu", "memory"}, name
        # What they write goes to emptyDir volumes: /tmp and the data directory.
        volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
        writable = {
            mount["mountPath"]
            for mount in main.get("volumeMounts", [])
            if "emptyDir" in volumes[mount["name"]]
        }
        if name in SPECS:
            assert writable == {"/tmp", environment(resources, deployment)["AIPROD_DATA_DIR"]}, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_outlive_their_drain(overlay: str) -> None:
    resources = rendered(OVERLAYS[overlay])
    for name in MESH:
        deployment = of_kind(resources, "Deployment")[name]
        grace = float(environment(resources, deployment)["AIPROD_SHUTDOWN_GRACE_SECONDS"])
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_name_real_variables_with_valid_values(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    resources = rendered(OVERLAYS[overlay])
    deployments = of_kind(resources, "Deployment")
    for name in set(deployments) & set(SETTINGS):
        variables = environment(resources, deployments[name])
        known = {variable for settings in SETTINGS[name] for variable in _variables(settings)}
        own = {variable["name"] for variable in container(deployments[name])["env"]}
        unknown = {variable for variable in own if variable.startswith("AIPROD_")} - known
        assert not unknown, f"{name} sets variables it does not read: {unknown}"
        for variable in aiprod_environment():
            monkeypatch.delenv(variable)
        for variable, value in variables.items():
            monkeypatch.setenv(variable, value)
        for settings in SETTINGS[name]:
            settings()  # raises on a value the service would refuse
    # The settings every pod shares: each one read by some service (or the OTLP exporter).
    (shared,) = container(deployments["gateway"])["envFrom"]
    names = set(of_kind(resources, "ConfigMap")[shared["configMapRef"]["name"]]["data"])
    readers = {variable for settings in SETTINGS.values() for cls in settings for variable in _variables(cls)}
    assert names - readers <= {"OTEL_EXPORTER_OTLP_ENDPOINT"}


def aiprod_environment() -> list[str]:
    return [variable for variable in os.environ if variable.startswith("AIPROD_")]


def _variables(settings: type[BaseSettings]) -> set[str]:
    """The variables the settings read, those of settings nested in them (AIPROD_TLS_*) included."""
    prefix = settings.model_config.get("env_prefix", "")
    variables = set()
    for name, field in settings.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseSettings):
            variables |= _variables(field.annotation)
        else:
            variables.add(
                str(field.validation_alias) if field.validation_alias else f"{prefix}{name}".upper()
            )
    return variables


# --- Availability --------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_a_disruption_budget(overlay: str) -> None:
    resources = rendered(OVERLAYS[overlay])
    budgets = of_kind(resources, "PodDisruptionBudget").values()
    for name, deployment in of_kind(resources, "Deployment").items():
        matching = [
            budget for budget in budgets if selects(budget["spec"]["selector"], pod_labels(deployment))
        ]
        assert len(matching) == 1, f"{name}: {len(matching)} PodDisruptionBudgets"
        assert matching[0]["spec"]["maxUnavailable"] == 1, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_scale_the_stateless_services(overlay: str) -> None:
    resources = rendered(OVERLAYS[overlay])
    deployments = of_kind(resources, "Deployment")
    scaled = {
        hpa["spec"]["scaleTargetRef"]["name"]
        for hpa in of_kind(resources, "HorizontalPodAutoscaler").values()
    }
    # The gateway scales only with a shared job store: replicas on their own SQLite files would each
    # know only their own jobs. The metrics service has none (its ledger).
    shared_store = "AIPROD_DATABASE_URL" in secret_references(deployments["gateway"])
    expected = {"router", "renderer-local", *PROVIDER_RENDERERS} | ({"gateway"} if shared_store else set())
    assert scaled == expected
    assert shared_store == (overlay == "gke")
    for name in scaled:
        # A replica count in the manifest would reset the autoscaler's at every apply.
        assert "replicas" not in deployments[name]["spec"], name


def test_gke_runs_two_replicas_of_every_production_service() -> None:
    resources = rendered(OVERLAYS["gke"])
    autoscalers = {
        hpa["spec"]["scaleTargetRef"]["name"]: hpa
        for hpa in of_kind(resources, "HorizontalPodAutoscaler").values()
    }
    deployments = of_kind(resources, "Deployment")
    for name in ("gateway", "router", *PROVIDER_RENDERERS, "metrics", "otel-collector"):
        least = (
            autoscalers[name]["spec"]["minReplicas"]
            if name in autoscalers
            else deployments[name]["spec"]["replicas"]
        )
        assert least >= 2, name


def test_dev_runs_one_replica_of_everything() -> None:
    resources = rendered(OVERLAYS["dev"])
    for hpa in of_kind(resources, "HorizontalPodAutoscaler").values():
        assert hpa["spec"]["maxReplicas"] == 1
    for deployment in of_kind(resources, "Deployment").values():
        assert deployment["spec"].get("replicas", 1) == 1


# --- Wiring --------------------------------------------------------------------------------------

DNS_TARGET = re.compile(r"^dns:///([a-z0-9-]+):(\d+)$")
# Who dials whom (ARCHITECTURE.md), by the setting that names the targets.
DIALS = {
    "gateway": {"AIPROD_ROUTER_TARGET": {"router"}, "AIPROD_METRICS_TARGET": {"metrics"}},
    "router": {
        "AIPROD_METRICS_TARGET": {"metrics"},
        "AIPROD_RENDERERS": {name for name in SPECS if name.startswith("renderer-")},
    },
}


def dialed(resources: list[dict]) -> dict[str, set[tuple[str, int]]]:
    """Service → the (name, port) of every dns:/// target in its settings."""
    result = {}
    for name, deployment in of_kind(resources, "Deployment").items():
        variables = environment(resources, deployment)
        result[name] = set()
        for variable in DIALS.get(name, {}):
            value = variables[variable]
            # The router's own parser: the value must be one it accepts.
            targets = parse_renderers(value).values() if variable == "AIPROD_RENDERERS" else [value]
            for target in targets:
                match = DNS_TARGET.match(target)
                assert match, f"{name}: {target!r} is not dns:/// (round_robin needs every address)"
                result[name].add((match[1], int(match[2])))
    return result


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dialed_services_are_headless_and_reach_their_deployment(overlay: str) -> None:
    resources = rendered(OVERLAYS[overlay])
    services, deployments = of_kind(resources, "Service"), of_kind(resources, "Deployment")
    calls = dialed(resources)
    for name, settings in DIALS.items():
        expected = set().union(*settings.values())
        assert calls[name] == {(target, SPECS[target].default_port) for target in expected}, name
    # A ClusterIP would pin each gRPC client to one pod (the gateway's clients dial dns:/// too).
    assert all(services[name]["spec"]["clusterIP"] == "None" for name in MESH)
    for name, port in set().union(*calls.values()):
        service = services[name]
        (service_port,) = (p for p in service["spec"]["ports"] if p["port"] == port)
        (target,) = (
            d
            for d in deployments.values()
            if selects({"matchLabels": service["spec"]["selector"]}, pod_labels(d))
        )
        assert target["metadata"]["name"] == name
        assert any(
            p["name"] == service_port["targetPort"] and p["containerPort"] == port
            for p in container(target)["ports"]
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_provider_credentials_are_optional_secrets(overlay: str) -> None:
    deployments = of_kind(rendered(OVERLAYS[overlay]), "Deployment")
    credentials = {
        "renderer-runway": "RUNWAYML_API_SECRET",
        "renderer-veo": "AIPROD_VEO_ACCESS_TOKEN",
        "renderer-replicate": "REPLICATE_API_TOKEN",
    }
    for name, variable in credentials.items():
        # Optional: a renderer without credentials runs, reporting NOT_SERVING.
        assert secret_references(deployments[name])[variable]["optional"] is True, name


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_the_gateway_admin_key_is_an_optional_secret(overlay: str) -> None:
    manifests = rendered(OVERLAYS[overlay])
    reference = secret_references(of_kind(manifests, "Deployment")["gateway"])["AIPROD_GATEWAY_ADMIN_KEY"]
    assert reference["optional"] is True
    secrets = {secret["metadata"]["name"] for secret in manifests if secret["kind"] == "Secret"}
    # The dev overlay brings its own; production's is created by its operators, never in the repository.
    assert any(name.startswith(reference["name"]) for name in secrets) == (overlay == "dev")


def test_dev_points_the_provider_renderers_at_the_sandbox() -> None:
    resources = rendered(OVERLAYS["dev"])
    deployments, services = of_kind(resources, "Deployment"), of_kind(resources, "Service")
    port = SPECS["sandbox"].default_port
    assert services["sandbox"]["spec"]["ports"][0]["port"] == port
    expected = sandbox_environment(f"sandbox:{port}")
    seen: dict[str, str] = {}
    for name in PROVIDER_RENDERERS:
        variables = environment(resources, deployments[name])
        seen.update({variable: variables[variable] for variable in expected if variable in variables})
    assert seen == expected
    assert SandboxSettings.model_fields["sandbox_api_key"].default in seen.values()
    assert environment(resources, deployments["gateway"])["AIPROD_OTEL_EXPORTER"] == "console"


def test_gke_sends_telemetry_through_the_collector() -> None:
    resources = rendered(OVERLAYS["gke"])
    deployments = of_kind(resources, "Deployment")
    for name in MESH:
        variables = environment(resources, deployments[name])
        assert variables["AIPROD_OTEL_EXPORTER"] == "otlp", name
        assert variables["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317", name
    service = of_kind(resources, "Service")["otel-collector"]
    assert [port["port"] for port in service["spec"]["ports"]] == [4317]
    collector = deployments["otel-collector"]
    (volume,) = collector["spec"]["template"]["spec"]["volumes"]
    configmap = of_kind(resources, "ConfigMap")[volume["configMap"]["name"]]
    config = yaml.safe_load(configmap["data"]["collector.yaml"])
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    pipelines = config["service"]["pipelines"]
    assert pipelines["metrics"]["exporters"] == ["googlemanagedprometheus"]
    assert pipelines["traces"]["exporters"] == ["googlecloud"]
    for pipeline in pipelines.values():
        assert pipeline["processors"][0] == "memory_limiter"
        assert {"batch", "resourcedetection"} <= set(pipeline["processors"])
    assert "gcp" in config["processors"]["resourcedetection"]["detectors"]
    account = of_kind(resources, "ServiceAccount")[
        collector["spec"]["template"]["spec"]["serviceAccountName"]
    ]
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(
        ".iam.gserviceaccount.com"
    )


def test_gke_keeps_jobs_and_ledger_in_postgresql() -> None:
    deployments = of_kind(rendered(OVERLAYS["gke"]), "Deployment")
    for name in ("gateway", "metrics"):
        reference = secret_references(deployments[name])["AIPROD_DATABASE_URL"]
        assert reference == {"name": "aiprod-database", "key": "url"}, name
    for name in set(MESH) - {"gateway", "metrics"}:
        assert "AIPROD_DATABASE_URL" not in secret_references(deployments[name]), name


def test_gke_names_one_project_everywhere() -> None:
    resources = rendered(OVERLAYS["gke"])
    assert not [text for resource in resources for text in strings(resource) if "PROJECT_ID" in text]
    deployments = of_kind(resources, "Deployment")
    project = environment(resources, deployments["renderer-veo"])["GOOGLE_CLOUD_PROJECT"]
    for resource in resources:
        if resource["kind"] == "MonitoringAlertPolicy":
            assert resource["metadata"]["annotations"]["cnrm.cloud.google.com/project-id"] == project
        elif is_config_connector(resource):
            assert resource["spec"]["projectRef"]["external"].removeprefix("projects/") == project


# --- Network policies ----------------------------------------------------------------------------

CLIENT = {"app": "some-client"}  # a pod of the namespace that is not part of the mesh
# Addresses outside the cluster's pods: the internet, a Cloud SQL private IP, the metadata server.
INTERNET, PRIVATE = "203.0.113.7", "10.20.0.5"


def _peer_matches(peer: dict, labels: dict[str, str] | None, address: str | None, namespace: str) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        inside = address is not None and ipaddress.ip_address(address) in ipaddress.ip_network(block["cidr"])
        return inside and not any(
            ipaddress.ip_address(address) in ipaddress.ip_network(cidr) for cidr in block.get("except", [])
        )
    if labels is None:
        return False  # pod selectors match no address outside the cluster
    if "namespaceSelector" in peer and not selects(
        peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace}
    ):
        return False
    return selects(peer.get("podSelector", {}), labels)


def _port_matches(ports: list[dict] | None, port: int, protocol: str) -> bool:
    return not ports or any(
        entry.get("protocol", "TCP") == protocol
        and (entry.get("port") is None or entry["port"] <= port <= entry.get("endPort", entry["port"]))
        for entry in ports
    )


def _admits(
    policies: list[dict],
    direction: str,
    pod: dict[str, str],
    peer: tuple,
    port: int,
    protocol: str,
    namespace: str,
) -> bool:
    """Whether the policies selecting `pod` let a connection through in `direction` ("ingress" or
    "egress") with `peer` = (labels, address)."""
    applicable = [
        policy
        for policy in policies
        if selects(policy["spec"]["podSelector"], pod)
        and direction.capitalize() in policy["spec"].get("policyTypes", ["Ingress"])
    ]
    if not applicable:
        return True
    side = "from" if direction == "ingress" else "to"
    return any(
        _port_matches(rule.get("ports"), port, protocol)
        and (side not in rule or any(_peer_matches(p, *peer, namespace) for p in rule[side]))
        for policy in applicable
        for rule in policy["spec"].get(direction, [])
    )


def test_network_policies_allow_exactly_the_architectures_calls() -> None:
    resources = rendered(OVERLAYS["gke"])
    policies = list(of_kind(resources, "NetworkPolicy").values())
    deployments = of_kind(resources, "Deployment")
    pods = {name: pod_labels(deployment) for name, deployment in deployments.items()} | {"client": CLIENT}
    ports = {name: [p["containerPort"] for p in container(d)["ports"]] for name, d in deployments.items()}

    def connects(source: str, target: str, port: int) -> bool:
        return _admits(
            policies, "egress", pods[source], (pods[target], None), port, "TCP", "aiprod"
        ) and _admits(policies, "ingress", pods[target], (pods[source], None), port, "TCP", "aiprod")

    allowed = {
        (source, target, port)
        for source in pods
        for target in deployments
        for port in ports[target]
        if source != target and connects(source, target, port)
    }
    calls = {(source, name, port) for source, targets in dialed(resources).items() for name, port in targets}
    telemetry = {(name, "otel-collector", 4317) for name in MESH}
    assert allowed == calls | telemetry | {("client", "gateway", 50051)}

    def reaches(source: str, address: str, port: int, protocol: str = "TCP") -> bool:
        return _admits(policies, "egress", pods[source], (None, address), port, protocol, "aiprod")

    # Out of the cluster: providers and Google APIs over HTTPS, PostgreSQL, the metadata server.
    google = {*PROVIDER_RENDERERS, "otel-collector"}
    assert {name for name in pods if reaches(name, INTERNET, 443)} == google
    assert {name for name in pods if reaches(name, "169.254.169.254", 80)} == google
    assert {name for name in pods if reaches(name, PRIVATE, 5432)} == {"gateway", "metrics"}
    assert {name for name in pods if reaches(name, INTERNET, 5432)} == set()
    assert all(reaches(name, PRIVATE, 53, "UDP") for name in pods)
    assert not any(reaches(name, INTERNET, 80) for name in pods)


# --- Monitoring ----------------------------------------------------------------------------------

SCHEME = list(documented_metrics().values())
METRICS = aiprod_settings.MetricsSettings.model_fields


def default(field: str) -> float:
    return METRICS[field].default


def seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration.removesuffix("s"))


def otel_name(metric_type: str, variant: str) -> str:
    (name,) = (m.name for m in SCHEME if arriving_name(m.name, m.kind, m.unit, variant) == metric_type)
    return name


def monitoring(variant: str) -> dict[str, dict[str, dict]]:
    resources = rendered(MONITORING[variant])
    return {kind: of_kind(resources, kind) for kind in {resource["kind"] for resource in resources}}


def the_condition(policy: dict) -> dict:
    (condition,) = policy["spec"]["conditions"]
    return condition


def threshold_condition(policy: dict, variant: str) -> tuple[str, dict]:
    """The OpenTelemetry metric a threshold policy watches, and its condition."""
    condition = the_condition(policy)["conditionThreshold"]
    (metric_type,) = types_in(condition["filter"], variant)
    return otel_name(metric_type, variant), condition


@pytest.mark.parametrize("variant", VARIANTS)
def test_alert_policies_hold_the_products_numbers(variant: str) -> None:
    policies = monitoring(variant)["MonitoringAlertPolicy"]
    expected = {
        # name: (metric, severity, comparison, threshold, window in seconds, reducer, grouped by)
        "aiprod-daily-spend-warning": (
            "aiprod.metrics.daily_spend", "WARNING", "COMPARISON_GT", default("metrics_alert_spend_warning_usd"), None, None, [],
        ),
        "aiprod-daily-spend-critical": (
            "aiprod.metrics.daily_spend", "CRITICAL", "COMPARISON_GT", default("metrics_alert_spend_critical_usd"), None, None, [],
        ),
        "aiprod-mean-quality-low": (
            "aiprod.gateway.job_quality", "CRITICAL", "COMPARISON_LT", default("metrics_alert_quality_min"),
            default("metrics_alert_quality_window_seconds"), "REDUCE_MEAN", [],
        ),
        "aiprod-job-latency-p95-high": (
            "aiprod.gateway.job_duration", "CRITICAL", "COMPARISON_GT", default("metrics_alert_latency_p95_max_seconds"),
            default("metrics_alert_latency_window_seconds"), "REDUCE_PERCENTILE_95", [],
        ),
        "aiprod-backend-errors-high": (
            "aiprod.router.backend_errors", "WARNING", "COMPARISON_GT", default("metrics_alert_backend_errors_max"),
            default("metrics_alert_backend_errors_window_seconds"), "REDUCE_SUM", ["metric.label.backend"],
        ),
        "aiprod-rpc-latency-p99-high": (
            "rpc.server.call.duration", "WARNING", "COMPARISON_GT", 20, 300, "REDUCE_PERCENTILE_99",
            ["metric.label.rpc_service", "metric.label.rpc_method"],
        ),
    }  # fmt: skip
    assert set(policies) == {*expected, "aiprod-rpc-error-ratio-high"}
    for name, (metric, severity, comparison, threshold, window, reducer, groups) in expected.items():
        policy = policies[name]
        watched, condition = threshold_condition(policy, variant)
        assert (watched, policy["spec"]["severity"]) == (metric, severity), name
        assert (condition["comparison"], condition["thresholdValue"]) == (comparison, threshold), name
        (aggregation,) = condition["aggregations"]
        if window is not None:
            assert seconds(aggregation["alignmentPeriod"]) == window, name
            assert aggregation["crossSeriesReducer"] == reducer, name
        assert aggregation.get("groupByFields", []) == groups, name
    # The latency of streams is the length of a render: they are left out.
    latency_filter = threshold_condition(policies["aiprod-rpc-latency-p99-high"], variant)[1]["filter"]
    excluded = re.search(r"NOT metric\.label\.rpc_method = one_of\(([^)]*)\)", latency_filter)
    assert excluded and set(re.findall(r'"(\w+)"', excluded[1])) == set(STREAMING_METHODS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rpc_error_ratio_alert_is_five_percent_of_calls(variant: str) -> None:
    policy = monitoring(variant)["MonitoringAlertPolicy"]["aiprod-rpc-error-ratio-high"]
    assert policy["spec"]["severity"] == "WARNING"
    query = the_condition(policy)["conditionPrometheusQueryLanguage"]["query"]
    numerator, denominator = query.split(" / ")
    assert float(re.fullmatch(r".*>\s*([0-9.]+)", denominator)[1]) == 0.05
    assert {otel_name(t, variant) for t in types_in(query, variant)} == {"rpc.server.call.duration"}
    # Errors: server failures only; the denominator is every call.
    codes = re.search(r'rpc_grpc_status_code=~"([^"]+)"', numerator)[1].split("|")
    assert set(codes) == {"2", "4", "13", "14", "15"}
    assert "rpc_grpc_status_code" not in denominator


@pytest.mark.parametrize("variant", VARIANTS)
def test_slos_hold_the_products_goals(variant: str) -> None:
    resources = monitoring(variant)
    (service,) = resources["MonitoringService"]
    window = default("metrics_slo_window_days") * 86400
    expected = {
        "aiprod-job-latency": (
            "aiprod.gateway.job_duration", default("metrics_slo_latency_goal"),
            {"min": 0, "max": default("metrics_slo_latency_max_seconds")},
        ),
        "aiprod-job-quality": (
            "aiprod.gateway.job_quality", default("metrics_slo_quality_goal"),
            {"min": default("metrics_slo_quality_min"), "max": 1},
        ),
    }  # fmt: skip
    assert set(resources["MonitoringServiceLevelObjective"]) == set(expected)
    for name, (metric, goal, good) in expected.items():
        slo = resources["MonitoringServiceLevelObjective"][name]["spec"]
        assert slo["serviceRef"] == {"name": service}, name
        assert (slo["goal"], seconds(slo["rollingPeriod"])) == (goal, window), name
        cut = slo["serviceLevelIndicator"]["requestBased"]["distributionCut"]
        (metric_type,) = types_in(cut["distributionFilter"], variant)
        assert otel_name(metric_type, variant) == metric, name
        assert cut["range"] == good, name


def test_dashboard_charts_the_main_metrics() -> None:
    (dashboard,) = monitoring("collector")["MonitoringDashboard"].values()
    charted = {otel_name(t, "collector") for text in strings(dashboard) for t in types_in(text, "collector")}
    assert charted >= {
        "aiprod.gateway.jobs_created", "aiprod.gateway.jobs_completed", "aiprod.gateway.jobs_failed",
        "aiprod.gateway.job_duration", "aiprod.gateway.job_quality", "aiprod.gateway.job_cost",
        "aiprod.metrics.daily_spend", "aiprod.metrics.budget_remaining", "aiprod.metrics.budget_level",
        "aiprod.metrics.reservations", "aiprod.router.backend_health", "aiprod.router.breaker_state",
        "aiprod.router.attempts", "aiprod.router.backend_errors", "aiprod.router.fallbacks",
        "aiprod.router.uncertain_attempts", "aiprod.renderer.provider_requests",
        "aiprod.renderer.provider_request_duration", "rpc.server.call.duration",
    }  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
def test_monitoring_names_only_metrics_of_the_scheme(variant: str) -> None:
    shape = {
        "collector": rf"{re.escape(COLLECTOR_PREFIX)}[a-z0-9_]+/(counter|gauge|histogram)",
        "direct": rf"{re.escape(DIRECT_PREFIX)}[a-z][a-z0-9_]*(\.[a-z0-9_]+)+",
    }[variant]
    arriving = {arriving_name(m.name, m.kind, m.unit, variant) for m in SCHEME}
    types = metric_types(variant)
    assert len(types) >= 20
    for metric_type in types:
        assert re.fullmatch(shape, metric_type), metric_type
        assert metric_type in arriving, f"{metric_type} is not in docs/TELEMETRY.md's scheme"


LABEL_KEY = re.compile(r"metric\.labels?\.([A-Za-z0-9_]+)")
PROMQL_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')
PROMQL_BY = re.compile(r"\bby\s*\(([^)]*)\)")


def queries(value: object) -> Iterator[tuple[str, list[str]]]:
    """Every filter or query in a resource, with the label keys its aggregations group by."""
    if isinstance(value, list):
        for item in value:
            yield from queries(item)
    elif isinstance(value, dict):
        for key in ("filter", "distributionFilter", "query", "prometheusQuery"):
            if isinstance(value.get(key), str):
                aggregations = value.get("aggregations") or [value.get("aggregation") or {}]
                yield value[key], [field for a in aggregations for field in a.get("groupByFields", [])]
        for item in value.values():
            yield from queries(item)


@pytest.mark.parametrize("variant", VARIANTS)
def test_monitoring_labels_are_the_metrics_own(variant: str) -> None:
    checked = 0
    for resource in rendered(MONITORING[variant]):
        for text, groups in queries(resource):
            metrics = [
                m for m in SCHEME if arriving_name(m.name, m.kind, m.unit, variant) in types_in(text, variant)
            ]
            if not metrics:
                continue
            labels = {label.replace(".", "_") for metric in metrics for label in metric.labels}
            used = set(LABEL_KEY.findall(" ".join([text, *groups])))
            if "__name__" in text:  # PromQL
                used |= {label for label in PROMQL_LABEL.findall(text) if label != "__name__"}
                used |= {label.strip() for group in PROMQL_BY.findall(text) for label in group.split(",")}
            assert used <= labels, f"{text}: {used - labels} are not labels of {[m.name for m in metrics]}"
            checked += 1
    assert checked >= 30


def _canonical(value: object, variant: str) -> object:
    """A resource with every metric named by its OpenTelemetry name and no resource type: what the two
    variants must have in common."""
    if isinstance(value, dict):
        return {key: _canonical(item, variant) for key, item in value.items()}
    if isinstance(value, list):
        return [_canonical(item, variant) for item in value]
    if not isinstance(value, str) or not types_in(value, variant):
        return value
    text = re.sub(r'\s*AND resource\.type = "[^"]+"', "", value)
    text = re.sub(r'metric\.type\s*=\s*"([^"]+)"', lambda m: f"metric={otel_name(m[1], variant)}", text)
    return re.sub(
        r'__name__\s*=\s*"([^"]+?)(_count|_sum|_bucket)?"',
        lambda m: f"metric={otel_name(next(iter(types_in(m[0], variant))), variant)}{m[2] or ''}",
        text,
    )


def test_direct_variant_changes_only_metric_names() -> None:
    collector, direct = (rendered(MONITORING[variant]) for variant in VARIANTS)
    key = lambda resource: (resource["kind"], resource["metadata"]["name"])  # noqa: E731
    collector, direct = sorted(collector, key=key), sorted(direct, key=key)
    assert [key(resource) for resource in collector] == [key(resource) for resource in direct]
    for ours, theirs in zip(collector, direct, strict=True):
        assert _canonical(ours, "collector") == _canonical(theirs, "direct"), key(ours)
    assert json.dumps(collector) != json.dumps(direct)


@pytest.mark.parametrize(
    ("otel", "kind", "unit", "collector"),
    [
        # docs/TELEMETRY.md's examples, and an up-down counter.
        ("aiprod.gateway.jobs_created", "counter", "{job}", "aiprod_gateway_jobs_created_total/counter"),
        ("aiprod.gateway.job_duration", "histogram", "s", "aiprod_gateway_job_duration_seconds/histogram"),
        ("aiprod.metrics.daily_spend", "gauge", "{USD}", "aiprod_metrics_daily_spend/gauge"),
        ("aiprod.metrics.budget_level", "updown", "", "aiprod_metrics_budget_level/gauge"),
    ],
)
def test_arriving_name_follows_the_documented_rule(otel: str, kind: str, unit: str, collector: str) -> None:
    assert arriving_name(otel, kind, unit, "collector") == COLLECTOR_PREFIX + collector
    assert arriving_name(otel, kind, unit, "direct") == DIRECT_PREFIX + otel


def test_gke_stitches_long_videos_in_the_bucket_the_renderers_write() -> None:
    resources = rendered(OVERLAYS["gke"])
    deployments = of_kind(resources, "Deployment")
    buckets = {
        name: environment(resources, deployments[name]).get("AIPROD_GCS_BUCKET")
        for name in ("gateway", "renderer-local", "renderer-runway", "renderer-veo", "renderer-replicate")
    }
    assert len(set(buckets.values())) == 1 and buckets["gateway"], buckets
    # Each writes or reads that bucket as a Google service account (Workload Identity).
    accounts = of_kind(resources, "ServiceAccount")
    for name in buckets:
        account = accounts[deployments[name]["spec"]["template"]["spec"]["serviceAccountName"]]
        assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(
            ".iam.gserviceaccount.com"
        ), name


# --- Mutual TLS --------------------------------------------------------------------------------------


def test_gke_runs_mutual_tls_between_the_services_with_rotating_certificates() -> None:
    resources = rendered(OVERLAYS["gke"])
    certificates, issuers = of_kind(resources, "Certificate"), of_kind(resources, "Issuer")
    mesh_certificate = certificates["aiprod-mesh"]["spec"]
    # Named for every service as the others dial it, and for the gateway's callers in other namespaces.
    dialed_names = {name for calls in dialed(resources).values() for name, _ in calls}
    assert dialed_names <= set(mesh_certificate["dnsNames"])
    assert {"gateway", "gateway.aiprod.svc", "gateway.aiprod.svc.cluster.local"} <= set(
        mesh_certificate["dnsNames"]
    )
    assert {"server auth", "client auth"} <= set(mesh_certificate["usages"])
    assert mesh_certificate["privateKey"]["rotationPolicy"] == "Always"
    # Issued by the mesh's own CA, an Issuer of this output whose Secret the CA certificate fills.
    ca_issuer = issuers[mesh_certificate["issuerRef"]["name"]]
    (ca_certificate,) = (
        c for c in certificates.values() if c["spec"]["secretName"] == ca_issuer["spec"]["ca"]["secretName"]
    )
    assert ca_certificate["spec"]["isCA"] is True
    assert ca_certificate["spec"]["issuerRef"]["name"] in issuers
    for name, deployment in of_kind(resources, "Deployment").items():
        if name not in MESH:
            continue
        variables = environment(resources, deployment)
        assert variables["AIPROD_TLS_MODE"] == "mtls", name
        # The gateway's callers need only the CA; between the services, mutual TLS.
        assert variables.get("AIPROD_TLS_SERVER_MODE") == ("tls" if name == "gateway" else None), name
        pod = deployment["spec"]["template"]["spec"]
        (volume,) = (
            v
            for v in pod["volumes"]
            if v.get("secret", {}).get("secretName") == mesh_certificate["secretName"]
        )
        (mount,) = (m for m in container(deployment)["volumeMounts"] if m["name"] == volume["name"])
        assert "subPath" not in mount, f"{name}: a subPath mount never sees the Secret's rotations"
        for variable, key in (("CERT", "tls.crt"), ("KEY", "tls.key"), ("CA", "ca.crt")):
            assert variables[f"AIPROD_TLS_{variable}_FILE"] == f"{mount['mountPath']}/{key}", name


def test_dev_runs_plaintext() -> None:
    resources = rendered(OVERLAYS["dev"])
    assert not [resource for resource in resources if is_cert_manager(resource)]
    for name, deployment in of_kind(resources, "Deployment").items():
        assert environment(resources, deployment).get("AIPROD_TLS_MODE", "off") == "off", name
