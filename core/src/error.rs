//! Errors of the domain and of the back ends behind the ports, by kind.
//!
//! A back-end error says what happened ([`ErrorKind`]) and keeps the error it came from as
//! its `source`, so a log line can show the whole chain ([`Error::chain`]) while a client
//! sees only what the kind allows. Callers decide by kind: retry what is
//! [`Error::is_transient`], report the rest.

use std::fmt;

use crate::problem::Problem;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Any error kept as the cause of one of ours.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What kind of failure an [`Error`] is; the one thing callers branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A request broke a rule of the domain.
    Invalid,
    NotFound,
    AlreadyExists,
    /// A conditional update lost a race with another writer.
    Conflict,
    /// A back end could not be reached or did not answer in time: retrying may succeed.
    Unavailable,
    /// A back end answered but refused the call (a rejected statement, a broken setup).
    Failed,
    /// Stored data could not be read.
    Corrupt,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request broke a rule of the domain; the problem says what to fix.
    #[error(transparent)]
    Invalid(#[from] Problem),

    #[error("{0} not found")]
    NotFound(String),

    #[error("{0} already exists")]
    AlreadyExists(String),

    #[error("concurrent update of {0}")]
    Conflict(String),

    #[error("{what} unavailable")]
    Unavailable {
        what: String,
        #[source]
        source: BoxError,
    },

    #[error("{what} failed")]
    Failed {
        what: String,
        #[source]
        source: BoxError,
    },

    #[error("corrupt {what}")]
    Corrupt {
        what: String,
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// `what` (the vote log, the warehouse, …) could not be reached; `source` says why.
    pub fn unavailable(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Unavailable {
            what: what.into(),
            source: source.into(),
        }
    }

    /// `what` answered but refused the call.
    pub fn failed(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Failed {
            what: what.into(),
            source: source.into(),
        }
    }

    /// `what` (a poll record, a log entry, …) could not be decoded.
    pub fn corrupt(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Corrupt {
            what: what.into(),
            source: source.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Invalid(_) => ErrorKind::Invalid,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::Conflict(_) => ErrorKind::Conflict,
            Error::Unavailable { .. } => ErrorKind::Unavailable,
            Error::Failed { .. } => ErrorKind::Failed,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
        }
    }

    /// True when retrying the same call later may succeed (an outage, not a bad request).
    pub fn is_transient(&self) -> bool {
        self.kind() == ErrorKind::Unavailable
    }

    /// The error and every cause under it, `: `-separated, for logs.
    pub fn chain(&self) -> Chain<'_> {
        Chain(self)
    }
}

/// Displays an error with its causes: `vote log unavailable: connection refused`.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl From<Error> for Problem {
    fn from(err: Error) -> Problem {
        match err {
            Error::Invalid(problem) => problem,
            Error::Unavailable { what, .. } => {
                Problem::unavailable(format!("the {what} is unreachable; retry shortly"))
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
            Error::Failed { .. } | Error::Corrupt { .. } => Problem::internal(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_keep_their_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let err = Error::unavailable("vote log", io);
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        assert!(err.is_transient());
        assert_eq!(
            err.chain().to_string(),
            "vote log unavailable: connection refused"
        );
        let corrupt = Error::corrupt("poll record", "missing field `title`");
        assert!(!corrupt.is_transient());
        assert_eq!(
            corrupt.chain().to_string(),
            "corrupt poll record: missing field `title`"
        );
        assert_eq!(Problem::from(corrupt).status, 500);
        assert_eq!(Problem::from(err).status, 503);
    }
}
