//! Flow control in Redis (see [`crate::flow`]): the limits in force, what is queued and running
//! under each dimension, the wait lists of tasks over a limit, and the token buckets.

use std::collections::BTreeMap;

use redis::Value;

use super::{Store, StoreError, number, scripts};
use crate::flow::{Limit, LimitTable, Limits, RateLimit, Scope, limit_field, parse_limit_field};

/// How a wait list is emptied by [`Store::unblock`].
#[derive(Debug, Clone, PartialEq)]
pub enum Unblock {
    /// As many as the limit has free slots.
    Running(u64),
    /// As many as the bucket holds whole tokens.
    Rate(RateLimit),
    /// Every task (the limit is no longer in force).
    All,
}

/// One dimension's use now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DimUse {
    /// Accepted and not ended.
    pub queued: u64,
    /// Holding a reservation: placed on a worker, or running there.
    pub running: u64,
    /// In the dimension's wait list (found over one of its limits).
    pub blocked: u64,
}

impl DimUse {
    /// Accepted, not ended, and holding no reservation.
    pub fn waiting(&self) -> u64 {
        self.queued.saturating_sub(self.running)
    }
}

impl Store {
    /// The limits in force; entries that do not parse or validate are left out (and logged).
    pub async fn limits(&self) -> Result<Limits, StoreError> {
        let stored: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.limits())
            .query_async(&mut self.conn.clone())
            .await?;
        let mut limits = Limits::default();
        for (field, json) in stored {
            let Some((scope, name)) = parse_limit_field(&field) else {
                tracing::warn!(field = %field, "Ignoring a stored limit of an unknown scope.");
                continue;
            };
            let parsed = serde_json::from_str::<Limit>(&json)
                .ok()
                .filter(|limit| limit.validate(scope, name).is_ok());
            match parsed {
                Some(limit) => {
                    limits.map.insert((scope, name.to_string()), limit);
                }
                None => {
                    tracing::warn!(field = %field, "A stored limit does not read; the last one read stays in force.");
                    limits.unreadable.push((scope, name.to_string()));
                }
            }
        }
        Ok(limits)
    }

    /// Stores a limit (replacing the one of that scope and name), or deletes it (`None`).
    /// Returns whether one was stored before.
    pub async fn set_limit(
        &self,
        scope: Scope,
        name: &str,
        limit: Option<&Limit>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let field = limit_field(scope, name);
        let existed: i64 = match limit {
            Some(limit) => {
                let json = serde_json::to_string(limit).expect("a limit serializes");
                let created: i64 = redis::cmd("HSET")
                    .arg(self.keys.limits())
                    .arg(&field)
                    .arg(json)
                    .query_async(&mut conn)
                    .await?;
                1 - created
            }
            None => {
                redis::cmd("HDEL")
                    .arg(self.keys.limits())
                    .arg(&field)
                    .query_async(&mut conn)
                    .await?
            }
        };
        Ok(existed > 0)
    }

    /// Writes the settings file's limits (a scheduler does at its start; run-time changes to
    /// them last until then).
    pub async fn write_limits(&self, table: &LimitTable) -> Result<(), StoreError> {
        for (scope, entries) in table {
            for (name, limit) in entries {
                self.set_limit(*scope, name, Some(limit)).await?;
            }
        }
        Ok(())
    }

    /// The use of each of `dims`.
    pub async fn dim_use(&self, dims: &[String]) -> Result<Vec<DimUse>, StoreError> {
        if dims.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET").arg(self.keys.flow_queued()).arg(dims);
        pipe.cmd("HMGET").arg(self.keys.flow_running()).arg(dims);
        for dim in dims {
            pipe.cmd("ZCARD").arg(self.keys.flow_wait(dim));
        }
        let mut replies: Vec<Value> = pipe.query_async(&mut self.conn.clone()).await?;
        let blocked: Vec<u64> = replies
            .split_off(2)
            .iter()
            .map(|v| number(Some(v)).unwrap_or(0).max(0) as u64)
            .collect();
        let counts = |v: &Value| -> Result<Vec<u64>, StoreError> {
            Ok(redis::from_redis_value::<Vec<Option<i64>>>(v.clone())
                .map_err(|_| StoreError::Protocol("HMGET answered other than counts"))?
                .into_iter()
                .map(|n| n.unwrap_or(0).max(0) as u64)
                .collect())
        };
        let queued = counts(&replies[0])?;
        let running = counts(&replies[1])?;
        Ok((0..dims.len())
            .map(|i| DimUse {
                queued: queued.get(i).copied().unwrap_or(0),
                running: running.get(i).copied().unwrap_or(0),
                blocked: blocked.get(i).copied().unwrap_or(0),
            })
            .collect())
    }

    /// Running counts of `dims` (for the dispatcher's own view within a round).
    pub async fn running_counts(&self, dims: &[String]) -> Result<Vec<u64>, StoreError> {
        if dims.is_empty() {
            return Ok(Vec::new());
        }
        let counts: Vec<Option<i64>> = redis::cmd("HMGET")
            .arg(self.keys.flow_running())
            .arg(dims)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(counts
            .into_iter()
            .map(|n| n.unwrap_or(0).max(0) as u64)
            .collect())
    }

    /// The dimensions with tasks in their wait list.
    pub async fn blocked_dims(&self) -> Result<Vec<String>, StoreError> {
        Ok(redis::cmd("SMEMBERS")
            .arg(self.keys.flow_waits())
            .query_async(&mut self.conn.clone())
            .await?)
    }

    /// The tokens of rate dimension `dim`'s bucket now (whole or not, by Redis time) not yet
    /// promised to placed tasks that have not started.
    pub async fn tokens(&self, dim: &str, rate: RateLimit) -> Result<f64, StoreError> {
        let mut conn = self.conn.clone();
        let (stored, placed): (Option<String>, Option<u64>) = redis::cmd("HMGET")
            .arg(self.keys.flow_tokens())
            .arg(dim)
            .arg(format!("{dim}|placed"))
            .query_async(&mut conn)
            .await?;
        let now = self.redis_time_ms().await?;
        let placed = placed.unwrap_or(0) as f64;
        let Some((tokens, last)) = stored.as_deref().and_then(|s| s.split_once(',')) else {
            return Ok(f64::from(rate.burst) - placed);
        };
        let tokens: f64 = tokens.parse().unwrap_or(f64::from(rate.burst));
        let last: u64 = last.parse().unwrap_or(now);
        Ok(rate.refill(tokens, last, now) - placed)
    }

    /// Sends tasks of wait lists back to be placed (see `lua/unblock.lua`), at most `cap` per
    /// list; returns per list how many went, and the ms until a rate list's next token.
    pub async fn unblock(
        &self,
        lists: &[(String, Unblock)],
        cap: usize,
    ) -> Result<Vec<(u64, Option<u64>)>, StoreError> {
        if lists.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.invocation(&scripts::UNBLOCK);
        inv.arg(lists.len()).arg(cap);
        for (dim, how) in lists {
            inv.arg(dim);
            match how {
                Unblock::Running(max) => inv.arg("c").arg(*max).arg("").arg(""),
                Unblock::Rate(r) => inv.arg("r").arg(r.limit).arg(r.period_ms).arg(r.burst),
                Unblock::All => inv.arg("a").arg("").arg("").arg(""),
            };
        }
        let rows: Vec<(i64, i64)> = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok(rows
            .into_iter()
            .map(|(moved, next)| (moved.max(0) as u64, u64::try_from(next).ok()))
            .collect())
    }
}

/// One limit with its use, as the API, `fleetctl limits` and the dashboard show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LimitView {
    pub scope: Scope,
    pub name: String,
    pub limit: Limit,
    /// Tasks of its dimension holding a slot (placed or running).
    pub running: u64,
    /// Tasks of its dimension accepted and not yet holding a slot.
    pub waiting: u64,
    /// Tasks in its wait list (found over one of its limits).
    pub blocked: u64,
    /// A rate limit's whole and partial tokens now (not promised to placed tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<f64>,
    /// For a dimension with tasks over a limit it has none of its own (a key under its queue's
    /// `key_max_running`): the limit it is held to; `limit` is then empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inherited_max_running: Option<u64>,
}

/// Most dimensions without a limit of their own [`Store::limit_views`] lists (those with most
/// tasks over a limit).
const INHERITED_SHOWN: usize = 20;

impl Store {
    /// Every limit in `limits` with its use now (the tenant default `*` has none of its own),
    /// then the dimensions with tasks over a limit they have none of their own for (a key
    /// under its queue's `key_max_running`), most first.
    pub async fn limit_views(&self, limits: &Limits) -> Result<Vec<LimitView>, StoreError> {
        let dims: Vec<String> = limits
            .map
            .keys()
            .map(|(scope, name)| format!("{}:{name}", scope.as_str()))
            .collect();
        let others: Vec<String> = self
            .blocked_dims()
            .await?
            .into_iter()
            .filter(|dim| !dims.contains(dim))
            .collect();
        let uses = self.dim_use(&dims).await?;
        let mut views = Vec::with_capacity(dims.len());
        for (((scope, name), limit), (dim, u)) in limits.map.iter().zip(dims.iter().zip(uses)) {
            let tokens = match limits.rate(name).filter(|_| *scope == Scope::Rate) {
                Some(rate) => Some(self.tokens(dim, rate).await?),
                None => None,
            };
            views.push(LimitView {
                scope: *scope,
                name: name.clone(),
                limit: *limit,
                running: u.running,
                waiting: u.waiting(),
                blocked: u.blocked,
                tokens,
                inherited_max_running: None,
            });
        }
        let uses = self.dim_use(&others).await?;
        let mut inherited: Vec<LimitView> = others
            .iter()
            .zip(uses)
            .filter_map(|(dim, u)| {
                let (scope, name) = dim.split_once(':')?;
                let max = match limits.of_dim(dim) {
                    Some(crate::flow::DimLimit::Running(max)) => Some(max),
                    _ => None,
                };
                Some(LimitView {
                    scope: scope.parse().ok()?,
                    name: name.to_string(),
                    limit: Limit::default(),
                    running: u.running,
                    waiting: u.waiting(),
                    blocked: u.blocked,
                    tokens: None,
                    inherited_max_running: max,
                })
            })
            .collect();
        inherited.sort_by_key(|v| std::cmp::Reverse(v.blocked));
        inherited.truncate(INHERITED_SHOWN);
        views.extend(inherited);
        Ok(views)
    }
}
