//! Settings loading: defaults, file, environment, and every way a value can be refused.

use std::collections::HashMap;
use std::io::Write;

use fleet_common::settings::{CommonSettings, LogFormat, SettingsError, load_with_env};

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn file(contents: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(contents.as_bytes()).unwrap();
    f
}

fn invalid(result: Result<CommonSettings, SettingsError>) -> (String, String) {
    match result {
        Err(SettingsError::Invalid { key, message }) => (key, message),
        other => panic!("expected an invalid-setting error, got {other:?}"),
    }
}

#[test]
fn defaults_need_no_file_and_no_environment() {
    let s: CommonSettings = load_with_env(None, env(&[])).unwrap();
    assert_eq!(s.kafka.brokers, "127.0.0.1:19092");
    assert_eq!(s.topics.prefix, "fleet");
    assert_eq!(s.topics.partitions, 6);
    assert_eq!(s.lease.lease_ms, 30_000);
    assert_eq!(s.lease.heartbeat_ms, 10_000);
    assert_eq!(s.log.format, LogFormat::Auto);
}

#[test]
fn file_overrides_defaults_and_environment_overrides_file() {
    let f = file(
        r#"
        [kafka]
        brokers = "10.0.0.1:9092,10.0.0.2:9092"
        [kafka.client]
        "linger.ms" = "20"
        [redis]
        url = "redis://cache:6379/2"
        [lease]
        lease_ms = 9000
        heartbeat_ms = 3000
        reaper_interval_ms = 1000
        "#,
    );
    let s: CommonSettings = load_with_env(
        Some(f.path()),
        env(&[
            ("FLEET__KAFKA__BROKERS", "broker:9092"),
            ("FLEET__LEASE__HEARTBEAT_MS", "2000"),
            ("FLEET__LOG__FORMAT", "json"),
            ("FLEET_ENV", "production"), // not ours: single underscore
            ("PATH", "/usr/bin"),
        ]),
    )
    .unwrap();
    assert_eq!(s.kafka.brokers, "broker:9092");
    assert_eq!(
        s.kafka.client.get("linger.ms").map(String::as_str),
        Some("20")
    );
    assert_eq!(s.redis.url.expose(), "redis://cache:6379/2");
    assert_eq!(s.lease.lease_ms, 9000);
    assert_eq!(s.lease.heartbeat_ms, 2000);
    assert_eq!(s.log.format, LogFormat::Json);
}

#[test]
fn unknown_keys_are_named() {
    let (key, message) = invalid(load_with_env(
        None,
        env(&[("FLEET__LEASE__LEASE_SECONDS", "30")]),
    ));
    assert_eq!(key, "lease.lease_seconds");
    assert!(message.contains("unknown field"), "{message}");

    let f = file("[kafak]\nbrokers = \"x:1\"\n");
    let (key, message) = invalid(load_with_env(Some(f.path()), env(&[])));
    assert_eq!(key, "kafak");
    assert!(message.contains("unknown field"), "{message}");
}

#[test]
fn invalid_values_name_the_key_and_the_expected_form() {
    let (key, message) = invalid(load_with_env(
        None,
        env(&[("FLEET__LEASE__LEASE_MS", "thirty")]),
    ));
    assert_eq!(key, "lease.lease_ms");
    assert!(message.contains("thirty"), "{message}");

    let (key, message) = invalid(load_with_env(
        None,
        env(&[("FLEET__LEASE__LEASE_MS", "-5")]),
    ));
    assert_eq!(key, "lease.lease_ms");
    assert!(!message.is_empty());

    let (key, message) = invalid(load_with_env(None, env(&[("FLEET__LOG__FORMAT", "xml")])));
    assert_eq!(key, "log.format");
    assert!(
        message.contains("xml") && message.contains("json"),
        "{message}"
    );

    let (key, _) = invalid(load_with_env(
        None,
        env(&[("FLEET__KAFKA__BROKERS", "no-port")]),
    ));
    assert_eq!(key, "kafka.brokers");

    let (key, _) = invalid(load_with_env(
        None,
        env(&[("FLEET__REDIS__URL", "http://x")]),
    ));
    assert_eq!(key, "redis.url");

    let (key, _) = invalid(load_with_env(
        None,
        env(&[("FLEET__REDIS__KEY_PREFIX", "a b{c}")]),
    ));
    assert_eq!(key, "redis.key_prefix");

    let (key, _) = invalid(load_with_env(
        None,
        env(&[("FLEET__TOPICS__PARTITIONS", "0")]),
    ));
    assert_eq!(key, "topics.partitions");

    let (key, _) = invalid(load_with_env(
        None,
        env(&[("FLEET__TOPICS__PREFIX", "fleet/../etc")]),
    ));
    assert_eq!(key, "topics.prefix");

    for bytes in ["0", "1023", "16777217"] {
        let (key, message) = invalid(load_with_env(
            None,
            env(&[("FLEET__TASKS__MAX_RESULT_BYTES", bytes)]),
        ));
        assert_eq!(key, "tasks.max_result_bytes", "{bytes}");
        assert!(message.contains("1024 to 16777216"), "{message}");
    }

    // Ten years is the longest a task or an idempotency key is kept; 1e17 ms would reach
    // Redis in exponent form.
    for (var, key) in [
        ("FLEET__TASKS__RETENTION_MS", "tasks.retention_ms"),
        (
            "FLEET__TASKS__IDEMPOTENCY_WINDOW_MS",
            "tasks.idempotency_window_ms",
        ),
    ] {
        let (got, message) = invalid(load_with_env(None, env(&[(var, "100000000000000000")])));
        assert_eq!(got, key);
        assert!(message.contains("ten years"), "{message}");
        assert!(load_with_env::<CommonSettings>(None, env(&[(var, "315360000000")])).is_ok());
    }
}

#[test]
fn unsafe_timing_ratios_are_refused() {
    let (key, message) = invalid(load_with_env(
        None,
        env(&[("FLEET__LEASE__HEARTBEAT_MS", "15000")]),
    ));
    assert_eq!(key, "lease.heartbeat_ms");
    assert!(message.contains("third"), "{message}");

    let (key, _) = invalid(load_with_env(
        None,
        env(&[("FLEET__LEASE__REAPER_INTERVAL_MS", "20000")]),
    ));
    assert_eq!(key, "lease.reaper_interval_ms");

    let (key, _) = invalid(load_with_env(
        None,
        env(&[
            ("FLEET__KAFKA__SESSION_TIMEOUT_MS", "6000"),
            ("FLEET__KAFKA__HEARTBEAT_INTERVAL_MS", "3000"),
        ]),
    ));
    assert_eq!(key, "kafka.heartbeat_interval_ms");

    let (key, _) = invalid(load_with_env(
        None,
        env(&[("FLEET__LEASE__HEARTBEAT_MS", "0")]),
    ));
    assert!(key.starts_with("lease"));
}

#[test]
fn sasl_needs_credentials() {
    let (key, _) = invalid(load_with_env(
        None,
        env(&[("FLEET__KAFKA__SECURITY_PROTOCOL", "sasl_ssl")]),
    ));
    assert_eq!(key, "kafka.sasl_mechanism");
    let (key, _) = invalid(load_with_env(
        None,
        env(&[("FLEET__KAFKA__SECURITY_PROTOCOL", "carrier-pigeon")]),
    ));
    assert_eq!(key, "kafka.security_protocol");
}

#[test]
fn secrets_never_appear_in_debug_output() {
    let f = file(
        r#"
        [kafka]
        security_protocol = "sasl_ssl"
        sasl_mechanism = "SCRAM-SHA-512"
        sasl_username = "fleet"
        sasl_password = "canary-kafka-pw"
        [kafka.client]
        "ssl.key.password" = "canary-key-pw"
        "linger.ms" = "5"
        [redis]
        url = "redis://fleet:canary-redis-pw@cache:6379"
        "#,
    );
    let s: CommonSettings = load_with_env(Some(f.path()), env(&[])).unwrap();
    let shown = format!("{s:?} {s:#?}");
    for canary in ["canary-kafka-pw", "canary-key-pw", "canary-redis-pw"] {
        assert!(!shown.contains(canary), "{canary} leaked into {shown}");
    }
    assert!(
        shown.contains("cache:6379"),
        "non-secret parts stay visible: {shown}"
    );
    assert!(shown.contains("linger.ms"));
    assert_eq!(s.kafka.sasl_password.expose(), "canary-kafka-pw");
}

#[test]
fn broken_or_missing_files_are_clear_errors() {
    let f = file("[kafka\nbrokers = ");
    let err = load_with_env::<CommonSettings>(Some(f.path()), env(&[])).unwrap_err();
    assert!(matches!(err, SettingsError::Source(_)), "{err:?}");

    let err = load_with_env::<CommonSettings>(
        Some(std::path::Path::new("/nonexistent/fleet.toml")),
        env(&[]),
    )
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/fleet.toml"), "{err}");

    // A hostile, very large file is parsed or refused, never a crash.
    let big = file(&format!(
        "[kafka]\nbrokers = \"{}:1\"\n",
        "h".repeat(1 << 20)
    ));
    let _ = load_with_env::<CommonSettings>(Some(big.path()), env(&[]));
    let wrong_type = file("kafka = 5\n");
    let (key, _) = invalid(load_with_env(Some(wrong_type.path()), env(&[])));
    assert_eq!(key, "kafka");
}

#[test]
fn per_kind_defaults_override_the_global_ones() {
    let f = file(
        r#"
        [tasks]
        default_max_attempts = 4
        default_timeout_ms = 60000
        [tasks.kinds.send_email]
        max_attempts = 10
        [tasks.kinds.report]
        timeout_ms = 600000
        "#,
    );
    let s: CommonSettings = load_with_env(Some(f.path()), env(&[])).unwrap();
    let email = s.tasks.defaults_for("send_email");
    assert_eq!((email.max_attempts, email.timeout_ms), (10, 60_000));
    let report = s.tasks.defaults_for("report");
    assert_eq!((report.max_attempts, report.timeout_ms), (4, 600_000));
    let other = s.tasks.defaults_for("other");
    assert_eq!((other.max_attempts, other.timeout_ms), (4, 60_000));

    let bad = file("[tasks.kinds.x]\nmax_attempts = 0\n");
    let (key, _) = invalid(load_with_env(Some(bad.path()), env(&[])));
    assert_eq!(key, "tasks.kinds.x.max_attempts");
    let typo = file("[tasks.kinds.x]\nmax_attempt = 3\n");
    let (key, _) = invalid(load_with_env(Some(typo.path()), env(&[])));
    assert_eq!(key, "tasks.kinds.x.max_attempt");
}

/// One file or environment for all of Fleet (a Kubernetes ConfigMap): a program ignores the
/// other programs' sections but still names any unknown section.
#[test]
fn other_services_sections_are_ignored_but_unknown_ones_are_named() {
    let f = file(
        "[kafka]\nbrokers = \"k:9092\"\n[worker]\nconcurrency = 8\n[scheduler]\nbatch_size = 10\n",
    );
    let s: CommonSettings = load_with_env(
        Some(f.path()),
        env(&[
            ("FLEET__WORKER__CONCURRENCY", "4"),
            ("FLEET__SCHEDULER__ANYTHING", "x"),
        ]),
    )
    .unwrap();
    assert_eq!(s.kafka.brokers, "k:9092");
    let (key, message) = invalid(load_with_env(
        None,
        env(&[("FLEET__WROKER__CONCURRENCY", "4")]),
    ));
    assert_eq!(key, "wroker", "{message}");
    assert!(message.contains("unknown field"), "{message}");
}
