"""The Helm charts, linted and rendered offline with Helm's own SDK
(helm-python-sdk), every rendered object validated against the Kubernetes
1.33 schemas (kubernetes-validate --strict), and checked against tether's
rules: security defaults in every pod, the generated CRD, and an agent chart
that renders the same objects as the operator's bundle."""

import json
import pathlib
import re
import shutil
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
NOT_BUILT_IN = {"ServiceMonitor", "PrometheusRule", "ProxiedCluster"}

AGENT_VALUES = {
    "clusterId": "customer-a",
    "serverUrl": "wss://tether.example.com:8443",
    "credentials": {"existingSecret": "tether-agent"},
}

NON_DEFAULT = {
    "image": {"digest": "sha256:" + "a" * 64},
    "publicUrl": "wss://tunnels.example.org",
    "operator": {"replicas": 3, "serverHostnames": ["tether.internal"], "byoServerCertificate": True},
    "server": {"replicas": 5, "rateLimit": 50, "allowImpersonation": True, "public": {"type": "LoadBalancer"}},
    "ingress": {"enabled": True, "className": "nginx"},
    "serviceMonitor": {"enabled": True},
    "metrics": {"auth": "none", "allowedNamespaces": ["prometheus", "observability"]},
    "prometheusRule": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
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


# What the all-in-one image holds (image/Containerfile); its ENTRYPOINT is
# tether-server, so every other container must name its program.
IMAGE_PROGRAMS = {f"/usr/local/bin/{name}" for name in ["tether-server", "tether-agent", "tether-operator", "kubectl-tether"]}
# Kubernetes' default mode for Secret volumes.
DEFAULT_SECRET_MODE = 0o644


def secret_readable_by_pod(pod, volume):
    """Whether the pod's user can read the files of a Secret volume: they
    are owned by root, and by the pod's fsGroup when it has one."""
    mode = volume["secret"].get("defaultMode", DEFAULT_SECRET_MODE)
    for item in volume["secret"].get("items", []):
        mode &= item.get("mode", mode)
    ctx = pod.get("securityContext", {})
    if ctx.get("runAsUser") == 0:
        return True
    if "fsGroup" in ctx and mode & 0o040:
        return True
    return bool(mode & 0o004)


def bundle_pods(bundle):
    return pods([("bundle", d) for d in bundle["agent"]])


def test_every_pod_can_start(bundle):
    """The two faults that crash-looped every pod of the first real install:
    a non-root pod that cannot read its own Secret volume, and a container
    of the all-in-one image that runs its entrypoint instead of its own
    program."""
    checked = 0
    sources = [render(TETHER, None), render(TETHER, NON_DEFAULT), render(AGENT, AGENT_VALUES)]
    all_pods = [p for docs in sources for p in pods(docs)] + list(bundle_pods(bundle))
    for name, pod in all_pods:
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            checked += 1
            command = container.get("command", [])
            assert command and command[0] in IMAGE_PROGRAMS, f"{name}/{container['name']} does not name its program: {command}"
            for mount in container.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                if "secret" in volume:
                    assert secret_readable_by_pod(pod, volume), f"{name}: user {pod['securityContext'].get('runAsUser')} cannot read Secret volume {mount['name']}"
    assert checked >= 5


def test_the_readability_check_knows_the_failing_case():
    failing = {"securityContext": {"runAsUser": 65532, "runAsGroup": 65532}}
    volume = {"secret": {"secretName": "x", "defaultMode": 0o440}}
    assert not secret_readable_by_pod(failing, volume)
    assert secret_readable_by_pod({"securityContext": {**failing["securityContext"], "fsGroup": 65532}}, volume)
    assert secret_readable_by_pod(failing, {"secret": {"secretName": "x"}})


def server_deployment(docs):
    return next(d for _, d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "tether-server")


def server_pod_labels(docs):
    return server_deployment(docs)["spec"]["template"]["metadata"]["labels"]


def admitted(policy, port, source_namespace, source_labels, policy_namespace="tether-system"):
    """Whether a NetworkPolicy's ingress rules admit a connection to `port`
    from a pod with `source_labels` in `source_namespace`, as a CNI that
    enforces them would decide (the subset of the API the charts use)."""
    def selects(selector, labels):
        return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())

    for rule in policy["spec"].get("ingress", []):
        if rule.get("ports") and not any(p["port"] == port for p in rule["ports"]):
            continue
        peers = rule.get("from")
        if not peers:
            return True
        for peer in peers:
            ns_ok = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source_namespace}) if "namespaceSelector" in peer else source_namespace == policy_namespace
            pod_ok = selects(peer["podSelector"], source_labels) if "podSelector" in peer else True
            if ns_ok and pod_ok:
                return True
    return False


def test_network_policy_admits_every_path_of_the_topology_and_nothing_more():
    docs = render(TETHER, None)
    policy = next(d for _, d in docs if d["kind"] == "NetworkPolicy")
    servers = server_pod_labels(docs)
    assert selects_server(policy, servers)
    # ArgoCD reaches the internal port; other namespaces do not.
    assert admitted(policy, 8080, "argocd", {"app.kubernetes.io/name": "argocd-server"})
    assert not admitted(policy, 8080, "default", {})
    assert not admitted(policy, 8080, "tether-system", {"app.kubernetes.io/name": "tether-operator"})
    # Replicas reach each other's internal port (peer forwarding, replica state).
    assert admitted(policy, 8080, "tether-system", servers)
    assert not admitted(policy, 8080, "other", servers)
    # Agents reach the public port from anywhere; probes reach the health port.
    assert admitted(policy, 8443, "anywhere", {})
    assert admitted(policy, 8081, "anywhere", {})
    assert not admitted(policy, 9999, "argocd", {})


def selects_server(policy, labels):
    return all(labels.get(k) == v for k, v in policy["spec"]["podSelector"]["matchLabels"].items())


def test_servers_find_each_other_and_drain_within_their_grace_period():
    docs = render(TETHER, None)
    objects = {(d["kind"], d["metadata"]["name"]): d for _, d in docs}
    server = objects[("Deployment", "tether-server")]
    assert server["spec"]["replicas"] == 3
    assert server["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    pod = server["spec"]["template"]["spec"]
    args = dict(a.split("=", 1) for a in pod["containers"][0]["args"])
    peers = objects[("Service", args["--peer-service"])]
    assert peers["spec"]["clusterIP"] == "None"
    assert all(server_pod_labels(docs).get(k) == v for k, v in peers["spec"]["selector"].items())
    seconds = lambda v: int(v.rstrip("s"))
    assert pod["terminationGracePeriodSeconds"] > seconds(args["--shutdown-delay"]) + seconds(args["--shutdown-grace"])
    container = pod["containers"][0]
    health = next(p for p in container["ports"] if p["name"] == "health")
    assert args["--health-addr"] == f":{health['containerPort']}"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"


def server_args(values):
    return server_deployment(render(TETHER, values))["spec"]["template"]["spec"]["containers"][0]["args"]


def test_worker_threads_are_the_binary_default_unless_set():
    assert not any(a.startswith("--worker-threads") for a in server_args(None))
    assert "--worker-threads=1" in server_args({"server": {"workerThreads": 1}})
    tether = helm.Chart.load(TETHER)
    for bad in [0, "two"]:
        with pytest.raises(helm.HelmValuesError):
            tether.validate_schema({"server": {"workerThreads": bad}})


def test_server_rbac_is_least_privilege():
    docs = [doc for _, doc in render(TETHER, None)]
    role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "tether-server")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["tether-clusters"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
    ]
    cluster_role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-server"))
    verbs = {(tuple(r["resources"]), tuple(r["verbs"])) for r in cluster_role["rules"]}
    assert verbs == {
        (("proxiedclusters",), ("get",)),
        (("proxiedclusters/status",), ("get", "patch")),
        # Agent certificate renewal: the server asks, the operator signs.
        (("certificatesigningrequests",), ("create", "get")),
    }


def test_only_the_operator_signs_and_only_for_its_signer():
    docs = [doc for _, doc in render(TETHER, None)]
    rules = [r for d in docs if d["kind"] in ("ClusterRole", "Role") for r in d["rules"]]
    signing = [r for r in rules if "signers" in r.get("resources", [])]
    assert signing == [{"apiGroups": ["certificates.k8s.io"], "resources": ["signers"],
                        "resourceNames": ["tether.dev/agent"], "verbs": ["approve", "sign"]}]
    operator = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-operator"))
    assert signing[0] in operator["rules"]
    for doc in docs:
        if doc["kind"] in ("ClusterRole", "Role") and doc is not operator:
            for rule in doc["rules"]:
                assert not {"certificatesigningrequests/approval", "certificatesigningrequests/status"} & set(
                    rule.get("resources", [])), doc["metadata"]["name"]


def test_chart_crd_is_the_generated_one():
    chart_crd = helm.Chart.load(TETHER).crds
    generated = (ROOT / "crds" / "proxiedclusters.tether.dev.yaml").read_text()
    assert len(chart_crd) == 1
    assert (TETHER / "crds" / "proxiedclusters.tether.dev.yaml").read_text() == generated


PROXY = {
    "url": "http://proxy.corp.example:3128",
    "noProxy": [".corp.example", "10.0.0.0/8"],
    "caCert": "-----BEGIN CERTIFICATE-----\nAg==\n-----END CERTIFICATE-----\n",
    "credentialsSecretName": "corp-proxy",
}


def render_bundle(out, agent_spec=None):
    """A bundle rendered by tether itself (kubectl tether bundle render)."""
    manifest = out / "pc.yaml"
    pc = {
        "apiVersion": "tether.dev/v1alpha1",
        "kind": "ProxiedCluster",
        "metadata": {"name": "customer-a", "namespace": "tenants"},
        "spec": {"publicUrl": "wss://tether.example.com:8443", **({"agent": agent_spec} if agent_spec else {})},
    }
    manifest.write_text(yaml.safe_dump(pc))
    cli = ROOT / "target" / "debug" / "kubectl-tether"
    subprocess.run([str(cli), "bundle", "render", "-f", str(manifest), "--ca-dir", str(out / "ca"),
                    "-o", str(out / "agent.yaml"), "--server-dir", str(out / "server")], check=True)
    return {
        "agent": [d for d in yaml.safe_load_all((out / "agent.yaml").read_text()) if d],
        "server": [d for d in yaml.safe_load_all((out / "server" / "server-objects.yaml").read_text()) if d],
    }


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return render_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def proxied_bundle(tmp_path_factory):
    return render_bundle(tmp_path_factory.mktemp("proxied"), {"proxy": PROXY})


AGENT_METRICS = {"enabled": True, "auth": "kubernetes", "allowedNamespaces": ["monitoring", "observability"]}


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
    # The agent writes renewed credentials to its own Secret, nothing else.
    own_secret = [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["tether-agent"], "verbs": ["get", "update"]}]
    assert chart["Role"]["rules"] == ours["Role"]["rules"] == own_secret
    assert chart["RoleBinding"]["subjects"] == ours["RoleBinding"]["subjects"]
    assert chart_c["env"] == bundle_c["env"]
    ports = lambda np: sorted((p["port"], p["protocol"]) for r in np["spec"]["egress"] for p in r["ports"])
    assert ports(chart["NetworkPolicy"]) == ports(ours["NetworkPolicy"])


def egress_ports(policy):
    return sorted((p["port"], p["protocol"]) for r in policy["spec"]["egress"] for p in r["ports"])


def test_behind_a_proxy_chart_and_bundle_agree_and_admit_the_proxy_alone(proxied_bundle):
    """spec.agent.proxy and the chart's proxy values give the same flags,
    volumes (the customer's Secret optional), CA ConfigMap and egress: the
    proxy's port instead of tether-server's."""
    docs = render(AGENT, {**AGENT_VALUES, "proxy": PROXY}, namespace="tether-agent")
    validate_all(docs)
    validate_all([("bundle", d) for d in proxied_bundle["agent"]])
    chart = {d["kind"]: d for _, d in docs}
    ours = {d["kind"]: d for d in proxied_bundle["agent"]}
    chart_pod = chart["Deployment"]["spec"]["template"]["spec"]
    bundle_pod = ours["Deployment"]["spec"]["template"]["spec"]
    chart_c, bundle_c = chart_pod["containers"][0], bundle_pod["containers"][0]
    assert sorted(chart_c["args"]) == sorted(bundle_c["args"])
    for flag in ["--proxy=http://proxy.corp.example:3128", "--no-proxy=.corp.example,10.0.0.0/8",
                 "--proxy-ca-cert=/etc/tether-proxy-ca/ca.crt",
                 "--proxy-credentials-file=/etc/tether-proxy/credentials"]:
        assert flag in chart_c["args"]
    by_name = lambda items: {i["name"]: i for i in items}
    assert by_name(chart_pod["volumes"]) == by_name(bundle_pod["volumes"])
    assert by_name(chart_c["volumeMounts"]) == by_name(bundle_c["volumeMounts"])
    assert by_name(chart_pod["volumes"])["proxy-credentials"]["secret"] == {
        "secretName": "corp-proxy", "defaultMode": 0o440, "optional": True}
    assert chart["ConfigMap"]["data"] == ours["ConfigMap"]["data"] == {"ca.crt": PROXY["caCert"]}
    assert "corp-proxy" not in {d["metadata"]["name"] for d in proxied_bundle["agent"]}, "the customer's Secret"
    assert egress_ports(chart["NetworkPolicy"]) == egress_ports(ours["NetworkPolicy"]) == [
        (53, "TCP"), (53, "UDP"), (443, "TCP"), (3128, "TCP"), (6443, "TCP")]


@pytest.mark.parametrize("no_proxy", [["tether.example.com"], [".example.com"], ["example.com:8443"], ["*"]])
def test_a_server_in_no_proxy_is_reached_directly_and_the_policy_says_so(no_proxy):
    docs = render(AGENT, {**AGENT_VALUES, "proxy": {**PROXY, "noProxy": no_proxy}}, namespace="tether-agent")
    policy = next(d for _, d in docs if d["kind"] == "NetworkPolicy")
    ports = [p for p, _ in egress_ports(policy)]
    assert 8443 in ports and 3128 not in ports, (no_proxy, ports)


@pytest.mark.parametrize("no_proxy", [["example.com:443"], ["other.example.com"], ["ample.com"], [".tether.example.com"]])
def test_a_server_not_in_no_proxy_goes_through_the_proxy(no_proxy):
    docs = render(AGENT, {**AGENT_VALUES, "proxy": {**PROXY, "noProxy": no_proxy}}, namespace="tether-agent")
    policy = next(d for _, d in docs if d["kind"] == "NetworkPolicy")
    ports = [p for p, _ in egress_ports(policy)]
    assert 3128 in ports and 8443 not in ports, (no_proxy, ports)


def test_a_proxy_url_with_credentials_is_refused_by_the_values_schema():
    with pytest.raises(Exception):
        render(AGENT, {**AGENT_VALUES, "proxy": {"url": "http://user:pw@proxy:3128"}}, namespace="tether-agent")


# Observability: the metrics ports, who may reach and read them, the
# ServiceMonitor, alerts (promtool) and the dashboard.

METRIC_CONSTRUCTOR = re.compile(
    r'(HistogramOpts::new|Opts::new|IntGauge::new|IntCounter::new|Gauge::new|Counter::new)\(\s*"([a-z_:]+)"', re.S
)


def metric_constructors():
    """(constructor, name) of every metric tether's binaries register, read from the source."""
    found = set()
    for source in list((ROOT / "dataplane" / "src").rglob("*.rs")) + list((ROOT / "operator" / "src").rglob("*.rs")):
        found.update(METRIC_CONSTRUCTOR.findall(source.read_text()))
    return found


def exported_metrics():
    return {name for _, name in metric_constructors()}


def documented_metrics():
    table = (ROOT / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\| `([a-z_:]+)` \|", table, re.M))


def test_every_exported_metric_is_documented_and_nothing_else():
    exported = exported_metrics()
    assert len(exported) > 20
    assert documented_metrics() == exported


PROMQL_WORDS = {
    "sum", "max", "min", "count", "rate", "increase", "histogram_quantile", "label_replace", "sort",
    "bottomk", "topk", "time", "vector", "by", "on", "and", "or", "unless", "without", "ignoring",
    "humanizeDuration",
}


def metric_names_in(expr):
    """Identifiers of an expression that are not functions, keywords, labels or strings."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_matchers = re.sub(r"\{[^}]*\}", "", without_strings)
    without_groupings = re.sub(r"\b(by|on|without|ignoring)\s*\([^)]*\)", "", without_matchers)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_groupings)
    words = set(re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", without_ranges))
    return {w for w in words if w not in PROMQL_WORDS and "_" in w}


def exported_series():
    """Series names a scrape holds: histograms add _bucket, _sum and _count."""
    series = exported_metrics()
    for constructor, name in metric_constructors():
        if constructor == "HistogramOpts::new":
            series.update({name + "_bucket", name + "_sum", name + "_count"})
    return series


def rendered_rules(values=None):
    docs = render(TETHER, {"prometheusRule": {"enabled": True}, **(values or {})})
    rule = next(d for _, d in docs if d["kind"] == "PrometheusRule")
    return rule["spec"]


def promtool(*args, cwd=None):
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian: prometheus)")
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True)


def test_alert_rules_fire_and_resolve_on_written_series(tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rendered_rules()))
    shutil.copy(ROOT / "charts" / "tests" / "alerts.test.yaml", tmp_path)
    checked = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    result = promtool("test", "rules", "alerts.test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every alert of the chart has a test that makes it fire.
    tested = set(re.findall(r"alertname: (\w+)", (tmp_path / "alerts.test.yaml").read_text()))
    alerts = {r["alert"] for g in rendered_rules()["groups"] for r in g["rules"]}
    assert alerts == tested


def test_the_alert_test_can_fail(tmp_path):
    # A rule file where the disconnect alert waits longer than the test
    # expects: promtool must report it.
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rendered_rules({"prometheusRule": {"enabled": True, "agentDisconnectedFor": "30m"}})))
    shutil.copy(ROOT / "charts" / "tests" / "alerts.test.yaml", tmp_path)
    result = promtool("test", "rules", "alerts.test.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert "TetherAgentDisconnected" in result.stdout + result.stderr


def test_alerts_use_only_exported_metrics():
    series = exported_series()
    for group in rendered_rules()["groups"]:
        for rule in group["rules"]:
            used = metric_names_in(rule["expr"])
            assert used and used <= series, (rule["alert"], used - series)


def dashboard():
    docs = render(TETHER, {"grafanaDashboard": {"enabled": True}})
    config_map = next(d for _, d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "tether-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    return json.loads(config_map["data"]["tether.json"])


def dashboard_queries():
    queries = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "5m").replace("$cluster", ".*")
            queries.append((panel["title"], expr))
    return queries


def test_every_dashboard_query_is_valid_promql_over_tether_metrics(tmp_path):
    queries = dashboard_queries()
    assert len(queries) >= 15
    series = exported_series()
    for title, expr in queries:
        used = metric_names_in(expr)
        assert used and used <= series, (title, used - series)
    # promtool parses each expression as a recording rule.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]}]}
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # ... and would refuse a broken one.
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(agents_connected[5m]"}]}]}))
    assert promtool("check", "rules", "broken.yaml", cwd=tmp_path).returncode != 0


def test_the_dashboard_has_a_fleet_row_and_a_per_cluster_row():
    board = dashboard()
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Fleet", "Cluster $cluster"]
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "cluster"}


@pytest.mark.parametrize("auth", ["kubernetes", "none"])
def test_metrics_ports_services_and_service_monitor_agree(auth):
    docs = [d for _, d in render(TETHER, {"serviceMonitor": {"enabled": True}, "metrics": {"auth": auth}})]
    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    monitor = objects[("ServiceMonitor", "tether")]
    endpoint = monitor["spec"]["endpoints"][0]
    selected = [d for d in docs if d["kind"] == "Service"
                and all(d["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())]
    assert sorted(d["metadata"]["name"] for d in selected) == ["tether-operator-metrics", "tether-server-metrics"]
    for service in selected:
        component = service["spec"]["selector"]["app.kubernetes.io/name"]
        pod = objects[("Deployment", component)]["spec"]["template"]["spec"]["containers"][0]
        port = next(p for p in pod["ports"] if p["name"] == "metrics")
        assert service["spec"]["ports"] == [{"name": "metrics", "port": 8082, "targetPort": "metrics", "protocol": "TCP"}]
        args = dict(a.split("=", 1) for a in pod["args"] if "=" in a)
        assert args["--metrics-addr"] == f":{port['containerPort']}"
        assert args["--metrics-auth"] == auth
    assert endpoint["port"] == "metrics"
    if auth == "kubernetes":
        assert endpoint["scheme"] == "https"
        assert endpoint["bearerTokenFile"] == "/var/run/secrets/kubernetes.io/serviceaccount/token"
        binding = objects[("ClusterRoleBinding", "tether-metrics-auth")]
        assert binding["roleRef"]["name"] == "system:auth-delegator"
        assert {s["name"] for s in binding["subjects"]} == {"tether-operator", "tether-server"}
    else:
        assert endpoint["scheme"] == "http"
        assert ("ClusterRoleBinding", "tether-metrics-auth") not in objects
    reader = objects[("ClusterRole", "tether-metrics-reader")]
    assert reader["rules"] == [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]


def test_metrics_ports_admit_the_monitoring_namespaces_only():
    docs = render(TETHER, {"metrics": {"allowedNamespaces": ["monitoring", "observability"]}})
    policies = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "NetworkPolicy"}
    servers = server_pod_labels(docs)
    operator = {"app.kubernetes.io/name": "tether-operator", "app.kubernetes.io/instance": "tether"}
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    for name, pod in [("tether-server", servers), ("tether-operator", operator)]:
        policy = policies[name]
        assert selects_server(policy, pod)
        assert admitted(policy, 8082, "monitoring", prometheus)
        assert admitted(policy, 8082, "observability", prometheus)
        assert not admitted(policy, 8082, "argocd", {})
        assert not admitted(policy, 8082, "default", prometheus)
        assert admitted(policy, 8081, "anywhere", {})
    # The operator listens on nothing else.
    assert not admitted(policies["tether-operator"], 8080, "argocd", {})
    assert not admitted(policies["tether-operator"], 8443, "anywhere", {})


@pytest.mark.parametrize("auth", ["kubernetes", "none"])
def test_agent_metrics_are_opt_in_and_chart_and_bundle_agree(tmp_path, auth):
    """spec.agent.metrics and the agent chart's metrics values give the same
    flags, port, Service, RBAC and NetworkPolicy rule; without them the agent
    listens on its health port alone."""
    settings = {**AGENT_METRICS, "auth": auth}
    bundle = render_bundle(tmp_path, {"metrics": settings})
    docs = render(AGENT, {**AGENT_VALUES, "metrics": settings}, namespace="tether-agent")
    validate_all(docs)
    validate_all([("bundle", d) for d in bundle["agent"]])
    chart = {(d["kind"], d["metadata"]["name"]): d for _, d in docs}
    ours = {(d["kind"], d["metadata"]["name"]): d for d in bundle["agent"]}
    assert set(ours) - {("Namespace", "tether-agent"), ("Secret", "tether-agent")} == {k for k in chart if k[0] != "Secret"}
    container = lambda objects: objects[("Deployment", "tether-agent")]["spec"]["template"]["spec"]["containers"][0]
    assert sorted(container(chart)["args"]) == sorted(container(ours)["args"])
    assert f"--metrics-auth={auth}" in container(chart)["args"]
    assert container(chart)["ports"] == container(ours)["ports"]
    for key in [("Service", "tether-agent-metrics"), ("NetworkPolicy", "tether-agent")]:
        assert chart[key]["spec"] == ours[key]["spec"], key
    policy = chart[("NetworkPolicy", "tether-agent")]
    agent_pod = chart[("Deployment", "tether-agent")]["spec"]["template"]["metadata"]["labels"]
    assert selects_server(policy, agent_pod)
    assert admitted(policy, 8082, "monitoring", {}, policy_namespace="tether-agent")
    assert admitted(policy, 8082, "observability", {}, policy_namespace="tether-agent")
    assert not admitted(policy, 8082, "default", {}, policy_namespace="tether-agent")
    assert not admitted(policy, 8082, "tether-agent", {}, policy_namespace="tether-agent")
    delegation = ("ClusterRoleBinding", "tether-agent-metrics-auth")
    if auth == "kubernetes":
        for field in ["roleRef", "subjects"]:
            assert chart[delegation][field] == ours[delegation][field], field
        assert ours[delegation]["roleRef"]["name"] == "system:auth-delegator"
        reader = ours[("ClusterRole", "tether-agent-metrics-reader")]
        assert reader["rules"] == [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]
    else:
        assert delegation not in ours and delegation not in chart


def test_without_metrics_the_agent_admits_its_health_port_alone(bundle):
    policy = next(d for d in bundle["agent"] if d["kind"] == "NetworkPolicy")
    assert [r["ports"] for r in policy["spec"]["ingress"]] == [[{"port": 8081, "protocol": "TCP"}]]
    assert not any(d["kind"] == "Service" for d in bundle["agent"])
