//! The HTTP kit the services share.

pub mod around;
pub mod cors;
pub mod guard;
pub mod health;
pub mod observe;
mod problem;
pub mod serve;
pub mod streams;

pub use guard::Guard;
pub use health::{service, Probe, REQUEST_TIMEOUT};
pub use problem::{read_body, read_body_within, require_content_type, ApiError, ApiJson, Reply};
pub use serve::{serve, ServeConfig};
