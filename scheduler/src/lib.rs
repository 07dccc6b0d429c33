//! The scheduler crate: ingest of submissions, routing onto the priority topics, the relay
//! (delay/retry timer and outbox), and the reaper. Two binaries use it: `fleet-scheduler`
//! (ingest + relay) and `fleet-reaper` (reaper + relay).

pub mod api;
pub mod dispatch;
pub mod ingest;
pub mod publish;
pub mod queues;
pub mod reaper;
pub mod relay;
pub mod routing;
pub mod schedules;
pub mod service;
pub mod settings;
