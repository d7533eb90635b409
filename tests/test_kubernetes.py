"""The Kubernetes manifests in examples/kubernetes: each validates against the schema of a pinned
Kubernetes release (kubernetes-validate, strict: unknown fields are errors), and they agree with
xgen itself (the ConfigMap's models.yaml is a valid spec; probes and ports are the daemon's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from reconciler.spec import parse

KUBERNETES = "1.33.0"  # the release the manifests are checked against
HERE = Path(__file__).resolve().parent.parent / "examples" / "kubernetes"
FILES = sorted(p.name for p in HERE.glob("*.yaml") if p.name != "kustomization.yaml")

# The Prometheus Operator's CRD is not in Kubernetes' schema: the fields this manifest uses, as
# the operator's v1 CRD defines them.
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}},
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                       "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                       "scheme": {"enum": ["http", "https"]}},
                    },
                },
            },
        },
    },
}


def documents() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name in FILES for doc in yaml.safe_load_all((HERE / name).read_text()) if doc]


@pytest.mark.parametrize("name", FILES)
def test_each_manifest_validates_against_a_pinned_kubernetes(name: str) -> None:
    for doc in yaml.safe_load_all((HERE / name).read_text()):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            jsonschema.validate(doc, SERVICE_MONITOR)
        else:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((HERE / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == FILES


def test_the_manifests_agree_with_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    by_kind = {doc["kind"]: doc for _, doc in documents()}
    monkeypatch.setenv("XGEN_CACHE_DIR", "/opt/xgen/cache")  # as the image sets it
    spec = parse(by_kind["ConfigMap"]["data"]["models.yaml"], "configmap.yaml")
    assert spec.active in spec.models and spec.server.status_public
    pod = by_kind["DaemonSet"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    [port] = container["ports"]
    assert port["containerPort"] == spec.server.port
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "models-yaml")
    assert "subPath" not in mount, "a subPath mount never sees a ConfigMap update"
    assert container["args"] == [f"{mount['mountPath']}/models.yaml"]
    # the grace period covers the preStop pause and the backends' stop
    assert pod["terminationGracePeriodSeconds"] > 5 + spec.server.stop_grace_s
    for name in ("Namespace", "ConfigMap", "DaemonSet", "Service", "ServiceMonitor"):
        assert by_kind[name]["metadata"].get("namespace", "xgen") == "xgen" or name == "Namespace"
    assert by_kind["Service"]["spec"]["selector"] == by_kind["DaemonSet"]["spec"]["selector"]["matchLabels"]
    assert by_kind["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == port["name"]
