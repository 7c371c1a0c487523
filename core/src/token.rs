//! Signed tokens: voter tokens (a campaign vouches for a voter of one poll until an expiry)
//! and results tokens (proof that its holder voted, for `after_vote` polls).
//!
//! Voter token: `v2.<expiry unix seconds>.<hex HMAC-SHA256(token key, "tally-token\0" poll_id
//! "\0" voter_id "\0" expiry)>`, where the token key is derived from the server secret for
//! this one purpose ([`crate::secrets::Secrets::token_key`], printed by `tally token-key`).
//! A platform holding the token key can mint tokens itself with any HMAC library; it cannot
//! recompute voter pseudonyms or sign anything else.
//!
//! Polls created before per-purpose keys ([`PseudonymScheme::Global`]) also accept the
//! legacy format `<expiry>.<signature>` signed with the secret itself, so tokens already
//! handed out keep working there.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::problem::Problem;
use crate::secrets::{PseudonymScheme, Secrets};

/// The version prefix of tokens signed with a derived key.
const V2: &str = "v2.";

fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("hmac accepts any key length");
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            mac.update(b"\0");
        }
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

fn voter_mac(key: &[u8], poll_id: &str, voter_id: &str, expiry: i64) -> Vec<u8> {
    let expiry = expiry.to_string();
    mac(
        key,
        &[
            b"tally-token",
            poll_id.as_bytes(),
            voter_id.as_bytes(),
            expiry.as_bytes(),
        ],
    )
}

fn results_mac(key: &[u8], poll_id: &str, expiry: i64) -> Vec<u8> {
    let expiry = expiry.to_string();
    mac(
        key,
        &[b"tally-results", poll_id.as_bytes(), expiry.as_bytes()],
    )
}

/// A voter token for `voter_id` in `poll_id`, signed with the token key.
pub fn mint(token_key: &[u8], poll_id: &str, voter_id: &str, expiry_unix: i64) -> String {
    format!(
        "{V2}{expiry_unix}.{}",
        crate::text::hex(&voter_mac(token_key, poll_id, voter_id, expiry_unix))
    )
}

/// A token's parts: whether it is `v2`, its expiry and its signature.
fn split(token: &str) -> Option<(bool, i64, Vec<u8>)> {
    let (v2, rest) = match token.strip_prefix(V2) {
        Some(rest) => (true, rest),
        None => (false, token),
    };
    let (expiry, signature) = rest.split_once('.')?;
    Some((v2, expiry.parse().ok()?, hex::decode(signature).ok()?))
}

/// The key a token of this form is checked with on this poll, if any.
fn key_for<'a>(
    v2: bool,
    v2_key: &'a [u8],
    secrets: &'a Secrets,
    scheme: PseudonymScheme,
) -> Option<&'a [u8]> {
    match (v2, scheme) {
        (true, _) => Some(v2_key),
        (false, PseudonymScheme::Global) => Some(secrets.legacy_key()),
        (false, PseudonymScheme::PerPoll) => None,
    }
}

/// 401 when missing, 403 when forged, expired or minted for another poll or voter.
pub fn verify(
    secrets: &Secrets,
    scheme: PseudonymScheme,
    token: Option<&str>,
    poll_id: &str,
    voter_id: Option<&str>,
    now_unix: i64,
) -> Result<(), Problem> {
    let Some(token) = token else {
        return Err(Problem::new(
            401,
            "token-required",
            "Voter token required",
            "this poll only counts votes that carry a signed voter token",
        ));
    };
    let invalid = |why: &str| {
        Problem::new(403, "invalid-token", "Invalid voter token", why.to_owned())
            .with_field("token")
    };
    let Some(voter_id) = voter_id else {
        return Err(invalid(
            "a voter token is bound to a voter_id; send the voter_id it was minted for",
        ));
    };
    let Some((v2, expiry, signature)) = split(token) else {
        return Err(invalid(
            "the token is not of the form v2.<expiry>.<signature>",
        ));
    };
    let token_key = secrets.token_key();
    let Some(key) = key_for(v2, &token_key, secrets, scheme) else {
        return Err(invalid(
            "this poll takes v2 tokens only: sign them with the token key (tally token-key)",
        ));
    };
    let expected = voter_mac(key, poll_id, voter_id, expiry);
    if !bool::from(expected.ct_eq(&signature)) {
        return Err(invalid(
            "the token's signature does not match this poll and voter",
        ));
    }
    if expiry <= now_unix {
        return Err(invalid("the token has expired"));
    }
    Ok(())
}

/// A results token: proof that its holder voted on an `after_vote` poll, handed out with the
/// vote's 202.
pub fn mint_results(secrets: &Secrets, poll_id: &str, expiry_unix: i64) -> String {
    format!(
        "{V2}{expiry_unix}.{}",
        crate::text::hex(&results_mac(&secrets.results_key(), poll_id, expiry_unix))
    )
}

/// Whether `token` is an unexpired results token for `poll_id`.
pub fn verify_results(
    secrets: &Secrets,
    scheme: PseudonymScheme,
    token: &str,
    poll_id: &str,
    now_unix: i64,
) -> bool {
    let Some((v2, expiry, signature)) = split(token) else {
        return false;
    };
    let results_key = secrets.results_key();
    let Some(key) = key_for(v2, &results_key, secrets, scheme) else {
        return false;
    };
    let expected = results_mac(key, poll_id, expiry);
    bool::from(expected.ct_eq(&signature)) && expiry > now_unix
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> Secrets {
        Secrets::new(b"a-secret-of-sixteen-bytes").unwrap()
    }

    #[test]
    fn results_tokens_are_bound_to_a_poll_and_expire() {
        let secrets = secrets();
        let scheme = PseudonymScheme::PerPoll;
        let token = mint_results(&secrets, "p1", 2_000);
        assert!(verify_results(&secrets, scheme, &token, "p1", 1_999));
        assert!(!verify_results(&secrets, scheme, &token, "p2", 1_999));
        assert!(!verify_results(&secrets, scheme, &token, "p1", 2_000));
        let other = Secrets::new(b"another-secret-entirely").unwrap();
        assert!(!verify_results(&other, scheme, &token, "p1", 1_999));
        assert!(!verify_results(&secrets, scheme, "v2.2000.zz", "p1", 1_999));
    }

    #[test]
    fn matches_the_documented_python_snippet() {
        // Computed with the README's Python snippet, given the token key's hex.
        let key = hex::decode("9f2b7c2e8d1a4b3c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4")
            .unwrap();
        assert_eq!(
            mint(&key, "spring-launch", "u-123", 2_000_000_000),
            "v2.2000000000.edf9069c77f64574be223ae3de843709e16ca27cdb6dbaa29c35bb894a0a643c"
        );
    }

    #[test]
    fn accepts_only_its_own_poll_voter_and_time() {
        let secrets = secrets();
        let scheme = PseudonymScheme::PerPoll;
        let token = mint(&secrets.token_key(), "p1", "u1", 100);
        let check = |token: Option<&str>, poll, voter| {
            verify(&secrets, scheme, token, poll, voter, 99).map_err(|p| p.status)
        };
        assert!(check(Some(&token), "p1", Some("u1")).is_ok());
        assert_eq!(check(None, "p1", Some("u1")), Err(401));
        assert_eq!(check(Some(&token), "p2", Some("u1")), Err(403));
        assert_eq!(check(Some(&token), "p1", Some("u2")), Err(403));
        assert_eq!(check(Some(&token), "p1", None), Err(403));
        assert_eq!(check(Some("garbage"), "p1", Some("u1")), Err(403));
        assert_eq!(
            verify(&secrets, scheme, Some(&token), "p1", Some("u1"), 100).map_err(|p| p.status),
            Err(403),
            "expired"
        );
        let other = Secrets::new(b"another-secret-entirely").unwrap();
        assert_eq!(
            verify(&other, scheme, Some(&token), "p1", Some("u1"), 99).map_err(|p| p.status),
            Err(403)
        );
    }

    #[test]
    fn legacy_tokens_count_only_on_legacy_polls() {
        let secrets = secrets();
        // What earlier versions minted: no prefix, signed with the secret itself.
        let legacy = format!(
            "100.{}",
            hex::encode(voter_mac(secrets.legacy_key(), "p1", "u1", 100))
        );
        assert!(verify(
            &secrets,
            PseudonymScheme::Global,
            Some(&legacy),
            "p1",
            Some("u1"),
            99
        )
        .is_ok());
        assert_eq!(
            verify(
                &secrets,
                PseudonymScheme::PerPoll,
                Some(&legacy),
                "p1",
                Some("u1"),
                99
            )
            .map_err(|p| p.status),
            Err(403)
        );
        // A v2 token signed with the secret (rather than the token key) is a forgery.
        let wrong_key = mint(secrets.legacy_key(), "p1", "u1", 100);
        assert!(verify(
            &secrets,
            PseudonymScheme::Global,
            Some(&wrong_key),
            "p1",
            Some("u1"),
            99
        )
        .is_err());
    }
}
