//! `fleetctl submit`: publish tasks to the submit topic, one from flags or many as JSON lines.

use std::io::BufRead;
use std::time::Duration;

use anyhow::{Context, bail};
use fleet_common::Topics;
use fleet_common::kafka;
use fleet_common::settings::CommonSettings;
use fleet_common::store::NewTask;
use fleet_common::task::{TaskSpec, new_task_id};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::Value;
use serde_json::value::RawValue;

/// Gives a submission an id when it has none, so the caller can follow it, after checking it
/// the same way the scheduler will. Returns (id, JSON text).
pub(crate) fn prepare(line: &str, max_bytes: usize) -> anyhow::Result<(String, String)> {
    let spec = TaskSpec::parse(line.as_bytes(), max_bytes)?;
    if let Some(id) = spec.id {
        return Ok((id, line.to_string()));
    }
    let mut value: Value = serde_json::from_str(line)?;
    let id = new_task_id();
    value["id"] = Value::String(id.clone());
    Ok((id, value.to_string()))
}

/// Checks the dependencies of a submission as the scheduler will (cycles, ids given twice),
/// so a bad one is refused here, before anything is sent. Returns whether any task has
/// dependencies.
pub(crate) fn check_dependencies(
    submissions: &[(String, String)],
    settings: &CommonSettings,
) -> anyhow::Result<bool> {
    let mut tasks = Vec::with_capacity(submissions.len());
    for (id, body) in submissions {
        let spec = TaskSpec::parse(body.as_bytes(), settings.tasks.max_task_bytes)?;
        tasks.push(NewTask::from_spec(spec, &settings.tasks, || id.clone()));
    }
    fleet_common::workflow::prepare(&mut tasks)?;
    Ok(tasks.iter().any(|t| !t.record.depends_on.is_empty()))
}

/// Publishes prepared submissions and waits until the broker has them all. Submissions with
/// dependencies (`as_batch`) go as one batch record (a JSON array), so the scheduler accepts
/// them whole and a task may name another of the same submission.
pub(crate) async fn publish(
    settings: &CommonSettings,
    submissions: &[(String, String)],
    as_batch: bool,
) -> anyhow::Result<()> {
    if as_batch {
        let bodies: Vec<&str> = submissions.iter().map(|(_, b)| b.as_str()).collect();
        let batch = format!("[{}]", bodies.join(","));
        if batch.len() > settings.tasks.max_task_bytes || submissions.len() > 1000 {
            bail!(
                "a submission with dependencies goes as one record: at most 1000 tasks and \
                 {} bytes (tasks.max_task_bytes), this one is {} tasks, {} bytes",
                settings.tasks.max_task_bytes,
                submissions.len(),
                batch.len()
            );
        }
        return publish_records(settings, &[(String::new(), batch)]).await;
    }
    publish_records(settings, submissions).await
}

/// Publishes records and waits until the broker has them all.
async fn publish_records(
    settings: &CommonSettings,
    submissions: &[(String, String)],
) -> anyhow::Result<()> {
    let mut config = kafka::producer_config(&settings.kafka, "fleetctl");
    fleet_common::kafka::fit_producer(
        &mut config,
        &settings.kafka,
        fleet_common::task::record_limit(settings.tasks.max_task_bytes),
    )?;
    let producer: FutureProducer = config.create().context("creating the producer")?;
    let topic = Topics::from_settings(&settings.topics).submit();
    // A progress line on stderr for bulk submissions (stdout keeps only the ids).
    let total = submissions.len();
    let show = total >= 1_000 && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut done = 0;
    for chunk in submissions.chunks(1_000) {
        let sends = chunk.iter().map(|(_, body)| {
            producer.send(
                FutureRecord::<(), _>::to(&topic).payload(body.as_bytes()),
                Duration::from_secs(30),
            )
        });
        for result in futures::future::join_all(sends).await {
            if let Err((err, _)) = result {
                bail!("publishing to {topic}: {err}");
            }
        }
        done += chunk.len();
        if show {
            let width = 30 * done / total;
            eprint!(
                "\rsubmitting [{}{}] {done}/{total}",
                "#".repeat(width),
                " ".repeat(30 - width)
            );
        }
    }
    if show {
        eprintln!();
    }
    let _ = producer.flush(Duration::from_secs(10));
    Ok(())
}

/// Reads tasks from a file or `-` (stdin): one JSON object (any layout), a JSON array of them,
/// or JSON lines (blank lines skipped). Every task is checked before anything is sent, and the
/// first bad one is reported by its line number or array index.
pub(crate) fn read_lines(path: &str, max_bytes: usize) -> anyhow::Result<Vec<(String, String)>> {
    let mut reader: Box<dyn BufRead> = if path == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("opening {path}"))?,
        ))
    };
    let mut all = Vec::new();
    reader
        .read_to_end(&mut all)
        .with_context(|| format!("reading {path}"))?;
    // A whole document: one task, or an array of tasks (each kept byte for byte).
    if let Ok(document) = serde_json::from_slice::<&RawValue>(&all) {
        let items: Vec<&RawValue> = if document.get().starts_with('[') {
            serde_json::from_str(document.get())?
        } else {
            vec![document]
        };
        return items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                prepare(item.get(), max_bytes).with_context(|| format!("{path}: task {i}"))
            })
            .collect();
    }
    let mut out = Vec::new();
    for (n, line) in all.split(|b| *b == b'\n').enumerate() {
        let line = line.to_vec();
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let text = String::from_utf8(line)
            .map_err(|_| anyhow::anyhow!("{path}:{}: not valid UTF-8", n + 1))?;
        out.push(prepare(text.trim(), max_bytes).with_context(|| format!("{path}:{}", n + 1))?);
    }
    Ok(out)
}
