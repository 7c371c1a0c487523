//! Signed voter tokens: a campaign vouches for a voter of one poll until an expiry.
//!
//! Format: `<expiry unix seconds>.<hex HMAC-SHA256(secret, "tally-token\0" poll_id "\0" voter_id "\0" expiry)>`.
//! A platform holding the secret can mint them itself with any HMAC library.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::problem::Problem;

fn mac(secret: &[u8], poll_id: &str, voter_id: &str, expiry: i64) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac accepts any key length");
    mac.update(b"tally-token\0");
    mac.update(poll_id.as_bytes());
    mac.update(b"\0");
    mac.update(voter_id.as_bytes());
    mac.update(b"\0");
    mac.update(expiry.to_string().as_bytes());
    mac.finalize().into_bytes().to_vec()
}

pub fn mint(secret: &[u8], poll_id: &str, voter_id: &str, expiry_unix: i64) -> String {
    format!(
        "{expiry_unix}.{}",
        hex::encode(mac(secret, poll_id, voter_id, expiry_unix))
    )
}

/// 401 when missing, 403 when forged, expired or minted for another poll or voter.
pub fn verify(
    secret: &[u8],
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
    let Some((expiry, signature)) = token.split_once('.') else {
        return Err(invalid("the token is not of the form <expiry>.<signature>"));
    };
    let (Ok(expiry), Ok(signature)) = (expiry.parse::<i64>(), hex::decode(signature)) else {
        return Err(invalid("the token is not of the form <expiry>.<signature>"));
    };
    let expected = mac(secret, poll_id, voter_id, expiry);
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

fn results_mac(secret: &[u8], poll_id: &str, expiry: i64) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac accepts any key length");
    mac.update(b"tally-results\0");
    mac.update(poll_id.as_bytes());
    mac.update(b"\0");
    mac.update(expiry.to_string().as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// A results token: proof that its holder voted on an `after_vote` poll, handed out with the
/// vote's 202. `<expiry>.<hex HMAC-SHA256(secret, "tally-results\0" poll_id "\0" expiry)>`.
pub fn mint_results(secret: &[u8], poll_id: &str, expiry_unix: i64) -> String {
    format!(
        "{expiry_unix}.{}",
        hex::encode(results_mac(secret, poll_id, expiry_unix))
    )
}

/// Whether `token` is an unexpired results token for `poll_id`.
pub fn verify_results(secret: &[u8], token: &str, poll_id: &str, now_unix: i64) -> bool {
    let Some((expiry, signature)) = token.split_once('.') else {
        return false;
    };
    let (Ok(expiry), Ok(signature)) = (expiry.parse::<i64>(), hex::decode(signature)) else {
        return false;
    };
    let expected = results_mac(secret, poll_id, expiry);
    bool::from(expected.ct_eq(&signature)) && expiry > now_unix
}

#[cfg(test)]
mod tests {
    #[test]
    fn results_tokens_are_bound_to_a_poll_and_expire() {
        let secret = b"a-secret-of-sixteen-bytes";
        let token = super::mint_results(secret, "p1", 2_000);
        assert!(super::verify_results(secret, &token, "p1", 1_999));
        assert!(!super::verify_results(secret, &token, "p2", 1_999));
        assert!(!super::verify_results(secret, &token, "p1", 2_000));
        assert!(!super::verify_results(
            b"another-secret-entirely",
            &token,
            "p1",
            1_999
        ));
        assert!(!super::verify_results(secret, "2000.zz", "p1", 1_999));
    }

    use super::*;

    #[test]
    fn matches_the_documented_python_snippet() {
        // Computed with the README's Python snippet.
        let expected =
            "2000000000.0584759e32fc8d9f70f04daa191f0c9e23ad9616bf55bebdecaeafe7cd9147b8";
        assert_eq!(
            mint(b"secret", "spring-launch", "u-123", 2_000_000_000),
            expected
        );
    }

    #[test]
    fn accepts_only_its_own_poll_voter_and_time() {
        let token = mint(b"s", "p1", "u1", 100);
        assert!(verify(b"s", Some(&token), "p1", Some("u1"), 99).is_ok());
        assert_eq!(
            verify(b"s", None, "p1", Some("u1"), 99).unwrap_err().status,
            401
        );
        assert_eq!(
            verify(b"s", Some(&token), "p2", Some("u1"), 99)
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(
            verify(b"s", Some(&token), "p1", Some("u2"), 99)
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(
            verify(b"s", Some(&token), "p1", Some("u1"), 100)
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(
            verify(b"other", Some(&token), "p1", Some("u1"), 99)
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(
            verify(b"s", Some("garbage"), "p1", Some("u1"), 99)
                .unwrap_err()
                .status,
            403
        );
    }
}
