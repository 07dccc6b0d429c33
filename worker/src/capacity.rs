//! What this worker offers placed tasks: `worker.capacity`, with `cpu` and `memory_mb` read
//! from its cgroup (v2: `cpu.max`, `memory.max`, the tightest limit on the way up to the root)
//! or else the machine (core count, `MemTotal`) when the settings leave them out, and `slots`
//! from `worker.concurrency`.

use std::path::{Path, PathBuf};

use fleet_common::placement::{Resources, SLOTS};

/// Where the cgroup v2 hierarchy is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A limit that could not be read: what, where, and the setting that would replace it.
#[derive(Debug, thiserror::Error)]
#[error(
    "worker.capacity: cannot read {what} from {path}: {problem} (set worker.capacity.{setting})"
)]
pub struct CapacityError {
    what: &'static str,
    path: PathBuf,
    problem: String,
    setting: &'static str,
}

/// The capacity to report: `configured`, plus `cpu` and `memory_mb` when it has none, plus
/// `slots` = `concurrency`.
pub fn capacity(configured: &Resources, concurrency: usize) -> Result<Resources, CapacityError> {
    let mut capacity = configured.clone();
    let group = own_cgroup(Path::new("/proc/self/cgroup"), Path::new(CGROUP_ROOT));
    if !capacity.contains_key("cpu") {
        let cpu = match &group {
            Some(dir) => tightest(dir, Path::new(CGROUP_ROOT), "cpu.max", parse_cpu_max)?,
            None => None,
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        capacity.insert("cpu".into(), cpu.map_or(cores, |c| c.min(cores)));
    }
    if !capacity.contains_key("memory_mb") {
        let limit = match &group {
            Some(dir) => tightest(dir, Path::new(CGROUP_ROOT), "memory.max", parse_memory_max)?,
            None => None,
        };
        let machine = machine_memory_mb(Path::new("/proc/meminfo"))?;
        capacity.insert(
            "memory_mb".into(),
            limit.map_or(machine, |l| l.min(machine)),
        );
    }
    capacity.insert(SLOTS.into(), concurrency as f64);
    Ok(capacity)
}

/// This process's cgroup v2 directory, from the `0::<path>` line of `/proc/self/cgroup`.
fn own_cgroup(proc_cgroup: &Path, root: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(proc_cgroup).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = root.join(path.trim().trim_start_matches('/'));
    dir.is_dir().then_some(dir)
}

/// The smallest limit in `file` of `dir` and its parents up to `root` (a child's limit cannot
/// exceed its parents' in effect); `None` when none sets one.
fn tightest(
    dir: &Path,
    root: &Path,
    file: &'static str,
    parse: fn(&str) -> Result<Option<f64>, String>,
) -> Result<Option<f64>, CapacityError> {
    let (what, setting) = match file {
        "cpu.max" => ("the CPU limit", "cpu"),
        _ => ("the memory limit", "memory_mb"),
    };
    let mut limit: Option<f64> = None;
    let mut at = Some(dir);
    while let Some(d) = at {
        let path = d.join(file);
        if let Ok(text) = std::fs::read_to_string(&path) {
            let found = parse(&text).map_err(|problem| CapacityError {
                what,
                path: path.clone(),
                problem,
                setting,
            })?;
            if let Some(found) = found {
                limit = Some(limit.map_or(found, |l| l.min(found)));
            }
        }
        if d == root {
            break;
        }
        at = d.parent().filter(|p| p.starts_with(root));
    }
    Ok(limit)
}

/// `cpu.max`: `max <period>` (no limit) or `<quota> <period>`, in cores.
fn parse_cpu_max(text: &str) -> Result<Option<f64>, String> {
    let mut parts = text.split_whitespace();
    let (Some(quota), Some(period)) = (parts.next(), parts.next()) else {
        return Err(format!(
            "expected `<quota> <period>`, found `{}`",
            text.trim()
        ));
    };
    if quota == "max" {
        return Ok(None);
    }
    let quota: f64 = quota
        .parse()
        .map_err(|_| format!("quota `{quota}` is not a number"))?;
    let period: f64 = period
        .parse()
        .ok()
        .filter(|p: &f64| *p > 0.0)
        .ok_or_else(|| format!("period `{period}` is not a positive number"))?;
    Ok(Some(quota / period))
}

/// `memory.max`: `max` or bytes, in MiB.
fn parse_memory_max(text: &str) -> Result<Option<f64>, String> {
    let text = text.trim();
    if text == "max" {
        return Ok(None);
    }
    let bytes: u64 = text
        .parse()
        .map_err(|_| format!("`{text}` is neither `max` nor a number of bytes"))?;
    Ok(Some((bytes / (1024 * 1024)) as f64))
}

/// The machine's memory in MiB, from `MemTotal` (kB).
fn machine_memory_mb(meminfo: &Path) -> Result<f64, CapacityError> {
    let error = |problem: String| CapacityError {
        what: "the machine's memory",
        path: meminfo.to_path_buf(),
        problem,
        setting: "memory_mb",
    };
    let text = std::fs::read_to_string(meminfo).map_err(|e| error(e.to_string()))?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| error("no readable MemTotal line".into()))?;
    Ok((kb / 1024) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_limits_are_read_and_bad_ones_refused() {
        assert_eq!(parse_cpu_max("max 100000\n"), Ok(None));
        assert_eq!(parse_cpu_max("150000 100000\n"), Ok(Some(1.5)));
        assert!(parse_cpu_max("lots").is_err());
        assert!(parse_cpu_max("100 0").is_err());
        assert_eq!(parse_memory_max("max\n"), Ok(None));
        assert_eq!(parse_memory_max("1073741824\n"), Ok(Some(1024.0)));
        assert!(parse_memory_max("1G").is_err());
    }

    #[test]
    fn the_tightest_limit_on_the_way_up_counts_and_an_unreadable_one_names_its_file() {
        let root = std::env::temp_dir().join(format!("fleet-cgroup-{}", std::process::id()));
        let child = root.join("a/b");
        std::fs::create_dir_all(&child).unwrap();
        std::fs::write(root.join("a/cpu.max"), "100000 100000").unwrap();
        std::fs::write(child.join("cpu.max"), "max 100000").unwrap();
        assert_eq!(
            tightest(&child, &root, "cpu.max", parse_cpu_max).unwrap(),
            Some(1.0)
        );
        std::fs::write(child.join("memory.max"), "lots").unwrap();
        let err = tightest(&child, &root, "memory.max", parse_memory_max)
            .unwrap_err()
            .to_string();
        assert!(err.contains("memory.max"), "{err}");
        assert!(err.contains("worker.capacity.memory_mb"), "{err}");
        std::fs::write(root.join("proc-cgroup"), "0::/a/b\n").unwrap();
        assert_eq!(
            own_cgroup(&root.join("proc-cgroup"), &root),
            Some(child.clone())
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn configured_amounts_win_and_slots_follow_concurrency() {
        let configured: Resources = [("cpu".to_string(), 3.0), ("gpu".to_string(), 1.0)].into();
        let capacity = capacity(&configured, 16).unwrap();
        assert_eq!(capacity["cpu"], 3.0);
        assert_eq!(capacity["gpu"], 1.0);
        assert_eq!(capacity["slots"], 16.0);
        assert!(capacity["memory_mb"] > 0.0);
    }
}
