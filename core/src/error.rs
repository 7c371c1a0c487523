//! Errors of the core crate: back-end failures and domain rule violations.

use crate::problem::Problem;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request broke a rule of the domain; the message says what to fix.
    #[error(transparent)]
    Invalid(#[from] Problem),

    /// The bus (vote log, registry, live feed) could not be reached or refused the call.
    #[error("bus unavailable: {0}")]
    Bus(String),

    /// The warehouse could not be reached or rejected a statement.
    #[error("warehouse: {0}")]
    Warehouse(String),

    /// A stored record could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(String),

    /// A conditional update lost a race with another writer.
    #[error("concurrent update of {0}")]
    Conflict(String),

    #[error("{0} already exists")]
    AlreadyExists(String),

    #[error("{0} not found")]
    NotFound(String),
}

impl Error {
    pub fn bus(err: impl std::fmt::Display) -> Self {
        Error::Bus(err.to_string())
    }

    pub fn warehouse(err: impl std::fmt::Display) -> Self {
        Error::Warehouse(err.to_string())
    }

    /// True when retrying the same call later may succeed (an outage, not a bad request).
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Bus(_) | Error::Warehouse(_))
    }
}

impl From<Error> for Problem {
    fn from(err: Error) -> Problem {
        match err {
            Error::Invalid(problem) => problem,
            Error::Bus(_) => Problem::unavailable("the vote log is unreachable; retry shortly"),
            Error::Warehouse(_) => {
                Problem::unavailable("the warehouse is unreachable; retry shortly")
            }
            Error::Conflict(what) => Problem::new(
                409,
                "concurrent-update",
                "Concurrent update",
                format!("{what} was changed by another request; fetch it and try again"),
            ),
            Error::AlreadyExists(what) => Problem::new(
                409,
                "already-exists",
                "Already exists",
                format!("{what} already exists"),
            ),
            Error::NotFound(what) => Problem::not_found(&what),
            Error::Corrupt(_) => Problem::internal(),
        }
    }
}
