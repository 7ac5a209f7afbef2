"""deploy/k8s: every manifest validates against the Kubernetes API schemas, and the pieces fit:
selectors, ports, probes, security, GPUs, and the services' real command-line parsers."""

from __future__ import annotations

import argparse
from typing import Any

import kubernetes_validate
import pytest

from services.gateway.args import build_parser as gateway_parser
from services.router.args import build_parser as router_parser
from services.worker.args import build_parser as worker_parser
from services.worker.args import engine_config
from tests.deploy.manifests import (
    ALL,
    APPLIED,
    LONG_RUNNING_KINDS,
    NAMESPACE,
    TANDEM_IMAGE,
    UID,
    WORKLOAD_KINDS,
    Doc,
    Manifest,
    container_env,
    container_ports,
    find,
    pod_annotations,
    pod_labels,
    pod_spec,
    resolve_port,
    resolved_args,
    selected_workloads,
    service_target,
)

# The oldest Kubernetes these manifests promise to work on (native gRPC probes are GA since
# 1.27), and the newest the validator knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CORE_API_VERSIONS = {"v1", "apps/v1", "batch/v1", "policy/v1", "autoscaling/v2", "networking.k8s.io/v1"}
COMPONENTS = ("gateway", "router", "prefill", "decode")
PARSERS: dict[str, Any] = {
    "gateway": gateway_parser,
    "router": router_parser,
    "prefill": lambda: worker_parser("prefill"),
    "decode": lambda: worker_parser("decode"),
}


def is_crd_kind(m: Manifest) -> bool:
    return m.doc["apiVersion"] not in CORE_API_VERSIONS


def deployment(component: str) -> Doc:
    return find("Deployment", f"tandem-{component}")


def container(component: str) -> Doc:
    (only,) = pod_spec(deployment(component))["containers"]
    return only


def parse(component: str) -> argparse.Namespace:
    """The component's container args through its service's real argparse parser."""
    args = resolved_args(container(component))
    assert args[:3] == ["python", "-m", f"services.{component}"], args[:3]
    unresolved = [a for a in args if "$(" in a]
    assert not unresolved, f"undefined variables in args: {unresolved}"
    try:
        return PARSERS[component]().parse_args(args[3:])
    except SystemExit as e:
        raise AssertionError(f"python -m services.{component} rejects {args[3:]}") from e


def all_pod_specs() -> list[tuple[str, Doc]]:
    return [(m.id, m.doc) for m in ALL if m.kind in WORKLOAD_KINDS]


# ---- schemas and layout -------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("m", [m for m in ALL if not is_crd_kind(m)], ids=lambda m: m.id)
def test_manifest_validates_against_the_kubernetes_schema(m: Manifest, version: str) -> None:
    kubernetes_validate.validate(m.doc, version, strict=True)


def test_plain_apply_needs_no_crds_and_creates_the_namespace_first() -> None:
    assert APPLIED[0].kind == "Namespace" and APPLIED[0].name == NAMESPACE
    for m in APPLIED:
        assert not is_crd_kind(m), f"{m.id} needs a CRD: move it to deploy/k8s/extras"
    for m in ALL:
        if m.kind != "Namespace":
            assert m.doc["metadata"].get("namespace") == NAMESPACE, m.id
    assert any(is_crd_kind(m) for m in ALL if m.path.parent.name == "extras")


def test_every_component_is_deployed_with_a_service_and_a_disruption_budget() -> None:
    for component in COMPONENTS:
        name = f"tandem-{component}"
        assert find("Service", name)["spec"]["selector"].items() <= pod_labels(deployment(component)).items()
        assert find("PodDisruptionBudget", name)
    assert deployment("gateway")["spec"]["replicas"] >= 2
    assert deployment("router")["spec"]["replicas"] == 1
    for pool in ("prefill", "decode"):  # workers are addressed one by one: headless
        assert find("Service", f"tandem-{pool}")["spec"]["clusterIP"] == "None"
    jaeger = find("Service", "jaeger")
    assert {p["port"] for p in jaeger["spec"]["ports"]} >= {4317, 4318, 16686}


# ---- selectors and ports --------------------------------------------------------------------------


@pytest.mark.parametrize("m", [m for m in ALL if m.kind in LONG_RUNNING_KINDS | {"Job"}], ids=lambda m: m.id)
def test_workload_selector_matches_its_pod_labels(m: Manifest) -> None:
    selector = m.doc["spec"].get("selector", {}).get("matchLabels")
    if m.kind == "Job" and selector is None:
        return  # Jobs generate their own selector
    assert selector and selector.items() <= pod_labels(m.doc).items()


@pytest.mark.parametrize("m", [m for m in ALL if m.kind == "Service"], ids=lambda m: m.id)
def test_service_selects_one_workload_and_its_target_ports_exist(m: Manifest) -> None:
    behind = selected_workloads(m.doc["spec"]["selector"], ALL)  # exactly one, model/ pods included
    assert len(behind) == 1, f"{m.id} selects {len(behind)} workloads"
    for port in m.doc["spec"]["ports"]:
        assert resolve_port(behind[0], port.get("targetPort", port["port"])) is not None, port


@pytest.mark.parametrize("m", [m for m in ALL if m.kind == "PodDisruptionBudget"], ids=lambda m: m.id)
def test_disruption_budget_selects_a_workload(m: Manifest) -> None:
    assert len(selected_workloads(m.doc["spec"]["selector"]["matchLabels"], ALL)) == 1


@pytest.mark.parametrize("m", [m for m in ALL if m.kind == "PodMonitor"], ids=lambda m: m.id)
def test_pod_monitor_selects_pods_that_have_its_port(m: Manifest) -> None:
    pods = selected_workloads(m.doc["spec"]["selector"]["matchLabels"])
    for endpoint in m.doc["spec"]["podMetricsEndpoints"]:
        assert any(endpoint["port"] in container_ports(w) for w in pods), endpoint


# ---- every long-running container: probes, resources, security ------------------------------------


@pytest.mark.parametrize("m", [m for m in ALL if m.kind in LONG_RUNNING_KINDS], ids=lambda m: m.id)
def test_containers_have_probes_on_declared_ports(m: Manifest) -> None:
    for c in pod_spec(m.doc)["containers"]:
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            assert probe, f"{c['name']} has no {kind}"
            (action,) = (k for k in ("grpc", "httpGet", "tcpSocket", "exec") if k in probe)
            if action != "exec":
                assert resolve_port(m.doc, probe[action]["port"]) is not None, (c["name"], kind)
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 60


@pytest.mark.parametrize("name,doc", all_pod_specs(), ids=[n for n, _ in all_pod_specs()])
def test_containers_have_requests_and_limits(name: str, doc: Doc) -> None:
    for c in pod_spec(doc)["containers"]:
        resources = c.get("resources", {})
        for key in ("cpu", "memory"):
            assert key in resources.get("requests", {}) and key in resources.get("limits", {}), (
                c["name"],
                key,
            )


@pytest.mark.parametrize("name,doc", all_pod_specs(), ids=[n for n, _ in all_pod_specs()])
def test_pods_run_as_non_root_without_privileges(name: str, doc: Doc) -> None:
    spec = pod_spec(doc)
    pod = spec.get("securityContext", {})
    assert pod.get("runAsNonRoot") is True
    assert isinstance(pod.get("runAsUser"), int) and pod["runAsUser"] > 0
    assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert spec.get("automountServiceAccountToken") is False
    for c in spec["containers"]:
        sc = c.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, c["name"]
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), c["name"]
        assert not sc.get("capabilities", {}).get("add"), c["name"]
        assert sc.get("privileged") is not True and sc.get("runAsUser", 1) != 0, c["name"]
        if c["image"].startswith(TANDEM_IMAGE):
            assert pod["runAsUser"] == UID and "command" not in c, "the image's user and entrypoint"
        # Read-only root: every writable path the container needs is a mounted volume.
        assert sc.get("readOnlyRootFilesystem") is True, c["name"]
        assert "/tmp" in {v["mountPath"] for v in c.get("volumeMounts", [])}, c["name"]


@pytest.mark.parametrize("m", [m for m in APPLIED if m.kind in LONG_RUNNING_KINDS], ids=lambda m: m.id)
def test_pods_carry_prometheus_scrape_annotations(m: Manifest) -> None:
    annotations = pod_annotations(m.doc)
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/path") == "/metrics"
    assert int(annotations["prometheus.io/port"]) in container_ports(m.doc).values()


@pytest.mark.parametrize("m", [m for m in APPLIED if m.kind in LONG_RUNNING_KINDS], ids=lambda m: m.id)
def test_graceful_termination_is_configured(m: Manifest) -> None:
    assert pod_spec(m.doc).get("terminationGracePeriodSeconds", 0) >= 30


@pytest.mark.parametrize("pool", ["prefill", "decode"])
def test_worker_pods_get_a_gpu_shared_memory_and_spread(pool: str) -> None:
    spec = pod_spec(deployment(pool))
    resources = container(pool)["resources"]
    assert int(resources["requests"]["nvidia.com/gpu"]) == int(resources["limits"]["nvidia.com/gpu"]) == 1
    shm = {v["name"] for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
    assert any(v["mountPath"] == "/dev/shm" and v["name"] in shm for v in container(pool)["volumeMounts"])
    assert spec["topologySpreadConstraints"]
    for component in ("gateway", "router"):
        assert "nvidia.com/gpu" not in container(component)["resources"]["limits"]


def test_model_volume_is_mounted_read_only_by_the_services() -> None:
    for component in COMPONENTS:
        volumes = {v["name"]: v for v in pod_spec(deployment(component))["volumes"]}
        (mount,) = (v for v in container(component)["volumeMounts"] if v["mountPath"] == "/models")
        assert mount["readOnly"] is True
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "tandem-models"
    model_path = find("ConfigMap", "tandem-config")["data"]["MODEL_PATH"]
    assert model_path.startswith("/models/")


# ---- the services' own flags ----------------------------------------------------------------------


@pytest.mark.parametrize("component", COMPONENTS)
def test_container_args_are_accepted_by_the_service_parser(component: str) -> None:
    ns = parse(component)
    ports = container_ports(deployment(component))
    if component == "gateway":
        assert ns.port == ports["http"] and ns.host == "0.0.0.0"
        return
    assert ns.host == "0.0.0.0"  # the kubelet's probes and peers connect to the pod IP
    assert ns.port == ports["grpc"]
    assert ns.metrics_port == ports["metrics"]
    assert int(pod_annotations(deployment(component))["prometheus.io/port"]) == ns.metrics_port
    if component == "router":
        assert ns.admin_http_port == ports["admin"] and ns.admin_port == ports["admin-grpc"]


def test_gateway_reaches_the_router_public_port_and_workers_its_admin_port() -> None:
    router = parse("router")
    _service, behind, port = service_target(parse("gateway").router)
    assert behind is deployment("router") and port == router.port
    for pool in ("prefill", "decode"):  # workers register and heartbeat on the admin port
        service, behind, port = service_target(parse(pool).router)
        assert behind is deployment("router") and port == router.admin_port, pool
        assert service["metadata"]["name"] == "tandem-router-admin"


def test_the_public_router_service_carries_no_admin_port() -> None:
    router = parse("router")
    ports = container_ports(deployment("router"))
    assert ports["admin-grpc"] == router.admin_port and ports["admin"] == router.admin_http_port
    public = {
        resolve_port(deployment("router"), p["targetPort"])
        for p in find("Service", "tandem-router")["spec"]["ports"]
    }
    assert router.port in public and not public & {router.admin_port, router.admin_http_port}
    assert router.admin_host == "0.0.0.0"  # workers in other pods register: the token guards it


SECRETS = {  # component -> the tandem-secrets keys it reads, by environment variable
    "gateway": {"TANDEM_API_KEY": "api-key"},
    "router": {"TANDEM_API_KEY": "api-key", "TANDEM_CLUSTER_TOKEN": "cluster-token"},
    "prefill": {"TANDEM_CLUSTER_TOKEN": "cluster-token"},
    "decode": {"TANDEM_CLUSTER_TOKEN": "cluster-token"},
}


@pytest.mark.parametrize("component", COMPONENTS)
def test_keys_and_the_cluster_token_come_from_the_secret(component: str) -> None:
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container(component)["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert {name: ref["key"] for name, ref in refs.items()} == SECRETS[component]
    assert all(ref["name"] == "tandem-secrets" and not ref.get("optional") for ref in refs.values())
    args = resolved_args(container(component))
    assert not any(a.startswith(("--api-key", "--cluster-token")) for a in args)  # never in argv
    # The placeholder Secret defines every key, and is not applied with the suite (re-applying
    # must not overwrite real secrets).
    placeholder = find("Secret", "tandem-secrets", ALL)
    assert set(SECRETS[component].values()) <= set(placeholder["stringData"])
    assert not [m for m in APPLIED if m.kind == "Secret"]


@pytest.mark.parametrize("pool", ["prefill", "decode"])
def test_workers_advertise_their_pod_ip_and_grpc_port(pool: str) -> None:
    ns = parse(pool)
    assert ns.advertise_address == f"10.1.2.3:{ns.port}"  # $(POD_IP) from the downward API
    assert ns.device.startswith("cuda")
    assert ns.served_model_name == parse("router").served_model_name == parse("gateway").served_model_name
    assert ns.model == parse("router").model == parse("gateway").tokenizer


@pytest.mark.parametrize("pool", ["prefill", "decode"])
def test_drain_hook_reaches_the_router_admin_port_and_names_this_worker(pool: str) -> None:
    env = container_env(container(pool))
    assert container(pool)["lifecycle"]["preStop"]["exec"]["command"][-1].endswith("drain.py")
    assert env["WORKER_ADDRESS"] == parse(pool).advertise_address
    url = env["ROUTER_ADMIN_URL"].removeprefix("http://")
    _service, behind, port = service_target(url)
    assert behind is deployment("router") and port == parse("router").admin_http_port
    grace = pod_spec(deployment(pool))["terminationGracePeriodSeconds"]
    assert float(env["DRAIN_TIMEOUT_S"]) + 15 <= grace  # room for the service's own 5 s and the engine


def test_traces_go_to_jaegers_otlp_grpc_port() -> None:
    config = find("ConfigMap", "tandem-config")["data"]
    endpoint = config["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert endpoint.startswith("http://") and config["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    _service, behind, port = service_target(endpoint.removeprefix("http://"))
    assert behind is find("Deployment", "jaeger") and port == 4317
    for component in COMPONENTS:
        names = {e["name"] for e in container(component)["env"]}
        assert {"OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"} <= names, component


# ---- deploy/k8s/extras/tensor-parallel ---------------------------------------------------


def worker_args(container: Doc) -> argparse.Namespace:
    """An extras worker container's args through the unified worker's parser (and EngineConfig)."""
    args = resolved_args(container, ALL)
    assert args[:3] == ["python", "-m", "services.worker"], args[:3]
    assert not [a for a in args if "$(" in a], args
    ns = worker_parser("unified").parse_args(args[3:])
    engine_config(ns, "unified")  # the engine options validate (tp_size, nnodes, dist_init_addr)
    return ns


def gpus(container: Doc) -> int:
    resources = container["resources"]
    count = int(resources["limits"]["nvidia.com/gpu"])
    assert int(resources["requests"]["nvidia.com/gpu"]) == count
    return count


def test_tensor_parallel_worker_has_a_gpu_per_rank() -> None:
    doc = find("Deployment", "tandem-worker-tp", ALL)
    (c,) = pod_spec(doc)["containers"]
    ns = worker_args(c)
    assert ns.tp_size == gpus(c) > 1 and ns.nnodes == 1
    assert ns.host == "0.0.0.0" and ns.port == container_ports(doc)["grpc"]
    assert ns.advertise_address == f"10.1.2.3:{ns.port}" == container_env(c, ALL)["WORKER_ADDRESS"]
    assert any(v["mountPath"] == "/dev/shm" for v in c["volumeMounts"])


def test_multi_node_group_is_a_stateful_set_whose_ordinal_is_the_node_rank() -> None:
    group = find("StatefulSet", "tandem-tp-nodes", ALL)
    service = find("Service", group["spec"]["serviceName"], ALL)
    # Pod 1 resolves pod 0 by name before pod 0 is ready, and the pods start together.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert group["spec"]["podManagementPolicy"] == "Parallel"
    (c,) = pod_spec(group)["containers"]
    rank = {e["name"]: e for e in c["env"]}["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert rank == "metadata.labels['apps.kubernetes.io/pod-index']"
    ns = worker_args(c)  # as pod 0
    assert ns.node_rank == 0 and ns.nnodes == group["spec"]["replicas"] and ns.tp_size == ns.nnodes * gpus(c)
    host, _, port = ns.dist_init_addr.rpartition(":")
    assert (
        host == f"{group['metadata']['name']}-0.{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    )
    (dist,) = (p for p in service["spec"]["ports"] if p["port"] == int(port))
    assert resolve_port(group, dist["targetPort"]) == int(port)
    # The router and every pod's drain hook name node 0 by the same stable address.
    assert ns.advertise_address == f"{host}:{ns.port}" == container_env(c, ALL)["WORKER_ADDRESS"]
    assert ns.port == container_ports(group)["grpc"] and ns.host == "0.0.0.0"
