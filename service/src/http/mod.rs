//! The HTTP kit the services share.

pub mod cors;
pub mod guard;
pub mod health;
pub mod observe;
mod problem;
pub mod serve;
pub mod streams;

pub use guard::Guard;
pub use health::{service, Probe, REQUEST_TIMEOUT};
pub use problem::{read_body, require_content_type, ApiError, ApiJson, Reply};
pub use serve::{serve, ServeConfig};
