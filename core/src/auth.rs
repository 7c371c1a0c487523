//! API keys with roles. Keys are held only as SHA-256 digests and compared in constant time
//! against every configured key, so neither timing nor memory reveals them.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::problem::Problem;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Analyst,
    /// Admins may do everything analysts may.
    Admin,
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
    pub fn new(admin: &[String], analyst: &[String]) -> Self {
        let digest = |key: &String| -> [u8; 32] { Sha256::digest(key.as_bytes()).into() };
        let mut digests: Vec<_> = admin
            .iter()
            .filter(|k| !k.is_empty())
            .map(|k| (digest(k), Role::Admin))
            .collect();
        digests.extend(
            analyst
                .iter()
                .filter(|k| !k.is_empty())
                .map(|k| (digest(k), Role::Analyst)),
        );
        ApiKeys { digests }
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    fn role_of(&self, key: &str) -> Option<Role> {
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        for (digest, role) in &self.digests {
            if bool::from(digest.ct_eq(&presented)) {
                found = found.max(Some(*role));
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
        let Some(role) = self.role_of(key) else {
            return Err(Problem::unauthorized("the API key is not known"));
        };
        if role < needed {
            let needed = match needed {
                Role::Admin => "admin",
                Role::Analyst => "analyst",
            };
            return Err(Problem::forbidden(format!(
                "this endpoint needs an {needed} key"
            )));
        }
        Ok(role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_errors() {
        let keys = ApiKeys::new(&["adm".into()], &["ana".into()]);
        assert_eq!(
            keys.authorize(Some("Bearer adm"), Role::Analyst),
            Ok(Role::Admin)
        );
        assert_eq!(
            keys.authorize(Some("Bearer ana"), Role::Analyst),
            Ok(Role::Analyst)
        );
        assert_eq!(
            keys.authorize(Some("Bearer ana"), Role::Admin)
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(
            keys.authorize(Some("Bearer nope"), Role::Analyst)
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(keys.authorize(None, Role::Analyst).unwrap_err().status, 401);
        assert_eq!(
            keys.authorize(Some("adm"), Role::Analyst)
                .unwrap_err()
                .status,
            401
        );
    }
}
