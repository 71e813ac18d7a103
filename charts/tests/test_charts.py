"""The Helm charts, linted and rendered offline with Helm's own SDK
(helm-python-sdk), every rendered object validated against the Kubernetes
1.33 schemas (kubernetes-validate --strict), and checked against tether's
rules: security defaults in every pod, the generated CRD, and an agent chart
that renders the same objects as the operator's bundle."""

import pathlib
import subprocess

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
TETHER = ROOT / "charts" / "tether"
AGENT = ROOT / "charts" / "tether-agent"
KUBE_VERSION = "1.33.0"
# Kinds that are not in the Kubernetes schemas: checked elsewhere (the CRD by
# the operator's own test, ServiceMonitor is Prometheus Operator's).
NOT_BUILT_IN = {"ServiceMonitor", "ProxiedCluster"}

AGENT_VALUES = {
    "clusterId": "customer-a",
    "serverUrl": "wss://tether.example.com:8443",
    "credentials": {"existingSecret": "tether-agent"},
}

NON_DEFAULT = {
    "image": {"digest": "sha256:" + "a" * 64},
    "publicUrl": "wss://tunnels.example.org",
    "operator": {"replicas": 3, "serverHostnames": ["tether.internal"], "byoServerCertificate": True},
    "server": {"replicas": 3, "rateLimit": 50, "allowImpersonation": True, "public": {"type": "LoadBalancer"}},
    "ingress": {"enabled": True, "className": "nginx"},
    "serviceMonitor": {"enabled": True},
    "podDisruptionBudget": {"enabled": False},
    "networkPolicy": {"enabled": False},
    "nodeSelector": {"kubernetes.io/os": "linux"},
}


def documents(manifests):
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                yield path, doc


def render(chart, values, namespace="tether-system"):
    return list(documents(helm.Chart.load(chart).render(values, name="tether", namespace=namespace, is_install=True)))


def validate_all(docs):
    checked = 0
    for path, doc in docs:
        if doc["kind"] in NOT_BUILT_IN:
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("chart,values", [(TETHER, None), (TETHER, NON_DEFAULT), (AGENT, AGENT_VALUES)])
def test_lint_is_clean(chart, values):
    report = helm.lint(chart, values, strict=True, kube_version="v" + KUBE_VERSION)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
    assert problems == [], problems


def test_values_schemas_accept_the_defaults_and_refuse_mistakes():
    tether = helm.Chart.load(TETHER)
    tether.validate_schema(tether.values)
    tether.validate_schema(NON_DEFAULT)
    for bad in [{"publicUrl": "http://insecure"}, {"server": {"replicas": 0}}, {"typo": 1}]:
        with pytest.raises(helm.HelmValuesError):
            tether.validate_schema(bad)
    agent = helm.Chart.load(AGENT)
    agent.validate_schema(AGENT_VALUES)
    with pytest.raises(helm.HelmValuesError):
        agent.validate_schema({**AGENT_VALUES, "replicas": 2})


@pytest.mark.parametrize("values", [None, NON_DEFAULT])
def test_management_chart_renders_valid_objects(values):
    docs = render(TETHER, values)
    validate_all(docs)
    kinds = {doc["kind"] for _, doc in docs}
    assert {"Deployment", "Service", "ServiceAccount", "ClusterRole", "Role"} <= kinds
    if values:
        assert {"Ingress", "ServiceMonitor"} <= kinds and "PodDisruptionBudget" not in kinds
    else:
        assert {"NetworkPolicy", "PodDisruptionBudget"} <= kinds and "Ingress" not in kinds


def pods(docs):
    for _, doc in docs:
        if doc["kind"] == "Deployment":
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


@pytest.mark.parametrize("chart,values", [(TETHER, None), (TETHER, NON_DEFAULT), (AGENT, AGENT_VALUES)])
def test_every_pod_has_security_defaults(chart, values):
    found = 0
    for name, pod in pods(render(chart, values)):
        found += 1
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["capabilities"]["drop"] == ["ALL"], name
            assert ctx["seccompProfile"]["type"] == "RuntimeDefault", name
            assert container["resources"]["requests"], name
            assert "readinessProbe" in container and "livenessProbe" in container, name
    assert found > 0


def test_internal_port_admits_only_argocd():
    policies = [doc for _, doc in render(TETHER, None) if doc["kind"] == "NetworkPolicy"]
    rules = policies[0]["spec"]["ingress"]
    internal = [r for r in rules if r["ports"][0]["port"] == 8080]
    assert internal and internal[0]["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "argocd"}


def test_server_rbac_is_least_privilege():
    docs = [doc for _, doc in render(TETHER, None)]
    role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "tether-server")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["tether-clusters"], "verbs": ["get", "list", "watch"]}]
    cluster_role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-server"))
    verbs = {(tuple(r["resources"]), tuple(r["verbs"])) for r in cluster_role["rules"]}
    assert verbs == {(("proxiedclusters",), ("get",)), (("proxiedclusters/status",), ("get", "patch"))}


def test_chart_crd_is_the_generated_one():
    chart_crd = helm.Chart.load(TETHER).crds
    generated = (ROOT / "crds" / "proxiedclusters.tether.dev.yaml").read_text()
    assert len(chart_crd) == 1
    assert (TETHER / "crds" / "proxiedclusters.tether.dev.yaml").read_text() == generated


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A bundle rendered by tether itself (kubectl tether bundle render)."""
    out = tmp_path_factory.mktemp("bundle")
    manifest = out / "pc.yaml"
    manifest.write_text(
        "apiVersion: tether.dev/v1alpha1\nkind: ProxiedCluster\nmetadata:\n  name: customer-a\n  namespace: tenants\n"
        "spec:\n  publicUrl: wss://tether.example.com:8443\n"
    )
    cli = ROOT / "target" / "debug" / "kubectl-tether"
    subprocess.run([str(cli), "bundle", "render", "-f", str(manifest), "--ca-dir", str(out / "ca"),
                    "-o", str(out / "agent.yaml"), "--server-dir", str(out / "server")], check=True)
    return {
        "agent": [d for d in yaml.safe_load_all((out / "agent.yaml").read_text()) if d],
        "server": [d for d in yaml.safe_load_all((out / "server" / "server-objects.yaml").read_text()) if d],
    }


def test_operator_bundles_are_valid_objects(bundle):
    validate_all([("bundle", d) for d in bundle["agent"] + bundle["server"]])


def test_agent_chart_renders_what_the_bundle_holds(bundle):
    chart = {doc["kind"]: doc for _, doc in render(AGENT, AGENT_VALUES, namespace="tether-agent")}
    ours = {doc["kind"]: doc for doc in bundle["agent"]}
    assert set(ours) - {"Namespace", "Secret"} == set(chart) - {"Secret"}
    chart_pod = chart["Deployment"]["spec"]["template"]["spec"]
    bundle_pod = ours["Deployment"]["spec"]["template"]["spec"]
    for key in ["serviceAccountName", "automountServiceAccountToken", "securityContext"]:
        assert chart_pod[key] == bundle_pod[key], key
    chart_c, bundle_c = chart_pod["containers"][0], bundle_pod["containers"][0]
    assert chart_c["securityContext"] == bundle_c["securityContext"]
    assert sorted(a.split("=")[0] for a in chart_c["args"]) == sorted(a.split("=")[0] for a in bundle_c["args"])
    assert chart["ClusterRole"]["rules"] == ours["ClusterRole"]["rules"]
    ports = lambda np: sorted((p["port"], p["protocol"]) for r in np["spec"]["egress"] for p in r["ports"])
    assert ports(chart["NetworkPolicy"]) == ports(ours["NetworkPolicy"])
