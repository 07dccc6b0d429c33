//! A test's own dependencies: a `redis-server` and, unless the test needs only Redis, a tansu
//! broker, on free loopback ports, with prefixes no other test uses.

use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fleet_common::settings::CommonSettings;

use crate::process::{self, ManagedProcess, free_ports};
use crate::{SETUP_COMMAND, redis_conf, state_dir, tansu_binary, which};

/// How a [`TestEnv`]'s Redis persists: no AOF, or AOF with `appendfsync everysec` (what the
/// docs/redis-schema.md recommends) or `always`. No RDB snapshots in any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aof {
    Off,
    EverySec,
    Always,
}

impl Aof {
    fn appendonly(self) -> &'static str {
        if self == Aof::Off { "no" } else { "yes" }
    }

    fn appendfsync(self) -> &'static str {
        match self {
            Aof::Always => "always",
            Aof::Off | Aof::EverySec => "everysec",
        }
    }

    /// The name the benchmark reports: `no`, `everysec`, `always`.
    pub fn name(self) -> &'static str {
        match self {
            Aof::Off => "no",
            Aof::EverySec => "everysec",
            Aof::Always => "always",
        }
    }
}

/// A Redis and (unless [`TestEnv::redis_only`]) a broker of the test's own, and prefixes no
/// other test uses.
#[derive(Debug)]
pub struct TestEnv {
    pub name: String,
    pub redis: ManagedProcess,
    broker: Option<ManagedProcess>,
    pub redis_url: String,
    /// The broker's address; empty in a Redis-only environment.
    pub brokers: String,
    /// Unique per test: used for topic names, the Redis key prefix and consumer groups.
    pub prefix: String,
    pub dir: PathBuf,
}

impl TestEnv {
    /// Starts redis-server and tansu for the test `name` and waits until both accept
    /// connections.
    pub fn start(name: &str) -> Self {
        Self::start_with_broker(name, &tansu_binary())
    }

    /// [`TestEnv::start`] with another tansu binary: the benchmark compares broker builds.
    pub fn start_with_broker(name: &str, tansu: &Path) -> Self {
        Self::start_with(name, tansu, Aof::Off)
    }

    /// [`TestEnv::start_with_broker`] with Redis persisting as `aof` says: tests check
    /// behaviour and run without; the benchmark measures the recommended deployment
    /// (docs/redis-schema.md).
    pub fn start_with(name: &str, tansu: &Path, aof: Aof) -> Self {
        Self::launch(name, Some(tansu), aof)
    }

    /// Only a Redis, for tests of the store: they never touch Kafka, so they do not wait for
    /// a broker to start (or pay for its memory).
    pub fn redis_only(name: &str) -> Self {
        Self::launch(name, None, Aof::Off)
    }

    /// The broker; panics in a [`TestEnv::redis_only`] environment.
    pub fn broker(&self) -> &ManagedProcess {
        self.broker
            .as_ref()
            .expect("this environment has no broker (TestEnv::redis_only)")
    }

    fn launch(name: &str, tansu: Option<&Path>, aof: Aof) -> Self {
        process::sweep_stale();
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "t{}x{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            name.chars()
                .filter(char::is_ascii_alphanumeric)
                .take(24)
                .collect::<String>()
        );
        let dir = state_dir().join(&prefix);
        std::fs::create_dir_all(&dir).expect("create test dir");
        if let Some(tansu) = tansu {
            assert!(
                tansu.exists(),
                "the tansu broker is not installed at {}: run {SETUP_COMMAND}",
                tansu.display()
            );
        }
        // A port can be taken between choosing it and binding it (other tests start servers
        // too): a process that exits instead of listening is started again on new ports.
        let mut attempt = 0;
        let (redis, broker, redis_port, broker_port) = loop {
            attempt += 1;
            let [redis_port, broker_port] = free_ports::<2>();
            let mut redis = spawn_redis(&dir, redis_port, aof);
            let mut broker = tansu.map(|tansu| spawn_broker(&dir, tansu, broker_port));
            let up = redis.listens_on(redis_port, Duration::from_secs(10))
                && broker
                    .as_mut()
                    .is_none_or(|b| b.listens_on(broker_port, Duration::from_secs(10)));
            if up {
                break (redis, broker, redis_port, broker_port);
            }
            assert!(
                attempt < 3,
                "redis-server or tansu did not start; see {}",
                dir.display()
            );
        };
        Self {
            name: name.to_string(),
            redis,
            brokers: match broker {
                Some(_) => format!("127.0.0.1:{broker_port}"),
                None => String::new(),
            },
            broker,
            redis_url: format!("redis://127.0.0.1:{redis_port}"),
            prefix,
            dir,
        }
    }

    /// Settings pointing at this environment, with the tests' timings:
    /// lease 3 s, heartbeat 1 s, reaper 0.5 s, group session 6 s; timeout grace 1 s.
    pub fn settings(&self) -> CommonSettings {
        let mut s = CommonSettings::default();
        s.kafka.brokers = self.brokers.clone();
        s.kafka.session_timeout_ms = 6_000;
        s.kafka.heartbeat_interval_ms = 1_000;
        s.redis.url = fleet_common::settings::Secret::new(self.redis_url.clone());
        s.redis.key_prefix = self.prefix.clone();
        s.topics.prefix = self.prefix.clone();
        s.topics.partitions = 4;
        s.lease.lease_ms = 3_000;
        s.lease.heartbeat_ms = 1_000;
        s.lease.reaper_interval_ms = 500;
        s.tasks.redeliver_ms = 2_000;
        s.tasks.retry_base_ms = 100;
        s.tasks.retry_cap_ms = 1_000;
        s.tasks.timeout_grace_ms = 1_000;
        s
    }

    /// The same settings as `FLEET__*` variables, for starting Fleet's binaries.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        let s = self.settings();
        [
            ("FLEET__KAFKA__BROKERS", s.kafka.brokers),
            (
                "FLEET__KAFKA__SESSION_TIMEOUT_MS",
                s.kafka.session_timeout_ms.to_string(),
            ),
            (
                "FLEET__KAFKA__HEARTBEAT_INTERVAL_MS",
                s.kafka.heartbeat_interval_ms.to_string(),
            ),
            ("FLEET__REDIS__URL", self.redis_url.clone()),
            ("FLEET__REDIS__KEY_PREFIX", s.redis.key_prefix),
            ("FLEET__TOPICS__PREFIX", s.topics.prefix),
            ("FLEET__TOPICS__PARTITIONS", s.topics.partitions.to_string()),
            ("FLEET__LEASE__LEASE_MS", s.lease.lease_ms.to_string()),
            (
                "FLEET__LEASE__HEARTBEAT_MS",
                s.lease.heartbeat_ms.to_string(),
            ),
            (
                "FLEET__LEASE__REAPER_INTERVAL_MS",
                s.lease.reaper_interval_ms.to_string(),
            ),
            (
                "FLEET__TASKS__REDELIVER_MS",
                s.tasks.redeliver_ms.to_string(),
            ),
            (
                "FLEET__TASKS__RETRY_BASE_MS",
                s.tasks.retry_base_ms.to_string(),
            ),
            (
                "FLEET__TASKS__RETRY_CAP_MS",
                s.tasks.retry_cap_ms.to_string(),
            ),
            (
                "FLEET__TASKS__TIMEOUT_GRACE_MS",
                s.tasks.timeout_grace_ms.to_string(),
            ),
            ("FLEET__LOG__FORMAT", "json".to_string()),
            // Every process gets its own free port; tests that call one pass a fixed port.
            ("FLEET__HTTP__LISTEN", "127.0.0.1:0".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// A multiplexed connection to this test's Redis.
    pub async fn redis_conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test redis")
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- test `{}` failed; its processes' logs are in {} ----",
                self.name,
                self.dir.display()
            );
            self.redis.print_log_tail(30);
            if let Some(broker) = &self.broker {
                broker.print_log_tail(30);
            }
        }
    }
}

/// A `redis-server` with Fleet's settings (`deploy/redis/fleet.conf`: AOF everysec, no
/// snapshots, noeviction, listpack hashes), then what the environment changes: its port, its
/// directory, and how it persists.
fn spawn_redis(dir: &Path, port: u16, aof: Aof) -> ManagedProcess {
    let redis_bin = which("redis-server")
        .unwrap_or_else(|| panic!("redis-server is not installed: run {SETUP_COMMAND}"));
    let conf = redis_conf();
    ManagedProcess::spawn(
        "redis",
        &redis_bin,
        &[
            conf.to_str().expect("utf-8 path"),
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--appendonly",
            aof.appendonly(),
            "--appendfsync",
            aof.appendfsync(),
            "--dir",
            dir.to_str().expect("utf-8 path"),
        ],
        &[],
        &dir.join("redis.log"),
    )
}

/// A tansu broker keeping its log in memory; `FLEET_IT_BROKER_LOG` sets its log filter.
fn spawn_broker(dir: &Path, tansu: &Path, port: u16) -> ManagedProcess {
    let url = format!("tcp://127.0.0.1:{port}");
    ManagedProcess::spawn(
        "tansu",
        tansu,
        &[
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "memory://tansu/",
        ],
        &[(
            "RUST_LOG".to_string(),
            std::env::var("FLEET_IT_BROKER_LOG").unwrap_or_else(|_| "warn".into()),
        )],
        &dir.join("tansu.log"),
    )
}
