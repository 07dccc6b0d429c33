//! Child processes that cannot outlive the test that started them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::state_dir;

/// `n` distinct free TCP ports on 127.0.0.1 for servers the caller starts.
///
/// They are chosen at random outside the kernel's ephemeral range, so no `bind(…:0)` and no
/// outgoing connection, of this process or another, can take one between choosing it and the
/// server binding it (a worker listening on port 0 once took a scheduler's port that way).
/// Each port is also reserved for the life of this process by a lock on a file named after it
/// in the temporary directory, so no other test process (nextest runs each test in its own)
/// picks it meanwhile; the kernel drops the lock when the process ends, however it ends.
pub fn free_ports<const N: usize>() -> [u16; N] {
    static GIVEN: Mutex<BTreeMap<u16, File>> = Mutex::new(BTreeMap::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let (low, high) = assignable_range(ephemeral_range());
    let locks = std::env::temp_dir().join("fleet-test-ports");
    std::fs::create_dir_all(&locks).expect("creating the port lock directory");
    let mut ports = [0u16; N];
    for slot in &mut ports {
        let (port, lock) = (0..10_000)
            .map(|_| (low + random() % (high - low)) as u16)
            .filter(|p| !given.contains_key(p))
            .find_map(|p| {
                let lock = reserve(&locks, p)?;
                TcpListener::bind(("127.0.0.1", p)).ok()?;
                Some((p, lock))
            })
            .expect("no free port outside the ephemeral range after 10,000 tries");
        given.insert(port, lock);
        *slot = port;
    }
    ports
}

/// The lock that reserves `port` among test processes, or `None` if another one holds it.
fn reserve(dir: &Path, port: u16) -> Option<File> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{port}.lock")))
        .ok()?;
    file.try_lock().ok()?;
    Some(file)
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`), both ends included;
/// Linux's default when it cannot be read.
pub fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut ends = s.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((ends.next()??, ends.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

/// The ports [`free_ports`] picks from, as `low..high`: the larger of the gaps below the
/// ephemeral range (from 10000) and above it, so no pick can be an ephemeral port.
fn assignable_range((ephemeral_low, ephemeral_high): (u16, u16)) -> (u64, u64) {
    let below = (10_000, u64::from(ephemeral_low).max(10_000));
    let above = (u64::from(ephemeral_high) + 1, 65_536);
    let size = |(low, high): (u64, u64)| high.saturating_sub(low);
    let range = if size(below) >= size(above) {
        below
    } else {
        above
    };
    assert!(
        size(range) >= 1_000,
        "the ephemeral port range {ephemeral_low}-{ephemeral_high} leaves fewer than 1,000 ports \
         for test servers; narrow net.ipv4.ip_local_port_range"
    );
    range
}

/// A random number from the standard library's randomly keyed hasher.
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// Whether process `pid` exists and has not exited, read from `/proc`: an exited child that is
/// not yet reaped (a zombie) counts as gone.
pub fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which is in parentheses.
        stat.rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

/// A child process killed when dropped, also when the test panics, and by the kernel if the
/// test process itself dies (`PR_SET_PDEATHSIG` through `setpriv`).
#[derive(Debug)]
pub struct ManagedProcess {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    registry_entry: PathBuf,
}

impl ManagedProcess {
    /// Starts `program args…` with `envs`, stdout and stderr appended to `log`.
    ///
    /// Call this from the test's own thread (not from `spawn_blocking`): the death signal is
    /// tied to the thread that forks.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[&str],
        envs: &[(String, String)],
        log: &Path,
    ) -> Self {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("open log file");
        let err = out.try_clone().expect("clone log handle");
        let child = Command::new("setpriv")
            .arg("--pdeathsig")
            .arg("KILL")
            .arg("--")
            .arg(program)
            .args(args)
            // As under systemd or a plain shell: services must not depend on it.
            .env_remove("HOSTNAME")
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}); is util-linux's setpriv installed?",
                    program.display()
                )
            });
        let registry_entry = registry_dir().join(format!("{}-{}", std::process::id(), child.id()));
        std::fs::write(&registry_entry, program.to_string_lossy().as_bytes())
            .expect("write pid registry");
        Self {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
            registry_entry,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process has exited; unlike [`ManagedProcess::is_running`], a shared
    /// reference will do.
    pub fn has_exited(&self) -> bool {
        !is_alive(self.pid())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits until the process accepts TCP connections on `port`. Returns false if it exited
    /// first (e.g. the port was taken); panics with its log if it neither listens nor exits
    /// within `timeout`.
    pub fn listens_on(&mut self, port: u16, timeout: Duration) -> bool {
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if !self.is_running() {
                return false;
            }
            if start.elapsed() > timeout {
                self.print_log_tail(40);
                panic!(
                    "{} did not listen on 127.0.0.1:{port} within {timeout:?}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Sends `signal` (e.g. "KILL", "STOP", "CONT", "TERM") to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "kill -{signal} {} failed",
            self.pid()
        );
    }

    /// Waits for the process to exit and returns its exit code (None if killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        let child = self.child.as_mut().expect("process already reaped");
        loop {
            if let Some(status) = child.try_wait().expect("wait for child") {
                return status.code();
            }
            if start.elapsed() > timeout {
                self.print_log_tail(40);
                panic!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Prints the last `lines` lines of the process's log to stderr.
    pub fn print_log_tail(&self, lines: usize) {
        let Ok(file) = File::open(&self.log) else {
            return;
        };
        let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
        eprintln!(
            "---- last {lines} lines of {} ({}) ----",
            self.name,
            self.log.display()
        );
        for line in &all[all.len().saturating_sub(lines)..] {
            eprintln!("{line}");
        }
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.registry_entry);
    }
}

fn registry_dir() -> PathBuf {
    let dir = state_dir().join("pids");
    std::fs::create_dir_all(&dir).expect("create pid registry");
    dir
}

/// Kills processes recorded by test processes that no longer exist. Each entry is named
/// `<test pid>-<child pid>` and holds the child's program path, which is compared with
/// `/proc/<pid>/cmdline` so a recycled pid is never killed.
pub(crate) fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(registry_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((owner, child)) = name.split_once('-') else {
            continue;
        };
        if Path::new("/proc").join(owner).exists() {
            continue; // its test is still running
        }
        let program = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let cmdline =
            std::fs::read(Path::new("/proc").join(child).join("cmdline")).unwrap_or_default();
        if !program.is_empty() && String::from_utf8_lossy(&cmdline).contains(&program) {
            let _ = Command::new("kill").arg("-9").arg(child).status();
        }
        let _ = std::fs::remove_file(entry.path());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_the_larger_gap_outside_the_ephemeral_range() {
        assert_eq!(assignable_range((32_768, 60_999)), (10_000, 32_768));
        // A range that starts low leaves the ports above it.
        assert_eq!(assignable_range((1_024, 49_999)), (50_000, 65_536));
        assert_eq!(assignable_range((12_000, 60_999)), (61_000, 65_536));
        assert_eq!(assignable_range((15_000, 60_999)), (10_000, 15_000));
        assert!(std::panic::catch_unwind(|| assignable_range((1_024, 65_000))).is_err());
    }

    #[test]
    fn a_port_reserved_by_another_holder_is_not_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let held = reserve(dir.path(), 12_345).expect("a free reservation");
        assert!(reserve(dir.path(), 12_345).is_none(), "held elsewhere");
        drop(held);
        assert!(
            reserve(dir.path(), 12_345).is_some(),
            "free again once released"
        );
    }
}
