//! The harness itself: what a test starts is gone when the test is killed, and its servers' ports
//! cannot be taken before they bind.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use fleet_testkit::{ManagedProcess, TestEnv, ephemeral_range, eventually, free_ports, is_alive};

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
    std::fs::write(path, format!("{} {}", env.redis.pid(), env.broker().pid())).unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

fn alive(pid: &str) -> bool {
    is_alive(pid.parse().expect("a pid"))
}

#[tokio::test]
async fn harness_processes_die_when_the_test_process_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let pids_file = dir.path().join("pids");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "harness::hold_environment_until_killed",
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

/// A server's port must not be taken between choosing it and the server binding it: ports come
/// from outside the kernel's ephemeral range, where `bind(…:0)` and outgoing connections never
/// land (a worker listening on port 0 once took the benchmark's scheduler port), are never
/// handed out twice, and are reserved against other test processes while this one lives.
#[test]
fn free_ports_are_distinct_and_outside_the_ephemeral_range() {
    let (ephemeral_low, ephemeral_high) = ephemeral_range();
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        for port in free_ports::<10>() {
            assert!(seen.insert(port), "port {port} handed out twice");
            assert!(
                !(ephemeral_low..=ephemeral_high).contains(&port),
                "port {port} is in the ephemeral range"
            );
        }
    }
    // Servers on port 0 get ephemeral ports, so none of them can be one of ours.
    let listeners: Vec<TcpListener> = (0..50)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    for listener in &listeners {
        let port = listener.local_addr().unwrap().port();
        assert!(!seen.contains(&port), "port 0 gave out our port {port}");
    }
    // Another process cannot reserve them meanwhile (nextest runs each test in its own).
    let port = *seen.first().unwrap();
    let lock = std::env::temp_dir().join(format!("fleet-test-ports/{port}.lock"));
    let other = std::process::Command::new("flock")
        .args(["--nonblock", "--conflict-exit-code", "75"])
        .arg(&lock)
        .arg("true")
        .status()
        .expect("running flock(1)");
    assert_eq!(
        other.code(),
        Some(75),
        "another process took the reservation of {port}"
    );
    // And each port we got is free for its server.
    for port in seen.iter().take(20) {
        TcpListener::bind(("127.0.0.1", *port)).unwrap();
    }
}

#[tokio::test]
async fn a_managed_process_tells_when_it_has_exited() {
    let dir = tempfile::tempdir().unwrap();
    let sleeper = ManagedProcess::spawn(
        "sleeper",
        Path::new("/bin/sleep"),
        &["30"],
        &[],
        &dir.path().join("sleeper.log"),
    );
    assert!(!sleeper.has_exited(), "sleep 30 runs");
    assert!(is_alive(sleeper.pid()));
    sleeper.signal("KILL");
    // Killed but not reaped: a zombie, which counts as exited.
    eventually(
        Duration::from_secs(10),
        "the killed process counts as exited",
        || async { sleeper.has_exited() },
    )
    .await;
}

#[tokio::test]
async fn an_environment_runs_the_broker_binary_it_is_given() {
    // A copy of the usual broker under another path: the process must run from that path.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("tansu-copy");
    std::fs::copy(fleet_testkit::tansu_binary(), &copy).unwrap();
    let env = TestEnv::start_with_broker("harness_broker_binary", &copy);
    let exe = std::fs::read_link(format!("/proc/{}/exe", env.broker().pid())).unwrap();
    assert_eq!(exe, copy);
    // And it is a working broker: the test topics can be created on it.
    env.create_topics().await;
}

#[tokio::test]
async fn every_redis_runs_with_fleets_settings_and_the_benchmark_persists_as_recommended() {
    use fleet_testkit::Aof;
    let tansu = fleet_testkit::tansu_binary();
    for (aof, appendonly, fsync) in [
        (Aof::EverySec, "yes", "everysec"),
        (Aof::Always, "yes", "always"),
        (Aof::Off, "no", "everysec"),
    ] {
        let env = TestEnv::start_with("harness_redis_settings", &tansu, aof);
        let config = fleet_testkit::redis_config(
            &env.store().await,
            &[
                "appendonly",
                "appendfsync",
                "save",
                "maxmemory-policy",
                "hash-max-listpack-value",
            ],
        )
        .await;
        assert_eq!(config["appendonly"], appendonly, "{aof:?}");
        assert_eq!(config["appendfsync"], fsync, "{aof:?}");
        // From deploy/redis/fleet.conf, whatever the persistence.
        assert_eq!(config["save"], "", "{aof:?}: no RDB snapshots");
        assert_eq!(config["maxmemory-policy"], "noeviction");
        assert_eq!(config["hash-max-listpack-value"], "8192");
    }
    // The local stack and compose read the same file.
    let root = fleet_testkit::workspace_root();
    for (file, needle) in [
        ("deploy/local/stack.sh", "deploy/redis/fleet.conf"),
        (
            "deploy/docker-compose.yml",
            "./redis/fleet.conf:/etc/fleet/redis.conf",
        ),
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        assert!(text.contains(needle), "{file} does not use {needle}");
    }
}
