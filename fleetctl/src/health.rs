//! `fleetctl topics create` and `fleetctl ping`: the broker and Redis, as Fleet needs them;
//! `fleetctl probe`: a service's health endpoint, for container health checks.

use std::time::{Duration, Instant};

use anyhow::Context;
use fleet_common::settings::{self, CommonSettings};
use fleet_common::{Topics, kafka};

use crate::connect;

pub(crate) async fn create_topics(
    settings: &CommonSettings,
    partitions: i32,
) -> anyhow::Result<()> {
    let names = Topics::from_settings(&settings.topics).all();
    let statuses = kafka::ensure_topics(
        &settings.kafka,
        &names,
        partitions,
        settings.topics.replication_factor,
        fleet_common::task::record_limit(settings.tasks.max_task_bytes),
        Duration::from_secs(15),
    )
    .await
    .with_context(|| format!("creating topics on {}", settings.kafka.brokers))?;
    for status in statuses {
        let what = if status.created { "created" } else { "exists " };
        let note = if !status.created && status.partitions != partitions as usize {
            format!(" (wanted {partitions}; partitions of an existing topic are not changed)")
        } else {
            String::new()
        };
        println!(
            "{what} {:<40} {} partitions{note}",
            status.name, status.partitions
        );
    }
    Ok(())
}

pub(crate) async fn ping(settings: &CommonSettings, wait: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        match ping_once(settings).await {
            Ok(report) => {
                println!("{report}");
                return Ok(());
            }
            Err(err) if start.elapsed() >= wait => return Err(err),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

async fn ping_once(settings: &CommonSettings) -> anyhow::Result<String> {
    let store = connect(settings).await?;
    let mut conn = store.conn();
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_string();
    let schema: Option<String> = redis::cmd("HGET")
        .arg(store.keys().schema())
        .arg("version")
        .query_async(&mut conn)
        .await?;

    let brokers = settings.kafka.brokers.clone();
    let config = kafka::producer_config(&settings.kafka, "fleetctl");
    let wanted = Topics::from_settings(&settings.topics).all();
    let topics = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(String, usize)>> {
        use rdkafka::producer::{BaseProducer, Producer};
        let producer: BaseProducer = config.create()?;
        let metadata = producer
            .client()
            .fetch_metadata(None, Duration::from_secs(5))?;
        Ok(wanted
            .into_iter()
            .map(|name| {
                let partitions = metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == name)
                    .map_or(0, |t| t.partitions().len());
                (name, partitions)
            })
            .collect())
    })
    .await?
    .with_context(|| format!("Kafka at {brokers}"))?;

    let mut report = format!(
        "redis   {} (version {version}, schema {})\nkafka   {brokers}\n",
        settings::redact_url(settings.redis.url.expose()),
        schema.as_deref().unwrap_or("not yet recorded"),
    );
    for (name, partitions) in topics {
        let state = if partitions == 0 {
            "missing".to_string()
        } else {
            format!("{partitions} partitions")
        };
        report.push_str(&format!("  topic {name:<40} {state}\n"));
    }
    Ok(report.trim_end().to_string())
}

/// The URL of `path` on a service listening on `listen`: loopback for a wildcard address
/// (`0.0.0.0:8080`, `[::]:8080`), else that address itself.
pub(crate) fn local_url(listen: &str, path: &str) -> anyhow::Result<String> {
    let mut addr: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("http.listen `{listen}` is not an address"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(format!("http://{addr}{path}"))
}

/// Splits a plain `http://host:port/path` URL into its authority and path; anything else is
/// refused with the reason.
pub(crate) fn probe_target(url: &str) -> Result<(&str, &str), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{url}`: only plain http:// URLs can be probed"))?;
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    if authority.is_empty()
        || authority.contains(char::is_whitespace)
        || path.contains(char::is_whitespace)
    {
        return Err(format!("`{url}` is not a usable URL"));
    }
    Ok((authority, path))
}

/// GETs `url` (plain `http://host:port/path`) and exits 0 on 200, else 1 with the reason
/// (2 for a URL it cannot probe). Plain HTTP only (the image needs no curl and the probe no
/// TLS): reqwest is built without TLS, ignores proxies from the environment and follows no
/// redirects, so the probe asks the service itself.
pub(crate) async fn probe(url: &str, timeout: Duration) -> anyhow::Result<std::process::ExitCode> {
    if let Err(reason) = probe_target(url) {
        eprintln!("fleetctl probe: {reason}");
        return Ok(std::process::ExitCode::from(crate::EXIT_BAD_INPUT));
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .build()
        .context("building the HTTP client")?;
    let answer = match client.get(url).send().await {
        Err(err) if err.is_timeout() => Err(format!("no answer within {} ms", timeout.as_millis())),
        // `{:#}`: the whole chain, e.g. "… tcp connect error: Connection refused (os error 111)".
        Err(err) => Err(format!("{:#}", anyhow::Error::from(err))),
        Ok(response) => {
            // e.g. `HTTP/1.1 200 OK` (the version and code the server sent, the canonical reason).
            let status = format!("{:?} {}", response.version(), response.status());
            if response.status() == reqwest::StatusCode::OK {
                Ok(status)
            } else {
                Err(format!("answered `{status}`"))
            }
        }
    };
    match answer {
        Ok(status) => {
            println!("{url}: {status}");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Err(reason) => {
            eprintln!("fleetctl probe: {url}: {reason}");
            Ok(std::process::ExitCode::from(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{local_url, probe_target};

    #[test]
    fn only_plain_http_urls_are_probed() {
        assert_eq!(
            probe_target("http://127.0.0.1:8080/readyz"),
            Ok(("127.0.0.1:8080", "/readyz"))
        );
        assert_eq!(probe_target("http://h:1"), Ok(("h:1", "/")));
        for bad in [
            "https://h:1/readyz",
            "h:1/readyz",
            "http:///x",
            "http://a b/",
            "",
            "ftp://h",
        ] {
            assert!(probe_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_wildcard_listener_is_probed_on_loopback_and_any_other_on_its_address() {
        assert_eq!(
            local_url("0.0.0.0:8080", "/readyz").unwrap(),
            "http://127.0.0.1:8080/readyz"
        );
        assert_eq!(
            local_url("[::]:9000", "/readyz").unwrap(),
            "http://[::1]:9000/readyz"
        );
        assert_eq!(
            local_url("10.1.2.3:8080", "/healthz").unwrap(),
            "http://10.1.2.3:8080/healthz"
        );
        assert!(local_url("not an address", "/").is_err());
    }
}
