//! The HTTP kit the services share.

pub mod health;
mod problem;

pub use health::{service, Probe, REQUEST_TIMEOUT};
pub use problem::{read_body, ApiError, ApiJson, Reply};
