//! The scheduler: validates submissions and routes them onto the priority topics.

pub mod settings;
