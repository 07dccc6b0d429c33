//! The deployment files: Kubernetes manifests checked against the API schemas and Fleet's own
//! rules (deploy/k8s/check.py), shown to catch broken copies, and their configuration accepted
//! by the real binaries; the registry and no-registry Dockerfiles keep one runtime definition.

use std::path::{Path, PathBuf};
use std::process::Command;

use fleet_testkit::{SETUP_COMMAND, fleet_binary, workspace_root};

fn python() -> PathBuf {
    let python = workspace_root().join(".tools/k8s-venv/bin/python");
    assert!(
        python.exists(),
        "kubernetes-validate is not installed at {}: run {SETUP_COMMAND}",
        python.display()
    );
    python
}

/// Runs deploy/k8s/check.py (from `dir`, a copy of deploy/k8s) with `args`.
fn check(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(python())
        .arg(dir.join("check.py"))
        .args(args)
        .output()
        .expect("check.py runs");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn the_kubernetes_manifests_pass_the_api_schemas_and_fleets_rules() {
    let k8s = workspace_root().join("deploy/k8s");
    let (code, out) = check(&k8s, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.matches(" 0 problems").count(),
        2,
        "base and keda: {out}"
    );
}

#[test]
fn broken_copies_of_the_manifests_are_caught() {
    // (file, text, replacement, kustomization to check, what the report must say)
    let cases = [
        (
            "base/worker.yaml",
            "terminationGracePeriodSeconds: 40",
            "terminationGracePeriodSeconds: 15",
            "base",
            "must be longer than the drain",
        ),
        (
            "base/scheduler.yaml",
            "replicas: 2",
            "replicas: two",
            "base",
            "spec/replicas: 'two' is not of type",
        ),
        (
            "base/scheduler.yaml",
            "replicas: 2",
            "replica: 2",
            "base",
            "replica",
        ),
        (
            "base/reaper.yaml",
            "path: /readyz",
            "path: /ready",
            "base",
            "readiness probe must GET /readyz",
        ),
        (
            "base/worker.yaml",
            "value: \"$(POD_NAME)\"\n            - name: FLEET__HTTP__LISTEN",
            "value: \"fixed\"\n            - name: FLEET__HTTP__LISTEN",
            "base",
            "group.instance.id must come from the pod name",
        ),
        (
            "overlays/keda/worker-scaledobject.yaml",
            "lagThreshold: \"50\"",
            "lagThreshold: 50",
            "overlays/keda",
            "lagThreshold: 50 is not of type 'string'",
        ),
        (
            "base/config.yaml",
            "FLEET__LOG__LEVEL: \"info\"",
            "FLEET__LOG__LEVEL: \"info\"\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: fleet-secrets\nstringData:\n  FLEET__HTTP__TOKENS: \"x\"",
            "base",
            "credentials must not be in the kustomization",
        ),
        (
            "overlays/keda/kustomization.yaml",
            "  - delete-worker-hpa.yaml",
            "  []",
            "overlays/keda",
            "exactly one autoscaler, found 2",
        ),
    ];
    for (file, from, to, kustomization, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&workspace_root().join("deploy/k8s"), dir.path());
        let path = dir.path().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} no longer holds `{from}`");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
        let target = dir.path().join(kustomization);
        let (code, out) = check(dir.path(), &[target.to_str().unwrap()]);
        assert_eq!(code, 1, "{file}: `{to}` passed: {out}");
        assert!(out.contains(expected), "{file}: `{to}`: {out}");
    }
}

/// The settings each workload gets (ConfigMap, Secret, env) are accepted by the binary itself.
#[test]
fn each_workloads_kubernetes_settings_pass_the_binarys_own_check() {
    let k8s = workspace_root().join("deploy/k8s");
    for (workload, binary) in [
        ("fleet-scheduler", "fleet-scheduler"),
        ("fleet-reaper", "fleet-reaper"),
        ("fleet-worker", "fleet-worker"),
    ] {
        let (code, out) = check(&k8s, &["--print-env", workload]);
        assert_eq!(code, 0, "{out}");
        let json = out.lines().find(|l| l.starts_with('{')).expect("env JSON");
        let env: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json).unwrap();
        assert!(env.len() > 8, "{workload}: {env:?}");
        let mut command = Command::new(fleet_binary(binary));
        command.arg("--check-config").env_clear();
        for (k, v) in &env {
            command.env(k, v.as_str().unwrap());
        }
        let out = command.output().unwrap();
        assert!(
            out.status.success(),
            "{workload}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8_lossy(&out.stdout);
        if workload == "fleet-worker" {
            assert!(printed.contains("fleet-worker-0"), "{printed}");
        }
    }
}

/// deploy/Dockerfile (registry) and deploy/images/fleet.Dockerfile (no registry) build the
/// same runtime: user, environment, port, health check and command.
#[test]
fn the_two_dockerfiles_share_one_runtime_definition() {
    let runtime = |file: &str| -> Vec<String> {
        let text = std::fs::read_to_string(workspace_root().join(file)).unwrap();
        let (_, tail) = text
            .split_once("# --- runtime: kept identical in ")
            .unwrap_or_else(|| panic!("{file} lost its runtime marker"));
        tail.lines().skip(1).map(String::from).collect()
    };
    let registry = runtime("deploy/Dockerfile");
    let local = runtime("deploy/images/fleet.Dockerfile");
    assert_eq!(registry, local);
    let text = registry.join("\n");
    assert!(text.contains("USER 10001:10001"), "non-root: {text}");
    assert!(text.contains("HEALTHCHECK"), "{text}");
}
