//! A fixed single-thread workload timed at the start and at the end of a run, alone and with
//! a copy on every core. This shared machine has spells in which every process runs several
//! times slower; the check puts a number on the machine's speed beside the results, so runs
//! are compared only when it agrees.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::hint::black_box;
use std::time::Instant;

/// Keys the workload inserts, hashes and walks.
const KEYS: u64 = 200_000;

/// Milliseconds the workload took, best of three (the least disturbed of the runs).
pub fn cpu_check_ms() -> f64 {
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
pub fn all_cores_ms() -> f64 {
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
}
