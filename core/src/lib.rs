//! tally's core: the domain model (polls, votes, segments), the versioned wire format of
//! a vote on the bus, the exact tally of a poll, the problem+json error shape shared by the
//! HTTP services, and the back-end traits every service talks through.
//!
//! In: configuration and raw requests. Out: validated [`vote::Vote`] events, [`results::Results`]
//! documents and the back ends (`VoteLog`, `PollRegistry`, `Warehouse`, `LiveFeed`) with
//! their NATS JetStream and ClickHouse implementations. Each trait has one conformance suite
//! in [`conformance`] that every implementation must pass; the guarantees a back end makes
//! (durable appends, one entry per uniqueness key, atomic position-stamped inserts) are
//! stated on the trait, not in its callers.

pub mod auth;
pub mod backend;
pub mod clickhouse;
pub mod conformance;
pub mod error;
pub mod health;
pub mod nats;
pub mod poll;
pub mod polls;
pub mod problem;
pub mod results;
pub mod rollup;
pub mod segment;
pub mod time;
pub mod token;
pub mod vote;
pub mod wire;

pub use error::{Error, Result};
