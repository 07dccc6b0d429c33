//! Lua scripts, one per `.lua` file under `common/lua/`, compiled into the binary.
//!
//! Transition scripts get `lua/prelude.lua` prepended (key names, Redis time, index moves), so
//! that shared code is written once, and run as a function followed by `flush_later()`, which
//! writes the batch's deferred sorted-set updates and counters with one command per key. `Script::invoke_async` sends EVALSHA and loads the script
//! on NOSCRIPT, so a Redis restart or `SCRIPT FLUSH` needs no bookkeeping here.

use std::sync::LazyLock;

use redis::Script;

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
                    // hash writes already made never lack their index and lease entries.
                    "\nend\nlocal ok, result = pcall(transition)\nflush_later()\n",
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
/// See `lua/unhold.lua`.
pub static UNHOLD: LazyLock<Script> = transition!("unhold.lua");
/// See `lua/reprioritize.lua`.
pub static REPRIORITIZE: LazyLock<Script> = transition!("reprioritize.lua");
