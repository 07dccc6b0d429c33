//! The foundation against real dependencies: Kafka consumer groups and offsets on tansu, Lua on
//! redis-server, the services' configuration handling, and the harness's own cleanup.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_common::{kafka, store};
use fleet_testkit::{TestEnv, eventually, fleet_binary};
use futures::StreamExt;
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(60);

/// (consumer, partition, offset, value) of every record a consumer saw.
type Seen = Arc<Mutex<Vec<(usize, i32, i64, u32)>>>;

fn group_consumer(env: &TestEnv, topic: &str) -> Arc<StreamConsumer> {
    let settings = env.settings();
    let mut config =
        kafka::consumer_config(&settings.kafka, &format!("{}-group", env.prefix), "it");
    config.set("enable.auto.commit", "false"); // this test commits by hand
    let consumer: StreamConsumer = config.create().expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    Arc::new(consumer)
}

/// Consumes forever, committing each record synchronously after recording it.
fn consume(id: usize, consumer: Arc<StreamConsumer>, seen: Seen) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut stream = consumer.stream();
        while let Some(Ok(msg)) = stream.next().await {
            let value: u32 = std::str::from_utf8(msg.payload().unwrap())
                .unwrap()
                .parse()
                .unwrap();
            seen.lock()
                .unwrap()
                .push((id, msg.partition(), msg.offset(), value));
            consumer
                .commit_message(&msg, CommitMode::Sync)
                .expect("commit");
        }
    })
}

async fn produce(env: &TestEnv, topic: &str, values: std::ops::Range<u32>) {
    let producer: FutureProducer = kafka::producer_config(&env.settings().kafka, "it")
        .create()
        .expect("producer");
    let sends = values.map(|v| {
        let producer = producer.clone();
        let topic = topic.to_string();
        async move {
            let (key, payload) = (format!("k{v}"), v.to_string());
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .expect("delivered");
        }
    });
    futures::future::join_all(sends).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_group_of_two_shares_partitions_and_committed_offsets_survive_restart() {
    let env = TestEnv::start("group");
    let topic = format!("{}.roundtrip", env.prefix);
    let settings = env.settings();
    let statuses = kafka::ensure_topics(
        &settings.kafka,
        std::slice::from_ref(&topic),
        4,
        1,
        1 << 20,
        Duration::from_secs(10),
    )
    .await
    .expect("create topic");
    assert_eq!((statuses[0].created, statuses[0].partitions), (true, 4));
    let again = kafka::ensure_topics(
        &settings.kafka,
        std::slice::from_ref(&topic),
        4,
        1,
        1 << 20,
        Duration::from_secs(10),
    )
    .await
    .expect("create topic again");
    assert!(
        !again[0].created,
        "a second create leaves the topic as it is"
    );

    // Two members of one group: wait until the group has split the four partitions.
    let (a, b) = (group_consumer(&env, &topic), group_consumer(&env, &topic));
    let seen: Seen = Arc::default();
    let loops = [
        consume(0, a.clone(), seen.clone()),
        consume(1, b.clone(), seen.clone()),
    ];
    eventually(WAIT, "both members own partitions", || {
        let (a, b) = (a.clone(), b.clone());
        async move {
            let (na, nb) = (
                a.assignment().unwrap().count(),
                b.assignment().unwrap().count(),
            );
            na > 0 && nb > 0 && na + nb == 4
        }
    })
    .await;

    produce(&env, &topic, 0..200).await;
    eventually(WAIT, "all 200 records consumed", || async {
        seen.lock().unwrap().len() >= 200
    })
    .await;
    let first: Vec<_> = seen.lock().unwrap().clone();
    let values: BTreeSet<u32> = first.iter().map(|r| r.3).collect();
    assert_eq!(values.len(), 200, "every record seen");
    assert_eq!(first.len(), 200, "no record seen twice");
    for member in 0..2 {
        assert!(
            first.iter().any(|r| r.0 == member),
            "member {member} got a share"
        );
    }
    // Each partition went to exactly one member.
    let mut owner: BTreeMap<i32, BTreeSet<usize>> = BTreeMap::new();
    for (member, partition, _, _) in &first {
        owner.entry(*partition).or_default().insert(*member);
    }
    assert!(
        owner.values().all(|m| m.len() == 1),
        "partition owners: {owner:?}"
    );
    // Close the members one at a time, letting the group settle in between, as a rolling
    // restart does. (tansu can keep a departed leader when both leave in the same instant;
    // see the notes on the local broker in docs/operations.md.)
    // The remaining member keeps polling so that it can take part in the rebalance.
    let [loop_a, loop_b] = loops;
    loop_a.abort();
    let _ = loop_a.await;
    drop(a);
    eventually(WAIT, "the remaining member owns every partition", || {
        let b = b.clone();
        async move { b.assignment().unwrap().count() == 4 }
    })
    .await;
    loop_b.abort();
    let _ = loop_b.await;
    drop(b);

    // Restart: a new member of the same group starts at the committed offsets.
    produce(&env, &topic, 200..300).await;
    let c = group_consumer(&env, &topic);
    let after: Seen = Arc::default();
    let handle = consume(2, c.clone(), after.clone());
    eventually(
        WAIT,
        "the 100 new records consumed after restart",
        || async { after.lock().unwrap().iter().filter(|r| r.3 >= 200).count() >= 100 },
    )
    .await;
    handle.abort();
    let after = after.lock().unwrap().clone();
    let old: Vec<_> = after.iter().filter(|r| r.3 < 200).collect();
    // Within a partition records arrive in offset order, so a replay of a committed record
    // would have come before the new ones.
    assert!(old.is_empty(), "records replayed after restart: {old:?}");
    assert_eq!(
        after.iter().map(|r| r.3).collect::<BTreeSet<_>>().len(),
        100
    );
}

#[tokio::test]
async fn lua_schema_script_runs_on_real_redis_and_survives_script_flush() {
    let env = TestEnv::start("lua");
    let settings = env.settings();
    let mut conn = store::connect(&settings.redis).await.expect("connect");
    let keys = store::Keys::new(&settings.redis.key_prefix);

    assert_eq!(
        store::check_schema(&mut conn, &keys, "test").await.unwrap(),
        store::SchemaCheck::Recorded,
        "first call records it"
    );
    assert_eq!(
        store::check_schema(&mut conn, &keys, "test").await.unwrap(),
        store::SchemaCheck::Current,
        "second call only checks"
    );

    let mut raw = env.redis_conn().await;
    let fields: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.schema())
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(fields["version"], store::SCHEMA_VERSION.to_string());
    assert_eq!(fields["created_by"], "test");
    assert!(
        fields["created_ms"].parse::<u64>().unwrap() > 1_600_000_000_000,
        "Redis server time in ms"
    );

    // EVALSHA falls back to loading the script after the cache is emptied.
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(
        store::check_schema(&mut conn, &keys, "test").await.unwrap(),
        store::SchemaCheck::Current
    );
    // So do the transition scripts, whose calls Fleet builds itself (`ScriptCall`): with the
    // cache emptied, a batch of two is accepted, the keys and arguments of each task in place.
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw)
        .await
        .unwrap();
    let task_store = env.store().await;
    let new = |json: &str| {
        let spec = fleet_common::task::TaskSpec::parse(json.as_bytes(), 1 << 20).unwrap();
        store::NewTask::from_spec(spec, &settings.tasks, || unreachable!("the id is given"))
    };
    let accepted = task_store
        .accept(&[
            new(r#"{"id":"flushed-1","kind":"noop","queue":"q1"}"#),
            new(r#"{"id":"flushed-2","kind":"noop","queue":"q2","priority":"high"}"#),
        ])
        .await
        .unwrap();
    assert_eq!(
        accepted,
        [
            store::Accepted::Pending("flushed-1".into()),
            store::Accepted::Pending("flushed-2".into())
        ]
    );
    for (id, queue, priority) in [("flushed-1", "q1", "normal"), ("flushed-2", "q2", "high")] {
        let (state, stored_queue, stored_priority): (String, String, String) = redis::cmd("HMGET")
            .arg(keys.task(id))
            .arg(&["state", "queue", "priority"])
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(
            (
                state.as_str(),
                stored_queue.as_str(),
                stored_priority.as_str()
            ),
            ("pending", queue, priority)
        );
        let indexed: Option<f64> = redis::cmd("ZSCORE")
            .arg(keys.queue_index(queue))
            .arg(id)
            .query_async(&mut raw)
            .await
            .unwrap();
        assert!(indexed.is_some(), "{id} is in its queue's index");
    }

    // Data in a layout this build does not know is refused, and left untouched: a newer one,
    // and one older than this build reads.
    for unknown in [store::SCHEMA_VERSION + 96, store::OLDEST_UPGRADABLE - 1] {
        set_schema_version(&mut raw, &keys, unknown).await;
        let err = store::check_schema(&mut conn, &keys, "test")
            .await
            .unwrap_err();
        assert!(
            matches!(err, store::StoreError::SchemaMismatch { found, .. } if found == unknown),
            "{err}"
        );
        assert_eq!(schema_version(&mut raw, &keys).await, unknown.to_string());
    }

    // An older layout this build reads is upgraded in place, once, by a service; a client
    // such as fleetctl refuses it and says what to do.
    set_schema_version(&mut raw, &keys, store::OLDEST_UPGRADABLE).await;
    let err = store::check_schema_current(&mut conn, &keys, "client")
        .await
        .unwrap_err();
    assert!(
        matches!(err, store::StoreError::SchemaNotUpgraded { found, .. } if found == store::OLDEST_UPGRADABLE),
        "{err}"
    );
    let vars = env.env_vars();
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, _, err) = run_binary("fleetctl", &["stats"], &vars);
    assert_ne!(code, 0);
    assert!(err.contains("start one (a scheduler first)"), "{err}");
    assert_eq!(
        schema_version(&mut raw, &keys).await,
        store::OLDEST_UPGRADABLE.to_string(),
        "left as it was"
    );
    assert_eq!(
        store::check_schema(&mut conn, &keys, "upgrader")
            .await
            .unwrap(),
        store::SchemaCheck::Upgraded {
            from: store::OLDEST_UPGRADABLE
        }
    );
    assert_eq!(
        store::check_schema(&mut conn, &keys, "test").await.unwrap(),
        store::SchemaCheck::Current
    );
    let fields: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.schema())
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(fields["version"], store::SCHEMA_VERSION.to_string());
    assert_eq!(
        fields["upgraded_from"],
        store::OLDEST_UPGRADABLE.to_string()
    );
    assert_eq!(fields["upgraded_by"], "upgrader");
    assert_eq!(fields["created_by"], "test", "the creation record stays");
}

/// Overwrites the schema version stored in Redis, as data of another release would have it.
async fn set_schema_version(
    raw: &mut redis::aio::MultiplexedConnection,
    keys: &store::Keys,
    version: u32,
) {
    let () = redis::cmd("HSET")
        .arg(keys.schema())
        .arg("version")
        .arg(version)
        .query_async(raw)
        .await
        .unwrap();
}

async fn schema_version(raw: &mut redis::aio::MultiplexedConnection, keys: &store::Keys) -> String {
    redis::cmd("HGET")
        .arg(keys.schema())
        .arg("version")
        .query_async(raw)
        .await
        .unwrap()
}

/// Runs a Fleet binary with `env` and returns (exit code, stdout, stderr).
fn run_binary(name: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(fleet_binary(name))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("run binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn services_refuse_bad_configuration_with_a_message_naming_the_key() {
    for binary in ["fleet-scheduler", "fleet-worker", "fleetctl"] {
        let args: &[&str] = if binary == "fleetctl" {
            &["ping"]
        } else {
            &["--check-config"]
        };
        let (code, _, err) = run_binary(binary, args, &[("FLEET__WORKER__CONCURENCY", "8")]);
        if binary == "fleet-worker" {
            assert_eq!(code, 2, "{binary}: {err}");
            assert!(
                err.contains("worker.concurency") && err.contains("unknown field"),
                "{binary}: {err}"
            );
            let bad_id = [("FLEET__WORKER__GROUP_INSTANCE_ID", "pod name; rm -rf /")];
            let (code, _, err) = run_binary(binary, args, &bad_id);
            assert_eq!(code, 2, "{binary}: {err}");
            assert!(err.contains("worker.group_instance_id"), "{binary}: {err}");
            for (var, value, key) in [
                ("FLEET__WORKER__CAPACITY__GPU", "lots", "worker.capacity"),
                ("FLEET__WORKER__CAPACITY__GPU", "-1", "worker.capacity"),
                ("FLEET__WORKER__CAPACITY__CPU", "1e12", "worker.capacity"),
                ("FLEET__WORKER__LABELS__ZONE", "eu 1", "worker.labels"),
                ("FLEET__WORKER__WEIGHT", "0", "worker.weight"),
            ] {
                let (code, _, err) = run_binary(binary, args, &[(var, value)]);
                assert_eq!(code, 2, "{binary} {var}={value}: {err}");
                assert!(err.contains(key), "{binary} {var}={value}: {err}");
            }
        }
        let (code, _, err) = run_binary(binary, args, &[("FLEET__LEASE__HEARTBEAT_MS", "20000")]);
        assert_eq!(code, 2, "{binary}: {err}");
        assert!(err.contains("lease.heartbeat_ms"), "{binary}: {err}");
        let (code, _, err) = run_binary(binary, args, &[("FLEET__REDIS__URL", "junk\u{7f}")]);
        assert_eq!(code, 2, "{binary}: {err}");
        assert!(err.contains("redis.url"), "{binary}: {err}");
        for (var, value, key) in [
            ("FLEET__HTTP__LISTEN", "not an address", "http.listen"),
            ("FLEET__HTTP__TOKENS", "short", "http.tokens"),
            (
                "FLEET__HTTP__MAX_BODY_BYTES",
                "99999999999",
                "http.max_body_bytes",
            ),
            (
                "FLEET__LOG__OTLP_ENDPOINT",
                "https://collector:4318",
                "log.otlp_endpoint",
            ),
        ] {
            let (code, _, err) = run_binary(binary, args, &[(var, value)]);
            assert_eq!(code, 2, "{binary} {var}={value}: {err}");
            assert!(err.contains(key), "{binary} {var}={value}: {err}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[scheduler]\ngroup_id = 7\nextra = true\n").unwrap();
    let (code, _, err) = run_binary(
        "fleet-scheduler",
        &["--check-config", "--config", bad.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("scheduler."), "{err}");
    for (var, value, key) in [
        ("FLEET__SCHEDULER__STICKY_RUN", "0", "scheduler.sticky_run"),
        (
            "FLEET__SCHEDULER__STICKY_RUN",
            "99999999",
            "scheduler.sticky_run",
        ),
        ("FLEET__SCHEDULER__PARTITIONER", "by_magic", "scheduler"),
        (
            "FLEET__SCHEDULER__QUEUES__MAIL__STRATEGY",
            "lifo",
            "scheduler.queues",
        ),
        (
            "FLEET__SCHEDULER__QUEUES__MAIL__PLACEMENT_TIMEOUT_MS",
            "0",
            "scheduler.queues.placement_timeout_ms",
        ),
        (
            "FLEET__SCHEDULER__LIMITS__KEY__HOT__MAX_RUNNING",
            "0",
            "`max_running` must be 1",
        ),
        (
            "FLEET__SCHEDULER__LIMITS__KEY__HOT__WEIGHT",
            "2",
            "`weight` does not apply to a key limit",
        ),
        (
            "FLEET__SCHEDULER__LIMITS__RATE__SMTP__LIMIT",
            "5",
            "a rate limit needs `limit` and `period_ms`",
        ),
        (
            "FLEET__SCHEDULER__LIMITS__PLANET__X__MAX_RUNNING",
            "1",
            "scheduler",
        ),
        (
            "FLEET__SCHEDULER__LIMITS__TENANT__ACME__MAX_WAITING",
            "-3",
            "scheduler",
        ),
    ] {
        let (code, _, err) = run_binary("fleet-scheduler", &["--check-config"], &[(var, value)]);
        assert_eq!(code, 2, "{var}={value}: {err}");
        assert!(err.contains(key), "{var}={value}: {err}");
    }
    // Limits as the README writes them are accepted.
    let limits = dir.path().join("limits.toml");
    std::fs::write(
        &limits,
        "[scheduler.limits.key.customer-42]\nmax_running = 3\n\
         [scheduler.limits.rate.smtp]\nlimit = 100\nperiod_ms = 1000\nburst = 10\n\
         [scheduler.limits.tenant.\"*\"]\nmax_waiting = 100000\n",
    )
    .unwrap();
    let (code, _, err) = run_binary(
        "fleet-scheduler",
        &["--check-config", "--config", limits.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    // The largest task (1 MiB by default) must fit through the producer.
    let small = dir.path().join("small.toml");
    std::fs::write(
        &small,
        "[kafka.client]\n\"message.max.bytes\" = \"1000000\"\n",
    )
    .unwrap();
    for binary in ["fleet-scheduler", "fleet-worker"] {
        let (code, _, err) = run_binary(
            binary,
            &["--check-config", "--config", small.to_str().unwrap()],
            &[],
        );
        assert_eq!(code, 2, "{binary}: {err}");
        assert!(
            err.contains("message.max.bytes") && err.contains("1310720"),
            "{binary}: {err}"
        );
        let (code, _, err) = run_binary(
            binary,
            &["--check-config", "--config", small.to_str().unwrap()],
            &[("FLEET__TASKS__MAX_TASK_BYTES", "500000")],
        );
        assert_eq!(code, 0, "{binary}: a smaller task limit fits: {err}");
    }
    let (code, _, err) = run_binary("fleet-scheduler", &["--config", "/nonexistent.toml"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent.toml"), "{err}");
    let (code, _, err) = run_binary("fleet-scheduler", &["--no-such-flag"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--no-such-flag"), "{err}");
}

#[test]
fn check_config_prints_effective_settings_without_secrets() {
    let (code, out, err) = run_binary(
        "fleet-worker",
        &["--check-config"],
        &[
            ("FLEET__REDIS__URL", "redis://u:canary-pw@cache:6379"),
            ("FLEET__WORKER__CONCURRENCY", "7"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("concurrency: 7"), "{out}");
    assert!(
        out.contains("cache:6379") && !out.contains("canary-pw"),
        "{out}"
    );
}

#[tokio::test]
async fn fleetctl_refuses_bad_input_with_clear_errors_and_exit_codes() {
    let env = TestEnv::start("fleetctl");
    let vars = env.env_vars();
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let dir = tempfile::tempdir().unwrap();
    let lines = dir.path().join("tasks.jsonl");
    std::fs::write(
        &lines,
        "{\"kind\":\"noop\"}\n\n{\"kind\":\"noop\",\"bogus\":1}\n",
    )
    .unwrap();
    let lines = lines.to_str().unwrap();

    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["submit", "--kind", "noop", "--payload", "{not json"],
            2,
            "--payload is not valid JSON",
        ),
        (&["submit", "--kind", "no space"], 2, "kind"),
        (
            &["submit", "--kind", "noop", "--priority", "urgent"],
            2,
            "urgent",
        ),
        (&["submit", "--file", lines], 2, "tasks.jsonl:3"),
        (
            &["submit", "--file", "/nonexistent/tasks.jsonl"],
            2,
            "opening /nonexistent/tasks.jsonl",
        ),
        (&["submit"], 2, "--kind"),
        (&["status", "no-such-task"], 1, "no task `no-such-task`"),
        (&["frobnicate"], 2, "frobnicate"),
    ];
    for (args, code, message) in cases {
        let (got, _, err) = run_binary("fleetctl", args, &vars);
        assert_eq!(got, *code, "fleetctl {args:?}: {err}");
        assert!(err.contains(message), "fleetctl {args:?}: {err}");
    }
    // Nothing reached the broker: the file was checked whole before sending.
    let (code, out, err) = run_binary("fleetctl", &["stats", "--json"], &vars);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"pending\":0"), "{out}");
}

/// Every service is `run(settings, token)` and only `run_service` handles signals, so a
/// scheduler runs in-process here and stops when its token is cancelled: its drain joins the
/// HTTP server and the API's group commit with the publication it started: the task accepted
/// over HTTP is in Redis, and Kafka's acknowledgement of it was recorded (its outbox entry is
/// gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_in_process_drains_when_its_token_is_cancelled() {
    use fleet_common::shutdown::Drain;
    use fleet_scheduler::service::{Role, serve};
    use fleet_scheduler::settings::SchedulerSettings;
    use fleet_testkit::free_ports;
    use fleet_testkit::http::request;

    let env = TestEnv::start("in-process");
    env.create_topics().await;
    let common = env.settings();
    let [port] = free_ports::<1>();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut settings = SchedulerSettings {
        kafka: common.kafka,
        redis: common.redis,
        topics: common.topics,
        lease: common.lease,
        tasks: common.tasks,
        log: common.log,
        http: common.http,
        ..SchedulerSettings::default()
    };
    settings.http.listen = addr.to_string();
    settings.http.insecure_no_auth = true;
    let token = tokio_util::sync::CancellationToken::new();
    let service = tokio::spawn(serve(settings, Role::Scheduler, token.clone()));
    eventually(WAIT, "the API is ready", || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
            && request(addr, "GET", "/readyz", None, None).await.status == 200
    })
    .await;
    let body = br#"{"id":"in-process","kind":"noop"}"#;
    let answer = request(addr, "POST", "/v1/tasks", None, Some(body)).await;
    assert_eq!(answer.status, 201, "{}", answer.body);

    token.cancel();
    let outcome = tokio::time::timeout(WAIT, service)
        .await
        .expect("the scheduler drains within a minute")
        .expect("the service task")
        .expect("the service");
    assert_eq!(outcome, Drain::Clean);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
    let task = env.store().await.task("in-process").await.unwrap();
    assert_eq!(task.map(|t| t.state.as_str()), Some("pending"));
    let backlog = env.store().await.backlog().await.unwrap();
    assert_eq!(
        backlog.outbox, 0,
        "the publication was confirmed before the drain ended"
    );
}
