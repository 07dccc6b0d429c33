"""Validates Fleet's Kubernetes manifests: renders each kustomization with `kubectl kustomize`,
checks every object against the Kubernetes API schemas (kubernetes-validate, strict: unknown
fields are errors) and KEDA's ScaledObject against schemas/keda-scaledobject.json, then checks
what the schemas cannot: probes, drain versus grace period, static membership, disruption
budgets, autoscaling and non-root containers.

    python deploy/k8s/check.py [KUSTOMIZATION_DIR ...]   (default: base and overlays/keda)
    python deploy/k8s/check.py --print-env fleet-worker  (a workload's FLEET__* environment)

Prints one line per problem and exits 1 if there is any. Run by the test suite.
"""

import json
import pathlib
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

HERE = pathlib.Path(__file__).resolve().parent
KUBERNETES_VERSION = "1.33"
WORKLOADS = ("Deployment", "StatefulSet")


def render(directory):
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"{directory}: kubectl kustomize failed:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def schema_problems(docs):
    keda = json.loads((HERE / "schemas/keda-scaledobject.json").read_text())
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            if doc.get("apiVersion", "").startswith("keda.sh/"):
                jsonschema.validate(doc, keda)
            else:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as err:
            path = "/".join(str(p) for p in err.absolute_path)
            yield f"{name}: {path}: {err.message}"
        except kubernetes_validate.SchemaNotFoundError:
            yield f"{name}: no schema for {doc.get('apiVersion')} {doc.get('kind')}"


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def fleet_problems(docs, config):
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    workloads = [d for kind in WORKLOADS for d in by_kind.get(kind, [])]
    names = {d["metadata"]["name"] for d in workloads}
    for wanted in ("fleet-scheduler", "fleet-reaper", "fleet-worker"):
        if wanted not in names:
            yield f"no workload {wanted}"
    pdb_selectors = [
        p["spec"]["selector"]["matchLabels"] for p in by_kind.get("PodDisruptionBudget", [])
    ]
    drain_ms = int(config.get("FLEET__WORKER__SHUTDOWN_GRACE_MS", "20000"))
    for w in workloads:
        name, pod = w["metadata"]["name"], w["spec"]["template"]
        labels = pod["metadata"].get("labels", {})
        if not any(all(labels.get(k) == v for k, v in sel.items()) for sel in pdb_selectors):
            yield f"{name}: no PodDisruptionBudget selects its pods"
        spec = pod["spec"]
        security = spec.get("securityContext", {})
        if not security.get("runAsNonRoot"):
            yield f"{name}: pods must set securityContext.runAsNonRoot"
        for c in spec["containers"]:
            ready = c.get("readinessProbe", {}).get("httpGet", {}).get("path")
            live = c.get("livenessProbe", {}).get("httpGet", {}).get("path")
            if ready != "/readyz":
                yield f"{name}/{c['name']}: readiness probe must GET /readyz, not {ready}"
            if live != "/healthz":
                yield f"{name}/{c['name']}: liveness probe must GET /healthz, not {live}"
        if name == "fleet-worker":
            grace_s = spec.get("terminationGracePeriodSeconds", 30)
            if grace_s * 1000 <= drain_ms:
                yield (
                    f"{name}: terminationGracePeriodSeconds ({grace_s} s) must be longer than "
                    f"the drain FLEET__WORKER__SHUTDOWN_GRACE_MS ({drain_ms} ms)"
                )
            env = env_of(spec["containers"][0])
            instance = env.get("FLEET__WORKER__GROUP_INSTANCE_ID", {}).get("value", "")
            pod_name = env.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {})
            if instance != "$(POD_NAME)" or pod_name.get("fieldPath") != "metadata.name":
                yield f"{name}: group.instance.id must come from the pod name"
            if w["kind"] != "StatefulSet":
                yield f"{name}: static membership needs stable pod names (a StatefulSet)"
    for secret in by_kind.get("Secret", []):
        yield (
            f"Secret/{secret['metadata']['name']}: credentials must not be in the kustomization "
            "(every apply would overwrite the operator's); see secret.example.yaml"
        )
    scalers = by_kind.get("HorizontalPodAutoscaler", []) + by_kind.get("ScaledObject", [])
    targets = [s["spec"]["scaleTargetRef"]["name"] for s in scalers]
    if targets.count("fleet-worker") != 1:
        yield f"fleet-worker needs exactly one autoscaler, found {targets.count('fleet-worker')}"
    for so in by_kind.get("ScaledObject", []):
        for trigger in so["spec"]["triggers"]:
            meta = trigger["metadata"]
            if meta.get("bootstrapServers") != config.get("FLEET__KAFKA__BROKERS"):
                yield f"ScaledObject: trigger {meta.get('topic')} reads other brokers than fleet-config"


def check(directory):
    docs = render(directory)
    config = next(
        (d["data"] for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "fleet-config"),
        {},
    )
    return [f"{directory}: {p}" for p in [*schema_problems(docs), *fleet_problems(docs, config)]], len(docs)


def workload_env(directory, name):
    """The FLEET__* environment a workload's first container gets (ConfigMap, Secret, env),
    with $(POD_NAME) as a pod of it would see it: for checking it with --check-config."""
    docs = render(directory) + list(yaml.safe_load_all((HERE / "secret.example.yaml").read_text()))
    data = {}
    for d in docs:
        if d["kind"] in ("ConfigMap", "Secret"):
            data[(d["kind"], d["metadata"]["name"])] = {**d.get("data", {}), **d.get("stringData", {})}
    workload = next(d for d in docs if d["kind"] in WORKLOADS and d["metadata"]["name"] == name)
    container = workload["spec"]["template"]["spec"]["containers"][0]
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(data[("ConfigMap", source["configMapRef"]["name"])])
        if "secretRef" in source:
            env.update(data[("Secret", source["secretRef"]["name"])])
    pod_name = f"{name}-0"
    for e in container.get("env", []):
        env[e["name"]] = e.get("value", pod_name).replace("$(POD_NAME)", pod_name)
    return {k: v for k, v in env.items() if k.startswith("FLEET__")}


def main(argv):
    if argv[:1] == ["--print-env"]:
        print(json.dumps(workload_env(HERE / "base", argv[1])))
        return 0
    dirs = [pathlib.Path(a) for a in argv] or [HERE / "base", HERE / "overlays/keda"]
    failed = False
    example = [d for d in yaml.safe_load_all((HERE / "secret.example.yaml").read_text()) if d]
    for problem in schema_problems(example):
        print(f"secret.example.yaml: {problem}")
        failed = True
    for directory in dirs:
        problems, count = check(directory)
        for problem in problems:
            print(problem)
        failed |= bool(problems)
        print(f"{directory}: {count} objects, {len(problems)} problems")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
