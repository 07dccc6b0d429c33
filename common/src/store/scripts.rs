//! Lua scripts, one per `.lua` file under `common/lua/`, compiled into the binary.
//!
//! Transition scripts get `lua/prelude.lua` prepended (key names, Redis time, index moves), so
//! that shared code is written once, and run as a function followed by `flush_later()`, which
//! writes the batch's deferred sorted-set updates and counters with one command per key. They
//! are called through `ScriptCall`, which sends EVALSHA and loads the script on NOSCRIPT, so
//! a Redis restart or `SCRIPT FLUSH` needs no bookkeeping here.

// The owner of Fleet's Redis scripts: the one place they are built.
#![allow(clippy::disallowed_methods)]

use std::sync::LazyLock;

use redis::{Cmd, ErrorKind, FromRedisValue, RedisResult, Script, ServerErrorKind, ToRedisArgs};

const PRELUDE: &str = include_str!("../../lua/prelude.lua");

macro_rules! transition {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(
                &[
                    PRELUDE,
                    "local function transition()\n",
                    include_str!(concat!("../../lua/", $file)),
                    // The deferred writes go out even when the script fails part-way, so the
                    // hash writes already made never lack their index and lease entries. Not
                    // after an out-of-memory refusal: Redis refuses only a script's first
                    // write, so nothing was written, and a flushed ZREM (never refused) would
                    // take a running task's lease while its hash stayed as it was.
                    "\nend\nlocal ok, result = pcall(transition)\n",
                    "if ok or not refused_for_memory(result) then flush_later() end\n",
                    "if not ok then error(result, 0) end\nreturn result\n",
                ]
                .concat(),
            )
        })
    };
}

/// See `lua/schema.lua`.
pub static SCHEMA: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/schema.lua")));
/// See `lua/expired.lua`.
pub static EXPIRED: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/expired.lua")));
/// See `lua/advance_schedule.lua`.
pub static ADVANCE_SCHEDULE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/advance_schedule.lua")));
/// See `lua/take_due.lua`.
pub static TAKE_DUE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/take_due.lua")));
/// See `lua/accept.lua`.
pub static ACCEPT: LazyLock<Script> = transition!("accept.lua");
/// See `lua/claim.lua`.
pub static CLAIM: LazyLock<Script> = transition!("claim.lua");
/// See `lua/extend.lua`.
pub static EXTEND: LazyLock<Script> = transition!("extend.lua");
/// See `lua/complete.lua`.
pub static COMPLETE: LazyLock<Script> = transition!("complete.lua");
/// See `lua/release.lua`.
pub static RELEASE: LazyLock<Script> = transition!("release.lua");
/// See `lua/prepare_dispatch.lua`.
pub static PREPARE_DISPATCH: LazyLock<Script> = transition!("prepare_dispatch.lua");
/// See `lua/redrive.lua`.
pub static REDRIVE: LazyLock<Script> = transition!("redrive.lua");
/// See `lua/requeue.lua`.
pub static REQUEUE: LazyLock<Script> = transition!("requeue.lua");
/// See `lua/cancel.lua`.
pub static CANCEL: LazyLock<Script> = transition!("cancel.lua");
/// See `lua/place.lua`.
pub static PLACE: LazyLock<Script> = transition!("place.lua");
/// See `lua/sort_in.lua`.
pub static SORT_IN: LazyLock<Script> = transition!("sort_in.lua");
/// See `lua/unpark.lua`.
pub static UNPARK: LazyLock<Script> = transition!("unpark.lua");
/// See `lua/unblock.lua`.
pub static UNBLOCK: LazyLock<Script> = transition!("unblock.lua");
/// See `lua/revoke.lua`.
pub static REVOKE: LazyLock<Script> = transition!("revoke.lua");
/// See `lua/unhold.lua`.
pub static UNHOLD: LazyLock<Script> = transition!("unhold.lua");
/// See `lua/reprioritize.lua`.
pub static REPRIORITIZE: LazyLock<Script> = transition!("reprioritize.lua");

/// One `EVALSHA` of a script, with keys and arguments added in any order, as with
/// `redis::ScriptInvocation`. That type keeps every key and argument in a `Vec` of its own and
/// copies them into the command when sent: a dozen allocations per task in a batched
/// transition, a visible part of the scheduler's CPU. Here keys and arguments each go into one
/// buffer, joined once when sent.
pub(super) struct ScriptCall<'a> {
    script: &'a Script,
    keys: Cmd,
    args: Cmd,
}

impl<'a> ScriptCall<'a> {
    pub(super) fn new(script: &'a Script) -> Self {
        Self {
            script,
            keys: Cmd::new(),
            args: Cmd::new(),
        }
    }

    pub(super) fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        self.keys.arg(key);
        self
    }

    pub(super) fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.args.arg(arg);
        self
    }

    /// Runs the script, loading it first if Redis does not have it (after a restart or
    /// `SCRIPT FLUSH`).
    pub(super) async fn invoke_async<T: FromRedisValue>(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> RedisResult<T> {
        let call = self.command();
        match call.query_async(conn).await {
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.script.load_async(conn).await?;
                call.query_async(conn).await
            }
            done => done,
        }
    }

    /// `EVALSHA <hash> <number of keys> <keys…> <args…>`.
    fn command(&self) -> Cmd {
        let (keys, args) = (self.keys.args_iter(), self.args.args_iter());
        let bytes: usize = keys.clone().chain(args.clone()).map(arg_len).sum();
        let mut call = Cmd::with_capacity(3 + keys.len() + args.len(), bytes + 64);
        call.arg("EVALSHA")
            .arg(self.script.get_hash())
            .arg(keys.len());
        for arg in keys.chain(args) {
            if let redis::Arg::Simple(bytes) = arg {
                call.arg(bytes);
            }
        }
        call
    }
}

/// The bytes of a key or argument. (Only `SCAN`-like commands have arguments of other kinds.)
fn arg_len(arg: redis::Arg<&[u8]>) -> usize {
    if let redis::Arg::Simple(bytes) = arg {
        bytes.len()
    } else {
        0
    }
}
