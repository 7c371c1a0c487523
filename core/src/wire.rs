//! The versioned wire format of a vote on the bus: a JSON object whose `v` field names the
//! format version. Decoders reject versions they do not know instead of guessing.

use serde::{Deserialize, Serialize};

use crate::segment::Segment;
use crate::vote::Vote;
use crate::{Error, Result};

pub const VERSION: u32 = 1;

/// The event as written: `v`, then the vote's own fields. Spelled out rather than
/// `#[serde(flatten)]`ed, which would serialize through a map and, when reading, buffer
/// every field before handing it over.
#[derive(Serialize)]
struct EnvelopeRef<'a> {
    v: u32,
    vote_id: &'a str,
    poll_id: &'a str,
    voter_key: &'a str,
    choice: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<i32>,
    segment: &'a Segment,
    received_at: i64,
}

#[derive(Deserialize)]
struct Envelope {
    v: u32,
    vote_id: String,
    poll_id: String,
    voter_key: String,
    choice: Vec<String>,
    #[serde(default)]
    value: Option<i32>,
    #[serde(default)]
    segment: Segment,
    received_at: i64,
}

pub fn encode(vote: &Vote) -> Vec<u8> {
    // Sized for a typical vote, so the buffer is not regrown as it fills.
    let mut out = Vec::with_capacity(256);
    let envelope = EnvelopeRef {
        v: VERSION,
        vote_id: &vote.vote_id,
        poll_id: &vote.poll_id,
        voter_key: &vote.voter_key,
        choice: &vote.choice,
        value: vote.value,
        segment: &vote.segment,
        received_at: vote.received_at,
    };
    serde_json::to_writer(&mut out, &envelope).expect("votes always serialize");
    out
}

pub fn decode(bytes: &[u8]) -> Result<Vote> {
    let envelope: Envelope =
        serde_json::from_slice(bytes).map_err(|e| Error::corrupt("vote event", e))?;
    if envelope.v != VERSION {
        return Err(Error::corrupt(
            "vote event",
            format!(
                "event version {} is not supported (this build reads {VERSION})",
                envelope.v
            ),
        ));
    }
    Ok(Vote {
        vote_id: envelope.vote_id,
        poll_id: envelope.poll_id,
        voter_key: envelope.voter_key,
        choice: envelope.choice,
        value: envelope.value,
        segment: envelope.segment,
        received_at: envelope.received_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(vote_id in "[a-z0-9-]{1,40}", poll in "[a-z0-9]{1,20}", key in "[0-9a-f]{0,32}",
                       choice in proptest::collection::vec("\\PC{0,10}", 1..4), value in proptest::option::of(-1000i32..1000),
                       country in "[A-Z]{2}", custom in proptest::collection::btree_map("[a-z]{1,5}", "\\PC{0,20}", 0..3),
                       at in 0i64..4_000_000_000_000) {
            let vote = Vote { vote_id, poll_id: poll, voter_key: key, choice, value,
                segment: Segment { country, custom, ..Segment::default() }, received_at: at };
            prop_assert_eq!(decode(&encode(&vote)).unwrap(), vote);
        }

        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }

    /// The format on the bus: events written by earlier builds must stay readable, so
    /// this pins the exact bytes.
    #[test]
    fn writes_the_pinned_format() {
        let vote = Vote {
            vote_id: "v1".into(),
            poll_id: "p".into(),
            voter_key: "ab".into(),
            choice: vec!["red".into()],
            value: Some(7),
            segment: Segment {
                country: "DE".into(),
                custom: [("plan".to_owned(), "pro".to_owned())].into(),
                ..Segment::default()
            },
            received_at: 5,
        };
        let expected = r#"{"v":1,"vote_id":"v1","poll_id":"p","voter_key":"ab","choice":["red"],"value":7,"segment":{"country":"DE","custom":{"plan":"pro"}},"received_at":5}"#;
        assert_eq!(String::from_utf8(encode(&vote)).unwrap(), expected);
        assert_eq!(decode(expected.as_bytes()).unwrap(), vote);
        // Fields in another order, unknown fields and a missing segment are read as before.
        let other = decode(
            br#"{"received_at":5,"choice":["red"],"later":true,"voter_key":"","poll_id":"p","vote_id":"v2","v":1}"#,
        )
        .unwrap();
        assert_eq!(other.segment, Segment::default());
        assert_eq!(other.value, None);
    }

    #[test]
    fn rejects_unknown_versions() {
        assert!(decode(
            br#"{"v":2,"vote_id":"a","poll_id":"p","voter_key":"","choice":[],"received_at":1}"#
        )
        .is_err());
    }
}
