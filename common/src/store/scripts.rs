//! Lua scripts, one per `.lua` file under `common/lua/`, compiled into the binary.
//!
//! `Script::invoke_async` sends EVALSHA and loads the script on NOSCRIPT, so a Redis restart or
//! `SCRIPT FLUSH` is handled without any bookkeeping here.

use std::sync::LazyLock;

use redis::Script;

/// See `lua/schema.lua` for KEYS/ARGV.
pub static SCHEMA: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/schema.lua")));
