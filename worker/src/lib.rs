//! The worker runtime: consumes the priority topics and runs task handlers.

pub mod settings;
