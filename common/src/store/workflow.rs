//! Reading workflows and the outcomes of a task's parents, and cancelling a workflow. The
//! transitions themselves (waiting, release, ends by policy) live in the scripts (see
//! `lua/prelude.lua`'s dependencies and [`crate::workflow`]).

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Cancel, Store, StoreError};
use crate::task::State;

/// Most members [`Store::workflow`] lists; a larger workflow says how many it left out.
const MAX_LISTED: usize = 10_000;

/// How one parent of a task ended, as the task's handler reads it (`ctx.parents()`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParentOutcome {
    pub id: String,
    /// `None` if the parent is gone (it expired: only possible when it ended before its
    /// retention and nothing held it, which the scripts prevent for a task's own parents).
    pub state: Option<State>,
    /// Its result (JSON), when it succeeded.
    pub result: Option<serde_json::Value>,
    /// Why it failed, was cancelled or skipped, when it did.
    pub error: Option<String>,
}

/// One member of a workflow.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowTask {
    pub id: String,
    pub kind: String,
    pub state: State,
    pub queue: String,
    /// Its parents (`depends_on`): the graph's edges, parent → this task.
    pub parents: Vec<String>,
    /// Parents not yet ended, while it is `waiting`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<u64>,
    pub on_parent_failure: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
}

/// A workflow: its members in acceptance order and how many are in each state.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowView {
    pub id: String,
    /// Members not yet ended.
    pub open: u64,
    pub counts: BTreeMap<String, u64>,
    pub tasks: Vec<WorkflowTask>,
    /// Members past the 10,000 listed.
    pub more: u64,
}

/// What cancelling a workflow did: how many members it ended at once, how many are running and
/// end `cancelled` soon, and how many had already ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WorkflowCancel {
    pub cancelled: u64,
    pub cancelling: u64,
    pub already_ended: u64,
}

impl Store {
    /// The outcomes of `ids` (a task's parents), in that order.
    pub async fn parent_outcomes(&self, ids: &[String]) -> Result<Vec<ParentOutcome>, StoreError> {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HMGET")
                .arg(self.keys().task(id))
                .arg(&["state", "result", "error"]);
        }
        let rows: Vec<(Option<String>, Option<String>, Option<String>)> =
            pipe.query_async(&mut self.conn()).await?;
        Ok(ids
            .iter()
            .zip(rows)
            .map(|(id, (state, result, error))| ParentOutcome {
                id: id.clone(),
                state: state.and_then(|s| s.parse().ok()),
                result: result.and_then(|r| serde_json::from_str(&r).ok()),
                error,
            })
            .collect())
    }

    /// The ids of a workflow's members, in acceptance order (up to index `stop`, -1: all), and
    /// how many it has.
    async fn workflow_members(
        &self,
        id: &str,
        stop: i64,
    ) -> Result<(Vec<String>, u64), StoreError> {
        let key = self.keys().workflow(id);
        let (members, total): (Vec<String>, u64) = redis::pipe()
            .cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(stop)
            .cmd("ZCARD")
            .arg(&key)
            .query_async(&mut self.conn())
            .await?;
        Ok((members, total))
    }

    /// Workflow `id` with every member's state and edges; `None` if it has no member (never
    /// was, or expired with its tasks).
    pub async fn workflow(&self, id: &str) -> Result<Option<WorkflowView>, StoreError> {
        let (members, total) = self.workflow_members(id, MAX_LISTED as i64 - 1).await?;
        if members.is_empty() {
            return Ok(None);
        }
        let mut pipe = redis::pipe();
        for member in &members {
            pipe.cmd("HMGET").arg(self.keys().task(member)).arg(&[
                "state",
                "kind",
                "queue",
                "parents",
                "deps_left",
                "on_parent_failure",
                "error",
                "created_ms",
                "finished_ms",
            ]);
        }
        pipe.cmd("HGET").arg(self.keys().workflows()).arg(id);
        let mut rows: Vec<redis::Value> = pipe.query_async(&mut self.conn()).await?;
        let open: Option<u64> = redis::from_redis_value(rows.pop().unwrap_or(redis::Value::Nil))
            .map_err(|_| StoreError::Protocol("HGET answered other than a count"))?;
        let mut tasks = Vec::with_capacity(members.len());
        let mut counts = BTreeMap::new();
        for (member, row) in members.into_iter().zip(rows) {
            type Row = (
                Option<String>,
                Option<String>,
                Option<String>,
                Option<String>,
                Option<u64>,
                Option<String>,
                Option<String>,
                Option<u64>,
                Option<u64>,
            );
            let (state, kind, queue, parents, left, policy, error, created, finished): Row =
                redis::from_redis_value(row)
                    .map_err(|_| StoreError::Protocol("HMGET answered other than fields"))?;
            // A member that expired on its own (its workflow outlived it) is not shown.
            let Some(state) = state.and_then(|s| s.parse::<State>().ok()) else {
                continue;
            };
            *counts.entry(state.as_str().to_string()).or_insert(0) += 1;
            tasks.push(WorkflowTask {
                id: member,
                kind: kind.unwrap_or_default(),
                state,
                queue: queue.unwrap_or_default(),
                parents: parents
                    .map(|p| p.lines().map(str::to_string).collect())
                    .unwrap_or_default(),
                waiting_for: left.filter(|_| state == State::Waiting),
                on_parent_failure: policy.unwrap_or_else(|| "fail".into()),
                error,
                created_ms: created.unwrap_or(0),
                finished_ms: finished,
            });
        }
        let listed = tasks.len() as u64;
        Ok(Some(WorkflowView {
            id: id.to_string(),
            open: open.unwrap_or(0),
            counts,
            tasks,
            more: total.saturating_sub(listed),
        }))
    }

    /// Open workflows (with members not yet ended) and how many members each has open.
    pub async fn open_workflows(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut open: Vec<(String, u64)> = redis::cmd("HGETALL")
            .arg(self.keys().workflows())
            .query_async(&mut self.conn())
            .await?;
        open.sort();
        Ok(open)
    }

    /// Cancels every member of workflow `id` not yet ended, each exactly once (see
    /// `lua/cancel.lua`); `None` if the workflow has no member.
    pub async fn cancel_workflow(&self, id: &str) -> Result<Option<WorkflowCancel>, StoreError> {
        let (members, _) = self.workflow_members(id, -1).await?;
        if members.is_empty() {
            return Ok(None);
        }
        let mut done = WorkflowCancel::default();
        for chunk in members.chunks(500) {
            for answer in self.cancel(chunk).await? {
                match answer {
                    Cancel::Cancelled => done.cancelled += 1,
                    Cancel::Cancelling => done.cancelling += 1,
                    Cancel::Ended(_) | Cancel::Unknown => done.already_ended += 1,
                }
            }
        }
        Ok(Some(done))
    }
}
