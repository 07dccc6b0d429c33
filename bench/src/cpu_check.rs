//! A fixed single-thread workload timed at the start and at the end of a run, alone and with
//! a copy on every core, and the latency of a random read from memory. This shared machine has
//! spells in which every process runs several times slower; the checks put numbers on the
//! machine's speed beside the results, so runs are compared only when they agree.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::hint::black_box;
use std::time::Instant;

/// Keys the workload inserts, hashes and walks.
const KEYS: u64 = 200_000;

/// Milliseconds the workload took, best of three (the least disturbed of the runs).
pub(crate) fn cpu_check_ms() -> f64 {
    (0..3)
        .map(|_| {
            let began = Instant::now();
            black_box(workload(black_box(KEYS)));
            began.elapsed().as_secs_f64() * 1000.0
        })
        .fold(f64::INFINITY, f64::min)
}

/// Milliseconds the same workload took with one copy on every core at once (the slowest
/// copy), best of three. The services run concurrently, and this machine has had spells in
/// which they all ran at half speed while the single-thread check did not move.
pub(crate) fn all_cores_ms() -> f64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (0..3)
        .map(|_| {
            let began = Instant::now();
            // The scope returns once every copy has finished.
            std::thread::scope(|scope| {
                for _ in 0..cores {
                    scope.spawn(|| black_box(workload(black_box(KEYS))));
                }
            });
            began.elapsed().as_secs_f64() * 1000.0
        })
        .fold(f64::INFINITY, f64::min)
}

/// Bytes the memory check walks: larger than any cache this machine kind has, so nearly every
/// step is a read from memory.
const CHASE_BYTES: usize = 64 << 20;

/// Steps of the memory check's walk.
const CHASE_STEPS: usize = 2_000_000;

/// Nanoseconds per dependent random read over 64 MiB, best of three. The deepest slow spells
/// made every service use 1.5–2 times its CPU per task, with no hypervisor steal and the
/// compute checks above nearly unmoved; contention for the host's caches and memory would do
/// that, and this check is where it would show.
pub(crate) fn memory_ns() -> f64 {
    let cycle = random_cycle(CHASE_BYTES / std::mem::size_of::<u32>());
    (0..3)
        .map(|_| {
            let began = Instant::now();
            black_box(chase(black_box(&cycle), CHASE_STEPS));
            began.elapsed().as_secs_f64() * 1e9 / CHASE_STEPS as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// One cycle through all of `0..len` in a fixed pseudo-random order (Sattolo's algorithm), so
/// that every read depends on the one before and no prefetcher can guess it.
fn random_cycle(len: usize) -> Vec<u32> {
    let mut next: Vec<u32> = (0..len as u32).collect();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for i in (1..len).rev() {
        // xorshift64: fixed, so every run walks the same cycle.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let j = (state % i as u64) as usize;
        next.swap(i, j);
    }
    next
}

/// Follows `steps` links of `cycle` from 0; returns where it ended.
fn chase(cycle: &[u32], steps: usize) -> u32 {
    let mut at = 0u32;
    for _ in 0..steps {
        at = cycle[at as usize];
    }
    at
}

/// What the services spend their time on, in small: short strings allocated and formatted,
/// SipHash, and an ordered map's inserts and walk. Returns a checksum so nothing is optimised
/// away.
fn workload(keys: u64) -> u64 {
    let mut map = BTreeMap::new();
    let mut sum = 0u64;
    for i in 0..keys {
        let key = format!("task:{:016x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        sum ^= hasher.finish();
        map.insert(key, i);
    }
    for (key, value) in &map {
        sum = sum.wrapping_mul(31).wrapping_add(value ^ key.len() as u64);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_is_the_same_every_time_and_is_timed() {
        assert_eq!(workload(1_000), workload(1_000));
        assert_ne!(workload(1_000), workload(1_001), "every key counts");
        for ms in [cpu_check_ms(), all_cores_ms()] {
            assert!(ms.is_finite() && ms > 0.0, "{ms}");
        }
    }

    #[test]
    fn the_memory_walk_visits_every_slot_once_per_lap() {
        let cycle = random_cycle(1_000);
        let mut seen = vec![false; cycle.len()];
        let mut at = 0u32;
        for _ in 0..cycle.len() {
            assert!(!seen[at as usize], "slot {at} visited twice in one lap");
            seen[at as usize] = true;
            at = cycle[at as usize];
        }
        assert_eq!(at, 0, "one lap ends where it began");
        assert!(seen.iter().all(|&s| s), "every slot is on the cycle");
        assert_eq!(chase(&cycle, cycle.len()), 0);
        let sequential = (0..cycle.len())
            .filter(|&i| cycle[i] as usize == i + 1)
            .count();
        assert!(
            sequential < 10,
            "shuffled, not a walk to the neighbour: {sequential}"
        );
        assert_eq!(random_cycle(1_000), cycle, "the same walk every time");
        let ns = memory_ns();
        assert!(ns.is_finite() && ns > 0.0, "{ns}");
    }
}
