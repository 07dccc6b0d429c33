//! Fleet under Docker Compose for the container tests: `deploy/docker-compose.yml` with the
//! images of `deploy/images/build.sh`, one compose project per test, removed with its volumes
//! when dropped (after saving every container's log to `target/fleet-it/<project>/`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use fleet_common::settings::TaskSettings;
use fleet_common::store::{self, Keys, Store, StoredTask};

use fleet_testkit::http;

/// The API token the test stacks use.
pub(crate) const TOKEN: &str = "container-test-token-0123456789";

/// Timings short enough for tests: 3 s leases, 1 s heartbeats, a 5 s drain.
const TEST_ENV: [(&str, &str); 8] = [
    ("FLEET_API_TOKEN", TOKEN),
    ("FLEET_LEASE_MS", "3000"),
    ("FLEET_HEARTBEAT_MS", "1000"),
    ("FLEET_REAPER_INTERVAL_MS", "500"),
    ("FLEET_SESSION_TIMEOUT_MS", "3000"),
    ("FLEET_KAFKA_HEARTBEAT_MS", "1000"),
    ("FLEET_SHUTDOWN_GRACE_MS", "5000"),
    ("FLEET_STOP_GRACE", "15s"),
];

/// Panics with the reason when no Docker engine answers or an image is missing: the test
/// command runs the container tests only where an engine answers, after building the images.
pub(crate) fn require_docker() {
    let info = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    assert!(
        info.as_ref().is_ok_and(|o| o.status.success()),
        "no Docker engine answers (`docker info` failed): the container tests need one"
    );
    for image in ["fleet:local", "fleet-redis:local", "fleet-tansu:local"] {
        let found = Command::new("docker")
            .args(["image", "inspect", image])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "image {image} is missing: run bash deploy/images/build.sh"
        );
    }
}

/// One compose project.
#[derive(Debug)]
pub(crate) struct Compose {
    project: String,
    env: Vec<(String, String)>,
    logs: PathBuf,
}

impl Compose {
    /// `up -d` with `workers` worker replicas and `extra` variables; waits until every service
    /// container reports healthy.
    pub(crate) async fn up(name: &str, workers: usize, extra: &[(&str, &str)]) -> Self {
        require_docker();
        let project = format!("fleet-it-{name}-{}", std::process::id());
        let logs = fleet_testkit::state_dir().join(&project);
        std::fs::create_dir_all(&logs).expect("log dir");
        let mut env: Vec<(String, String)> = TEST_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let compose = Self { project, env, logs };
        compose.ok(&["up", "-d", "--scale", &format!("worker={workers}")]);
        compose.wait_healthy(Duration::from_secs(120)).await;
        compose
    }

    /// Runs `docker-compose -p <project> -f deploy/docker-compose.yml <args>`.
    pub(crate) fn run(&self, args: &[&str]) -> Output {
        let file = fleet_testkit::workspace_root().join("deploy/docker-compose.yml");
        let mut command = Command::new("docker-compose");
        command
            .arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(file)
            .args(args);
        for (k, v) in &self.env {
            command.env(k, v);
        }
        command.output().expect("docker-compose runs")
    }

    /// Like [`Compose::run`], panicking with its output when it fails; returns stdout.
    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "docker-compose {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The containers of `service`, by id.
    pub(crate) fn containers(&self, service: &str) -> Vec<String> {
        self.ok(&["ps", "-q", service])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    /// The network `name` of this project (`kafka` or `redis`).
    pub(crate) fn network(&self, name: &str) -> String {
        format!("{}_{name}", self.project.replace('.', ""))
    }

    /// Where the host reaches `service`'s container port (replica `index`, from 1).
    pub(crate) fn port(&self, service: &str, index: usize, port: u16) -> SocketAddr {
        let out = self.ok(&[
            "port",
            &format!("--index={index}"),
            service,
            &port.to_string(),
        ]);
        out.trim()
            .parse()
            .unwrap_or_else(|err| panic!("port of {service}: `{out}`: {err}"))
    }

    /// The scheduler's API (first replica).
    pub(crate) fn api(&self) -> SocketAddr {
        self.port("scheduler", 1, 8080)
    }

    /// A store on the stack's Redis, through its published port.
    pub(crate) async fn store(&self) -> Store {
        let url = format!("redis://{}", self.port("redis", 1, 6379));
        let settings = fleet_common::settings::RedisSettings {
            url: fleet_common::settings::Secret::new(url),
            ..Default::default()
        };
        let conn = store::connect(&settings).await.expect("Redis of the stack");
        Store::new(
            conn,
            Keys::new(&settings.key_prefix),
            &TaskSettings::default(),
        )
    }

    /// Submits `tasks` (JSON objects) through the API, 500 per request.
    pub(crate) async fn submit(&self, tasks: &[serde_json::Value]) {
        let api = self.api();
        for chunk in tasks.chunks(500) {
            let body = serde_json::Value::Array(chunk.to_vec()).to_string();
            let response =
                http::request(api, "POST", "/v1/tasks", Some(TOKEN), Some(body.as_bytes())).await;
            assert_eq!(response.status, 201, "submit: {}", response.body);
        }
    }

    /// Submits `tasks` on the submit topic with `fleetctl submit` inside a worker container
    /// (the broker is reachable only on the stack's network).
    pub(crate) fn submit_on_topic(&self, tasks: &[serde_json::Value]) {
        use std::io::Write;
        let worker = self
            .containers("worker")
            .into_iter()
            .next()
            .expect("a worker");
        let mut child = Command::new("docker")
            .args(["exec", "-i", &worker, "fleetctl", "submit", "--file", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("docker exec runs");
        let lines: String = tasks.iter().map(|t| format!("{t}\n")).collect();
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(lines.as_bytes())
            .expect("write the tasks");
        let out = child.wait_with_output().expect("fleetctl submit output");
        assert!(
            out.status.success(),
            "fleetctl submit in {worker}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Every container's health (`healthy`, `starting`, `unhealthy`, or `none`) and state.
    pub(crate) fn health(&self) -> BTreeMap<String, (String, String)> {
        let ids = self.ok(&["ps", "-q"]);
        let mut out = BTreeMap::new();
        for id in ids.lines().filter(|l| !l.trim().is_empty()) {
            let inspect = Command::new("docker")
                .args([
                    "inspect",
                    "-f",
                    "{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}",
                    id.trim(),
                ])
                .output()
                .expect("docker inspect");
            let text = String::from_utf8_lossy(&inspect.stdout);
            let mut parts = text.split_whitespace();
            let (Some(name), Some(state), Some(health)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            out.insert(
                name.trim_start_matches('/').to_string(),
                (state.to_string(), health.to_string()),
            );
        }
        out
    }

    /// Waits until every running container with a health check is healthy (the one-shot
    /// topic job has exited by then).
    pub(crate) async fn wait_healthy(&self, deadline: Duration) {
        fleet_testkit::eventually(deadline, "every container healthy", || async {
            let health = self.health();
            !health.is_empty()
                && health.iter().all(|(name, (state, health))| {
                    name.contains("_topics_") && state == "exited"
                        || state == "running" && (health == "healthy" || health == "none")
                })
        })
        .await;
    }

    /// The worker id (`<hostname>-<pid>`) prefix of a container: its hostname.
    pub(crate) fn hostname(&self, container: &str) -> String {
        docker(&["inspect", "-f", "{{.Config.Hostname}}", container])
            .trim()
            .to_string()
    }
}

/// Runs `docker <args>` and returns stdout, panicking when it fails.
pub(crate) fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A container's log (services log to stderr).
pub(crate) fn container_logs(container: &str) -> String {
    let out = Command::new("docker")
        .args(["logs", container])
        .output()
        .expect("docker logs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every listed task as Redis holds it (missing tasks are absent from the map).
pub(crate) async fn tasks(store: &Store, ids: &[String]) -> HashMap<String, StoredTask> {
    let mut out = HashMap::new();
    for id in ids {
        if let Some(task) = store.task(id).await.expect("read a task") {
            out.insert(id.clone(), task);
        }
    }
    out
}

impl Drop for Compose {
    fn drop(&mut self) {
        let logs = self.run(&["logs", "--no-color", "--timestamps"]);
        let _ = std::fs::write(self.logs.join("compose.log"), &logs.stdout);
        let down = self.run(&["down", "-v", "--remove-orphans", "--timeout", "5"]);
        if !down.status.success() {
            eprintln!(
                "docker-compose down failed for {}: {}",
                self.project,
                String::from_utf8_lossy(&down.stderr)
            );
        }
    }
}
