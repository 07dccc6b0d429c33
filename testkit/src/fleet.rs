//! Running Fleet's real binaries against a [`TestEnv`], submitting tasks, and reading back what
//! happened: task states from Redis and handler executions from the workers' own logs.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use fleet_common::store::{Keys, Selector, Store, StoredTask};
use fleet_common::{Topics, kafka};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::{ManagedProcess, TestEnv, fleet_binary};

impl TestEnv {
    /// Starts a Fleet binary (`fleet-scheduler`, `fleet-reaper`, `fleet-worker`) named `name`
    /// with this environment's settings plus `extra` variables. Its JSON log goes to
    /// `<test dir>/<name>.log`.
    pub fn spawn(&self, binary: &str, name: &str, extra: &[(&str, &str)]) -> ManagedProcess {
        let mut vars = self.env_vars();
        vars.push(("FLEET__WORKER__ID".into(), name.into()));
        // Successes are logged at debug; the tests read them from the log (a fenced attempt
        // must never log one).
        vars.push((
            "RUST_LOG".into(),
            "info,fleet_worker::runtime::execute=debug".into(),
        ));
        vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        if binary != "fleet-worker" {
            vars.retain(|(k, _)| !k.starts_with("FLEET__WORKER__"));
        }
        let path = fleet_binary(binary);
        let log = self.dir.join(format!("{name}.log"));
        ManagedProcess::spawn(name, &path, &[], &vars, &log)
    }

    /// Starts a scheduler named `name` with its API on a free loopback port, and waits until
    /// `/readyz` answers 200; returns it and the API's address.
    pub async fn spawn_api(
        &self,
        name: &str,
        extra: &[(&str, &str)],
    ) -> (ManagedProcess, std::net::SocketAddr) {
        let [port] = crate::free_ports::<1>();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let listen = addr.to_string();
        let mut vars: Vec<(&str, &str)> = vec![("FLEET__HTTP__LISTEN", &listen)];
        vars.extend_from_slice(extra);
        let process = self.spawn("fleet-scheduler", name, &vars);
        crate::eventually(
            Duration::from_secs(60),
            "the API answers /readyz",
            || async {
                tokio::time::timeout(
                    Duration::from_millis(500),
                    tokio::net::TcpStream::connect(addr),
                )
                .await
                .is_ok_and(|c| c.is_ok())
                    && crate::http::request(addr, "GET", "/readyz", None, None)
                        .await
                        .status
                        == 200
            },
        )
        .await;
        (process, addr)
    }

    /// A proxy in front of this environment's Redis that can lose replies on purpose.
    pub async fn reply_cut_proxy(&self) -> crate::reply_cut::ReplyCut {
        let redis_addr = self
            .settings()
            .redis
            .url
            .expose()
            .trim_start_matches("redis://")
            .parse()
            .expect("the test Redis's address");
        crate::reply_cut::ReplyCut::start(redis_addr).await
    }

    /// Log file of the process started as `name`.
    pub fn log_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// A producer for the submit topic (or any other).
    pub fn producer(&self) -> FutureProducer {
        kafka::producer_config(&self.settings().kafka, "it-submitter")
            .create()
            .expect("producer")
    }

    /// Publishes submissions (raw JSON texts) to the submit topic and waits for the acks.
    pub async fn submit(&self, submissions: &[String]) {
        let producer = self.producer();
        let topic = Topics::from_settings(&self.settings().topics).submit();
        for chunk in submissions.chunks(1000) {
            let sends = chunk.iter().map(|body| {
                let producer = producer.clone();
                let topic = topic.clone();
                async move {
                    producer
                        .send(
                            FutureRecord::<(), _>::to(&topic).payload(body.as_bytes()),
                            Duration::from_secs(30),
                        )
                        .await
                        .expect("submission delivered");
                }
            });
            futures::future::join_all(sends).await;
        }
    }

    /// Creates every Fleet topic (as `fleetctl topics create` does) before anything produces.
    pub async fn create_topics(&self) {
        let s = self.settings();
        kafka::ensure_topics(
            &s.kafka,
            &Topics::from_settings(&s.topics).all(),
            s.topics.partitions,
            1,
            fleet_common::task::record_limit(s.tasks.max_task_bytes),
            Duration::from_secs(10),
        )
        .await
        .expect("create topics");
    }

    /// A store client on this environment's Redis.
    pub async fn store(&self) -> Store {
        let s = self.settings();
        let conn = fleet_common::store::connect(&s.redis).await.expect("redis");
        Store::new(conn, Keys::new(&s.redis.key_prefix), &s.tasks)
    }

    /// How many tasks Redis holds, in every state.
    pub async fn task_total(&self) -> u64 {
        let counts = self.store().await.counts().await.expect("counts");
        counts.iter().map(|(_, n)| n).sum()
    }

    /// Every listed task as Redis holds it (missing tasks are absent from the map).
    pub async fn tasks(&self, ids: &[String]) -> HashMap<String, StoredTask> {
        let store = self.store().await;
        let mut out = HashMap::new();
        for id in ids {
            if let Some(task) = store.task(id).await.expect("read task") {
                out.insert(id.clone(), task);
            }
        }
        out
    }

    /// Waits (up to `deadline`) until every listed task is in a terminal state, and returns
    /// them.
    pub async fn wait_terminal(
        &self,
        ids: &[String],
        deadline: Duration,
    ) -> HashMap<String, StoredTask> {
        crate::eventually(deadline, "every task reaches a terminal state", || async {
            let tasks = self.tasks(ids).await;
            tasks.len() == ids.len() && tasks.values().all(|t| t.state.is_terminal())
        })
        .await;
        self.tasks(ids).await
    }
}

/// One JSON log event of a Fleet process.
pub type LogEvent = serde_json::Map<String, serde_json::Value>;

/// Every JSON event in the log files of `names`, with a `process` field added.
pub fn log_events(env: &TestEnv, names: &[&str]) -> Vec<LogEvent> {
    let mut events = Vec::new();
    for name in names {
        let text = std::fs::read_to_string(env.log_of(name)).unwrap_or_default();
        for line in text.lines() {
            if let Ok(serde_json::Value::Object(mut event)) = serde_json::from_str(line) {
                event.insert(
                    "process".into(),
                    serde_json::Value::String(name.to_string()),
                );
                events.push(event);
            }
        }
    }
    events
}

/// Handler executions per task id, as `(attempt, process)` pairs, from "Handler started."
/// events: the workers' own record of every execution, independent of Redis.
pub fn executions(env: &TestEnv, workers: &[&str]) -> BTreeMap<String, Vec<(u64, String)>> {
    let mut out: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for event in log_events(env, workers) {
        if event.get("message").and_then(|m| m.as_str()) == Some("Handler started.") {
            let id = event["task_id"].as_str().unwrap_or_default().to_string();
            let attempt = event["attempt"].as_u64().unwrap_or(0);
            let process = event["process"].as_str().unwrap_or_default().to_string();
            out.entry(id).or_default().push((attempt, process));
        }
    }
    out
}

/// A submission JSON for `kind` with `payload`, an explicit id and `priority`.
pub fn task_json(id: &str, kind: &str, priority: &str, payload: serde_json::Value) -> String {
    serde_json::json!({ "id": id, "kind": kind, "priority": priority, "payload": payload })
        .to_string()
}

/// One record read back from a topic: its headers (as text) and value.
#[derive(Debug, Clone)]
pub struct Record {
    pub headers: HashMap<String, String>,
    pub payload: Vec<u8>,
}

impl Record {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).expect("a JSON record")
    }
}

impl TestEnv {
    /// Reads `n` records from `topic` from the beginning (a fresh consumer group), waiting up
    /// to `deadline` for them.
    pub async fn read_topic(&self, topic: &str, n: usize, deadline: Duration) -> Vec<Record> {
        use rdkafka::Message;
        use rdkafka::consumer::{Consumer, StreamConsumer};
        use rdkafka::message::Headers;

        let group = format!("{}-read-{}", self.prefix, fleet_common::task::new_task_id());
        let mut config = kafka::consumer_config(&self.settings().kafka, &group, "it-reader");
        config.set("enable.auto.commit", "false");
        let consumer: StreamConsumer = config.create().expect("consumer");
        consumer.subscribe(&[topic]).expect("subscribe");
        let mut records = Vec::new();
        while records.len() < n {
            let message = tokio::time::timeout(deadline, consumer.recv())
                .await
                .unwrap_or_else(|_| panic!("{n} records on {topic}; got {records:?}"))
                .expect("a record");
            let headers = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                            (h.key.to_string(), value.into_owned())
                        })
                        .collect()
                })
                .unwrap_or_default();
            records.push(Record {
                headers,
                payload: message.payload().unwrap_or_default().to_vec(),
            });
        }
        records
    }
}

impl TestEnv {
    /// A validated task from submission JSON, with this environment's defaults.
    pub fn new_task(&self, json: &str) -> fleet_common::store::NewTask {
        let spec = fleet_common::task::TaskSpec::parse(json.as_bytes(), 1 << 20).expect("task");
        fleet_common::store::NewTask::from_spec(
            spec,
            &self.settings().tasks,
            fleet_common::task::new_task_id,
        )
    }

    /// A store client with `tasks` (submission JSON) accepted, each as a new task: how most
    /// store-level tests begin.
    pub async fn store_with(&self, tasks: &[&str]) -> Store {
        let store = self.store().await;
        let new: Vec<_> = tasks.iter().map(|json| self.new_task(json)).collect();
        let accepted = store.accept(&new).await.expect("accept");
        assert!(
            !accepted
                .iter()
                .any(|a| matches!(a, fleet_common::store::Accepted::Duplicate(_))),
            "every task is new: {accepted:?}"
        );
        store
    }

    /// Publishes `attempt` of `task` on partition 0 of the normal-priority topic, as Fleet's
    /// dispatch would (for tests that record tasks in Redis themselves).
    pub async fn publish_attempt(&self, task: &fleet_common::store::NewTask, attempt: u32) {
        let topic =
            Topics::from_settings(&self.settings().topics).tasks(fleet_common::Priority::Normal);
        let body = fleet_common::wire::Envelope::encode(&task.record_json, attempt);
        self.producer()
            .send(
                FutureRecord::<(), _>::to(&topic)
                    .payload(&body)
                    .partition(0),
                Duration::from_secs(10),
            )
            .await
            .expect("publish an attempt");
    }

    /// Makes a running task's lease expire now, as if its worker had stopped heartbeating.
    pub async fn expire_lease(&self, store: &Store, id: &str) {
        let mut conn = self.redis_conn().await;
        let () = redis::cmd("ZADD")
            .arg(store.keys().leases())
            .arg("XX")
            .arg(0)
            .arg(id)
            .query_async(&mut conn)
            .await
            .expect("expire lease");
    }

    /// The first half of a resume, as left by one whose process died before it sent the held
    /// tasks on: the pause of `selector` is lifted, its tasks stay held.
    pub async fn lift_pause_only(&self, store: &Store, selector: &Selector) {
        let mut conn = self.redis_conn().await;
        let () = redis::cmd("SREM")
            .arg(store.keys().paused())
            .arg(selector.member())
            .query_async(&mut conn)
            .await
            .expect("lift the pause");
    }
}

impl TestEnv {
    /// Runs `fleetctl` with this environment's settings; returns (exit code, stdout, stderr).
    pub fn fleetctl(&self, args: &[&str]) -> (i32, String, String) {
        self.fleetctl_with_stdin(args, "")
    }

    /// Runs `fleetctl` with `stdin` as its standard input.
    pub fn fleetctl_with_stdin(&self, args: &[&str], stdin: &str) -> (i32, String, String) {
        use std::io::Write;
        let mut child = std::process::Command::new(fleet_binary("fleetctl"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env_vars())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run fleetctl");
        let _ = child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes());
        let out = child.wait_with_output().expect("fleetctl output");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// The size of Redis's append-only file now (0 with AOF off): its growth over a run is what the
/// run appended. For the benchmark, which measures with AOF on.
pub async fn redis_aof_bytes(store: &Store) -> Result<u64, redis::RedisError> {
    Ok(redis_persistence(store).await?[0])
}

/// Redis's AOF counters now: `[aof_current_size, aof_rewrites, aof_delayed_fsync,
/// total_forks]`. A rewrite forks a child that competes for the CPU; a delayed fsync is a
/// write Redis held back because the disk was still busy with the previous second's fsync.
pub async fn redis_persistence(store: &Store) -> Result<[u64; 4], redis::RedisError> {
    let info: String = redis::cmd("INFO")
        .arg("all")
        .query_async(&mut store.conn())
        .await?;
    let value = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Ok([
        value("aof_current_size"),
        value("aof_rewrites"),
        value("aof_delayed_fsync"),
        value("total_forks"),
    ])
}

/// The value of each of Redis's `names` settings (`CONFIG GET`), by name.
pub async fn redis_config(store: &Store, names: &[&str]) -> HashMap<String, String> {
    let mut found = HashMap::new();
    for name in names {
        let pair: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg(*name)
            .query_async(&mut store.conn())
            .await
            .expect("CONFIG GET");
        found.insert(name.to_string(), pair.get(1).cloned().unwrap_or_default());
    }
    found
}
