//! `fleet-redis-cost`: how many CPU instructions Redis spends per task in each hot transition
//! (accept, dispatch acknowledgement, claim, completion), counted by valgrind's callgrind.
//!
//! Why: on a shared 2-core machine, timings of the same run differ by half (see
//! docs/performance.md), so a change to a Lua script worth 5 % cannot be seen in `fleet-bench`.
//! Instruction counts are the same from run to run whatever else the machine does, so they
//! tell whether a script change made Redis's work smaller, and which functions it spends on.
//! It starts its own redis-server under callgrind on a free loopback port (no broker), drives
//! the transitions through `Store` exactly as the services call them, dumps the counters
//! after each phase and prints instructions per task.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use fleet_common::settings::{RedisSettings, Secret, TaskSettings};
use fleet_common::store::{self, Completion, Keys, NewTask, Outcome, Store};
use fleet_common::task::{TaskSpec, new_task_id};

#[derive(Debug, Parser)]
#[command(
    name = "fleet-redis-cost",
    about = "Redis instructions per task in each hot transition, counted by callgrind."
)]
struct Args {
    /// No-op tasks taken through every transition.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    tasks: u32,
    /// Tasks per script call (the services batch claims and completions over free slots).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch: u32,
    /// The redis-server to measure. Debian's is stripped, so functions show as addresses; a
    /// build with symbols names them.
    #[arg(long, default_value = "redis-server")]
    redis_server: PathBuf,
    /// Functions listed per transition, by their own instructions.
    #[arg(long, default_value_t = 8)]
    top: usize,
    /// Where callgrind writes its counter dumps (and Redis its append-only file).
    #[arg(long, default_value = "target/bench/callgrind")]
    dir: PathBuf,
    /// Redis's `appendfsync`, AOF on, as docs/redis-schema.md recommends (`everysec`), or `always`; `no`
    /// turns AOF off. What feeding the AOF costs Redis is counted with the rest.
    #[arg(long, default_value = "everysec", value_parser = ["everysec", "always", "no"])]
    aof: String,
}

/// The phases, in the order they run; each ends with a counter dump named after it.
const PHASES: [&str; 4] = ["accept", "dispatched", "claim", "complete"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for tool in ["valgrind", "callgrind_control"] {
        ensure!(
            Command::new(tool).arg("--version").output().is_ok(),
            "{tool} is not installed (Debian: apt-get install valgrind)"
        );
    }
    let redis_server = resolve(&args.redis_server)?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    remove_old_dumps(&args.dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut redis = RedisUnderCallgrind::start(&redis_server, port, &args.dir, &args.aof)?;
    let settings = RedisSettings {
        url: Secret::new(format!("redis://127.0.0.1:{port}")),
        ..Default::default()
    };
    let conn = redis.connect(&settings).await?;
    let store = Store::new(conn, Keys::new("cost"), &TaskSettings::default());

    let tasks = (0..args.tasks)
        .map(|_| {
            let spec = TaskSpec::parse(br#"{"kind":"noop"}"#, 1 << 20)?;
            Ok(NewTask::from_spec(
                spec,
                &TaskSettings::default(),
                new_task_id,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let batches: Vec<&[NewTask]> = tasks.chunks(args.batch as usize).collect();
    let firsts = |batch: &[NewTask]| -> Vec<(String, u32)> {
        batch.iter().map(|t| (t.record.id.clone(), 1)).collect()
    };
    let ok = Outcome::Ok("null".into());
    redis.dump("start")?;
    let mut aof_bytes = vec![fleet_testkit::redis_aof_bytes(&store).await?];
    for batch in &batches {
        store.accept(batch).await?;
    }
    redis.dump(PHASES[0])?;
    aof_bytes.push(fleet_testkit::redis_aof_bytes(&store).await?);
    for batch in &batches {
        let sent = firsts(batch);
        let sent: Vec<_> = sent.iter().map(|(id, a)| (id.as_str(), *a)).collect();
        store.dispatched(&sent).await?;
    }
    redis.dump(PHASES[1])?;
    aof_bytes.push(fleet_testkit::redis_aof_bytes(&store).await?);
    for batch in &batches {
        let sent = firsts(batch);
        let sent: Vec<_> = sent.iter().map(|(id, a)| (id.as_str(), *a)).collect();
        let claims = store.claim("cost-worker", 60_000, &sent).await?;
        ensure!(
            claims.iter().all(|c| *c == store::Claim::Claimed),
            "a claim failed"
        );
    }
    redis.dump(PHASES[2])?;
    aof_bytes.push(fleet_testkit::redis_aof_bytes(&store).await?);
    for batch in &batches {
        let sent = firsts(batch);
        let outcomes: Vec<_> = sent
            .iter()
            .map(|(id, a)| ((id.as_str(), *a), &ok))
            .collect();
        let done = store.complete("cost-worker", &outcomes).await?;
        ensure!(
            done.iter().all(|c| *c == Completion::Succeeded),
            "a completion failed"
        );
    }
    redis.dump(PHASES[3])?;
    aof_bytes.push(fleet_testkit::redis_aof_bytes(&store).await?);
    redis.stop(store.conn()).await?;

    println!(
        "Redis instructions per task ({} tasks, {} per call; {}; appendfsync {}), and the bytes \
         each step appends to the AOF per task:",
        args.tasks,
        args.batch,
        redis_server.display(),
        args.aof
    );
    let mut total = 0;
    for (i, phase) in PHASES.into_iter().enumerate() {
        let text = std::fs::read_to_string(redis.dump_file(phase)?)?;
        let profile = Profile::parse(&text);
        let per_task = profile.total / u64::from(args.tasks);
        total += per_task;
        let appended = aof_bytes[i + 1].saturating_sub(aof_bytes[i]) / u64::from(args.tasks);
        println!("\n{phase:<11} {per_task:>9}   AOF {appended} bytes");
        for (function, cost) in profile.top(args.top) {
            let share = cost as f64 * 100.0 / profile.total.max(1) as f64;
            let per = cost / u64::from(args.tasks);
            println!("  {share:5.1} %  {per:>7}  {function}");
        }
    }
    let appended = (aof_bytes[4].saturating_sub(aof_bytes[0])) / u64::from(args.tasks);
    println!("\nall four   {total:>9}   AOF {appended} bytes");
    Ok(())
}

/// Callgrind's files in `dir` (named by `--callgrind-out-file` below); nothing else there is
/// read or removed.
fn dumps(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ours = entry.file_name().to_string_lossy().starts_with(DUMP_PREFIX);
        if ours && entry.file_type()?.is_file() {
            found.push(entry.path());
        }
    }
    Ok(found)
}

/// Removes the dumps of an earlier run, so that phases are never read from them.
fn remove_old_dumps(dir: &Path) -> anyhow::Result<()> {
    for path in dumps(dir)? {
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// The redis-server binary: a path, or a name looked up in PATH.
fn resolve(redis_server: &Path) -> anyhow::Result<PathBuf> {
    let found = if redis_server.components().count() > 1 {
        Some(redis_server.to_path_buf()).filter(|path| path.is_file())
    } else {
        fleet_testkit::which(&redis_server.to_string_lossy())
    };
    found.with_context(|| {
        format!(
            "no redis-server at {:?} (install it with `make setup`, or pass --redis-server PATH)",
            redis_server.display().to_string()
        )
    })
}

const DUMP_PREFIX: &str = "callgrind.out.";

/// redis-server running under callgrind, which dumps its counters on request.
#[derive(Debug)]
struct RedisUnderCallgrind {
    child: Child,
    dir: PathBuf,
}

impl RedisUnderCallgrind {
    fn start(redis_server: &Path, port: u16, dir: &Path, aof: &str) -> anyhow::Result<Self> {
        let (appendonly, fsync) = match aof {
            "no" => ("no", "everysec"),
            fsync => ("yes", fsync),
        };
        let data = dir.join("redis-data");
        // A fresh AOF: an earlier run's would be loaded, and its size counted.
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let out = dir.join(format!("{DUMP_PREFIX}%p"));
        let child = Command::new("valgrind")
            .args([
                "--tool=callgrind",
                "--compress-strings=no",
                "--compress-pos=no",
                &format!("--callgrind-out-file={}", out.display()),
            ])
            .arg(redis_server)
            // The settings of Fleet's own Redis (docs/redis-schema.md).
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                appendonly,
                "--appendfsync",
                fsync,
            ])
            .arg("--dir")
            .arg(&data)
            .args(["--hash-max-listpack-value", "8192"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} under valgrind", redis_server.display()))?;
        Ok(Self {
            child,
            dir: dir.to_path_buf(),
        })
    }

    /// Connects once Redis answers (valgrind takes a few seconds to start it).
    async fn connect(
        &mut self,
        settings: &RedisSettings,
    ) -> anyhow::Result<redis::aio::ConnectionManager> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("redis-server under valgrind exited: {status}");
            }
            match store::connect(settings).await {
                Ok(conn) => return Ok(conn),
                Err(e) if Instant::now() > deadline => bail!("Redis never answered: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Writes the counters since the last dump to a file named after `phase`, and zeroes them.
    fn dump(&self, phase: &str) -> anyhow::Result<()> {
        let status = Command::new("callgrind_control")
            .arg(format!("--dump={phase}"))
            .arg(self.child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        ensure!(
            status.success(),
            "callgrind_control --dump failed: {status}"
        );
        Ok(())
    }

    /// The dump file whose trigger names `phase`.
    fn dump_file(&self, phase: &str) -> anyhow::Result<PathBuf> {
        let trigger = format!("desc: Trigger: dump {phase}\n");
        for path in dumps(&self.dir)? {
            if std::fs::read_to_string(&path)?.contains(&trigger) {
                return Ok(path);
            }
        }
        bail!("no callgrind dump for {phase} in {}", self.dir.display())
    }

    /// Shuts Redis down cleanly, so that valgrind exits with it.
    async fn stop(&mut self, mut conn: redis::aio::ConnectionManager) -> anyhow::Result<()> {
        // SHUTDOWN answers by closing the connection: the error is the expected outcome.
        let _: Result<(), _> = redis::cmd("SHUTDOWN")
            .arg("NOSAVE")
            .query_async(&mut conn)
            .await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                self.child.kill()?;
                bail!("redis-server did not shut down");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

impl Drop for RedisUnderCallgrind {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Instructions of one callgrind dump (written with `--compress-strings=no`), per function.
#[derive(Debug, Default, PartialEq)]
struct Profile {
    total: u64,
    /// Each function's own instructions, without those of the functions it calls.
    by_function: Vec<(String, u64)>,
}

impl Profile {
    fn parse(text: &str) -> Self {
        let mut own = std::collections::HashMap::<String, u64>::new();
        let mut function: Option<&str> = None;
        // The cost line after `calls=` is the callee's inclusive cost, not the caller's own.
        let mut callee_cost = false;
        let mut total = 0;
        for line in text.lines() {
            if let Some(name) = line.strip_prefix("fn=") {
                function = Some(name);
            } else if line.starts_with("calls=") {
                callee_cost = true;
            } else if let Some(sum) = line
                .strip_prefix("summary:")
                .or_else(|| line.strip_prefix("totals:"))
            {
                total = sum.trim().parse().unwrap_or(total);
            } else if line.starts_with(|c: char| c.is_ascii_digit() || "+-*".contains(c)) {
                if std::mem::take(&mut callee_cost) {
                    continue;
                }
                let cost = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse::<u64>().ok());
                if let (Some(name), Some(cost)) = (function, cost) {
                    *own.entry(name.to_string()).or_default() += cost;
                }
            }
        }
        let mut by_function: Vec<_> = own.into_iter().collect();
        by_function.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Self { total, by_function }
    }

    fn top(&self, n: usize) -> impl Iterator<Item = (&str, u64)> {
        self.by_function
            .iter()
            .take(n)
            .map(|(name, cost)| (name.as_str(), *cost))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_out_of_range_or_malformed_are_refused() {
        for bad in [
            &["--tasks", "0"][..],
            &["--tasks", "1000001"],
            &["--tasks", "-5"],
            &["--batch", "0"],
            &["--batch", "ten"],
            &["--top", "99999999999999999999999"],
            &["--unknown"],
        ] {
            let argv = std::iter::once("fleet-redis-cost").chain(bad.iter().copied());
            assert!(Args::try_parse_from(argv).is_err(), "{bad:?} was accepted");
        }
        let ok = Args::try_parse_from(["fleet-redis-cost", "--tasks", "5", "--batch", "2"]);
        assert_eq!(ok.map(|a| (a.tasks, a.batch)).ok(), Some((5, 2)));
    }

    #[test]
    fn a_missing_redis_server_is_named_in_the_error() {
        let err = resolve(Path::new("/nonexistent/redis-server")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/redis-server"),
            "{err}"
        );
        let err = resolve(Path::new("no-such-redis-server-binary")).unwrap_err();
        assert!(err.to_string().contains("--redis-server"), "{err}");
    }

    #[test]
    fn only_callgrind_dumps_are_read_and_removed() {
        let dir = std::env::temp_dir().join(format!("fleet-redis-cost-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("callgrind.out.sub")).unwrap();
        std::fs::write(dir.join("callgrind.out.12.1"), "dump").unwrap();
        std::fs::write(dir.join("notes.txt"), "keep me").unwrap();
        std::fs::write(dir.join("binary"), [0xff, 0xfe, 0x00]).unwrap();
        assert_eq!(dumps(&dir).unwrap(), vec![dir.join("callgrind.out.12.1")]);
        remove_old_dumps(&dir).unwrap();
        assert!(!dir.join("callgrind.out.12.1").exists());
        assert!(dir.join("notes.txt").exists() && dir.join("binary").exists());
        assert!(dir.join("callgrind.out.sub").is_dir());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn profile_counts_own_instructions_and_not_those_of_callees() {
        let dump = "\
events: Ir
summary: 1000

fl=/src/t_hash.c
fn=hmgetCommand
10 100
+2 50
cfl=/src/listpack.c
cfn=lpFind
calls=3 40
12 600
fl=/src/listpack.c
fn=lpFind
40 600
fn=hmgetCommand
14 5
";
        let profile = Profile::parse(dump);
        assert_eq!(profile.total, 1000);
        assert_eq!(
            profile.by_function,
            vec![
                ("lpFind".to_string(), 600),
                ("hmgetCommand".to_string(), 155)
            ]
        );
        assert_eq!(profile.top(1).collect::<Vec<_>>(), vec![("lpFind", 600)]);
        assert_eq!(Profile::parse("garbage\n\n"), Profile::default());
    }
}
