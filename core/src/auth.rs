//! API keys with roles. Keys are held only as SHA-256 digests and compared in constant time
//! against every configured key, so neither timing nor memory reveals them.
//!
//! Roles: `admin` may do everything; `analyst` reads analytics (breakdowns, time series,
//! private results, SQL, exports); `ingest` imports votes in batches (integrations). A key
//! shorter than [`MIN_KEY_CHARS`] is refused at start: a short key is a guessable key.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::problem::Problem;

/// The shortest API key a service accepts.
pub const MIN_KEY_CHARS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Analyst,
    /// Batch import of votes (`POST /v1/votes:batch`), for integrations.
    Ingest,
    /// Everything the other roles may, and poll management.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Analyst => "analyst",
            Role::Ingest => "ingest",
            Role::Admin => "admin",
        }
    }

    /// Whether a key of this role may do what `needed` may.
    pub fn permits(self, needed: Role) -> bool {
        self == Role::Admin || self == needed
    }
}

#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Vec<([u8; 32], Role)>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

impl ApiKeys {
    /// The keys of each role; empty entries are ignored. Refuses a key that is too short or
    /// has white space in it, naming its role (never the key).
    pub fn new(roles: &[(Role, &[String])]) -> Result<Self, String> {
        let mut digests = Vec::new();
        for (role, keys) in roles {
            for key in keys.iter().filter(|k| !k.is_empty()) {
                if key.chars().count() < MIN_KEY_CHARS {
                    return Err(format!(
                        "an {} key is shorter than {MIN_KEY_CHARS} characters; use a long random key (e.g. `openssl rand -hex 24`)",
                        role.name()
                    ));
                }
                if key.chars().any(char::is_whitespace) {
                    return Err(format!("an {} key contains white space", role.name()));
                }
                digests.push((Sha256::digest(key.as_bytes()).into(), *role));
            }
        }
        Ok(ApiKeys { digests })
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether any key has `role`.
    pub fn has(&self, role: Role) -> bool {
        self.digests.iter().any(|(_, r)| *r == role)
    }

    /// The roles of `key` (one key may be listed under several).
    fn roles_of(&self, key: &str) -> Vec<Role> {
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = Vec::new();
        // Every digest is compared, so the time does not tell which one matched.
        for (digest, role) in &self.digests {
            if bool::from(digest.ct_eq(&presented)) {
                found.push(*role);
            }
        }
        found
    }

    /// Checks an `Authorization` header value for a role: 401 when missing or unknown, 403
    /// when the key's role is not enough.
    pub fn authorize(&self, header: Option<&str>, needed: Role) -> Result<Role, Problem> {
        let Some(header) = header else {
            return Err(Problem::unauthorized(
                "send an API key as `Authorization: Bearer <key>`",
            ));
        };
        let Some(key) = header.strip_prefix("Bearer ").map(str::trim) else {
            return Err(Problem::unauthorized(
                "the Authorization header must be `Bearer <key>`",
            ));
        };
        let roles = self.roles_of(key);
        if roles.is_empty() {
            return Err(Problem::unauthorized("the API key is not known"));
        }
        match roles.iter().find(|role| role.permits(needed)) {
            Some(role) => Ok(*role),
            None => Err(Problem::forbidden(format!(
                "this endpoint needs an {} key",
                needed.name()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADMIN: &str = "admin-key-0123456789";
    const ANALYST: &str = "analyst-key-0123456789";
    const INGEST: &str = "ingest-key-0123456789";

    fn keys() -> ApiKeys {
        ApiKeys::new(&[
            (Role::Admin, &[ADMIN.into()]),
            (Role::Analyst, &[ANALYST.into()]),
            (Role::Ingest, &[INGEST.into()]),
        ])
        .unwrap()
    }

    #[test]
    fn roles_and_errors() {
        let keys = keys();
        let bearer = |key: &str| format!("Bearer {key}");
        assert_eq!(
            keys.authorize(Some(&bearer(ADMIN)), Role::Analyst),
            Ok(Role::Admin)
        );
        assert_eq!(
            keys.authorize(Some(&bearer(ADMIN)), Role::Ingest),
            Ok(Role::Admin)
        );
        assert_eq!(
            keys.authorize(Some(&bearer(ANALYST)), Role::Analyst),
            Ok(Role::Analyst)
        );
        let status = |key: Option<&str>, needed| keys.authorize(key, needed).unwrap_err().status;
        assert_eq!(status(Some(&bearer(ANALYST)), Role::Admin), 403);
        assert_eq!(status(Some(&bearer(ANALYST)), Role::Ingest), 403);
        assert_eq!(status(Some(&bearer(INGEST)), Role::Analyst), 403);
        assert_eq!(status(Some(&bearer(INGEST)), Role::Admin), 403);
        assert_eq!(
            keys.authorize(Some(&bearer(INGEST)), Role::Ingest),
            Ok(Role::Ingest)
        );
        assert_eq!(
            status(Some("Bearer nope-nope-nope-nope"), Role::Analyst),
            401
        );
        assert_eq!(status(None, Role::Analyst), 401);
        assert_eq!(status(Some(ADMIN), Role::Analyst), 401);
    }

    #[test]
    fn refuses_short_keys_naming_the_role() {
        let err = ApiKeys::new(&[(Role::Analyst, &["tiny-key".into()])]).unwrap_err();
        assert!(
            err.contains("analyst") && !err.contains("tiny-key"),
            "{err}"
        );
        assert!(ApiKeys::new(&[(Role::Admin, &["a key with spaces in it".into()])]).is_err());
        assert!(ApiKeys::new(&[(Role::Admin, &["".into()])])
            .unwrap()
            .is_empty());
    }
}
