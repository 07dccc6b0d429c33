//! Deliveries waiting for a free slot, one FIFO per priority, and the weighted choice of which
//! starts next.
//!
//! Each partition belongs to one priority topic, so taking from the front of a FIFO keeps every
//! partition in offset order, which is what lets claimed offsets be stored in order.

use std::collections::VecDeque;

use fleet_common::Priority;
use fleet_common::trace::TraceParent;
use fleet_common::wire::{Envelope, InvalidEnvelope};

/// One record from a task topic.
#[derive(Debug)]
pub struct Delivery {
    pub priority: Priority,
    pub partition: i32,
    pub offset: i64,
    pub envelope: Result<Envelope, InvalidEnvelope>,
    /// The record's bytes when they are not a valid envelope (for the rejected topic).
    pub raw: Option<Vec<u8>>,
    /// When the record was published (Kafka timestamp, ms), for the queue-wait metric.
    pub published_ms: Option<i64>,
    /// Its `traceparent` header: the handler's span joins that trace.
    pub trace: Option<TraceParent>,
}

/// Per-priority queues with smooth weighted round-robin selection (the nginx algorithm): with
/// weights 8:4:2:1 and every level waiting, 8 of each 15 starts go to critical, and low still
/// gets 1 — so lower levels progress without starving. `strict` always takes the most urgent.
#[derive(Debug)]
pub struct Buffers {
    queues: [VecDeque<Delivery>; 4],
    weights: [i64; 4],
    current: [i64; 4],
    strict: bool,
}

impl Buffers {
    pub fn new(weights: [u32; 4], strict: bool) -> Self {
        Self {
            queues: Default::default(),
            weights: weights.map(i64::from),
            current: [0; 4],
            strict,
        }
    }

    pub fn push(&mut self, delivery: Delivery) -> usize {
        let queue = &mut self.queues[delivery.priority.index()];
        queue.push_back(delivery);
        queue.len()
    }

    pub fn len(&self, priority: Priority) -> usize {
        self.queues[priority.index()].len()
    }

    pub fn is_empty(&self) -> bool {
        self.queues.iter().all(VecDeque::is_empty)
    }

    /// The next delivery to start, if any.
    pub fn pick(&mut self) -> Option<Delivery> {
        let waiting: Vec<usize> = (0..4).filter(|&i| !self.queues[i].is_empty()).collect();
        let chosen = if self.strict {
            *waiting.first()?
        } else {
            let total: i64 = waiting.iter().map(|&i| self.weights[i]).sum();
            let mut best: Option<usize> = None;
            for &i in &waiting {
                self.current[i] += self.weights[i];
                if best.is_none_or(|b| self.current[i] > self.current[b]) {
                    best = Some(i);
                }
            }
            let best = best?;
            self.current[best] -= total;
            best
        };
        self.queues[chosen].pop_front()
    }

    /// Drops everything buffered (on drain: these were never claimed, so the next owner of the
    /// partition reads them again from the committed offset).
    pub fn clear(&mut self) -> usize {
        let n = self.queues.iter().map(VecDeque::len).sum();
        self.queues.iter_mut().for_each(VecDeque::clear);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(priority: Priority, offset: i64) -> Delivery {
        Delivery {
            priority,
            partition: 0,
            offset,
            envelope: Err(InvalidEnvelope::Empty),
            raw: None,
            published_ms: None,
            trace: None,
        }
    }

    fn fill(b: &mut Buffers, n: i64) {
        for p in Priority::ALL {
            for o in 0..n {
                b.push(delivery(p, o));
            }
        }
    }

    #[test]
    fn weighted_shares_follow_the_weights_and_nobody_starves() {
        let mut b = Buffers::new([8, 4, 2, 1], false);
        fill(&mut b, 1000);
        let mut counts = [0; 4];
        for _ in 0..150 {
            counts[b.pick().unwrap().priority.index()] += 1;
        }
        assert_eq!(counts, [80, 40, 20, 10]);
    }

    #[test]
    fn strict_mode_drains_the_most_urgent_first() {
        let mut b = Buffers::new([8, 4, 2, 1], true);
        fill(&mut b, 3);
        let order: Vec<Priority> = std::iter::from_fn(|| b.pick())
            .map(|d| d.priority)
            .collect();
        assert_eq!(&order[..3], &[Priority::Critical; 3]);
        assert_eq!(&order[9..], &[Priority::Low; 3]);
    }

    #[test]
    fn each_priority_stays_in_offset_order() {
        let mut b = Buffers::new([1, 1, 1, 1], false);
        fill(&mut b, 50);
        let mut last = [-1i64; 4];
        while let Some(d) = b.pick() {
            assert!(d.offset > last[d.priority.index()]);
            last[d.priority.index()] = d.offset;
        }
        assert!(b.is_empty());
    }

    #[test]
    fn an_idle_level_does_not_bank_credit() {
        let mut b = Buffers::new([8, 4, 2, 1], false);
        for o in 0..100 {
            b.push(delivery(Priority::Low, o));
        }
        for _ in 0..50 {
            assert_eq!(b.pick().unwrap().priority, Priority::Low);
        }
        b.push(delivery(Priority::Critical, 0));
        assert_eq!(
            b.pick().unwrap().priority,
            Priority::Critical,
            "critical goes first once it arrives"
        );
    }
}
