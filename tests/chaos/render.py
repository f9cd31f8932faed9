"""Render the Helm chart as a chaos run needs it: the StatefulSet's container arguments and
environment, the config file and the admin token, as JSON.

    render.py HELM CHART OUT.json

The chart is rendered with `helm template` for replica counts 1, 3 and 5 (the pods'
arguments must be the same for all three: scaling must never change them), with a config
whose provider is the run's mock and `providerSecret` set (the run provides the Secret's
variable itself).
"""

import base64
import json
import subprocess
import sys
import tempfile

import yaml

CONFIG = """version: 1
providers:
  - name: mock
    kind: openai_compatible
    base_url: http://10.78.0.1:9000/v1
    keys: [{key: env:UPSTREAM_KEY}]
routes:
  - name: alpha
    deployments: [{provider: mock, model: m}]
"""


def render(helm, chart, replicas):
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as values:
        yaml.safe_dump({"config": CONFIG, "providerSecret": "chaos-keys"}, values)
        values.flush()
        text = subprocess.run(
            [helm, "template", "skein", chart, "-f", values.name, "--set", f"replicaCount={replicas}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def main():
    helm, chart, out = sys.argv[1:]
    specs = []
    for replicas in (1, 3, 5):
        docs = render(helm, chart, replicas)
        sts = next(doc for doc in docs if doc["kind"] == "StatefulSet")
        container = sts["spec"]["template"]["spec"]["containers"][0]
        env = []
        for variable in container.get("env", []):
            if "value" in variable:
                env.append({"name": variable["name"], "value": variable["value"]})
            else:
                env.append({"name": variable["name"], "field": variable["valueFrom"]["fieldRef"]["fieldPath"]})
        config = next(doc for doc in docs if doc["kind"] == "ConfigMap")["data"]["skein.yaml"]
        secret = next(doc for doc in docs if doc["kind"] == "Secret")
        token = base64.b64decode(secret["data"]["token"]).decode()
        specs.append({
            "replicas": replicas,
            "fullname": sts["metadata"]["name"],
            "service": sts["spec"]["serviceName"],
            "args": container["args"],
            "env": env,
            "config": config,
            "token": token,
            "mounts": [mount["mountPath"] for mount in container["volumeMounts"]],
        })
    first = specs[0]
    for other in specs[1:]:
        if other["args"] != first["args"] or other["env"] != first["env"]:
            sys.exit(f"the pods' arguments differ between 1 and {other['replicas']} replicas")
    with open(out, "w") as handle:
        json.dump(first, handle, indent=2)


if __name__ == "__main__":
    main()
