//! What every tally service process shares, so ingest, processor and query write it once:
//!
//! - [`http`]: the HTTP kit — problem+json responses for every error (our own and the
//!   extractors' rejections alike), the JSON body extractor, `/healthz` and `/readyz`, and
//!   the middleware every router gets (request time limit, fallbacks);
//! - [`limits`]: rate limits and the client's address behind trusted proxies;
//! - [`polls`]: a local, always-fresh copy of the poll registry for hot paths;
//! - [`openapi`]: what every service's OpenAPI document shares (key scheme, problem types,
//!   health routes);
//! - [`tasks`]: the one owner of a process's background tasks, which stops them together
//!   and waits for them on shutdown.
//!
//! In: the ports of `tally-core`. Out: axum building blocks and task plumbing; nothing here
//! knows a concrete back end.

pub mod http;
pub mod limits;
pub mod openapi;
pub mod polls;
pub mod tasks;

pub use polls::PollCache;
pub use tasks::Tasks;
