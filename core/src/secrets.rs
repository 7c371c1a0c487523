//! The server secret and the keys derived from it, one per purpose.
//!
//! One secret (`TALLY_SECRET`) used to key voter pseudonyms, voter tokens and results tokens
//! alike, so whoever could mint tokens (an integrator) could also recompute every voter's
//! pseudonym, and a voter's pseudonym was the same in every poll. Now each purpose has its
//! own key, derived from the secret with HMAC-SHA256 over a purpose label, so holding one
//! key tells nothing about the others or the secret:
//!
//! | key | purpose | who holds it |
//! |---|---|---|
//! | pseudonym key of a poll | voter id → `voter_key`, per poll (scheme 2) | ingest only |
//! | token key | signs voter tokens (`v2.` format) | integrators that mint tokens (`tally token-key`) |
//! | results key | signs results tokens of `after_vote` polls | ingest and query |
//! | live key | signs live totals on the broker | processor and query |
//!
//! Versioned so nothing already stored changes meaning: polls created before per-poll
//! pseudonyms ([`PseudonymScheme::Global`]) keep hashing voter ids with the secret itself,
//! so their voters still count once, and they keep accepting the legacy token formats.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::vote::VoterHasher;

/// The shortest secret tally accepts, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// How a poll turns voter ids into voter keys. Stored with the poll; never changes for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum PseudonymScheme {
    /// Scheme 1 (polls created before per-poll keys): HMAC of the secret itself, the same
    /// in every poll.
    #[default]
    Global,
    /// Scheme 2: HMAC with a key derived for this poll alone, so a voter's keys in two
    /// polls cannot be linked without the secret.
    PerPoll,
}

impl From<PseudonymScheme> for u8 {
    fn from(scheme: PseudonymScheme) -> u8 {
        match scheme {
            PseudonymScheme::Global => 1,
            PseudonymScheme::PerPoll => 2,
        }
    }
}

impl TryFrom<u8> for PseudonymScheme {
    type Error = String;

    fn try_from(value: u8) -> Result<Self, String> {
        match value {
            1 => Ok(PseudonymScheme::Global),
            2 => Ok(PseudonymScheme::PerPoll),
            other => Err(format!(
                "pseudonym scheme {other} is not known to this build"
            )),
        }
    }
}

/// The server secret, and every key derived from it.
#[derive(Clone)]
pub struct Secrets {
    master: Vec<u8>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(..)")
    }
}

impl Secrets {
    /// The secret must be at least [`MIN_SECRET_BYTES`] long.
    pub fn new(master: &[u8]) -> Result<Secrets, String> {
        if master.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the server secret (TALLY_SECRET) must be at least {MIN_SECRET_BYTES} bytes"
            ));
        }
        Ok(Secrets {
            master: master.to_vec(),
        })
    }

    /// HMAC-SHA256(secret, "tally/v2/" purpose): a key for one purpose.
    fn derive(&self, purpose: &[&[u8]]) -> [u8; 32] {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.master).expect("hmac accepts any key length");
        mac.update(b"tally/v2/");
        for part in purpose {
            mac.update(part);
            mac.update(b"\0");
        }
        mac.finalize().into_bytes().into()
    }

    /// The hasher of voter ids for a poll with `scheme`.
    pub fn voter_hasher(&self, poll_id: &str, scheme: PseudonymScheme) -> VoterHasher {
        match scheme {
            PseudonymScheme::Global => VoterHasher::new(&self.master),
            PseudonymScheme::PerPoll => {
                VoterHasher::new(&self.derive(&[b"voter-pseudonym", poll_id.as_bytes()]))
            }
        }
    }

    /// Signs `v2.` voter tokens. Integrators that mint tokens hold this key, never the secret.
    pub fn token_key(&self) -> [u8; 32] {
        self.derive(&[b"voter-token"])
    }

    /// Signs `v2.` results tokens.
    pub fn results_key(&self) -> [u8; 32] {
        self.derive(&[b"results-token"])
    }

    /// Signs live totals on the broker, so a subscriber can tell them from forgeries.
    pub fn live_key(&self) -> [u8; 32] {
        self.derive(&[b"live-totals"])
    }

    /// The secret itself, for what polls of [`PseudonymScheme::Global`] still verify.
    pub fn legacy_key(&self) -> &[u8] {
        &self.master
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_purpose_has_its_own_key() {
        let secrets = Secrets::new(b"a-secret-of-enough-length").unwrap();
        let keys = [
            secrets.token_key(),
            secrets.results_key(),
            secrets.live_key(),
        ];
        assert_ne!(keys[0], keys[1]);
        assert_ne!(keys[1], keys[2]);
        assert_ne!(keys[0], keys[2]);
        assert!(keys.iter().all(|k| k[..] != secrets.master[..]));
        assert_eq!(
            secrets.token_key(),
            Secrets::new(b"a-secret-of-enough-length")
                .unwrap()
                .token_key()
        );
        assert_ne!(
            secrets.token_key(),
            Secrets::new(b"another-secret-entirely")
                .unwrap()
                .token_key()
        );
    }

    #[test]
    fn per_poll_pseudonyms_differ_between_polls_and_legacy_ones_do_not() {
        let secrets = Secrets::new(b"a-secret-of-enough-length").unwrap();
        let per_poll = |poll| {
            secrets
                .voter_hasher(poll, PseudonymScheme::PerPoll)
                .voter_key("u-1")
        };
        assert_ne!(per_poll("a"), per_poll("b"));
        assert_eq!(per_poll("a"), per_poll("a"));
        let global = |poll| {
            secrets
                .voter_hasher(poll, PseudonymScheme::Global)
                .voter_key("u-1")
        };
        assert_eq!(global("a"), global("b"));
        // Scheme 1 is exactly what every earlier version computed: existing polls' voters
        // keep their keys.
        assert_eq!(
            global("a"),
            VoterHasher::new(b"a-secret-of-enough-length").voter_key("u-1")
        );
    }

    #[test]
    fn refuses_a_short_secret() {
        assert!(Secrets::new(b"short").is_err());
    }

    #[test]
    fn schemes_are_stored_as_numbers() {
        assert_eq!(
            serde_json::to_string(&PseudonymScheme::PerPoll).unwrap(),
            "2"
        );
        assert_eq!(
            serde_json::from_str::<PseudonymScheme>("1").unwrap(),
            PseudonymScheme::Global
        );
        assert!(serde_json::from_str::<PseudonymScheme>("7").is_err());
    }
}
