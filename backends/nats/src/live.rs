//! Live totals on core NATS: `tally.live.<poll>` carries full results as JSON, signed.
//!
//! Whoever may publish on `tally.live.>` could otherwise forge totals, and one forged
//! message with `as_of = u64::MAX` would freeze every live stream of its poll (the query
//! service only ever moves forward in `as_of`). So a feed with a key (derived from
//! `TALLY_SECRET`, the same in the processor and the query service) signs each message and
//! takes only messages signed with that key:
//!
//! - header [`SIGNATURE_HEADER`]: `v1=<hex HMAC-SHA256(key, payload)>`, over the exact payload
//!   bytes, so a signature cannot be moved to another payload. The payload names its poll,
//!   and the subject is not signed, so subject mappings between accounts do not break it.
//!   A replayed genuine message is accepted, and harmless: it is never ahead of the newest.
//! - a keyed subscriber drops every message whose signature is missing, unreadable or wrong,
//!   and says so in the log (at most once a minute per reason, with the count).
//! - a feed without a key signs nothing and takes everything, signed or not: the behaviour
//!   before signatures, for brokers where only tally can publish (see docs/nats/README.md).

use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::LIVE_PREFIX;
use tally_core::ports::{BoxStream, LiveFeed};
use tally_core::results::Results;
use tally_core::{Error, Result};

/// The NATS header that carries a totals message's signature.
pub const SIGNATURE_HEADER: &str = "Tally-Signature";
/// The signature scheme this build writes and reads: `v1=` + hex HMAC-SHA256 of the payload.
const SCHEME_V1: &str = "v1=";
/// How often a subscriber logs the messages it drops, per reason.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct NatsLiveFeed {
    client: async_nats::Client,
    /// Signs what this feed publishes and checks what it receives; `None`: neither.
    key: Option<[u8; 32]>,
}

impl NatsLiveFeed {
    /// A feed that signs and checks live totals with `key`
    /// (`tally_core::secrets::Secrets::live_key`), or, without one, trusts every message on
    /// `tally.live.>`.
    pub fn new(client: async_nats::Client, key: Option<[u8; 32]>) -> Self {
        if key.is_none() {
            tracing::warn!(
                "live totals are not authenticated: anyone who may publish on {LIVE_PREFIX}.> \
                 can forge them; give the processor and the query service the same TALLY_SECRET"
            );
        }
        NatsLiveFeed { client, key }
    }
}

/// The `v1=` signature of `payload` under `key`.
pub fn sign(key: &[u8; 32], payload: &[u8]) -> String {
    format!(
        "{SCHEME_V1}{}",
        tally_core::text::hex(&mac(key, payload).finalize().into_bytes())
    )
}

fn mac(key: &[u8; 32], payload: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("hmac accepts any key length");
    mac.update(payload);
    mac
}

/// Why a keyed subscriber refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// No signature header: a publisher without the key (or a forger).
    Unsigned,
    /// A signature that is unreadable or does not match: another key, or a forgery.
    BadSignature,
}

/// Whether `signature` (the header's value, if any) is `payload`'s under `key`.
fn verify(key: &[u8; 32], signature: Option<&str>, payload: &[u8]) -> Result<(), Refusal> {
    let Some(signature) = signature else {
        return Err(Refusal::Unsigned);
    };
    let tag = signature
        .strip_prefix(SCHEME_V1)
        .and_then(|hex_tag| hex::decode(hex_tag).ok())
        .ok_or(Refusal::BadSignature)?;
    // Constant-time comparison: a forger learns nothing from how fast a guess is refused.
    mac(key, payload)
        .verify_slice(&tag)
        .map_err(|_| Refusal::BadSignature)
}

/// Counts refused messages and logs them, at most once per [`DROP_LOG_INTERVAL`].
#[derive(Default)]
struct DropLog {
    last_logged: Option<Instant>,
    /// Refused since the last log line.
    unlogged: u64,
}

impl DropLog {
    fn note(&mut self, refusal: Refusal, subject: &str) {
        self.unlogged += 1;
        if self
            .last_logged
            .is_some_and(|at| at.elapsed() < DROP_LOG_INTERVAL)
        {
            return;
        }
        let dropped = std::mem::take(&mut self.unlogged);
        self.last_logged = Some(Instant::now());
        match refusal {
            Refusal::Unsigned => tracing::warn!(
                subject,
                dropped,
                "dropping unsigned live totals: give every service the same TALLY_SECRET"
            ),
            Refusal::BadSignature => tracing::warn!(
                subject,
                dropped,
                "dropping live totals with a wrong signature: forged, or signed with another \
                 TALLY_SECRET; give every service the same one"
            ),
        }
    }
}

/// What a subscriber keeps: everything without a key, only signed messages with one.
struct Gate {
    key: Option<[u8; 32]>,
    unsigned: DropLog,
    bad_signature: DropLog,
}

impl Gate {
    fn admit(&mut self, message: &async_nats::Message) -> bool {
        let Some(key) = &self.key else {
            return true;
        };
        let signature = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(SIGNATURE_HEADER))
            .map(|value| value.as_str());
        match verify(key, signature, &message.payload) {
            Ok(()) => true,
            Err(refusal) => {
                let log = match refusal {
                    Refusal::Unsigned => &mut self.unsigned,
                    Refusal::BadSignature => &mut self.bad_signature,
                };
                log.note(refusal, message.subject.as_str());
                false
            }
        }
    }
}

#[async_trait]
impl LiveFeed for NatsLiveFeed {
    async fn publish(&self, results: &Results) -> Result<()> {
        let payload = serde_json::to_vec(results).map_err(|e| Error::failed("live feed", e))?;
        let subject = format!("{LIVE_PREFIX}.{}", results.poll_id);
        let sent = match &self.key {
            Some(key) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(SIGNATURE_HEADER, sign(key, &payload).as_str());
                self.client
                    .publish_with_headers(subject, headers, payload.into())
                    .await
            }
            None => self.client.publish(subject, payload.into()).await,
        };
        sent.map_err(|e| Error::unavailable("live feed", e))
    }

    async fn subscribe(&self) -> Result<BoxStream<Results>> {
        let subscriber = self
            .client
            .subscribe(format!("{LIVE_PREFIX}.>"))
            .await
            .map_err(|e| Error::unavailable("live feed", e))?;
        // Sends the SUB now rather than with the next write. (A flush is no round trip: the
        // server registers the interest a moment later, and totals published before that are
        // not seen here; the next ones replace them.)
        self.client
            .flush()
            .await
            .map_err(|e| Error::unavailable("live feed", e))?;
        let mut gate = Gate {
            key: self.key,
            unsigned: DropLog::default(),
            bad_signature: DropLog::default(),
        };
        let stream = subscriber.filter_map(move |message| {
            // Checked here, synchronously: the gate's counters belong to this stream alone.
            let results = gate.admit(&message).then(|| decode(&message)).flatten();
            std::future::ready(results)
        });
        Ok(Box::pin(stream))
    }
}

fn decode(message: &async_nats::Message) -> Option<Results> {
    match serde_json::from_slice::<Results>(&message.payload) {
        Ok(results) => Some(results),
        Err(err) => {
            tracing::warn!(subject = %message.subject, error = %err, "undecodable live totals");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    #[test]
    fn a_signature_holds_for_its_payload_and_key_only() {
        let payload = br#"{"poll_id":"p","as_of":3}"#;
        let signature = sign(&KEY, payload);
        assert!(signature.starts_with("v1="), "{signature}");
        assert_eq!(signature.len(), 3 + 64);
        assert_eq!(verify(&KEY, Some(&signature), payload), Ok(()));

        let other_payload = br#"{"poll_id":"p","as_of":18446744073709551615}"#;
        assert_eq!(
            verify(&KEY, Some(&signature), other_payload),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            verify(&[8; 32], Some(&signature), payload),
            Err(Refusal::BadSignature)
        );
        assert_eq!(verify(&KEY, None, payload), Err(Refusal::Unsigned));
        for unreadable in ["", "v1=", "v1=zz", "v2=00", &signature[3..]] {
            assert_eq!(
                verify(&KEY, Some(unreadable), payload),
                Err(Refusal::BadSignature),
                "{unreadable:?}"
            );
        }
    }

    #[test]
    fn drops_are_logged_at_most_once_a_minute_with_their_count() {
        let mut log = DropLog::default();
        log.note(Refusal::Unsigned, "tally.live.p");
        assert_eq!(log.unlogged, 0, "the first drop is logged at once");
        log.note(Refusal::Unsigned, "tally.live.p");
        log.note(Refusal::Unsigned, "tally.live.p");
        assert_eq!(log.unlogged, 2, "later drops wait for the next line");
        log.last_logged = Instant::now().checked_sub(DROP_LOG_INTERVAL);
        log.note(Refusal::Unsigned, "tally.live.p");
        assert_eq!(log.unlogged, 0, "counted into the next line");
    }
}
