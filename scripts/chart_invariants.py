#!/usr/bin/env python3
"""Invariants of the Helm chart's renders, for scripts/check-chart.

    chart_invariants.py check RENDER_DIR   checks the renders RENDER_DIR/<entry>.yaml
    chart_invariants.py same A B           checks two renders are the same (but for the
                                           random admin token)

Prints one line per check, `ok <name>` or `FAIL <name>: <why>`, and exits 0 (scripts/check-chart
counts the lines). Needs PyYAML (in the chart venv).
"""

import base64
import sys
from pathlib import Path

import yaml

RELEASE = "skein"
FULLNAME = "skein-skein"
NAMESPACE = "skein-ns"
DOMAIN = f"{FULLNAME}-headless.{NAMESPACE}.svc.cluster.local"
GRPC_PORT = 8081
ADMIN_SECRET = f"{FULLNAME}-admin"
# The entries of the matrix that differ from the defaults in replicaCount only.
REPLICA_ENTRIES = {"replicas-0": 0, "replicas-1": 1, "replicas-2": 2, "default": 3, "replicas-5": 5}

results = []


def check(name, ok, why=""):
    results.append((name, bool(ok), why))


def load(path):
    return [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc]


def find(docs, kind, name=None):
    return [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind, name=None):
    found = find(docs, kind, name)
    if len(found) != 1:
        raise AssertionError(f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def container(statefulset):
    return statefulset["spec"]["template"]["spec"]["containers"][0]


def args_of(docs):
    return container(one(docs, "StatefulSet"))["args"]


def guarded(name, fn):
    """Runs fn(); a failed assertion or a missing key fails the check `name`."""
    try:
        fn()
        check(name, True)
    except (AssertionError, KeyError, IndexError, TypeError) as error:
        check(name, False, f"{type(error).__name__}: {error}")


def check_renders(directory):
    renders = {path.stem: load(path) for path in sorted(Path(directory).glob("*.yaml"))}
    default = renders["default"]

    def identical_across_replicas():
        base = one(renders["default"], "StatefulSet")["spec"]
        for entry, count in REPLICA_ENTRIES.items():
            spec = one(renders[entry], "StatefulSet")["spec"]
            assert spec["replicas"] == count, f"{entry}: replicas {spec['replicas']}"
            assert container_args(spec) == container_args(base), f"{entry}: args differ"

    def container_args(spec):
        return spec["template"]["spec"]["containers"][0]["args"]

    guarded("args identical for replicaCount 0, 1, 2, 3, 5", identical_across_replicas)

    def template_identical_across_replicas():
        base = one(renders["default"], "StatefulSet")["spec"]["template"]
        for entry in REPLICA_ENTRIES:
            template = one(renders[entry], "StatefulSet")["spec"]["template"]
            assert template == base, f"{entry}: the pod template differs (scaling would restart pods)"

    guarded("pod template identical for replicaCount 0, 1, 2, 3, 5", template_identical_across_replicas)

    def no_voters_flag():
        for entry, docs in renders.items():
            for arg in args_of(docs):
                assert not arg.startswith("--voters"), f"{entry}: {arg}"

    guarded("no --voters in any render", no_voters_flag)

    def cluster_forming_flags():
        for entry, docs in renders.items():
            args = args_of(docs)
            assert "--bootstrap-node=1" in args, f"{entry}: no --bootstrap-node=1"
            assert f"--peers={DOMAIN}:{GRPC_PORT}" in args, f"{entry}: --peers is not the headless name"
            assert "--node-id=ordinal" in args, f"{entry}: no --node-id=ordinal"
            assert "--metrics-on-proxy-port=false" in args, f"{entry}: no --metrics-on-proxy-port=false"
            assert f"--gossip-seeds={DOMAIN}:8082" in args, f"{entry}: gossip seed"
            assert any(a.startswith("--advertise-addr=$(POD_NAME).") for a in args), entry

    guarded("--bootstrap-node=1, --peers=<headless>:<grpc>, --metrics-on-proxy-port=false everywhere",
            cluster_forming_flags)

    def target_voters():
        for entry, voters in {"default": 3, "voters-1": 1, "voters-5": 5, "voters-7": 7}.items():
            assert f"--target-voters={voters}" in args_of(renders[entry]), entry

    guarded("--target-voters follows cluster.voters", target_voters)

    def headless_publishes_not_ready():
        service = one(default, "Service", f"{FULLNAME}-headless")
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True

    guarded("headless Service publishes not-ready pods", headless_publishes_not_ready)

    def pods_hardened():
        for entry, docs in renders.items():
            pods = [one(docs, "StatefulSet")["spec"]["template"]["spec"]]
            pods += [p["spec"] for p in find(docs, "Pod")]
            for pod in pods:
                assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, entry
                assert pod["automountServiceAccountToken"] is False, entry
                assert pod["securityContext"]["runAsNonRoot"] is True, entry
                for c in pod["containers"]:
                    assert c["securityContext"]["readOnlyRootFilesystem"] is True, entry
                    assert c["securityContext"]["allowPrivilegeEscalation"] is False, entry

    guarded("seccomp RuntimeDefault, no service account token, read-only root, in every pod",
            pods_hardened)

    def service_account():
        account = one(default, "ServiceAccount")
        assert account["automountServiceAccountToken"] is False
        pod = one(default, "StatefulSet")["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == account["metadata"]["name"]

    guarded("ServiceAccount created, automount off", service_account)

    def admin_secret_default():
        secret = one(default, "Secret", ADMIN_SECRET)
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        token = base64.b64decode(secret["data"]["token"]).decode()
        assert len(token) == 48 and token.isalnum(), "not a 48-character token"
        statefulset = one(default, "StatefulSet")
        volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
        assert volumes["admin-token"]["secret"]["secretName"] == ADMIN_SECRET
        assert volumes["admin-token"]["secret"]["items"] == [{"key": "token", "path": "token"}]
        mounts = {m["name"]: m for m in container(statefulset)["volumeMounts"]}
        assert mounts["admin-token"]["mountPath"] == "/etc/skein-admin"
        assert "--admin-token-file=/etc/skein-admin/token" in container(statefulset)["args"]

    guarded("default: admin token Secret rendered (48 chars, kept) and mounted", admin_secret_default)

    def admin_secret_given():
        docs = renders["admin-secret"]
        assert not find(docs, "Secret"), "the chart made a Secret though adminTokenSecret is set"
        spec = one(docs, "StatefulSet")["spec"]["template"]["spec"]
        volume = {v["name"]: v for v in spec["volumes"]}["admin-token"]["secret"]
        assert volume["secretName"] == "my-admin"
        assert volume["items"] == [{"key": "admin-token", "path": "token"}]
        for pod in find(docs, "Pod"):
            env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
            assert env["SKEIN_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "my-admin", "key": "admin-token"}

    guarded("adminTokenSecret set: that Secret is used, none is made", admin_secret_given)

    def default_config():
        config_map = one(default, "ConfigMap", FULLNAME)
        text = config_map["data"]["skein.yaml"]
        assert "env:" not in text, "the default config references an environment variable"
        config = yaml.safe_load(text)
        assert config == {"version": 1, "providers": [], "routes": []}, config
        assert "envFrom" not in container(one(default, "StatefulSet"))

    guarded("default config: version 1, no provider, no env: reference", default_config)

    def provider_secret():
        c = container(one(renders["provider"], "StatefulSet"))
        assert c["envFrom"] == [{"secretRef": {"name": "my-provider-keys"}}]
        config = yaml.safe_load(one(renders["provider"], "ConfigMap")["data"]["skein.yaml"])
        assert config["providers"][0]["keys"] == [{"key": "env:OPENAI_API_KEY"}]

    guarded("providerSecret: its keys become environment variables", provider_secret)

    def probes():
        c = container(one(default, "StatefulSet"))
        assert c["startupProbe"]["httpGet"] == {"path": "/health/startup", "port": "http"}
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120
        assert c["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}

    guarded("probes: startup, readiness, liveness on the http port", probes)

    def disruption_budget():
        for entry, docs in renders.items():
            replicas = one(docs, "StatefulSet")["spec"]["replicas"]
            budgets = find(docs, "PodDisruptionBudget")
            if replicas >= 2:
                assert len(budgets) == 1 and budgets[0]["spec"]["maxUnavailable"] == 1, entry
            else:
                assert not budgets, f"{entry}: a budget with {replicas} replicas"

    guarded("PodDisruptionBudget maxUnavailable 1 exactly when replicaCount >= 2", disruption_budget)

    def network_policy():
        policy = one(default, "NetworkPolicy")
        http_rule, internal_rule = policy["spec"]["ingress"]
        assert http_rule["ports"] == [{"port": "http", "protocol": "TCP"}] and "from" not in http_rule
        assert {(p["port"], p["protocol"]) for p in internal_rule["ports"]} == {("grpc", "TCP"), ("gossip", "UDP")}
        assert internal_rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": RELEASE}}}]
        assert not find(renders["no-netpol"], "NetworkPolicy")
        custom = one(renders["overrides"], "NetworkPolicy")["spec"]["ingress"]
        assert custom[0]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]
        assert custom[1]["from"][1:] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
        # The test pods carry the release label the policy admits, and no Service selects them.
        for pod in find(default, "Pod"):
            labels = pod["metadata"]["labels"]
            assert labels["app.kubernetes.io/instance"] == RELEASE and "app.kubernetes.io/name" not in labels

    guarded("NetworkPolicy: http open, grpc and gossip from the release (and adminFrom) only",
            network_policy)

    def grpc_tls():
        for entry, mutual in (("grpc-tls", False), ("grpc-mtls", True)):
            statefulset = one(renders[entry], "StatefulSet")
            args = container(statefulset)["args"]
            for flag in ("--grpc-tls-cert=/etc/skein-tls/tls.crt", "--grpc-tls-key=/etc/skein-tls/tls.key",
                         "--grpc-tls-ca=/etc/skein-tls/ca.crt"):
                assert flag in args, f"{entry}: {flag}"
            assert ("--grpc-tls-require-client-cert" in args) == mutual, entry
            volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
            assert volumes["grpc-tls"]["secret"]["secretName"] == "skein-tls", entry
            mounts = {m["name"]: m for m in container(statefulset)["volumeMounts"]}
            assert mounts["grpc-tls"] == {"name": "grpc-tls", "mountPath": "/etc/skein-tls", "readOnly": True}
            test = one(renders[entry], "Pod")["spec"]["containers"][0]["args"]
            assert f"--endpoint=https://{FULLNAME}-0.{DOMAIN}:{GRPC_PORT}" in test, entry
            assert ("--tls-cert=/etc/skein-tls/tls.crt" in test) == mutual, entry
        assert not any(a.startswith("--grpc-tls") for a in args_of(default))

    guarded("grpcTls: flags passed, Secret mounted read-only, tests speak TLS", grpc_tls)

    def service_monitor():
        assert not find(default, "ServiceMonitor")
        monitor = one(renders["servicemonitor"], "ServiceMonitor")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] == "grpc" and endpoint["path"] == "/metrics"
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        # It selects the headless Service only (which lists every pod), not both Services.
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [s for s in find(renders["servicemonitor"], "Service")
                    if all(s["metadata"]["labels"].get(k) == v for k, v in selector.items())]
        assert [s["metadata"]["name"] for s in services] == [f"{FULLNAME}-headless"], services
        tls = one(renders["grpc-mtls"], "ServiceMonitor")["spec"]["endpoints"][0]
        assert tls["scheme"] == "https" and tls["tlsConfig"]["keySecret"]["name"] == "skein-tls"

    guarded("ServiceMonitor: off by default; port grpc, path /metrics, headless Service", service_monitor)

    def helm_tests():
        for entry, docs in renders.items():
            pods = find(docs, "Pod")
            replicas = one(docs, "StatefulSet")["spec"]["replicas"]
            assert (len(pods) >= 1) == (replicas >= 1), entry
            for pod in pods:
                assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test", entry
                c = pod["spec"]["containers"][0]
                env = {e["name"]: e for e in c["env"]}
                assert "secretKeyRef" in env["SKEIN_ADMIN_TOKEN"]["valueFrom"], entry
                assert c["image"] == container(one(docs, "StatefulSet"))["image"], entry

    guarded("helm test pods: hook, skein image, admin token from the Secret", helm_tests)

    def scheduling():
        pod = one(default, "StatefulSet")["spec"]["template"]["spec"]
        soft = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert soft[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        (spread,) = pod["topologySpreadConstraints"]
        assert spread["whenUnsatisfiable"] == "ScheduleAnyway" and spread["topologyKey"] == "kubernetes.io/hostname"
        assert spread["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": "skein",
                                                          "app.kubernetes.io/instance": RELEASE}
        custom = one(renders["overrides"], "StatefulSet")["spec"]["template"]["spec"]
        assert "nodeAffinity" in custom["affinity"] and "podAntiAffinity" not in custom["affinity"]
        assert custom["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
        assert custom["nodeSelector"] == {"kubernetes.io/arch": "amd64"}
        assert custom["containers"][0]["args"][-1] == "--worker-threads=2"
        hard = one(renders["hard"], "StatefulSet")["spec"]["template"]["spec"]
        assert "requiredDuringSchedulingIgnoredDuringExecution" in hard["affinity"]["podAntiAffinity"]
        assert "topologySpreadConstraints" not in hard

    guarded("scheduling: soft anti-affinity and hostname spread by default, overridable", scheduling)

    def persistence():
        assert one(default, "StatefulSet")["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
        statefulset = one(renders["no-persistence"], "StatefulSet")
        assert "volumeClaimTemplates" not in statefulset["spec"]
        volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
        assert volumes["data"] == {"name": "data", "emptyDir": {}}

    guarded("persistence: a PVC per pod, or an emptyDir", persistence)


def check_same(a, b):
    def masked(path):
        docs = load(path)
        for doc in docs:
            if doc.get("kind") == "Secret" and doc["metadata"]["name"] == ADMIN_SECRET:
                doc["data"]["token"] = "<random>"
        return docs

    left, right = masked(a), masked(b)
    check(f"helm 3 and helm 4 render the same: {Path(a).stem}", left == right,
          "the renders differ" if left != right else "")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "check":
        check_renders(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "same":
        check_same(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
    for name, ok, why in results:
        print(f"ok {name}" if ok else f"FAIL {name}: {why}")


if __name__ == "__main__":
    main()
