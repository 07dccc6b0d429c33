//! The benchmarked stack: the integration harness's broker and Redis on free loopback ports,
//! with Fleet's release binaries, and the helpers every scenario needs.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use fleet_common::store::Store;
use fleet_common::store::{TaskTimes, WorkerInfo};
use fleet_common::task::State;
use fleet_common::{Priority, Topics};
use fleet_testkit::{Aof, ManagedProcess, TestEnv, free_ports, tansu_binary};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::client::Pool;

/// One broker, one Redis, a scheduler, a reaper and workers.
pub(crate) struct Stack {
    pub env: TestEnv,
    pub store: Store,
    pub scheduler: ManagedProcess,
    pub reaper: ManagedProcess,
    pub workers: Vec<ManagedProcess>,
    producer: FutureProducer,
    submit_topic: String,
    /// The profile's settings file, for every service started.
    config: String,
    /// Kept-alive connections to the API for HTTP submissions.
    http: Pool,
    /// How this stack's Redis persists.
    aof: Aof,
}

/// Kafka client settings of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Profile {
    /// Fleet's defaults: producer linger 5 ms, fetch wait 10 ms.
    Default,
    /// The low-latency settings of docs/performance.md: linger 1 ms, fetch wait
    /// 2 ms.
    LowLatency,
}

impl Profile {
    /// `kafka.client` entries of the profile.
    pub(crate) fn client(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Profile::Default => &[],
            Profile::LowLatency => &[("linger.ms", "1"), ("fetch.wait.max.ms", "2")],
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Profile::Default => "default",
            Profile::LowLatency => "low-latency",
        }
    }
}

/// How the Redis of every stack started from now on persists (see [`set_aof`]).
static AOF: std::sync::Mutex<Aof> = std::sync::Mutex::new(Aof::EverySec);

/// Sets how the Redis of the stacks started from now on persists: AOF `everysec`, as the
/// docs/redis-schema.md recommends, unless a comparison run says otherwise.
pub(crate) fn set_aof(aof: Aof) {
    *AOF.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = aof;
}

/// How the Redis of a stack started now persists.
pub(crate) fn aof() -> Aof {
    *AOF.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Niceness of redis-server in the runs that give it priority (see `prioritize_redis`).
pub(crate) const REDIS_NICENESS: &str = "-10";

/// Wall-clock milliseconds (the same clock Redis `TIME` reads on this machine).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Stack {
    /// How this stack's Redis persists.
    pub(crate) fn env_aof(&self) -> Aof {
        self.aof
    }

    /// Gives every thread of this stack's redis-server a higher CPU priority (niceness −10)
    /// than the broker, the services and the load generator, as Redis on a core of its own
    /// would have. Needs root or CAP_SYS_NICE.
    pub(crate) fn prioritize_redis(&self) -> anyhow::Result<()> {
        let pid = self.env.redis.pid();
        let tids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("listing the threads of redis-server ({pid})"))?
            .filter_map(|entry| Some(entry.ok()?.file_name().to_string_lossy().into_owned()))
            .collect();
        let status = std::process::Command::new("renice")
            .args(["-n", REDIS_NICENESS, "-p"])
            .args(&tids)
            .stdout(std::process::Stdio::null())
            .status()
            .context("running renice")?;
        if !status.success() {
            bail!(
                "renice -n {REDIS_NICENESS} of redis-server failed (it needs root or CAP_SYS_NICE)"
            );
        }
        Ok(())
    }

    /// Starts the stack with `workers` workers (each with `worker_vars`) and waits until every
    /// worker owns partitions. Fleet's services run with the client settings of `profile`; the
    /// load generator always with a client's defaults (linger 5 ms).
    pub(crate) async fn start(
        name: &str,
        workers: usize,
        worker_vars: &[(&str, &str)],
        profile: Profile,
    ) -> anyhow::Result<Self> {
        Self::start_on(name, workers, worker_vars, profile, &tansu_binary()).await
    }

    /// [`Stack::start`] with the broker binary `tansu`.
    pub(crate) async fn start_on(
        name: &str,
        workers: usize,
        worker_vars: &[(&str, &str)],
        profile: Profile,
        tansu: &Path,
    ) -> anyhow::Result<Self> {
        let persistence = aof();
        let env = TestEnv::start_with(name, tansu, persistence);
        env.create_topics().await;
        // The profile reaches the services as a settings file (`[kafka.client]`).
        let config = env.dir.join("profile.toml");
        let mut toml = String::from("[kafka.client]\n");
        for (key, value) in profile.client() {
            toml.push_str(&format!("\"{key}\" = \"{value}\"\n"));
        }
        std::fs::write(&config, toml).context("writing the profile's settings")?;
        let config = config.to_string_lossy().into_owned();
        let [port] = free_ports::<1>();
        let api: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let mut scheduler = env.spawn(
            "fleet-scheduler",
            "scheduler",
            &[
                ("FLEET__HTTP__LISTEN", &api.to_string()),
                ("FLEET__HTTP__INSECURE_NO_AUTH", "true"),
                ("FLEET_CONFIG", &config),
            ],
        );
        // Every measurement waits on the scheduler: one that exited must stop the run here.
        if !scheduler.listens_on(port, Duration::from_secs(30)) {
            scheduler.print_log_tail(20);
            bail!("the scheduler exited instead of listening on {api}");
        }
        let reaper = env.spawn("fleet-reaper", "reaper", &[("FLEET_CONFIG", &config)]);
        let mut stack = Self {
            store: env.store().await,
            producer: {
                let mut config =
                    fleet_common::kafka::producer_config(&env.settings().kafka, "fleet-bench");
                // A submitter as users run one, whatever Fleet's services are set to: the
                // client's default linger and sticky partitioning (a partition per linger
                // window), not Fleet's per-record one.
                config
                    .set("linger.ms", "5")
                    .set("sticky.partitioning.linger.ms", "10")
                    .set("batch.num.messages", "10000");
                config.create()?
            },
            submit_topic: Topics::from_settings(&env.settings().topics).submit(),
            env,
            scheduler,
            reaper,
            workers: Vec::new(),
            config,
            http: Pool::new(api, "/v1/tasks"),
            aof: persistence,
        };
        for i in 0..workers {
            stack.add_worker(&format!("w{i}"), worker_vars);
        }
        stack.wait_workers(workers).await?;
        Ok(stack)
    }

    /// Starts another scheduler (no HTTP listener) and returns it.
    pub(crate) fn add_scheduler(&self, name: &str) -> ManagedProcess {
        self.env.spawn(
            "fleet-scheduler",
            name,
            &[("FLEET_CONFIG", &self.config), ("FLEET__HTTP__LISTEN", "")],
        )
    }

    /// Starts the stack's scheduler again (after it was killed), without its HTTP API.
    pub(crate) fn restart_scheduler(&mut self) {
        self.scheduler = self.add_scheduler("scheduler-restarted");
    }

    pub(crate) fn add_worker(&mut self, name: &str, vars: &[(&str, &str)]) {
        let mut vars = vars.to_vec();
        vars.push(("FLEET_CONFIG", &self.config));
        self.workers
            .push(self.env.spawn("fleet-worker", name, &vars));
    }

    /// Waits until `n` workers heartbeat and between them own every partition of every
    /// priority topic exactly once: the group's rebalance is over.
    pub(crate) async fn wait_workers(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let partitions = self.env.settings().topics.partitions;
        loop {
            let live = self.store.live_workers(2_000).await?;
            let infos: Vec<WorkerInfo> = live.into_iter().map(|(_, info)| info).collect();
            if n == 0 || assignment_settled(&infos, n, partitions) {
                // Heartbeats report assignments up to a beat late: a short margin.
                tokio::time::sleep(Duration::from_millis(500)).await;
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{n} workers did not own every task partition once within 60 s: {infos:?}");
            }
            self.check_services()?;
            if let Some(dead) = self.workers.iter().find(|w| w.has_exited()) {
                dead.print_log_tail(20);
                bail!(
                    "{} exited while starting; see {}",
                    dead.name(),
                    dead.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Publishes submissions as fast as the producer takes them; returns the bytes sent.
    pub(crate) async fn submit(&self, bodies: &[String]) -> anyhow::Result<u64> {
        let mut bytes = 0;
        for chunk in bodies.chunks(20_000) {
            let sends = chunk.iter().map(|body| {
                self.producer.send(
                    FutureRecord::<(), _>::to(&self.submit_topic).payload(body.as_bytes()),
                    Duration::from_secs(60),
                )
            });
            for result in futures::future::join_all(sends).await {
                result.map_err(|(err, _)| err).context("submitting")?;
            }
            bytes += chunk.iter().map(|b| b.len() as u64).sum::<u64>();
        }
        Ok(bytes)
    }

    /// Publishes `bodies` at `rate`/s, in 10 ms ticks, each send spawned; returns once Kafka
    /// acknowledged them all.
    pub(crate) async fn submit_paced(&self, bodies: &[String], rate: u64) -> anyhow::Result<()> {
        let per_tick = (rate / 100).max(1) as usize;
        let mut interval = tokio::time::interval(Duration::from_millis(10));
        let mut sends = Vec::with_capacity(bodies.len());
        for chunk in bodies.chunks(per_tick) {
            interval.tick().await;
            for body in chunk {
                sends.push(tokio::spawn(self.submit_one(body.clone())));
            }
        }
        for send in sends {
            send.await??;
        }
        Ok(())
    }

    /// Publishes one submission (a future to spawn, so the caller need not wait for it).
    pub(crate) fn submit_one(
        &self,
        body: String,
    ) -> impl Future<Output = anyhow::Result<()>> + use<> {
        let producer = self.producer.clone();
        let topic = self.submit_topic.clone();
        async move {
            producer
                .send(
                    FutureRecord::<(), _>::to(&topic).payload(body.as_bytes()),
                    Duration::from_secs(60),
                )
                .await
                .map_err(|(err, _)| err)
                .context("submitting")?;
            Ok(())
        }
    }

    /// Submits one task through the scheduler's HTTP API, which accepts it in Redis and
    /// publishes it at once (no submit-topic hop).
    pub(crate) fn submit_http(
        &self,
        body: String,
    ) -> impl Future<Output = anyhow::Result<()>> + use<> {
        let http = self.http.clone();
        async move {
            match http.post(body.into_bytes()).await.context("HTTP submit")? {
                (201, _) => Ok(()),
                (status, body) => bail!("HTTP submit answered {status}: {body}"),
            }
        }
    }

    /// Fails, with the log's tail, if the broker, Redis, the scheduler or the reaper has
    /// exited: the run could only wait out its deadline.
    pub(crate) fn check_services(&self) -> anyhow::Result<()> {
        let services = [
            self.env.broker(),
            &self.env.redis,
            &self.scheduler,
            &self.reaper,
        ];
        match services.into_iter().find(|p| p.has_exited()) {
            Some(dead) => {
                dead.print_log_tail(20);
                bail!(
                    "{} exited during the run; see {}",
                    dead.name(),
                    dead.log.display()
                )
            }
            None => Ok(()),
        }
    }

    /// How many tasks are in `state` now.
    pub(crate) async fn count(&self, state: State) -> anyhow::Result<u64> {
        let counts = self.store.counts().await?;
        Ok(counts
            .into_iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| n))
    }

    /// Waits until at least `n` tasks are in `state`.
    pub(crate) async fn wait_count(
        &self,
        state: State,
        n: u64,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let have = self.count(state).await?;
            if have >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{have} of {n} tasks {state} after {limit:?}");
            }
            self.check_services()?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The journey times of each of `ids`, in order; a task not in Redis reads as empty.
    pub(crate) async fn times(&self, ids: &[String]) -> anyhow::Result<Vec<TaskTimes>> {
        Ok(self
            .store
            .task_times(ids)
            .await?
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect())
    }
}

/// Resident memory of a process: (current, peak) in bytes, from /proc.
pub(crate) fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU seconds (user + system) a process has used so far, from /proc (0 if it is gone).
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat(5); here 11 and 12 after the state field.
    (ticks(11) + ticks(12)) / 100.0
}

/// Whether `n` workers' heartbeat infos each show partitions of every priority topic and
/// together own each of its `partitions` partitions exactly once. A worker still holding what
/// a rebalance moves away, or one not yet given its share, fails the check.
fn assignment_settled(infos: &[WorkerInfo], n: usize, partitions: i32) -> bool {
    if infos.len() != n {
        return false;
    }
    Priority::ALL.iter().all(|priority| {
        let mut owned: Vec<i32> = Vec::new();
        for info in infos {
            let Some(list) = info.partitions_of(*priority) else {
                return false;
            };
            if list.is_empty() && n as i64 <= i64::from(partitions) {
                return false;
            }
            owned.extend_from_slice(list);
        }
        owned.sort_unstable();
        owned == (0..partitions).collect::<Vec<_>>()
    })
}

/// Core-seconds the hypervisor took from this machine's CPUs so far (`steal` in
/// `/proc/stat`): time the processes wanted to run and a neighbour ran instead.
pub(crate) fn steal_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    steal_of(&stat)
}

/// The steal column of `/proc/stat`'s summary line, in seconds (0 when absent).
fn steal_of(stat: &str) -> f64 {
    stat.lines()
        .find_map(|line| line.strip_prefix("cpu "))
        .and_then(|fields| fields.split_whitespace().nth(7))
        .and_then(|ticks| ticks.parse::<f64>().ok())
        .map_or(0.0, |ticks| ticks / 100.0)
}

/// Redis's total commands processed and CPU seconds used so far.
pub(crate) async fn redis_usage(store: &Store) -> anyhow::Result<(u64, f64)> {
    let info: String = redis::cmd("INFO")
        .arg("all")
        .query_async(&mut store.conn())
        .await?;
    let value = |key: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or("0")
            .to_string()
    };
    let commands: u64 = value("total_commands_processed:").parse().unwrap_or(0);
    let cpu = value("used_cpu_sys:").parse::<f64>().unwrap_or(0.0)
        + value("used_cpu_user:").parse::<f64>().unwrap_or(0.0);
    Ok((commands, cpu))
}

/// Redis's `INFO commandstats`: calls and CPU microseconds per command so far. Commands that
/// scripts call are counted under their own names as well as inside `evalsha`.
pub(crate) async fn redis_commandstats(
    store: &Store,
) -> anyhow::Result<std::collections::BTreeMap<String, (u64, u64)>> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut store.conn())
        .await?;
    let mut stats = std::collections::BTreeMap::new();
    for line in info.lines() {
        let Some((name, rest)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let field = |key: &str| {
            rest.split(',')
                .find_map(|kv| kv.strip_prefix(key))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        stats.insert(name.to_string(), (field("calls="), field("usec=")));
    }
    Ok(stats)
}

/// `p` (0–100) percentile of sorted values.
pub(crate) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// The numeric `fields` of each of `ids`' task hashes (Redis ms), read in pipelines of 1,000.
pub(crate) async fn task_times(
    store: &fleet_common::store::Store,
    ids: &[String],
    fields: &[&str],
) -> anyhow::Result<Vec<Vec<Option<u64>>>> {
    let keys = store.keys();
    let mut conn = store.conn();
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(1000) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("HMGET").arg(keys.task(id)).arg(fields);
        }
        let rows: Vec<Vec<Option<u64>>> = pipe.query_async(&mut conn).await?;
        out.extend(rows);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_assignment_is_settled_when_every_partition_has_one_owner() {
        let settled = |infos: &[&str], n, partitions| {
            let parsed: Vec<WorkerInfo> = infos.iter().map(|i| WorkerInfo::parse(i)).collect();
            assignment_settled(&parsed, n, partitions)
        };
        let info = |parts: [&str; 4]| {
            format!(
                r#"{{"host":"h","partitions":{{"critical":[{}],"high":[{}],"normal":[{}],"low":[{}]}}}}"#,
                parts[0], parts[1], parts[2], parts[3]
            )
        };
        let half = info(["0,2", "0,2", "0,2", "0,2"]);
        let other = info(["1,3", "1,3", "1,3", "1,3"]);
        let all = info(["0,1,2,3"; 4]);
        let none = info([""; 4]);
        assert!(settled(&[&half, &other], 2, 4));
        assert!(settled(&[&all], 1, 4));
        // Mid-rebalance: one still holds everything, the other its new share or nothing.
        assert!(!settled(&[&all, &other], 2, 4));
        assert!(!settled(&[&all, &none], 2, 4));
        // Too few workers reporting, a partition nobody owns, or one reported twice.
        assert!(!settled(&[&half], 2, 4));
        assert!(!settled(&[&half, &info(["1,3", "1,3", "1", "1,3"])], 2, 4));
        assert!(!settled(
            &[&half, &info(["1,3", "1,3", "1,2,3", "1,3"])],
            2,
            4
        ));
        // Unreadable or incomplete infos never count.
        assert!(!settled(&["not json", &other], 2, 4));
        assert!(!settled(
            &[&half, r#"{"partitions":{"normal":[1,3]}}"#],
            2,
            4
        ));
        // More workers than partitions: some own none, which is settled too.
        let one = |p: &str| info([p; 4]);
        let (w0, w1, w2) = (one("0"), one("1"), one(""));
        assert!(settled(&[&w0, &w1, &w2], 3, 2));
    }

    #[test]
    fn steal_is_read_from_the_summary_line_only() {
        let stat = "cpu  229577 133967 31506 272369 900 0 3835 3824 0 0\n\
                    cpu0 115438 66700 15763 135767 418 0 1866 1929 0 0\n";
        assert_eq!(steal_of(stat), 38.24);
        assert_eq!(
            steal_of(&steal_seconds().to_string()),
            0.0,
            "not a stat file"
        );
        for broken in [
            "",
            "cpu0 1 2 3 4 5 6 7 8",
            "cpu  1 2 3",
            "cpu  1 2 3 4 5 6 7 x",
        ] {
            assert_eq!(steal_of(broken), 0.0, "{broken:?}");
        }
        assert!(steal_seconds() >= 0.0);
    }
}
