//! Which partition of its priority topic a task goes to when the scheduler publishes it. A task
//! with a `key` goes by the key's hash (the producer's partitioner), so one key's tasks stay in
//! order on one partition; keyless tasks follow `scheduler.partitioner`. (Republished tasks go
//! to a live worker's partition first; see `Publisher::dispatch`.)
//!
//! Each partition a produce request touches becomes one record batch on the broker, and a
//! consumer's fetch costs per batch. Sending every keyless task to its own partition makes a
//! batch of 10 tasks into up to 10 broker batches; `sticky` (the default, like Kafka's own
//! sticky partitioner) keeps runs of consecutive tasks together while still spreading a
//! burst over every partition.

use std::sync::Mutex;

use fleet_common::Priority;

use crate::settings::Partitioner;

/// Partition choice shared by every publish of one process.
#[derive(Debug)]
pub struct Router {
    partitioner: Partitioner,
    /// Fewest consecutive keyless tasks of a priority that `sticky` sends to one partition, and
    /// so to one worker, before moving on to the next (`scheduler.sticky_run`). The next
    /// partition belongs to another worker under the workers' round-robin assignment.
    sticky_run: usize,
    /// Partitions of each priority's topic, as the broker reported them at start (partitions
    /// added later get keyless tasks after a restart).
    partitions: [usize; 4],
    /// Each priority's current run (`sticky`) or turn (`round_robin`), carried from batch to
    /// batch, so single-task batches (HTTP submissions one by one) are grouped too.
    runs: [Mutex<Run>; 4],
}

/// Where a priority's keyless tasks go next.
#[derive(Debug, Default)]
struct Run {
    /// Runs started so far; the next one goes to partition `runs_started % partitions`.
    runs_started: usize,
    /// The partition of the current run.
    partition: usize,
    /// Tasks still to go to `partition` before the next run starts.
    left: usize,
}

impl Router {
    /// `partitions` per priority topic; a count below 1 is taken as 1.
    pub fn new(partitioner: Partitioner, sticky_run: usize, partitions: [usize; 4]) -> Self {
        Self {
            partitioner,
            sticky_run: sticky_run.max(1),
            partitions: partitions.map(|p| p.max(1)),
            runs: Default::default(),
        }
    }

    /// Starts each priority's runs at a random partition, so that scheduler replicas, reapers
    /// and restarts do not all begin on partition 0.
    pub fn with_random_start(self) -> Self {
        for (run, partitions) in self.runs.iter().zip(self.partitions) {
            let mut run = run.lock().unwrap_or_else(|e| e.into_inner());
            run.runs_started = rand::random_range(0..partitions);
        }
        self
    }

    /// Routes one batch, given how many keyless tasks of each priority it holds.
    pub fn batch(&self, keyless: [usize; 4]) -> BatchRoute<'_> {
        let run_len =
            std::array::from_fn(|i| keyless[i].div_ceil(self.partitions[i]).max(self.sticky_run));
        BatchRoute {
            router: self,
            run_len,
        }
    }

    /// Routes a single task (the relay's and the reaper's publishes).
    pub fn one(&self, priority: Priority, key: Option<&str>) -> Option<i32> {
        let mut keyless = [0; 4];
        keyless[priority.index()] = 1;
        self.batch(keyless).next(priority, key)
    }
}

/// Partition choices for the tasks of one batch, taken in order.
#[derive(Debug)]
pub struct BatchRoute<'a> {
    router: &'a Router,
    /// Length of the runs this batch starts, per priority.
    run_len: [usize; 4],
}

impl BatchRoute<'_> {
    /// The partition for the batch's next task, or `None` to let the producer pick (by the key's
    /// hash, or at random for `random`).
    pub fn next(&mut self, priority: Priority, key: Option<&str>) -> Option<i32> {
        if key.is_some() || self.router.partitioner == Partitioner::Random {
            return None;
        }
        let i = priority.index();
        let len = match self.router.partitioner {
            Partitioner::RoundRobin => 1,
            _ => self.run_len[i],
        };
        let mut run = self.router.runs[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if run.left == 0 {
            run.partition = run.runs_started % self.router.partitions[i];
            run.runs_started += 1;
            run.left = len;
        }
        run.left -= 1;
        Some(run.partition as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(n: usize) -> [usize; 4] {
        let mut keyless = [0; 4];
        keyless[Priority::Normal.index()] = n;
        keyless
    }

    fn route(router: &Router, n: usize) -> Vec<i32> {
        let mut batch = router.batch(normal(n));
        (0..n)
            .map(|_| batch.next(Priority::Normal, None).expect("a partition"))
            .collect()
    }

    fn per_partition(picked: &[i32], partitions: usize) -> Vec<usize> {
        let mut counts = vec![0; partitions];
        for p in picked {
            counts[*p as usize] += 1;
        }
        counts
    }

    #[test]
    fn sticky_groups_consecutive_tasks_across_batches_then_moves_to_the_next_partition() {
        let router = Router::new(Partitioner::Sticky, 8, [6; 4]);
        assert_eq!(route(&router, 5), vec![0; 5]);
        // The run of 8 goes on into the next batch, then the next partition starts.
        assert_eq!(route(&router, 5), vec![0, 0, 0, 1, 1]);
        let picked = route(&router, 40);
        assert_eq!(per_partition(&picked, 6), vec![2, 6, 8, 8, 8, 8]);
        // Single publishes (HTTP submissions one by one) are grouped the same way.
        let router = Router::new(Partitioner::Sticky, 8, [3; 4]);
        let picked: Vec<_> = (0..10).map(|_| router.one(Priority::Low, None)).collect();
        assert_eq!(picked, [0, 0, 0, 0, 0, 0, 0, 0, 1, 1].map(Some));
    }

    #[test]
    fn sticky_puts_tasks_beyond_one_run_on_the_next_partition() {
        // Two runs on two consecutive partitions: under the workers' round-robin assignment
        // those belong to different workers.
        let router = Router::new(Partitioner::Sticky, 8, [6; 4]);
        let picked = route(&router, 16);
        assert_eq!(per_partition(&picked, 6), vec![8, 8, 0, 0, 0, 0]);
        // A burst first finishes the run it finds half done.
        let router = Router::new(Partitioner::Sticky, 8, [6; 4]);
        route(&router, 3);
        let picked = route(&router, 600);
        assert_eq!(&picked[..5], &[0; 5]);
        assert_eq!(per_partition(&picked, 6), vec![100; 6]);
        assert_eq!(&picked[5..10], &[1; 5]);
    }

    #[test]
    fn zero_partitions_or_run_length_are_taken_as_one() {
        let router = Router::new(Partitioner::Sticky, 0, [0; 4]);
        assert_eq!(route(&router, 5), vec![0; 5]);
        let router = Router::new(Partitioner::Sticky, 0, [3; 4]);
        let picked: Vec<_> = (0..4).map(|_| router.one(Priority::Normal, None)).collect();
        assert_eq!(picked, [0, 1, 2, 0].map(Some));
        // A random start still stays within the partitions.
        let router = Router::new(Partitioner::Sticky, 1, [3; 4]).with_random_start();
        assert!(route(&router, 30).iter().all(|p| (0..3).contains(p)));
    }

    #[test]
    fn sticky_splits_a_burst_evenly_over_every_partition() {
        let router = Router::new(Partitioner::Sticky, 8, [6; 4]);
        let picked = route(&router, 600);
        assert_eq!(per_partition(&picked, 6), vec![100; 6]);
        // Each partition's share is one run of consecutive tasks.
        assert_eq!(picked.windows(2).filter(|w| w[0] != w[1]).count(), 5);
        let picked = route(&router, 97);
        assert_eq!(per_partition(&picked, 6), vec![17, 17, 17, 17, 17, 12]);
    }

    #[test]
    fn priorities_have_their_own_runs_and_partition_counts() {
        let router = Router::new(Partitioner::Sticky, 8, [1, 2, 6, 3]);
        let mut keyless = [0; 4];
        keyless[Priority::Critical.index()] = 5;
        keyless[Priority::Low.index()] = 60;
        let mut batch = router.batch(keyless);
        let mut low = Vec::new();
        for i in 0..65 {
            if i % 13 == 0 {
                assert_eq!(batch.next(Priority::Critical, None), Some(0));
            } else {
                low.push(batch.next(Priority::Low, None).expect("a partition"));
            }
        }
        assert_eq!(per_partition(&low, 3), vec![20, 20, 20]);
    }

    #[test]
    fn keyed_tasks_go_by_key_hash_under_every_partitioner() {
        for partitioner in [
            Partitioner::Sticky,
            Partitioner::RoundRobin,
            Partitioner::Random,
        ] {
            let router = Router::new(partitioner, 8, [4; 4]);
            assert_eq!(router.one(Priority::High, Some("customer-42")), None);
        }
    }

    #[test]
    fn round_robin_cycles_per_task_and_random_leaves_the_choice_to_the_producer() {
        let router = Router::new(Partitioner::RoundRobin, 8, [4; 4]);
        let picked = route(&router, 8);
        assert_eq!(picked, [0, 1, 2, 3, 0, 1, 2, 3]);
        let router = Router::new(Partitioner::Random, 8, [4; 4]);
        assert_eq!(router.batch(normal(3)).next(Priority::Normal, None), None);
    }
}
