//! Typed settings shared by every Fleet service, and the one loader they all use.
//!
//! Layers, later wins: built-in defaults (the `Default` impls here) → an optional TOML file
//! (`--config PATH`) → environment variables `FLEET__SECTION__KEY` (double underscores, so
//! names like `lease_ms` keep their single underscore). Unknown keys are errors that name the
//! key; values of the wrong form name the key and what was expected; unsafe timing ratios are
//! refused before any connection is made.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// The file could not be read or is not valid TOML.
    #[error("cannot read settings: {0}")]
    Source(#[from] config::ConfigError),
    /// A key is unknown or its value has the wrong form.
    #[error("invalid setting `{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl SettingsError {
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Checks a loaded settings struct for values that parse but are unsafe together.
pub trait Validate {
    fn validate(&self) -> Result<(), SettingsError>;
}

/// A whole service's settings (made by [`service_settings!`](crate::service_settings)).
pub trait ServiceSettings: DeserializeOwned + Validate + fmt::Debug {
    /// The service's own sections (`worker`, `scheduler`); none for tools.
    const SECTIONS: &'static [&'static str];
    fn log(&self) -> &LogSettings;
}

/// Every service's own section. One settings file or environment (a Kubernetes ConfigMap, say)
/// can serve all of Fleet: each program ignores the other programs' sections, and still
/// rejects any other unknown section or key.
const SERVICE_SECTIONS: [&str; 2] = ["scheduler", "worker"];

/// Loads `T` from defaults, the optional TOML `file`, and the process environment.
pub fn load<T>(file: Option<&Path>) -> Result<T, SettingsError>
where
    T: ServiceSettings,
{
    load_with_env(file, std::env::vars().collect())
}

/// Like [`load`], reading variables from `env` instead of the process environment, so tests
/// never mutate the environment.
pub fn load_with_env<T>(
    file: Option<&Path>,
    env: HashMap<String, String>,
) -> Result<T, SettingsError>
where
    T: ServiceSettings,
{
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        builder = builder.add_source(
            config::File::from(path)
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    // Only FLEET__* variables are ours; FLEET_ENV and friends are left alone.
    let mut ours: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("FLEET__"))
        .collect();
    // List settings take comma-separated values, e.g. FLEET__HTTP__TOKEN_FILES=/run/a,/run/b.
    for (var, key) in LIST_VARS {
        if let Some(value) = ours.remove(var) {
            let items: Vec<String> = value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            builder = builder.set_override(key, items)?;
        }
    }
    builder = builder.add_source(
        config::Environment::with_prefix("FLEET")
            .prefix_separator("__")
            .separator("__")
            .source(Some(ours)),
    );
    let mut table: config::Map<String, config::Value> = builder.build()?.try_deserialize()?;
    for section in SERVICE_SECTIONS {
        if !T::SECTIONS.contains(&section) {
            table.remove(section);
        }
    }
    let merged = config::Value::new(None, config::ValueKind::Table(table));
    let settings: T = serde_path_to_error::deserialize(merged).map_err(|err| {
        let key = err.path().to_string();
        let message = err.into_inner().to_string();
        SettingsError::Invalid {
            key,
            message: strip_key_suffix(&message),
        }
    })?;
    settings.validate()?;
    Ok(settings)
}

/// Environment variables holding comma-separated lists, and their keys.
const LIST_VARS: [(&str, &str); 2] = [
    ("FLEET__HTTP__TOKENS", "http.tokens"),
    ("FLEET__HTTP__TOKEN_FILES", "http.token_files"),
];

/// `config` appends " for key `x`" to some messages; the key is already reported by the path.
fn strip_key_suffix(message: &str) -> String {
    match message.find(" for key `") {
        Some(at) => message[..at].to_string(),
        None => message.to_string(),
    }
}

/// A value that must never be printed: `Debug` and `Display` show `***`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself, for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

/// Log output shape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON otherwise (containers, files).
    #[default]
    Auto,
    Pretty,
    Json,
}

impl<'de> Deserialize<'de> for LogFormat {
    // By hand: the derived enum error of `config` does not list the accepted values.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.as_str() {
            "auto" => Ok(Self::Auto),
            "pretty" => Ok(Self::Pretty),
            "json" => Ok(Self::Json),
            other => Err(serde::de::Error::custom(format!(
                "unknown log format `{}`; expected auto, pretty or json",
                other.chars().take(32).collect::<String>()
            ))),
        }
    }
}

/// `[log]`: format and level. `RUST_LOG`, when set, overrides `level`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// An `EnvFilter` directive, e.g. `info` or `info,fleet_worker=debug`.
    pub level: String,
    /// OTLP/HTTP collector to export spans to, `http://host:port[/base]`; empty: no export.
    pub otlp_endpoint: String,
}

/// An OTLP/HTTP collector: `http://host:port[/base]`, whose spans go to `/base/v1/traces`.
/// Plain HTTP only: put a collector or sidecar next to the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpEndpoint {
    /// `host:port`.
    pub authority: String,
    /// The request path: `/v1/traces` under the base.
    pub path: String,
}

impl OtlpEndpoint {
    /// `None` unless `endpoint` is `http://host:port[/base]`.
    pub fn parse(endpoint: &str) -> Option<Self> {
        let rest = endpoint.strip_prefix("http://")?;
        let (authority, base) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.is_empty() || !authority.contains(':') {
            return None;
        }
        let base = base.trim_end_matches('/');
        let path = if base.is_empty() {
            "/v1/traces".to_string()
        } else {
            format!("/{base}/v1/traces")
        };
        Some(Self {
            authority: authority.to_string(),
            path,
        })
    }
}

impl Validate for LogSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        if !self.otlp_endpoint.is_empty() && OtlpEndpoint::parse(&self.otlp_endpoint).is_none() {
            return Err(SettingsError::invalid(
                "log.otlp_endpoint",
                "expected http://host:port or http://host:port/base (plain HTTP), or empty",
            ));
        }
        Ok(())
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Auto,
            level: "info".into(),
            otlp_endpoint: String::new(),
        }
    }
}

/// `[kafka]`: how to reach the brokers.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSettings {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub brokers: String,
    /// `security.protocol`: plaintext, ssl, sasl_plaintext or sasl_ssl.
    pub security_protocol: String,
    /// `sasl.mechanisms`, e.g. SCRAM-SHA-512 (used with a sasl_* protocol).
    pub sasl_mechanism: String,
    pub sasl_username: String,
    pub sasl_password: Secret,
    /// `ssl.ca.location`: PEM file of the CA that signed the brokers' certificates.
    pub ssl_ca_location: String,
    /// Consumer `session.timeout.ms`: how long before a silent group member is evicted.
    pub session_timeout_ms: u64,
    /// Consumer `heartbeat.interval.ms`; at most a third of the session timeout.
    pub heartbeat_interval_ms: u64,
    /// Extra librdkafka properties passed through unchanged (file only, e.g.
    /// `"linger.ms" = "5"`). Values whose name mentions a password or secret are redacted.
    pub client: BTreeMap<String, String>,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:19092".into(),
            security_protocol: "plaintext".into(),
            sasl_mechanism: String::new(),
            sasl_username: String::new(),
            sasl_password: Secret::default(),
            ssl_ca_location: String::new(),
            session_timeout_ms: 45_000,
            heartbeat_interval_ms: 3_000,
            client: BTreeMap::new(),
        }
    }
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let client: BTreeMap<&str, &str> = self
            .client
            .iter()
            .map(|(k, v)| (k.as_str(), if is_sensitive(k) { "***" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &self.sasl_password)
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("session_timeout_ms", &self.session_timeout_ms)
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("client", &client)
            .finish()
    }
}

/// librdkafka property names that carry credentials.
pub fn is_sensitive(property: &str) -> bool {
    let p = property.to_ascii_lowercase();
    p.contains("password") || p.contains("secret") || p.contains("token") || p.ends_with(".key")
}

impl KafkaSettings {
    /// The producer's `message.max.bytes` from `kafka.client` when it is set below `needed`
    /// (a value that does not parse counts as 0); `None` when it fits or is not set.
    pub fn producer_limit_below(&self, needed: usize) -> Option<usize> {
        let configured = self
            .client
            .get("message.max.bytes")?
            .trim()
            .parse()
            .unwrap_or(0);
        (configured < needed).then_some(configured)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        if self.brokers.trim().is_empty() {
            return Err(SettingsError::invalid(
                "kafka.brokers",
                "must list at least one host:port",
            ));
        }
        for broker in self.brokers.split(',') {
            let ok = broker
                .trim()
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(SettingsError::invalid(
                    "kafka.brokers",
                    format!("`{broker}` is not of the form host:port"),
                ));
            }
        }
        let protocol = self.security_protocol.to_ascii_lowercase();
        if !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&protocol.as_str()) {
            return Err(SettingsError::invalid(
                "kafka.security_protocol",
                "expected one of plaintext, ssl, sasl_plaintext, sasl_ssl",
            ));
        }
        if protocol.starts_with("sasl")
            && (self.sasl_mechanism.is_empty()
                || self.sasl_username.is_empty()
                || self.sasl_password.is_empty())
        {
            return Err(SettingsError::invalid(
                "kafka.sasl_mechanism",
                "a sasl_* protocol needs sasl_mechanism, sasl_username and sasl_password",
            ));
        }
        if self.session_timeout_ms == 0 || self.heartbeat_interval_ms == 0 {
            return Err(SettingsError::invalid(
                "kafka.session_timeout_ms",
                "session and heartbeat intervals must be positive",
            ));
        }
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms {
            return Err(SettingsError::invalid(
                "kafka.heartbeat_interval_ms",
                format!(
                    "{} ms is more than a third of kafka.session_timeout_ms ({} ms); \
                     the group would evict live members",
                    self.heartbeat_interval_ms, self.session_timeout_ms
                ),
            ));
        }
        Ok(())
    }
}

/// `[redis]`: the state store.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]`; the password is redacted in `Debug`.
    pub url: Secret,
    /// Prefix of every key Fleet writes, so several fleets can share one Redis.
    pub key_prefix: String,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("redis://127.0.0.1:16379"),
            key_prefix: "fleet".into(),
        }
    }
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redact_url(self.url.expose()))
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// `scheme://user:pass@host` → `scheme://***@host`; URLs without credentials are unchanged.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

impl RedisSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        let url = self.url.expose();
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(SettingsError::invalid(
                "redis.url",
                "expected redis://host:port or rediss://host:port",
            ));
        }
        if self.key_prefix.is_empty()
            || self.key_prefix.len() > 64
            || !self
                .key_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(SettingsError::invalid(
                "redis.key_prefix",
                "1-64 characters of letters, digits, '-', '_' or '.'",
            ));
        }
        Ok(())
    }
}

/// `[topics]`: names and shape of Fleet's Kafka topics.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicSettings {
    /// Topic names are `<prefix>.submit`, `<prefix>.tasks.<priority>`, `<prefix>.rejected`,
    /// `<prefix>.dead`.
    pub prefix: String,
    /// Partitions of each topic created by Fleet; caps how many workers share one priority.
    pub partitions: i32,
    pub replication_factor: i32,
}

impl Default for TopicSettings {
    fn default() -> Self {
        Self {
            prefix: "fleet".into(),
            partitions: 6,
            replication_factor: 1,
        }
    }
}

impl TopicSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        // Kafka topic names: [a-zA-Z0-9._-], at most 249 characters including our suffixes.
        if self.prefix.is_empty()
            || self.prefix.len() > 200
            || !self
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(SettingsError::invalid(
                "topics.prefix",
                "1-200 characters of letters, digits, '-', '_' or '.'",
            ));
        }
        if !(1..=1024).contains(&self.partitions) {
            return Err(SettingsError::invalid(
                "topics.partitions",
                "expected 1 to 1024",
            ));
        }
        if !(1..=16).contains(&self.replication_factor) {
            return Err(SettingsError::invalid(
                "topics.replication_factor",
                "expected 1 to 16",
            ));
        }
        Ok(())
    }
}

/// `[lease]`: the timing contract between workers and the reaper. Every service loads the same
/// section so they agree on it.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseSettings {
    /// How long a claim stays valid without a heartbeat (Redis server time).
    pub lease_ms: u64,
    /// How often a worker extends its leases; at most a third of `lease_ms`.
    pub heartbeat_ms: u64,
    /// How often the reaper looks for expired leases; at most half of `lease_ms`.
    pub reaper_interval_ms: u64,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        Self {
            lease_ms: 30_000,
            heartbeat_ms: 10_000,
            reaper_interval_ms: 5_000,
        }
    }
}

impl LeaseSettings {
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
    pub fn reaper_interval(&self) -> Duration {
        Duration::from_millis(self.reaper_interval_ms)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        if self.lease_ms == 0 || self.heartbeat_ms == 0 || self.reaper_interval_ms == 0 {
            return Err(SettingsError::invalid(
                "lease",
                "lease, heartbeat and reaper intervals must be positive",
            ));
        }
        if self.heartbeat_ms * 3 > self.lease_ms {
            return Err(SettingsError::invalid(
                "lease.heartbeat_ms",
                format!(
                    "{} ms is more than a third of lease.lease_ms ({} ms); one late heartbeat \
                     would lose the lease",
                    self.heartbeat_ms, self.lease_ms
                ),
            ));
        }
        if self.reaper_interval_ms * 2 > self.lease_ms {
            return Err(SettingsError::invalid(
                "lease.reaper_interval_ms",
                format!(
                    "{} ms is more than half of lease.lease_ms ({} ms); stalled tasks would wait \
                     too long",
                    self.reaper_interval_ms, self.lease_ms
                ),
            ));
        }
        Ok(())
    }
}

/// `[tasks]`: limits and defaults of the task lifecycle, shared by every service.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskSettings {
    /// Largest accepted submission, in bytes.
    pub max_task_bytes: usize,
    /// Largest result a handler may return, in bytes of JSON: a larger one fails the attempt
    /// permanently, with the reason (it is stored in Redis, and read by dependent tasks).
    pub max_result_bytes: usize,
    /// `max_attempts` of tasks that do not set one.
    pub default_max_attempts: u32,
    /// `timeout_ms` of tasks that do not set one; 0 means no timeout.
    pub default_timeout_ms: u64,
    /// How long terminal tasks stay in Redis.
    pub retention_ms: u64,
    /// How long an `idempotency_key` keeps mapping to its task.
    pub idempotency_window_ms: u64,
    /// How long a dispatched task may wait for its Kafka acknowledgement before the relay
    /// publishes it again (the outbox sweep).
    pub redeliver_ms: u64,
    /// Retry backoff: after failed attempt n, wait a random time up to
    /// `min(retry_cap_ms, retry_base_ms × 2^(n-1))` (exponential backoff with full jitter).
    pub retry_base_ms: u64,
    pub retry_cap_ms: u64,
    /// How long past its `timeout_ms` an attempt may still run before the reaper stops it (its
    /// hard deadline), for handlers that hang yet keep heartbeating. The worker's own timeout
    /// normally ends the attempt first.
    pub timeout_grace_ms: u64,
    /// Per-kind defaults, e.g. `[tasks.kinds.send_email] max_attempts = 10`.
    pub kinds: BTreeMap<String, KindDefaults>,
}

/// `[tasks.kinds.<kind>]`: defaults for one task kind; unset fields use the global ones.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KindDefaults {
    pub max_attempts: Option<u32>,
    pub timeout_ms: Option<u64>,
}

impl Default for TaskSettings {
    fn default() -> Self {
        Self {
            max_task_bytes: 1 << 20,
            max_result_bytes: 1 << 20,
            default_max_attempts: 5,
            default_timeout_ms: 0,
            retention_ms: 7 * 24 * 3600 * 1000,
            idempotency_window_ms: 24 * 3600 * 1000,
            redeliver_ms: 10_000,
            retry_base_ms: 1_000,
            retry_cap_ms: 300_000,
            timeout_grace_ms: 10_000,
            kinds: BTreeMap::new(),
        }
    }
}

/// Longest `tasks.retention_ms` and `tasks.idempotency_window_ms`: ten years.
const MAX_KEEP_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

impl TaskSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        if !(1024..=16 << 20).contains(&self.max_task_bytes) {
            return Err(SettingsError::invalid(
                "tasks.max_task_bytes",
                "expected 1024 to 16777216",
            ));
        }
        if !(1024..=16 << 20).contains(&self.max_result_bytes) {
            return Err(SettingsError::invalid(
                "tasks.max_result_bytes",
                "expected 1024 to 16777216",
            ));
        }
        if !(1..=crate::task::MAX_ATTEMPTS_LIMIT).contains(&self.default_max_attempts) {
            return Err(SettingsError::invalid(
                "tasks.default_max_attempts",
                "expected 1 to 100",
            ));
        }
        if self.default_timeout_ms > crate::task::MAX_TIMEOUT_MS {
            return Err(SettingsError::invalid(
                "tasks.default_timeout_ms",
                "at most one week",
            ));
        }
        if self.retention_ms < 1000 || self.idempotency_window_ms < 1000 {
            return Err(SettingsError::invalid(
                "tasks.retention_ms",
                "retention and idempotency window must be at least 1000 ms",
            ));
        }
        // Redis gets them as numbers formatted in Lua; far beyond any real need, they would be
        // written in exponent form, which PEXPIRE refuses after the task's state has changed.
        for (key, ms) in [
            ("tasks.retention_ms", self.retention_ms),
            ("tasks.idempotency_window_ms", self.idempotency_window_ms),
        ] {
            if ms > MAX_KEEP_MS {
                return Err(SettingsError::invalid(key, "at most ten years"));
            }
        }
        if self.retry_base_ms == 0 || self.retry_cap_ms < self.retry_base_ms {
            return Err(SettingsError::invalid(
                "tasks.retry_cap_ms",
                "retry_base_ms must be positive and at most retry_cap_ms",
            ));
        }
        for (kind, own) in &self.kinds {
            let key = |field: &str| format!("tasks.kinds.{kind}.{field}");
            if kind.is_empty() || kind.len() > crate::task::MAX_NAME_LEN {
                return Err(SettingsError::invalid(
                    key(""),
                    "kind names are 1 to 128 characters",
                ));
            }
            if own
                .max_attempts
                .is_some_and(|n| !(1..=crate::task::MAX_ATTEMPTS_LIMIT).contains(&n))
            {
                return Err(SettingsError::invalid(
                    key("max_attempts"),
                    "expected 1 to 100",
                ));
            }
            if own
                .timeout_ms
                .is_some_and(|ms| ms > crate::task::MAX_TIMEOUT_MS)
            {
                return Err(SettingsError::invalid(
                    key("timeout_ms"),
                    "at most one week",
                ));
            }
        }
        if !(100..=24 * 3600 * 1000).contains(&self.timeout_grace_ms) {
            return Err(SettingsError::invalid(
                "tasks.timeout_grace_ms",
                "expected 100 ms to one day",
            ));
        }
        if self.redeliver_ms < 100 {
            return Err(SettingsError::invalid(
                "tasks.redeliver_ms",
                "at least 100 ms",
            ));
        }
        Ok(())
    }

    /// The delay before retrying after failed attempt `attempt` (1-based), given a uniform
    /// random `unit` in [0, 1).
    pub fn retry_delay_ms(&self, attempt: u32, unit: f64) -> u64 {
        let exp = self
            .retry_base_ms
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(40));
        (exp.min(self.retry_cap_ms) as f64 * unit.clamp(0.0, 1.0)) as u64
    }

    /// The defaults for tasks of `kind`: its `[tasks.kinds.<kind>]` entry where set, the global
    /// defaults otherwise.
    pub fn defaults_for(&self, kind: &str) -> crate::task::TaskDefaults {
        let own = self.kinds.get(kind);
        crate::task::TaskDefaults {
            max_attempts: own
                .and_then(|k| k.max_attempts)
                .unwrap_or(self.default_max_attempts),
            timeout_ms: own
                .and_then(|k| k.timeout_ms)
                .unwrap_or(self.default_timeout_ms),
        }
    }
}

/// Validates the sections every service shares.
pub fn validate_common(
    kafka: &KafkaSettings,
    redis: &RedisSettings,
    topics: &TopicSettings,
    lease: &LeaseSettings,
    tasks: &TaskSettings,
) -> Result<(), SettingsError> {
    kafka.validate()?;
    redis.validate()?;
    topics.validate()?;
    lease.validate()?;
    tasks.validate()?;
    // The largest accepted task must fit through the producer (checked here so that
    // `--check-config` catches it; topics are checked against the broker at start).
    let needed = crate::task::record_limit(tasks.max_task_bytes);
    match kafka.producer_limit_below(needed) {
        Some(configured) => Err(SettingsError::invalid(
            "kafka.client.message.max.bytes",
            format!(
                "{configured} is smaller than the largest Fleet record ({needed} bytes: \
                 tasks.max_task_bytes + {}); raise it or lower tasks.max_task_bytes",
                crate::task::RECORD_ROOM
            ),
        )),
        None => Ok(()),
    }
}

/// `[http]`: the service's HTTP listener and, for the scheduler's API, who may call it.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// `host:port` to listen on; port 0 picks a free one (logged); empty: no listener.
    pub listen: String,
    /// Bearer tokens accepted by the API.
    pub tokens: Vec<Secret>,
    /// Files holding more tokens, one per line (e.g. Kubernetes Secret mounts).
    pub token_files: Vec<String>,
    /// Serve the API without authentication. For local development only.
    pub insecure_no_auth: bool,
    /// Largest request body accepted by the API.
    pub max_body_bytes: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            tokens: Vec::new(),
            token_files: Vec::new(),
            insecure_no_auth: false,
            max_body_bytes: 16 << 20,
        }
    }
}

impl Validate for HttpSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        if !self.listen.is_empty() && self.listen.parse::<SocketAddr>().is_err() {
            return Err(SettingsError::invalid(
                "http.listen",
                "expected host:port with an IP address, e.g. 0.0.0.0:8080, or empty for none",
            ));
        }
        if self.tokens.iter().any(|t| t.expose().trim().len() < 16) {
            return Err(SettingsError::invalid(
                "http.tokens",
                "tokens must be at least 16 characters",
            ));
        }
        if !(1024..=256 << 20).contains(&self.max_body_bytes) {
            return Err(SettingsError::invalid(
                "http.max_body_bytes",
                "expected 1024 to 268435456",
            ));
        }
        Ok(())
    }
}

impl HttpSettings {
    /// Every accepted token: the configured ones and those in `token_files`.
    pub fn load_tokens(&self) -> Result<Vec<Secret>, SettingsError> {
        let mut tokens: Vec<Secret> = self.tokens.clone();
        for path in &self.token_files {
            let text = std::fs::read_to_string(path).map_err(|err| {
                SettingsError::invalid("http.token_files", format!("cannot read {path}: {err}"))
            })?;
            tokens.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(Secret::new),
            );
        }
        Ok(tokens)
    }
}

/// Declares a service's settings struct: the shared sections (`kafka`, `redis`, `topics`,
/// `lease`, `tasks`, `log`, `http`) plus the service's own section, with unknown keys rejected at every level.
/// (`serde(flatten)` would lose `deny_unknown_fields` and precise error paths, hence a macro.)
#[macro_export]
macro_rules! service_settings {
    ($(#[$meta:meta])* $name:ident { $($section:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, serde::Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            pub kafka: $crate::settings::KafkaSettings,
            pub redis: $crate::settings::RedisSettings,
            pub topics: $crate::settings::TopicSettings,
            pub lease: $crate::settings::LeaseSettings,
            pub tasks: $crate::settings::TaskSettings,
            pub log: $crate::settings::LogSettings,
            pub http: $crate::settings::HttpSettings,
            $(pub $section: $ty,)*
        }

        impl $crate::settings::ServiceSettings for $name {
            const SECTIONS: &'static [&'static str] = &[$(stringify!($section)),*];
            fn log(&self) -> &$crate::settings::LogSettings {
                &self.log
            }
        }

        impl $crate::settings::Validate for $name {
            fn validate(&self) -> Result<(), $crate::settings::SettingsError> {
                $crate::settings::validate_common(
                    &self.kafka, &self.redis, &self.topics, &self.lease, &self.tasks,
                )?;
                $crate::settings::Validate::validate(&self.http)?;
                $crate::settings::Validate::validate(&self.log)?;
                $($crate::settings::Validate::validate(&self.$section)?;)*
                Ok(())
            }
        }
    };
}

service_settings! {
    /// Settings of tools that use only the shared sections (fleetctl, tests).
    CommonSettings {}
}
