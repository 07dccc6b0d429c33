//! Ingest: consumes the submit topic as a consumer group, validates each submission, records
//! the valid ones in Redis and publishes them, and refuses the rest onto the rejected topic.
//!
//! A batch's offsets are stored only after Redis accepted its tasks and the rejected records are
//! acknowledged, so a scheduler killed at any moment loses nothing: the next owner of the
//! partition reads the batch again, and acceptance is idempotent (ids of id-less submissions are
//! derived from the record's position, so a replay names the same task).
//!
//! Publishing is a second stage: accepted batches go, in order, to a publisher task, and ingest
//! moves on to the next batch while the last one waits for Kafka's acknowledgements. Waiting
//! for them in line made ingest the bottleneck of a full-speed run (one Redis call, then one
//! Kafka round trip, then one more Redis call per batch, one after the other). An accepted task
//! is safe before it is published: its outbox entry makes the relay publish it if the
//! scheduler dies first.

use std::sync::Arc;

use fleet_common::flow::OVER_QUOTA;
use fleet_common::ops::Readiness;
use fleet_common::store::{Accepted, NewTask, Store};
use fleet_common::task::TaskSpec;
use fleet_common::trace::TraceParent;
use fleet_common::{Topics, kafka, membership};
use futures::StreamExt;
use rdkafka::Message;
use rdkafka::consumer::Consumer;
use rdkafka::message::BorrowedMessage;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::publish::Publisher;
use crate::queues::Queues;
use crate::settings::SchedulerSettings;
use fleet_common::dependency::keep_trying;

/// Runs ingest until `token` is cancelled. A stall of the submit consumer's group is reported
/// on `readiness` and repaired (see [`membership`]).
pub async fn run(
    settings: Arc<SchedulerSettings>,
    store: Store,
    publisher: Publisher,
    queues: Queues,
    readiness: Readiness,
    token: CancellationToken,
) -> fleet_common::shutdown::TaskResult {
    let topics = Topics::from_settings(&settings.topics);
    let client_id = format!("fleet-scheduler-{}", std::process::id());
    let group = &settings.scheduler.group_id;
    let consumer = Arc::new(membership::consumer(
        kafka::consumer_config(&settings.kafka, group, &client_id),
        group,
    )?);
    consumer.subscribe(&[&topics.submit()])?;
    info!(topic = %topics.submit(), group = %group, "Ingest started.");
    let watcher = tokio::spawn(membership::watch(
        consumer.clone(),
        membership::Watch {
            kafka: settings.kafka.clone(),
            group: group.clone(),
            topics: vec![topics.submit()],
            member: client_id.clone(),
            store: store.clone(),
            readiness,
        },
        token.child_token(),
    ));

    let (to_publish, accepted_batches) = mpsc::channel(PUBLISH_QUEUE);
    let publishing = tokio::spawn(publish_stage(
        store.clone(),
        publisher.clone(),
        accepted_batches,
    ));
    let mut batches = consumer
        .stream()
        .ready_chunks(settings.scheduler.batch_size);
    loop {
        let batch = tokio::select! {
            () = token.cancelled() => break,
            batch = batches.next() => match batch {
                Some(batch) => batch,
                None => break,
            },
        };
        let mut messages = Vec::with_capacity(batch.len());
        for item in batch {
            match item {
                Ok(message) => messages.push(message),
                Err(err) => warn!(error = %err, "Kafka consumer error; continuing."),
            }
        }
        if messages.is_empty() {
            continue;
        }
        if !handle_batch(
            &settings,
            &store,
            &publisher,
            &queues,
            &to_publish,
            &messages,
            &token,
        )
        .await
        {
            break; // cancelled before the batch was safe: its offsets stay unstored
        }
        for message in &messages {
            if let Err(err) = kafka::store_handled(
                &*consumer,
                message.topic(),
                message.partition(),
                message.offset(),
            ) {
                debug!(error = %err, "Offset not stored (partition revoked).");
            }
        }
    }
    drop(batches);
    watcher.abort();
    if let Err(err) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        debug!(error = %err, "Final offset commit skipped.");
    }
    // Accepted batches still queued are published now rather than by the relay later (the
    // service's shutdown grace period bounds this wait; what it cuts off, the relay sends).
    drop(to_publish);
    if let Err(err) = publishing.await {
        // Whatever it did not publish is in the outbox; failing the service gets it restarted.
        return Err(format!("the publisher stage failed: {err}").into());
    }
    info!("Ingest stopped.");
    Ok(())
}

/// Accepted batches waiting for the publisher stage. When it falls this far behind, ingest
/// waits, so a slow broker slows intake instead of growing memory.
const PUBLISH_QUEUE: usize = 4;

/// A batch that Redis accepted, on its way to the publisher stage.
type AcceptedBatch = (Vec<NewTask>, Vec<Accepted>);

/// Publishes accepted batches in the order they were accepted (so tasks with the same key keep
/// their order on the partition), until ingest closes the channel. Batches that queued up
/// while the last ones were published go out together, with one wait for Kafka and one
/// confirmation in Redis, so a slow acknowledgement never makes a queue of small batches.
async fn publish_stage(
    store: Store,
    publisher: Publisher,
    mut accepted: mpsc::Receiver<AcceptedBatch>,
) {
    let mut queued = Vec::with_capacity(PUBLISH_QUEUE);
    while accepted.recv_many(&mut queued, PUBLISH_QUEUE).await > 0 {
        let (mut tasks, mut outcomes) = (Vec::new(), Vec::new());
        for (batch_tasks, batch_outcomes) in queued.drain(..) {
            tasks.extend(batch_tasks);
            outcomes.extend(batch_outcomes);
        }
        crate::publish::publish_accepted(&store, &publisher, &tasks, &outcomes).await;
    }
}

/// A submission's id when it has none: derived from where the record sits in Kafka, so that a
/// replay of the same record after a crash names the same task. Shaped like a UUIDv7 (the
/// record's timestamp first) so ids still sort by time.
fn derived_id(message: &BorrowedMessage<'_>) -> String {
    let ts = message.timestamp().to_millis().unwrap_or(0).max(0) as u64;
    let mut h1: u64 = 0xcbf2_9ce4_8422_2325;
    let mut h2: u64 = 0x8422_2325_cbf2_9ce4;
    let coordinates = format!(
        "{}/{}/{}/{ts}",
        message.topic(),
        message.partition(),
        message.offset()
    );
    for b in coordinates.bytes() {
        h1 = (h1 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        h2 = (h2 ^ u64::from(b))
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(7);
    }
    let bytes: u128 = (u128::from(ts & 0xffff_ffff_ffff) << 80)
        | (0x7u128 << 76)
        | (u128::from(h1 & 0x0fff) << 64)
        | (0x2u128 << 62)
        | u128::from(h2 >> 2);
    uuid::Uuid::from_u128(bytes).to_string()
}

/// Most tasks in one batch record (a JSON array on the submit topic).
const MAX_BATCH_RECORD: usize = 1000;

/// Refusal code of a submission whose dependencies name a task that does not exist.
const INVALID_DEPENDENCY: &str = "invalid_dependency";

/// The tasks of one submit-topic record: a task object, or an array of up to 1000 (a batch,
/// accepted whole or refused whole, whose tasks may depend on each other). The whole record is
/// at most `tasks.max_task_bytes`. Ids of id-less tasks are derived from the record's place in
/// Kafka (and the task's index in a batch), so a replay names the same tasks.
fn parse_record(
    message: &BorrowedMessage<'_>,
    settings: &SchedulerSettings,
) -> Result<Vec<NewTask>, fleet_common::task::InvalidTask> {
    use fleet_common::task::InvalidTask;
    let bytes = message.payload().unwrap_or_default();
    let max = settings.tasks.max_task_bytes;
    let trace = TraceParent::continue_or_start(fleet_common::wire::trace_of(message).as_ref());
    if bytes.trim_ascii_start().first() != Some(&b'[') {
        let spec = TaskSpec::parse(bytes, max)?;
        let mut task = NewTask::from_spec(spec, &settings.tasks, || derived_id(message));
        task.trace = trace;
        let mut tasks = vec![task];
        fleet_common::workflow::prepare(&mut tasks)?;
        return Ok(tasks);
    }
    if bytes.len() > max {
        return Err(InvalidTask::TooLarge {
            size: bytes.len(),
            limit: max,
        });
    }
    let items: Vec<&serde_json::value::RawValue> = serde_json::from_slice(bytes).map_err(|e| {
        InvalidTask::Json(format!("batch record is not a JSON array of tasks: {e}"))
    })?;
    if items.is_empty() || items.len() > MAX_BATCH_RECORD {
        return Err(InvalidTask::Field {
            field: "batch",
            problem: format!(
                "must hold 1 to {MAX_BATCH_RECORD} tasks, not {}",
                items.len()
            ),
        });
    }
    let base = derived_id(message);
    let mut tasks = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let spec = TaskSpec::parse(item.get().as_bytes(), max).map_err(|err| match err {
            InvalidTask::Field { field, problem } => InvalidTask::Field {
                field,
                problem: format!("{problem} (task {index} of the batch)"),
            },
            InvalidTask::Json(text) => InvalidTask::Json(format!("task {index}: {text}")),
            other => other,
        })?;
        let mut task = NewTask::from_spec(spec, &settings.tasks, || format!("{base}-{index}"));
        task.trace = trace;
        tasks.push(task);
    }
    fleet_common::workflow::prepare_batch(&mut tasks)?;
    Ok(tasks)
}

/// Handles one batch; returns false if cancelled before the batch was fully handled.
async fn handle_batch(
    settings: &SchedulerSettings,
    store: &Store,
    publisher: &Publisher,
    queues: &Queues,
    to_publish: &mpsc::Sender<AcceptedBatch>,
    messages: &[BorrowedMessage<'_>],
    token: &CancellationToken,
) -> bool {
    let mut tasks = Vec::with_capacity(messages.len());
    // The message each task came from, for refusals after Redis saw it (over a quota).
    let mut sources = Vec::with_capacity(messages.len());
    let mut rejected: Vec<(&BorrowedMessage<'_>, &'static str, String)> = Vec::new();
    for message in messages {
        match parse_record(message, settings) {
            Ok(parsed) => {
                sources.extend(std::iter::repeat_n(message, parsed.len()));
                tasks.extend(parsed);
            }
            Err(err) => rejected.push((message, err.code(), err.to_string())),
        }
    }

    queues.mark(&mut tasks);
    let Some(accepted) = keep_trying(token, "recording submissions in Redis", || {
        store.accept(&tasks)
    })
    .await
    else {
        return false;
    };

    // Over a quota: refused as `over_quota`, nothing of it stored (accepted tasks before and
    // after it in the batch are not affected). A batch record is accepted or refused whole,
    // so its tasks all have the same answer: the record is refused once.
    let mut last: Option<(i32, i64)> = None;
    for (message, outcome) in sources.iter().zip(&accepted) {
        let refusal = match outcome {
            Accepted::OverQuota(why) => (OVER_QUOTA, format!("over quota: {why}")),
            Accepted::Refused(why) => (INVALID_DEPENDENCY, why.clone()),
            _ => continue,
        };
        let at = (message.partition(), message.offset());
        if last != Some(at) {
            last = Some(at);
            rejected.push((message, refusal.0, refusal.1));
        }
    }

    // Refused submissions must be on the rejected topic before their offsets are stored.
    for (message, code, reason) in &rejected {
        warn!(
            code = *code, reason = %reason, partition = message.partition(), offset = message.offset(),
            "Submission rejected."
        );
        let source = fleet_common::wire::RejectedSource {
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
        };
        let sent = keep_trying(token, "publishing a rejected submission", || {
            publisher.rejected(message.payload(), code, reason, source)
        })
        .await;
        if sent.is_none() {
            return false;
        }
    }

    for (_, code, _) in &rejected {
        fleet_common::telemetry::metrics::tasks_rejected(code).increment(1);
    }
    if !rejected.is_empty()
        && let Err(err) = store.count("rejected", rejected.len() as u64).await
    {
        warn!(error = %err, "Could not count rejected submissions.");
    }

    // The publisher stage only ends after ingest's loop, so the send fails only if it
    // panicked. The batch is accepted either way (the relay publishes it); ingest stops, and
    // `run` reports the failure so the service is restarted.
    if to_publish.send((tasks, accepted)).await.is_err() {
        warn!("The publisher stage is gone; stopping ingest.");
        return false;
    }
    true
}
