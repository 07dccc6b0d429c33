//! The harness itself: what a test starts is gone when the test is killed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use fleet_integration_tests::{TestEnv, eventually};

const PIDS_FILE: &str = "FLEET_IT_PIDS_FILE";

/// Not a test on its own: the child process of the test below. It starts an environment,
/// reports the pids, and waits to be killed.
#[test]
#[ignore = "run by harness_processes_die_when_the_test_process_is_killed"]
fn hold_environment_until_killed() {
    let Some(path) = std::env::var_os(PIDS_FILE) else {
        return;
    };
    let env = TestEnv::start("held");
    std::fs::write(path, format!("{} {}", env.redis.pid(), env.broker.pid())).unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

fn alive(pid: &str) -> bool {
    // A zombie (already dead, not yet reaped) counts as gone.
    std::fs::read_to_string(Path::new("/proc").join(pid).join("stat")).is_ok_and(|stat| {
        !stat
            .split(") ")
            .nth(1)
            .is_some_and(|rest| rest.starts_with('Z'))
    })
}

#[tokio::test]
async fn harness_processes_die_when_the_test_process_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let pids_file = dir.path().join("pids");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "hold_environment_until_killed",
            "--ignored",
            "--nocapture",
        ])
        .env(PIDS_FILE, &pids_file)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the child test reports its processes",
        || async { std::fs::read_to_string(&pids_file).is_ok_and(|s| s.contains(' ')) },
    )
    .await;
    let pids = std::fs::read_to_string(&pids_file).unwrap();
    let pids: Vec<&str> = pids.split(' ').collect();
    assert!(
        pids.iter().all(|p| alive(p)),
        "redis and tansu run while the test runs"
    );

    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();
    eventually(
        Duration::from_secs(10),
        "redis and tansu die with their test process",
        || async { pids.iter().all(|p| !alive(p)) },
    )
    .await;
}
