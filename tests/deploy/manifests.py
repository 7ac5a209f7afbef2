"""The manifests under deploy/k8s as Python data, and the lookups the deploy tests share.

`kubectl apply -f deploy/k8s` applies the top-level files only, in name order; `model/` and
`extras/` are applied by hand. Environment resolution follows Kubernetes: `envFrom` first, then
`env` in order, `$(VAR)` expanded from what is defined so far, `$$` escaping a literal `$`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
NAMESPACE = "tandem"
TANDEM_IMAGE = "tandem:"  # the image built from the repository's Dockerfile
UID = 10001  # its user (Dockerfile USER), the pods' runAsUser
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "Pod"}
LONG_RUNNING_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
# What the downward API would give a pod, for resolving $(POD_IP) and friends in tests.
FIELD_VALUES = {
    "status.podIP": "10.1.2.3",
    "metadata.name": "tandem-pod-0",
    "metadata.namespace": NAMESPACE,
    "spec.nodeName": "gpu-node-1",
    "metadata.labels['apps.kubernetes.io/pod-index']": "0",  # a StatefulSet pod's ordinal
}

Doc = dict[str, Any]


@dataclass(frozen=True)
class Manifest:
    path: Path
    index: int  # position of the document in its file
    doc: Doc

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(K8S)}#{self.index}:{self.kind}/{self.name}"


def load(paths: list[Path]) -> list[Manifest]:
    out = []
    for path in paths:
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                out.append(Manifest(path, index, doc))
    return out


def applied_files() -> list[Path]:
    """What `kubectl apply -f deploy/k8s` applies, in its order."""
    return sorted(p for p in K8S.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml", ".json"))


def all_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".json"))


APPLIED = load(applied_files())
ALL = load(all_files())


def find(kind: str, name: str, manifests: list[Manifest] = APPLIED) -> Doc:
    hits = [m.doc for m in manifests if m.kind == kind and m.name == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def pod_spec(doc: Doc) -> Doc:
    if doc["kind"] == "Pod":
        return doc["spec"]
    return doc["spec"]["template"]["spec"]


def pod_labels(doc: Doc) -> dict[str, str]:
    if doc["kind"] == "Pod":
        return doc["metadata"].get("labels", {})
    return doc["spec"]["template"]["metadata"].get("labels", {})


def pod_annotations(doc: Doc) -> dict[str, str]:
    if doc["kind"] == "Pod":
        return doc["metadata"].get("annotations", {})
    return doc["spec"]["template"]["metadata"].get("annotations", {})


def workloads(manifests: list[Manifest] = APPLIED, kinds: set[str] = WORKLOAD_KINDS) -> list[Doc]:
    return [m.doc for m in manifests if m.kind in kinds]


def selected_workloads(selector: dict[str, str], manifests: list[Manifest] = APPLIED) -> list[Doc]:
    return [w for w in workloads(manifests) if selector.items() <= pod_labels(w).items()]


def container_ports(doc: Doc) -> dict[str, int]:
    """name -> number over all containers of a workload's pod (unnamed ports under their number)."""
    ports: dict[str, int] = {}
    for c in pod_spec(doc)["containers"]:
        for p in c.get("ports", []):
            ports[p.get("name", str(p["containerPort"]))] = p["containerPort"]
    return ports


def resolve_port(doc: Doc, port: int | str) -> int | None:
    """A probe's or Service's target port (name or number) as a declared container port number."""
    ports = container_ports(doc)
    if isinstance(port, str) and not port.isdigit():
        return ports.get(port)
    return int(port) if int(port) in ports.values() else None


def container_env(container: Doc, manifests: list[Manifest] = APPLIED) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref is not None, "only ConfigMaps feed envFrom here"
        data = find("ConfigMap", ref["name"], manifests)["data"]
        env.update({source.get("prefix", "") + k: str(v) for k, v in data.items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(str(item["value"]), env)
            continue
        ref = item["valueFrom"]
        if "fieldRef" in ref:
            env[item["name"]] = FIELD_VALUES[ref["fieldRef"]["fieldPath"]]
        elif "configMapKeyRef" in ref:
            key = ref["configMapKeyRef"]
            env[item["name"]] = find("ConfigMap", key["name"], APPLIED)["data"][key["key"]]
        elif "secretKeyRef" in ref:
            env[item["name"]] = "<secret>"
        else:
            raise AssertionError(f"unexpected valueFrom {ref}")
    return env


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion; an undefined variable stays as written (as Kubernetes does)."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR.sub(one, text)


def resolved_args(container: Doc, manifests: list[Manifest] = APPLIED) -> list[str]:
    env = container_env(container, manifests)
    return [expand(str(a), env) for a in container.get("args", [])]


def service_target(address: str) -> tuple[Doc, Doc, int]:
    """host:port of an in-cluster Service -> (Service, the workload behind it, container port)."""
    host, _, port = address.rpartition(":")
    name, _, domain = host.partition(".")
    assert domain in ("", NAMESPACE, f"{NAMESPACE}.svc", f"{NAMESPACE}.svc.cluster.local"), address
    service = find("Service", name)
    matches = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    assert matches, f"{address}: Service {name} has no port {port}"
    behind = selected_workloads(service["spec"]["selector"])
    assert len(behind) == 1, f"{address}: Service {name} selects {len(behind)} workloads"
    target = resolve_port(behind[0], matches[0].get("targetPort", matches[0]["port"]))
    assert target is not None, f"{address}: the target port is not declared by {name}'s pods"
    return service, behind[0], target
