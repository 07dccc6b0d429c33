//! Fleet's integration tests: one test binary with a module per area, so the workspace links
//! one test executable instead of one per file. Every test starts its own Redis and (unless it
//! tests only the store) its own broker through `fleet_testkit`, and runs Fleet's real binaries.
//!
//! Run one area with `cargo nextest run -E 'test(/^faults::/)'`.

mod browser;
mod compose;

mod api;
mod containers;
mod control;
mod dashboard;
mod deploy;
mod failures;
mod faults;
mod fleetctl;
mod flow;
mod foundation;
mod groups;
mod harness;
mod hostile;
mod lifecycle;
mod metrics;
mod placement;
mod schedules;
mod series;
mod store;
mod store_control;
mod workflows;
