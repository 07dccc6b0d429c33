//! `fleetctl status`, `watch`, `list`, `stats` and `workers`: read the fleet from Redis (and
//! consumer lag from Kafka).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use fleet_common::settings::CommonSettings;
use fleet_common::store::{Cursor, Store, TaskFilter};
use fleet_common::task::State;
use fleet_common::{Priority, Topics, kafka};

use crate::{EXIT_ENDED, EXIT_NOT_FOUND};

/// Prints one task, human-readable or as JSON. Returns false if there is no such task.
pub(crate) async fn status(store: &Store, id: &str, json: bool) -> anyhow::Result<bool> {
    let Some(task) = store.task(id).await? else {
        return Ok(false);
    };
    let fields = task.fields();
    if json {
        println!("{}", serde_json::to_string_pretty(&fields)?);
        return Ok(true);
    }
    for (name, value) in fields.iter().filter(|(name, _)| *name != "history") {
        println!("{name:<18} {}", shorten(value, 200));
    }
    if !task.history.is_empty() {
        println!("attempts:");
        for h in &task.history {
            let outcome = serde_json::to_value(&h.outcome).unwrap_or_default();
            println!(
                "  #{:<3} {:<14} {:<20} {}",
                h.attempt,
                outcome.as_str().unwrap_or(""),
                h.worker,
                shorten(&h.error, 120)
            );
        }
    }
    Ok(true)
}

fn shorten(value: &str, max: usize) -> String {
    if value.len() > max {
        format!(
            "{}… ({} bytes)",
            &value[..value.floor_char_boundary(max)],
            value.len()
        )
    } else {
        value.to_string()
    }
}

/// How long `watch` waits for a task that is not in Redis yet (just submitted: the scheduler
/// records it a moment later).
const APPEAR_WITHIN: Duration = Duration::from_secs(10);

/// Prints a task's state and progress as they change until it ends.
pub(crate) async fn watch(store: &Store, id: &str, every: Duration) -> anyhow::Result<ExitCode> {
    let mut last = String::new();
    let started = std::time::Instant::now();
    loop {
        let Some(task) = store.task(id).await? else {
            if started.elapsed() < APPEAR_WITHIN {
                tokio::time::sleep(every).await;
                continue;
            }
            eprintln!("fleetctl: no task `{id}`");
            return Ok(ExitCode::from(EXIT_NOT_FOUND));
        };
        let line = format!(
            "{} attempt {} {}{}",
            task.state,
            task.attempt,
            task.worker.as_deref().unwrap_or(""),
            match task.progress {
                None => String::new(),
                Some(p) => format!(" {p}% {}", task.progress_message.as_deref().unwrap_or("")),
            }
        );
        if line != last {
            println!("{line}");
            last = line;
        }
        match task.state {
            State::Succeeded => return Ok(ExitCode::SUCCESS),
            s if s.is_terminal() => {
                let error = task.error.as_deref().unwrap_or("");
                if !error.is_empty() {
                    println!("error: {error}");
                }
                return Ok(ExitCode::from(EXIT_ENDED));
            }
            _ => tokio::time::sleep(every).await,
        }
    }
}

/// Prints a page of tasks and the cursor of the next one.
pub(crate) async fn list(
    store: &Store,
    filter: &TaskFilter,
    cursor: Option<Cursor>,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    let page = store.list(filter, cursor, limit).await?;
    if json {
        println!("{}", serde_json::to_string(&page)?);
        return Ok(());
    }
    println!(
        "{:<38} {:<10} {:<16} {:<12} {:<9} {:>3} {:<16} error",
        "id", "state", "kind", "queue", "priority", "try", "worker"
    );
    for t in &page.tasks {
        println!(
            "{:<38} {:<10} {:<16} {:<12} {:<9} {:>3} {:<16} {}",
            t.id,
            t.state,
            t.kind,
            t.queue,
            t.priority,
            t.attempt,
            t.worker,
            shorten(&t.last_error, 60)
        );
    }
    match &page.next {
        Some(next) => println!("next page: --cursor {next}"),
        None => println!("({} tasks, end of list)", page.tasks.len()),
    }
    Ok(())
}

/// Prints fleet statistics and the consumer lag of `group` on the task topics.
pub(crate) async fn stats(
    settings: &CommonSettings,
    store: &Store,
    group: &str,
    json: bool,
) -> anyhow::Result<()> {
    let stats = store.stats().await?;
    let lag = consumer_lag(settings, group).await;
    if json {
        let mut value = serde_json::to_value(&stats)?;
        value["consumer_lag"] = match &lag {
            Ok(per_topic) => serde_json::json!(per_topic),
            Err(err) => serde_json::json!({ "error": err.to_string() }),
        };
        println!("{value}");
        return Ok(());
    }
    let states = State::ALL.map(State::as_str);
    println!("{:<10} {}", "", states.map(|s| format!("{s:>10}")).join(""));
    let row = |name: &str, counts: &BTreeMap<String, u64>| {
        let cells: String = states
            .iter()
            .map(|s| format!("{:>10}", counts.get(*s).copied().unwrap_or(0)))
            .collect();
        println!("{name:<10} {cells}");
    };
    row("all", &stats.states);
    for (queue, counts) in &stats.by_queue {
        row(&format!("q:{queue}"), counts);
    }
    for (priority, counts) in &stats.by_priority {
        row(&format!("p:{priority}"), counts);
    }
    println!(
        "(ended columns of queues and priorities count the tasks that ended so, all time; the rest is current)"
    );
    if stats.partial {
        println!(
            "(a waiting or running state is large: its per-queue split covers the newest 50,000)"
        );
    }
    println!(
        "throughput  {:.1} succeeded/s over the last minute",
        stats.succeeded_per_s
    );
    if !stats.paused.is_empty() || stats.held > 0 {
        println!(
            "paused      {} ({} tasks held)",
            stats.paused.join(", "),
            stats.held
        );
    }
    for (queue, n) in &stats.placing {
        let queue = if queue.is_empty() {
            "(arriving)"
        } else {
            queue
        };
        println!("placing     {queue:<32} {n} waiting for a worker that fits");
    }
    if stats.placing_parked > 0 {
        println!(
            "placing     {:<32} {} no live worker could take, until the workers change",
            "(parked)", stats.placing_parked
        );
    }
    match lag {
        Ok(per_topic) => {
            for (topic, lag) in per_topic {
                println!("lag         {topic:<32} {lag}");
            }
        }
        Err(err) => println!("lag         unknown ({err})"),
    }
    for (name, n) in &stats.counters {
        println!("counter     {name:<16} {n}");
    }
    Ok(())
}

/// Records waiting per task topic for `group`: end offsets minus committed offsets.
async fn consumer_lag(
    settings: &CommonSettings,
    group: &str,
) -> anyhow::Result<BTreeMap<String, i64>> {
    let topics: Vec<String> = Priority::ALL
        .iter()
        .map(|p| Topics::from_settings(&settings.topics).tasks(*p))
        .collect();
    let config = kafka::consumer_config(&settings.kafka, group, "fleetctl-lag");
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::{Offset, TopicPartitionList};
        let consumer: BaseConsumer = config.create()?;
        let timeout = Duration::from_secs(5);
        let mut out = BTreeMap::new();
        for topic in topics {
            let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            let mut list = TopicPartitionList::new();
            for p in &partitions {
                list.add_partition(&topic, *p);
            }
            let committed = consumer.committed_offsets(list, timeout)?;
            let mut lag = 0;
            for p in partitions {
                let (_, high) = consumer.fetch_watermarks(&topic, p, timeout)?;
                let done = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => 0,
                };
                lag += (high - done).max(0);
            }
            out.insert(topic, lag);
        }
        Ok(out)
    })
    .await?
}

/// Prints the workers heard from within `max_age_ms`.
pub(crate) async fn workers(store: &Store, max_age_ms: u64, json: bool) -> anyhow::Result<()> {
    let workers = store.workers(max_age_ms).await?;
    if json {
        println!("{}", serde_json::to_string(&workers)?);
        return Ok(());
    }
    println!(
        "{:<28} {:<20} {:<8} {:<6} {:>5} {:>7} {:<24} last seen (ms ago)",
        "id", "host", "version", "queues", "slots", "running", "partitions"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for w in workers {
        println!(
            "{:<28} {:<20} {:<8} {:<6} {:>5} {:>7} {:<24} {}",
            w.id,
            w.info.host,
            w.info.version,
            w.info.queues.join(","),
            w.info.concurrency,
            w.running,
            serde_json::to_string(&w.info.partitions).unwrap_or_default(),
            now.saturating_sub(w.last_seen_ms)
        );
        println!("    {}", placement_line(&w));
    }
    Ok(())
}

/// What a worker offers placed tasks and what they hold now:
/// `capacity cpu 1.5/4 gpu 0/1 memory_mb 512/2048 slots 3/32 · labels zone=eu-1 · weight 1`.
fn placement_line(w: &fleet_common::store::WorkerView) -> String {
    let mut line = String::from("capacity");
    for (name, total) in &w.info.capacity {
        let used = w.in_use.get(name).copied().unwrap_or(0.0);
        line.push_str(&format!(" {name} {used}/{total}"));
    }
    let labels: Vec<String> = w
        .info
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let labels = if labels.is_empty() {
        "none".to_string()
    } else {
        labels.join(",")
    };
    format!("{line} · labels {labels} · weight {}", w.info.weight.max(1))
}
