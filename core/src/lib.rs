//! tally's domain: polls, votes and segments, the versioned wire format of a vote on the
//! bus, the exact tally of a poll and its rollups, the problem a bad request gets, and the
//! ports — the back-end traits every service talks through.
//!
//! In: poll definitions and raw vote requests. Out: validated [`vote::Vote`] events,
//! [`results::Results`] documents, [`problem::Problem`]s naming what to fix, and the traits
//! in [`ports`] (`VoteLog`, `PollRegistry`, `Warehouse`, `LiveFeed`). The guarantees a back
//! end makes (durable appends, one entry per uniqueness key, atomic position-stamped
//! inserts) are stated on the trait, not in its callers; the implementations live in their
//! own crates and pass the suites of `tally-conformance`. This crate knows no HTTP
//! framework, broker client, database or query engine.

pub mod analyst;
pub mod analytics;
pub mod api;
pub mod auth;
pub mod error;
pub mod poll;
pub mod ports;
pub mod problem;
pub mod results;
pub mod retry;
pub mod rollup;
pub mod secrets;
pub mod segment;
pub mod text;
pub mod time;
pub mod token;
pub mod vote;
pub mod wire;

pub use error::{Error, ErrorKind, Result};
